#!/usr/bin/env python3
"""The "where the time goes" table of flamegraphs/README.md, from the folded stacks that
`FLAMEGRAPH=NAME benches/e2e.sh ...` leaves in target/NAME.folded. Each stack is counted
once, under the first row it matches, top to bottom.

    python3 flamegraphs/shares.py scoreboard ticker
"""
import sys

ROWS = [
    ("`writev` (kernel: TCP send, and the loopback receive it runs inline)", ("writev",)),
    ("epoll and socket reads", ("epoll", "tcp_recvmsg", "sys_read", "recvfrom")),
    ("tokio worker park/unpark, futex", ("futex", "park", "Park")),
    ("allocator (mimalloc) + page faults", (";mi_", "_mi_", "page_fault")),
    ("fan-out: outbox pushes and room windows", ("Outbox$LT$W$GT$::push", "Outbox<W>::push", "Outbox::push", "hub::room::")),
    ("Redis connection driver and inbound envelopes", ("redis::",)),
    ("parse and publish (`Session::on_text` / `dispatch`)", ("on_text", "Session::dispatch")),
]


def shares(name):
    total, counts = 0, [0] * (len(ROWS) + 1)
    with open(f"target/{name}.folded") as folded:
        for line in folded:
            stack, _, n = line.rstrip().rpartition(" ")
            n = int(n)
            total += n
            for i, (_, needles) in enumerate(ROWS):
                if any(needle in stack for needle in needles):
                    counts[i] += n
                    break
            else:
                counts[-1] += n
    return [100 * c / max(total, 1) for c in counts]


names = sys.argv[1:] or ["scoreboard", "ticker"]
table = [shares(n) for n in names]
print("| frames | " + " | ".join(names) + " |")
print("| --- |" + " ---: |" * len(names))
labels = [r[0] for r in ROWS] + ["everything else (tokio scheduler, timers, counters, batch frames)"]
for i, label in enumerate(labels):
    print(f"| {label} | " + " | ".join(f"{t[i]:.1f}%" for t in table) + " |")
