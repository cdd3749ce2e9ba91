#!/usr/bin/env python3
"""Runs benches/e2e.sh over the batching knobs and prints the tables of tuning.md.

    python3 benches/tuning.py [RUNS]        (default 3 runs per row; medians are printed)

Each row is one configuration of two nodes + Redis under the scoreboard or ticker load.
It takes about 20 minutes on a 2-core machine (7 with RUNS=1); the machine should be otherwise idle.
"""
import os
import re
import statistics
import subprocess
import sys

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
ENV = dict(os.environ, WARMUP="2", DURATION="6")
PATTERNS = {
    "cpu": r"= ([\d.]+) µs per delivery",
    "p50": r"p50 ([\d.]+)",
    "p99": r"p99 ([\d.]+)",
    "frames": r"frames/socket/s ([\d.]+)",
    "lost": r"lost (\d+)",
    "delivered": r"delivered/s (\d+)",
    "redis": r"redis commands/s (\d+)",
    "pipelines": r"publish pipelines/s ([\d.]+)",
}


def run(scenario, sets):
    args = ["benches/e2e.sh", scenario]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, env=ENV, capture_output=True, text=True, check=True).stdout
    row = {}
    for key, pattern in PATTERNS.items():
        m = re.search(pattern, out)
        row[key] = float(m.group(1)) if m else float("nan")
    return row


def median_row(scenario, sets):
    rows = [run(scenario, sets) for _ in range(RUNS)]
    return {k: statistics.median(r[k] for r in rows) for k in PATTERNS}, max(r["lost"] for r in rows)


def table(title, label, configs):
    print(f"\n### {title}\n")
    print(f"| scenario | {label} | server CPU µs/delivery | p50 ms | p99 ms | frames/socket/s | Redis cmds/s | pipelines/s | lost (max of runs) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for scenario in ["scoreboard", "ticker"]:
        for value, sets in configs:
            m, lost = median_row(scenario, sets)
            print(f"| {scenario} | {value} | {m['cpu']:.2f} | {m['p50']:.1f} | {m['p99']:.1f} | {m['frames']:.1f} | {m['redis']:.0f} | {m['pipelines']:.1f} | {lost:.0f} |", flush=True)


windows = [0, 5, 10, 25, 50, 100]
table("Delivery window (publish window 50 ms)", "batch.delivery_window_ms",
      [(w, [f"batch.delivery_window_ms={w}"]) for w in windows])
table("Publish window (delivery window 50 ms)", "batch.publish_window_ms",
      [(w, [f"batch.publish_window_ms={w}"]) for w in windows])
table("Envelope shape (both windows 50 ms)", "redis.envelope",
      [(e, [f"redis.envelope={e}"]) for e in ["batch", "single"]])
table("Leading edge (both windows 50 ms)", "batch.leading_edge",
      [(v, [f"batch.leading_edge={v}"]) for v in ["true", "false"]])
