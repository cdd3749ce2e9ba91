#!/usr/bin/env bash
# End-to-end load: a redis-server and two volley nodes on 127.0.0.1, driven by volley-bench.
#
#   benches/e2e.sh SCENARIO [--set KEY=VALUE ...]      SCENARIO: scoreboard | ticker
#   NODES=1 benches/e2e.sh ticker                      one node on the embedded broker
#   WARMUP=3 DURATION=10 benches/e2e.sh scoreboard     seconds
#   BENCH_ARGS="--rate 4000" benches/e2e.sh ticker     extra volley-bench flags
#
# --set flags go to both nodes (e.g. --set batch.delivery_window_ms=10). Prints the
# bench's report, then the Redis commands and pipelines per second it saw. Everything it
# starts, it stops. Installs redis-server (Debian) if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

scenario=${1:?usage: benches/e2e.sh scoreboard|ticker [--set KEY=VALUE ...]}
shift
nodes=${NODES:-2}
warmup=${WARMUP:-3}
duration=${DURATION:-10}

if [ "$nodes" -gt 1 ] && ! command -v redis-server >/dev/null 2>&1; then
  as_root=""; [ "$(id -u)" -eq 0 ] || as_root="sudo"
  DEBIAN_FRONTEND=noninteractive $as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi
cargo build --release --locked --bins -q

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

redis_args=()
if [ "$nodes" -gt 1 ]; then
  rport=$(free_port)
  redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
  pids+=($!)
  for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done
  redis_args=(--set "redis.url=redis://127.0.0.1:$rport")
fi

urls=(); node_pids=(); node_http=()
for i in $(seq "$nodes"); do
  port=$(free_port)
  target/release/volley --listen "127.0.0.1:$port" --node-id "bench-$i" --log warn \
    --set limits.publish_rate=0 "${redis_args[@]}" "$@" &
  pids+=($!); node_pids+=($!)
  urls+=(--url "ws://127.0.0.1:$port/ws")
  node_http+=("127.0.0.1:$port")
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.05; done
done
if [ "$nodes" -gt 1 ]; then
  for hp in "${node_http[@]}"; do
    for _ in $(seq 100); do curl -sf "http://$hp/readyz" >/dev/null 2>&1 && break; sleep 0.05; done
  done
  redis-cli -p "$rport" config resetstat >/dev/null
fi
pipelines_now() {
  for hp in "${node_http[@]}"; do curl -sf "http://$hp/healthz"; echo; done |
    python3 -c 'import sys, json; print(sum(json.loads(l).get("redis_pipelines", 0) for l in sys.stdin if l.strip()))'
}
pipelines_before=$(pipelines_now)

pid_args=(); for p in "${node_pids[@]}"; do pid_args+=(--pid "$p"); done
# shellcheck disable=SC2086
target/release/volley-bench --scenario "$scenario" "${urls[@]}" "${pid_args[@]}" \
  --warmup "$warmup" --duration "$duration" ${BENCH_ARGS:-}

if [ "$nodes" -gt 1 ]; then
  # The stats cover warm-up, measurement and drain: divide by the whole run.
  secs=$(python3 -c "print($warmup + $duration)")
  redis-cli -p "$rport" info commandstats | tr -d '\r' | awk -F'[:=,]' -v s="$secs" '
    /^cmdstat_publish:/ { printf "redis PUBLISH commands/s %.0f\n", $3 / s }'
  redis-cli -p "$rport" info stats | tr -d '\r' | awk -F: -v s="$secs" '
    /^total_commands_processed:/ { printf "redis commands/s (all) %.0f\n", $2 / s }'
  python3 -c "print('publish pipelines/s (both nodes) %.1f' % (($(pipelines_now) - $pipelines_before) / $secs))"
fi
