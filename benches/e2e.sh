#!/usr/bin/env bash
# End-to-end load: a redis-server and two volley nodes on 127.0.0.1, driven by volley-bench.
#
#   benches/e2e.sh SCENARIO [--set KEY=VALUE ...]      SCENARIO: scoreboard | ticker | saturate
#   NODES=1 benches/e2e.sh ticker                      one node on the embedded broker
#   SHARDS=3 benches/e2e.sh ticker                     three independent Redis (redis.shards)
#   CLUSTER=3 benches/e2e.sh ticker                    a 3-master Redis Cluster (redis.cluster_nodes)
#   WARMUP=3 DURATION=10 benches/e2e.sh scoreboard     seconds
#   BENCH_ARGS="--rate 4000" benches/e2e.sh ticker     extra volley-bench flags
#   PREBUILT=DIR benches/e2e.sh ticker               use DIR/volley, DIR/volley-bench (no build)
#   FLAMEGRAPH=NAME benches/e2e.sh ticker              record the nodes with perf and write
#                                                      flamegraphs/NAME.svg (frame pointers,
#                                                      see flamegraphs/README.md)
#
# --set flags go to both nodes (e.g. --set batch.delivery_window_ms=10). Prints the
# bench's report, with the Redis commands and pipelines per second during the measured
# seconds (the bench reads INFO and the nodes' /healthz at its start and end). Everything it
# starts, it stops. Installs redis-server (Debian) if it is missing.
# `saturate` runs the ticker load at doubling rates (RATES="2000 4000 ...") until a step
# loses messages or its p99 passes 1 s, and reports the highest rate held.
# The nodes' api.key is "bench": BENCH_ARGS="--via api --api-key bench" publishes over HTTP.
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
source benches/flamegraph.sh
bin=$(bench_bins)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# A cluster node's bus listens on its port + 10000: both must be free, and below the
# ephemeral range (32768+), where client connections could take them.
cluster_port() {
  python3 -c '
import random, socket
def free(p):
    s = socket.socket()
    try: s.bind(("127.0.0.1", p)); return True
    except OSError: return False
    finally: s.close()
while True:
    p = random.randrange(20000, 22700)
    if free(p) and free(p + 10000): print(p); break'
}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

redis_args=(); bench_redis=(); shard_pids=(); shard_ports=(); cluster_dir=""
if [ "$nodes" -gt 1 ]; then
  # SHARDS=N: N independent Redis servers (redis.shards) instead of one (redis.url).
  # CLUSTER=N: an N-master Redis Cluster (redis.cluster_nodes), slots split evenly.
  shard_urls=()
  cluster_dir=$(mktemp -d); cluster_args=()
  [ -n "${CLUSTER:-}" ] && cluster_args=(--cluster-enabled yes --cluster-config-file nodes.conf --dir "$cluster_dir")
  for i in $(seq "${CLUSTER:-${SHARDS:-1}}"); do
    rport=$(free_port)
    [ -n "${CLUSTER:-}" ] && { rport=$(cluster_port); mkdir -p "$cluster_dir/$i"; cluster_args[5]="$cluster_dir/$i"; }
    redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no "${cluster_args[@]}" >/dev/null &
    pids+=($!); shard_pids+=($!); shard_ports+=("$rport")
    for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done
    shard_urls+=("redis://127.0.0.1:$rport")
  done
  redis_pid=${shard_pids[0]}
  if [ -n "${CLUSTER:-}" ]; then
    addrs=(); for p in "${shard_ports[@]}"; do addrs+=("127.0.0.1:$p"); done
    redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
    for p in "${shard_ports[@]}"; do
      for _ in $(seq 200); do redis-cli -p "$p" cluster info | grep -q cluster_state:ok && break; sleep 0.05; done
    done
    redis_args=(--set "redis.cluster_nodes=[\"${shard_urls[0]}\"]")
  elif [ "${SHARDS:-1}" -gt 1 ]; then
    list=$(printf '"%s",' "${shard_urls[@]}")
    redis_args=(--set "redis.shards=[${list%,}]")
  else
    redis_args=(--set "redis.url=${shard_urls[0]}")
  fi
  # The bench reads the first Redis' command rates and CPU; per-shard CPU is printed below.
  bench_redis=(--redis-url "${shard_urls[0]}" --redis-pid "$redis_pid")
