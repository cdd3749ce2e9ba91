#!/usr/bin/env python3
"""Merges the --json reports of volley-bench shards (--shard i/n) into one.

Counts add up; latency percentiles come from the shards' recorded latencies, merged
exactly (each report carries `latency_us`: [µs, count] pairs); the nodes' and Redis' CPU
come from shard 0 (the one given --pid) and are divided by every shard's deliveries.

    python3 benches/merge_shards.py shard0.json shard1.json ...
"""
import json
import sys


def percentile(pairs, total, q):
    """The smallest recorded value at or above quantile q."""
    if total == 0:
        return 0.0
    want = q * total
    seen = 0
    for value, count in pairs:
        seen += count
        if seen >= want:
            return value / 1000.0
    return pairs[-1][0] / 1000.0


def main(paths):
    reports = [json.loads(open(p).read().strip().splitlines()[-1]) for p in paths]
    first = next((r for r in reports if r.get("shard", "0/1").startswith("0/")), reports[0])
    total = lambda key: sum(r[key] for r in reports)
    latencies = {}
    for r in reports:
        for value, count in r.get("latency_us") or []:
            latencies[value] = latencies.get(value, 0) + count
    pairs = sorted(latencies.items())
    recorded = sum(c for _, c in pairs)
    delivered = total("delivered")
    expected = total("expected")
    joins = [r["joins"] for r in reports]
    sockets = sum(j["sockets"] for j in joins)
    join_seconds = max(j["seconds"] for j in joins)
    print(f"{sockets} viewers in {len(reports)} shards, {first['rooms']} room(s), "
          f"{first['rate']} msg/s, {first['seconds']:.1f} s measured")
    print(f"published {first['published']}  expected {expected}  delivered {delivered}  "
          f"lost {max(expected - delivered, 0)}  dup/out-of-order {total('disordered_or_duplicate')}  "
          f"failed sockets {total('failed_sockets')}")
    print(f"latency ms over every delivery  p50 {percentile(pairs, recorded, 0.5):.1f}  "
          f"p99 {percentile(pairs, recorded, 0.99):.1f}  p99.9 {percentile(pairs, recorded, 0.999):.1f}  "
          f"max {pairs[-1][0] / 1000.0 if pairs else 0:.1f}")
    p99s = ", ".join("%.0f" % j["p99_ms"] for j in joins)
    failed = sum(j["failed"] for j in joins)
    print(f"joins: {sockets} sockets in {join_seconds:.1f} s ({sockets / join_seconds:.0f}/s)  "
          f"p99 per shard {p99s} ms  failed attempts {failed} (retried)")
    rss = [j.get("bench_kib_per_socket") for j in joins if j.get("bench_kib_per_socket")]
    if rss:
        print(f"volley-bench memory per socket: {max(rss):.1f} KiB (the largest shard's)")
    cpu = first.get("server_cpu_s")
    if cpu is not None and delivered:
        print(f"nodes' CPU {cpu:.2f} s = {cpu * 1e6 / delivered:.2f} µs per delivery")
    redis_cpu = first.get("redis_cpu_s")
    if redis_cpu is not None and delivered:
        print(f"Redis CPU {redis_cpu:.2f} s = {redis_cpu * 1e6 / delivered:.3f} µs per delivery")


if __name__ == "__main__":
    main(sys.argv[1:])
