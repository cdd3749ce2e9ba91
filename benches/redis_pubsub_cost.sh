#!/usr/bin/env bash
# Redis CPU per PUBLISH and per SPUBLISH of a 1 KB message with k subscriber connections
# (k = 0 1 2 4 8): the constants of benches/capacity.py. Starts its own redis-server on
# 127.0.0.1:47011 (cluster-enabled for SPUBLISH, all slots on itself), drives it with
# redis-benchmark (200 000 commands, 4 clients, pipelines of 16), reads its CPU ticks from
# /proc, and stops everything it started. About 30 s.
set -euo pipefail
payload=$(python3 -c 'print("x"*1000)')
port=47011
for mode in publish spublish; do
  for k in 0 1 2 4 8; do
    dir=$(mktemp -d)
    extra=(); [ $mode = spublish ] && extra=(--cluster-enabled yes --cluster-config-file nodes.conf)
    redis-server --port $port --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" "${extra[@]}" >/dev/null &
    rpid=$!
    for _ in $(seq 100); do redis-cli -p $port ping >/dev/null 2>&1 && break; sleep 0.05; done
    if [ $mode = spublish ]; then redis-cli -p $port cluster addslotsrange 0 16383 >/dev/null; sleep 0.5; fi
    subs=()
    sub=subscribe; [ $mode = spublish ] && sub=ssubscribe
    for i in $(seq $k); do redis-cli -p $port $sub ch >/dev/null & subs+=($!); done
    sleep 0.3
    n=200000
    before=$(awk '{print $14+$15}' /proc/$rpid/stat)
    redis-benchmark -p $port -c 4 -P 16 -n $n -q ${mode^^} ch "$payload" >/dev/null 2>&1
    after=$(awk '{print $14+$15}' /proc/$rpid/stat)
    echo "$mode subscribers=$k cpu_ticks=$((after-before)) us_per_publish=$(python3 -c "print(round(($after-$before)*10000/$n,2))")"
    kill "${subs[@]}" 2>/dev/null; kill $rpid; wait 2>/dev/null; rm -rf "$dir"
  done
done