fi
shard_cpu() { for p in "${shard_pids[@]}"; do awk '{print $14+$15}' "/proc/$p/stat"; done | paste -sd' '; }
shard_cmds() {
  for p in "${shard_ports[@]}"; do
    redis-cli -p "$p" info stats | tr -d '\r' | awk -F: '/^total_commands_processed:/ {print $2}'
  done | paste -sd' '
}
cpu_before=$(shard_cpu); cmds_before=$(shard_cmds)

urls=(); node_pids=(); node_http=()
for i in $(seq "$nodes"); do
  port=$(free_port)
  node_cmd=("$bin/volley" --listen "127.0.0.1:$port" --node-id "bench-$i" --log warn
    --set limits.publish_rate=0 --set api.key=bench "${redis_args[@]}" "$@")
  "${node_cmd[@]}" &
  node_pid=$!
  [ -z "${FLAMEGRAPH:-}" ] || flame_record "$node_pid" "$i"
  pids+=("$node_pid"); node_pids+=("$node_pid")
  urls+=(--url "ws://127.0.0.1:$port/ws")
  node_http+=("127.0.0.1:$port")
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.05; done
done
if [ "$nodes" -gt 1 ]; then
  for hp in "${node_http[@]}"; do
    for _ in $(seq 100); do curl -sf "http://$hp/readyz" >/dev/null 2>&1 && break; sleep 0.05; done
  done
fi

pid_args=(); for p in "${node_pids[@]}"; do pid_args+=(--pid "$p"); done
if [ "$scenario" = saturate ]; then
  best=0; best_line=""
  for rate in ${RATES:-2000 4000 8000 16000 32000 64000 128000 256000}; do
    # shellcheck disable=SC2086
    line=$("$bin/volley-bench" --scenario ticker --rate "$rate" "${urls[@]}" "${pid_args[@]}" "${bench_redis[@]}" \
      --warmup "$warmup" --duration "$duration" --json ${BENCH_ARGS:-}) || break
    held=$(python3 -c 'import sys, json; r = json.loads(sys.argv[1]); print(int(r["lost"] == 0 and r["failed_sockets"] == 0 and r["latency_ms"]["p99"] <= 1000))' "$line")
    python3 -c 'import sys, json; r = json.loads(sys.argv[1]); print("rate %6d msg/s: delivered/s %9.0f  lost %d  p50 %.1f ms  p99 %.1f ms  cpu %s us/delivery  %s" % (r["rate"], r["delivered_per_s"], r["lost"], r["latency_ms"]["p50"], r["latency_ms"]["p99"], "%.2f" % r["server_cpu_us_per_delivery"] if r["server_cpu_us_per_delivery"] else "-", "held" if sys.argv[2] == "1" else "NOT held"))' "$line" "$held"
    [ "$held" = 1 ] || break
    best=$rate; best_line=$line
  done
  if [ -n "$best_line" ]; then
    python3 -c 'import sys, json; r = json.loads(sys.argv[1]); print("highest rate held: %d msg/s = %.0f deliveries/s" % (r["rate"], r["delivered_per_s"]))' "$best_line"
  else
    echo "no rate held"
  fi
else
  # shellcheck disable=SC2086
  "$bin/volley-bench" --scenario "$scenario" "${urls[@]}" "${pid_args[@]}" "${bench_redis[@]}" \
    --warmup "$warmup" --duration "$duration" ${BENCH_ARGS:-}
fi

if [ "${#shard_pids[@]}" -gt 1 ]; then
  # CPU ticks and commands of each shard over the whole run (start-up and warm-up included).
  echo "redis shard CPU ticks: before [$cpu_before] after [$(shard_cpu)]" >&2
  echo "redis shard commands: before [$cmds_before] after [$(shard_cmds)]" >&2
fi
[ -z "$cluster_dir" ] || rm -rf "$cluster_dir"

if [ -n "${FLAMEGRAPH:-}" ]; then
  for p in "${node_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # perf writes its data when the process it follows exits.
  flame_stop
  flame_write "volley $scenario: $FLAMEGRAPH"
fi
