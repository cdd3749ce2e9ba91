#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 120 s each) on the nightly
# toolchain, then copies any crash inputs into fuzz/regressions/TARGET/, where
# tests/fuzz_regressions.rs runs them on stable with `cargo test`.
#
#   cargo install cargo-fuzz        (once)
#   bash fuzz/run.sh [SECONDS] [TARGET ...]
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-120}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(client_frame publish_body envelope frame_reader config)
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "regressions/$t"
  cp -n "regressions/$t"/* "corpus/$t"/ 2>/dev/null || true
  echo "== $t ($seconds s)"
  cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 2>&1 \
    | grep -E "DONE|Done [0-9]+ runs|ERROR|SUMMARY|stat::number_of_executed_units" || true
  for crash in artifacts/"$t"/crash-* artifacts/"$t"/timeout-* artifacts/"$t"/oom-*; do
    if [ -e "$crash" ]; then cp "$crash" "regressions/$t/"; fi
  done
done
