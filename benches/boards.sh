#!/usr/bin/env bash
# Boards (state rooms) end to end: one 5 000-symbol board in one room, 500 sockets, 2 000
# realistic quotes a second (about 150 bytes, the volume and time change per update),
# measured by volley-bench in board mode against a release node on 127.0.0.1.
#
#   benches/boards.sh                 the modes, alternated, 3 rounds; medians printed
#   ROUNDS=1 DURATION=5 benches/boards.sh
#   PREBUILT=DIR benches/boards.sh    use DIR/volley and DIR/volley-bench (no build)
#   ONLY=redis benches/boards.sh      only the Redis CPU comparison
#   ONLY=snapshot benches/boards.sh   only the snapshots (the board filled first)
#   FLAMEGRAPH=NAME benches/boards.sh one delta run with the node under perf, written to
#                                     flamegraphs/NAME.svg (frame-pointer build in target/fp,
#                                     as benches/e2e.sh; needs perf and inferno)
#
# Modes (each round runs every mode once, in this order, on a fresh room):
#   plain       subscribers take every update in full
#   conflated   the class conflates by symbol (window 50 ms): superseded quotes dropped
#   plain+deflate  plain, with permessage-deflate (compress-once frames)
#   delta       subscribers join with delta:"fossil"
#   delta+deflate  the same, with permessage-deflate (compress-once frames)
# (after plain, the snapshot of its full board: one joiner, then a storm of 500 joiners
# at once); then, on a redis-server, Redis CPU per update of the board against a plain
# durable room, and the storm of 500 on Redis.
# Reported: wire bytes per update per subscriber, server CPU per delivery, snapshot ms,
# Redis CPU µs per update. Board mode counts deliveries by arrival within the measured
# seconds (a delta carries no send time), so "lost" is only the window's edge, not loss
# (the tests count loss). Everything it starts, it stops.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${ROUNDS:-3}
duration=${DURATION:-10}
symbols=${SYMBOLS:-5000}
sockets=${SOCKETS:-500}
rate=${RATE:-2000}
source benches/flamegraph.sh
bin=$(bench_bins)
command -v redis-server >/dev/null || { echo "needs redis-server (Debian: redis-server)"; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
out=$(mktemp -d)
config="$out/volley.toml"
cat > "$config" <<EOF
[limits]
publish_rate = 0
[compression]
enabled = true
[[rooms]]
match = "conf-*"
state_key = "symbol"
conflate = "symbol"
state_max_keys = $symbols
[[rooms]]
match = "durable-*"
history_size = 1000
[[rooms]]
match = "*"
state_key = "symbol"
delta = "fossil"
state_max_keys = $symbols
EOF

start_node() { # $1: extra flags; sets node_pid, url
  local port; port=$(free_port)
  # shellcheck disable=SC2086
  "$bin/volley" --config "$config" --listen "127.0.0.1:$port" --node-id "boards" --log warn $1 &
  node_pid=$!; pids+=("$node_pid")
  url="ws://127.0.0.1:$port/ws"
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.05; done
}
bench() { # $1: label, then volley-bench flags
  local label=$1; shift
  "$bin/volley-bench" --url "$url" --pid "$node_pid" --publishers 2 --rate "${rate_now:-$rate}" \
    --sockets "${n:-$sockets}" --board "$symbols" --warmup "${warm:-3}" --duration "${secs:-$duration}" --json "$@" \
    | sed "s/^/{\"mode\":\"$label\",\"r\":/; s/\$/}/" >> "$out/runs.jsonl"
}

start_node ""
if [ -n "${FLAMEGRAPH:-}" ]; then
  # One delta run (its connects and warm-up too): the node's fan-out, deltas and writes.
  flame_record "$node_pid" boards
  bench delta --room-prefix "flame" --delta
  flame_stop
  flame_write "volley board, 500 delta subscribers: $FLAMEGRAPH"
  exit 0
fi
for r in $(seq "$rounds"); do
  [ "${ONLY:-}" = redis ] && break
  if [ "${ONLY:-}" = snapshot ]; then
    secs=1 bench fill --room-prefix "plain-$r"
  else
    bench plain --room-prefix "plain-$r"
  fi
  n=1 rate_now=0 warm=0.5 secs=1 bench snapshot-1 --room-prefix "plain-$r" --state
  rate_now=0 warm=0.5 secs=1 bench snapshot-500 --room-prefix "plain-$r" --state
  [ "${ONLY:-}" = snapshot ] && continue
  bench conflated --room-prefix "conf-$r"
  bench plain+deflate --room-prefix "pdeflate-$r" --deflate
  bench delta --room-prefix "delta-$r" --delta
  bench delta+deflate --room-prefix "deflate-$r" --delta --deflate
done
kill "$node_pid"; wait "$node_pid" 2>/dev/null || true

rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
redis_pid=$!; pids+=("$redis_pid")
for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done
start_node "--set redis.url=redis://127.0.0.1:$rport"
for r in $(seq "$rounds"); do
  bench redis-board --room-prefix "rboard-$r" --redis-pid "$redis_pid" --redis-url "redis://127.0.0.1:$rport"
  rate_now=0 warm=0.5 secs=1 bench snapshot-500-redis --room-prefix "rboard-$r" --state
  [ "${ONLY:-}" = snapshot ] && continue
  bench redis-durable --room-prefix "durable-$r" --redis-pid "$redis_pid" --redis-url "redis://127.0.0.1:$rport"
done

python3 - "$out/runs.jsonl" <<'EOF'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    row = json.loads(line)
    runs.setdefault(row["mode"], []).append(row["r"])
med = lambda xs: statistics.median([x for x in xs if x is not None]) if any(x is not None for x in xs) else None
fmt = lambda x, d=1: "-" if x is None else f"{x:.{d}f}"
print(f"{'mode':15} {'wire B/update':>14} {'B/delivery':>11} {'delivered/s':>12} {'lost':>6} {'CPU µs/delivery':>16}")
base = None
for mode in ["plain", "conflated", "plain+deflate", "delta", "delta+deflate"]:
    rs = runs.get(mode, [])
    if not rs: continue
    w = med([r["wire_bytes_per_update"] for r in rs])
    base = base or w
    print(f"{mode:15} {fmt(w):>14} {fmt(med([r['wire_bytes_per_delivery'] for r in rs])):>11} {fmt(med([r['delivered_per_s'] for r in rs]),0):>12} {fmt(med([r['lost'] for r in rs]),0):>6} {fmt(med([r['server_cpu_us_per_delivery'] for r in rs]),3):>16}   ({fmt(base / w if w else None)}x fewer bytes than plain)")
for mode in ["snapshot-1", "snapshot-500", "snapshot-500-redis"]:
    rs = [r["snapshot_ms"] for r in runs.get(mode, []) if r.get("snapshot_ms")]
    if rs:
        print(f"{mode}: joiners {rs[0]['joiners']}  p50 {med([s['p50'] for s in rs]):.1f} ms  p99 {med([s['p99'] for s in rs]):.1f} ms  max {med([s['max'] for s in rs]):.1f} ms")
for mode in ["redis-board", "redis-durable"]:
    rs = runs.get(mode, [])
    if rs:
        per = med([r["redis_cpu_s"] * 1e6 / r["published"] for r in rs if r.get("redis_cpu_s") and r["published"]])
        print(f"{mode}: Redis CPU {fmt(per, 2)} µs per update  (node CPU {fmt(med([r['server_cpu_us_per_delivery'] for r in rs]),3)} µs per delivery)")
print(f"(medians of {len(runs.get('plain', []))} rounds; raw runs in {sys.argv[1]})")
EOF
