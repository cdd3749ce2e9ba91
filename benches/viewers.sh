#!/usr/bin/env bash
# Many viewers of one room: a redis-server, NODES volley nodes on it, and the viewers
# spread over SHARDS volley-bench processes (no process passes the 20 000 file limit),
# their reports merged into one.
#
#   benches/viewers.sh                                  20 000 viewers, 2 nodes, 2 shards
#   VIEWERS=100000 NODES=7 SHARDS=7 benches/viewers.sh  the cup final
#   RATE=1 DURATION=20 benches/viewers.sh               goals per second, seconds measured
#   PREBUILT=target/release benches/viewers.sh          no build
#   BENCH_ARGS="--connect-concurrency 1000" ...         more volley-bench flags
#   NODE_ARGS="--set server.io_uring=true" ...          more flags for every node
#   FLAMEGRAPH=NAME benches/viewers.sh                 the nodes under perf in the measured
#                                                      seconds: flamegraphs/NAME.svg
#   SIDE_VIEWERS=200 SIDE_RATE=10 benches/viewers.sh    a second room meanwhile: its viewers
#                                                      spread over the nodes, its own small
#                                                      steady traffic, its own report
#
# Every shard connects its share (spread over 8 loopback source addresses), confirms its
# joins (probes: one room is far past limits.notices_max_members), then all shards
# measure the same seconds (--start-at). The merged report: published, expected over
# every viewer, delivered, lost; latency percentiles over every delivery (merged
# exactly); the connect + join storm per shard and in all; the nodes' and Redis' CPU per
# delivery, and each node's memory per viewer at the end. Everything it starts, it stops.
set -euo pipefail
cd "$(dirname "$0")/.."

viewers=${VIEWERS:-20000}
nodes=${NODES:-2}
shards=${SHARDS:-$(( (viewers + 14999) / 15000 ))}
rate=${RATE:-1}
duration=${DURATION:-20}
join_budget_s=${JOIN_BUDGET_S:-$(( 20 + viewers / 2000 ))}
side_viewers=${SIDE_VIEWERS:-0}
side_rate=${SIDE_RATE:-10}

command -v redis-server >/dev/null 2>&1 || {
  as_root=""; [ "$(id -u)" -eq 0 ] || as_root="sudo"
  DEBIAN_FRONTEND=noninteractive $as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq --no-install-recommends redis-server >/dev/null
}
source benches/flamegraph.sh
bin=$(bench_bins)
ulimit -n "$(ulimit -Hn)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
# Stopped in reverse: load processes, then nodes, then Redis.
cleanup() { for (( i=${#pids[@]}-1; i>=0; i-- )); do kill "${pids[$i]}" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
redis_pid=$!; pids+=("$redis_pid")
for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done

per_node=$(( viewers / nodes + 1000 ))
urls=(); node_pids=()
for i in $(seq "$nodes"); do
  port=$(free_port)
  "$bin/volley" --listen "127.0.0.1:$port" --node-id "viewers-$i" --log warn \
    --set "redis.url=redis://127.0.0.1:$rport" --set limits.publish_rate=0 \
    --set limits.join_rate=0 --set "limits.max_connections=$per_node" ${NODE_ARGS:-} &
  pids+=($!); node_pids+=($!)
  urls+=(--url "ws://127.0.0.1:$port/ws")
  for _ in $(seq 200); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.05; done
done
pid_args=(); for p in "${node_pids[@]}"; do pid_args+=(--pid "$p"); done

start_at=$(( $(date +%s%3N) + join_budget_s * 1000 ))
out=$(mktemp -d)
shard_pids=()
for i in $(seq 0 $(( shards - 1 ))); do
  extra=()
  [ "$i" -eq 0 ] && extra=("${pid_args[@]}" --redis-pid "$redis_pid" --redis-url "redis://127.0.0.1:$rport")
  # shellcheck disable=SC2086
  "$bin/volley-bench" "${urls[@]}" --sockets "$viewers" --rooms 1 --publishers 1 --rate "$rate" \
    --shard "$i/$shards" --start-at "$start_at" --duration "$duration" --source-addrs 8 \
    --room-prefix "viewers-$$" --json "${extra[@]}" ${BENCH_ARGS:-} > "$out/$i.json" 2> "$out/$i.err" &
  shard_pids+=($!); pids+=($!)
done
if [ "$side_viewers" -gt 0 ]; then
  "$bin/volley-bench" "${urls[@]}" --sockets "$side_viewers" --rooms 1 --publishers 1 \
    --rate "$side_rate" --start-at "$start_at" --duration "$duration" \
    --room-prefix "side-$$" > "$out/side.txt" 2> "$out/side.err" &
  shard_pids+=($!); pids+=($!)
fi
sleep_until() {
  local ms=$(( $1 - $(date +%s%3N) ))
  [ "$ms" -le 0 ] || sleep "$(( ms / 1000 )).$(printf '%03d' $(( ms % 1000 )))"
}
if [ -n "${FLAMEGRAPH:-}" ]; then
  # The measured seconds only: from --start-at, every viewer joined, until the load
  # processes stop (their sockets closing is not the goals' cost).
  sleep_until "$start_at"
  for i in "${!node_pids[@]}"; do flame_record "${node_pids[$i]}" "$i"; done
  sleep_until "$(python3 -c "print(int($start_at + $duration * 1000))")"
  flame_stop
fi
failed=0
for p in "${shard_pids[@]}"; do wait "$p" || failed=1; done
if [ "$failed" -ne 0 ]; then
  for i in $(seq 0 $(( shards - 1 ))); do sed "s/^/shard $i: /" "$out/$i.err"; done
  [ "$side_viewers" -gt 0 ] && sed "s/^/second room: /" "$out/side.err"
  exit 1
fi
python3 benches/merge_shards.py "$out"/[0-9]*.json
if [ "$side_viewers" -gt 0 ]; then
  echo "second room ($side_viewers viewers, $side_rate msg/s) meanwhile:"
  grep -E "^(published|latency)" "$out/side.txt" | sed 's/^/  /'
fi
# The nodes' memory, every viewer still connected.
for p in "${node_pids[@]}"; do
  kib=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status")
  echo "node $p: RSS $(( kib / 1024 )) MB = $(python3 -c "print(f'{$kib / ($viewers / $nodes):.1f}')") KiB per viewer"
done
rm -rf "$out"
[ -z "${FLAMEGRAPH:-}" ] || flame_write "volley: one room, $viewers viewers on $nodes nodes, $rate goals/s"
