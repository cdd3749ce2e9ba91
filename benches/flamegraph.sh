# Sourced by the load scripts (e2e.sh, boards.sh, viewers.sh) for FLAMEGRAPH=NAME: frame-
# pointer binaries, perf following node processes, and the SVG in flamegraphs/.
#
#   bench_bins             the directory of the binaries to run: the frame-pointer build
#                          for FLAMEGRAPH, PREBUILT as given, else a release build
#   flame_build            builds the frame-pointer binaries (target/fp, profile
#                          release-with-debug) and prints their directory
#   flame_record PID TAG   starts perf on a node process (cpu-clock, 997 Hz, call graphs);
#                          its pid is added to flame_pids
#   flame_stop             stops every recording (SIGINT) and waits for perf to write
#   flame_write TITLE      writes flamegraphs/$FLAMEGRAPH.svg from every recording
#                          (the folded stacks stay in target/$FLAMEGRAPH.folded)

flame_pids=()
flame_data=()

flame_build() {
  command -v perf >/dev/null || { echo "FLAMEGRAPH needs perf (Debian: linux-perf)" >&2; exit 1; }
  command -v inferno-flamegraph >/dev/null || { echo "FLAMEGRAPH needs inferno (cargo install inferno)" >&2; exit 1; }
  # Frame pointers give perf reliable stacks; a separate target dir keeps the normal build.
  RUSTFLAGS=-Cforce-frame-pointers=yes CARGO_TARGET_DIR=target/fp \
    cargo build --profile release-with-debug --locked --bins -q >&2
  echo target/fp/release-with-debug
}

bench_bins() {
  if [ -n "${FLAMEGRAPH:-}" ]; then
    flame_build
  elif [ -n "${PREBUILT:-}" ]; then
    echo "$PREBUILT"   # prebuilt volley and volley-bench, e.g. to keep editing while it runs
  else
    cargo build --release --locked --bins -q >&2
    echo target/release
  fi
}

flame_record() {
  local data="target/perf-$FLAMEGRAPH-$2.data"
  perf record -e cpu-clock -F 997 -g -o "$data" -p "$1" 2>/dev/null &
  flame_pids+=($!)
  flame_data+=("$data")
}

flame_stop() {
  local p
  for p in "${flame_pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  for p in "${flame_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  flame_pids=()
}

flame_write() {
  local d
  mkdir -p flamegraphs
  for d in "${flame_data[@]}"; do perf script -i "$d" 2>/dev/null; done |
    inferno-collapse-perf > "target/$FLAMEGRAPH.folded"
  inferno-flamegraph --title "$1" < "target/$FLAMEGRAPH.folded" > "flamegraphs/$FLAMEGRAPH.svg"
  echo "wrote flamegraphs/$FLAMEGRAPH.svg"
}
