#!/usr/bin/env python3
"""How many volley nodes and Redis servers a load needs, and what saturates first.

    python3 benches/capacity.py --connections 1000000 --deliveries 500000 --fanout 1000
    python3 benches/capacity.py --check          (the model against the measured runs)

The load: C connections, D deliveries/s (messages written to sockets), F subscribers per
room (the fan-out), so M = D / F messages/s are published into R = C x rooms-per-socket
/ F rooms. Every constant below was measured on the 2-core test VM (docs/capacity.md
says how); pass your own with the flags when your machines differ.
"""
import argparse
import math

# Node CPU per delivery (µs) by messages per written frame: a socket's deliveries in one
# delivery window go out as one frame, so the cost per delivery falls as more share a
# write. From benches/e2e.sh: scoreboard (about 1 per frame) and the ticker saturate
# steps (10 to 320 per frame), two nodes on two cores with Redis and the load tool.
NODE_US_BY_MESSAGES_PER_FRAME = [
    (1, 8.5),
    (10, 1.7),
    (20, 1.2),
    (40, 0.75),
    (80, 0.44),
    (160, 0.30),
    (320, 0.24),
]
# RSS per connected socket joined to one room (plain TCP, one node): 5.0 KiB when they
# connect a few at a time (benches/idle_sockets.py at 15 000 sockets, median of 3), 7.6
# KiB after a storm of 16 000 at 500 handshakes at once (benches/viewers.sh; what a node
# restart brings): planned at the storm's figure.
NODE_KIB_PER_SOCKET = 7.6
# Redis CPU per PUBLISH (or SPUBLISH) command of a ~1 KB envelope, and per subscriber
# connection it is delivered to. benches/redis_pubsub_cost.sh measures 0.8-0.9 µs per
# command and 0.4-0.5 µs per subscriber in deep pipelines; in the e2e runs (a pipeline
# per node per 50 ms window, probes beside) Redis spent 3.5 µs per PUBLISH delivered to 2
# nodes, so the base is raised to match what volley's traffic costs.
REDIS_US_PER_PUBLISH = 2.5
REDIS_US_PER_SUBSCRIBER = 0.5
# A durable room's append script costs about 6x a plain PUBLISH (tuning.md).
DURABLE_FACTOR = 6.0
# Wire bytes per delivery beyond the payload: the message frame's JSON around the
# content (type, roomId, timestamp) plus its share of the WebSocket frame header.
FRAME_OVERHEAD_BYTES = 60
# Use at most this share of a core, a NIC or memory.
HEADROOM = 0.7


def node_us_per_delivery(per_frame):
    """Interpolated in log-log space; clamped at the table's ends."""
    table = NODE_US_BY_MESSAGES_PER_FRAME
    per_frame = max(per_frame, table[0][0])
    if per_frame >= table[-1][0]:
        return table[-1][1]
    for (k0, c0), (k1, c1) in zip(table, table[1:]):
        if k0 <= per_frame <= k1:
            t = (math.log(per_frame) - math.log(k0)) / (math.log(k1) - math.log(k0))
            return math.exp(math.log(c0) + t * (math.log(c1) - math.log(c0)))
    return table[-1][1]


def publishes_per_s(messages, rooms, nodes, window_s):
    """PUBLISH commands/s with batch envelopes: one per room per window per node that
    had at least one of the room's messages in that window (messages entering on
    nodes at random)."""
    per_room_window = messages / rooms * window_s
    nodes_with_one = nodes * (1 - math.exp(-per_room_window / nodes))
    return min(messages, rooms * nodes_with_one / window_s)


def subscribed_nodes(fanout, nodes):
    """Nodes holding at least one of a room's F subscribers (spread by the balancer)."""
    return nodes * (1 - math.exp(-fanout / nodes))


def plan(a):
    out = {}
    messages = a.deliveries / a.fanout
    rooms = max(1.0, a.connections * a.rooms_per_socket / a.fanout)
    per_socket_window = a.deliveries / a.connections * a.window_ms / 1000
    per_frame = max(1.0, per_socket_window)
    node_us = node_us_per_delivery(per_frame)
    cores = a.deliveries * node_us / 1e6
    by_cpu = cores / (a.node_cores * HEADROOM)
    memory_gib = a.connections * NODE_KIB_PER_SOCKET / 2**20
    by_memory = memory_gib / (a.node_memory_gib * HEADROOM)
    wire_bytes = a.deliveries * (a.payload + FRAME_OVERHEAD_BYTES)
    by_nic = wire_bytes * 8 / (a.node_nic_gbps * 1e9 * HEADROOM)
    by_sockets = a.connections / a.max_sockets_per_node
    limits = {"node CPU": by_cpu, "node memory": by_memory, "node NIC": by_nic,
              "sockets per node (blast radius)": by_sockets}
    nodes = max(2, math.ceil(max(limits.values())))
    out.update(messages=messages, rooms=rooms, per_frame=per_frame, node_us=node_us,
               node_cores=cores, memory_gib=memory_gib, wire_gbps=wire_bytes * 8 / 1e9,
               node_limits=limits, nodes=nodes)
    publishes = publishes_per_s(messages, rooms, nodes, a.window_ms / 1000)
    subscribers = subscribed_nodes(a.fanout, nodes)
    us = REDIS_US_PER_PUBLISH * (DURABLE_FACTOR if a.durable else 1) + REDIS_US_PER_SUBSCRIBER * subscribers
    redis_cores = publishes * us / 1e6
    out.update(publishes=publishes, subscribed_nodes=subscribers, redis_cores=redis_cores,
               shards=max(1, math.ceil(redis_cores / HEADROOM)))
    return out


def report(a):
    p = plan(a)
    print(f"load: {a.connections:,} connections, {a.deliveries:,.0f} deliveries/s, fan-out {a.fanout:,}")
    print(f"  = {p['messages']:,.0f} messages/s into {p['rooms']:,.0f} rooms; "
          f"{p['per_frame']:.1f} messages per frame (window {a.window_ms} ms)")
    print(f"nodes ({a.node_cores} cores, {a.node_memory_gib} GiB, {a.node_nic_gbps} Gbit/s each, {HEADROOM:.0%} used):")
    print(f"  node CPU {p['node_us']:.2f} µs/delivery -> {p['node_cores']:.1f} cores in all")
    print(f"  memory {p['memory_gib']:.1f} GiB in all; wire {p['wire_gbps']:.2f} Gbit/s in all")
    for name, need in sorted(p["node_limits"].items(), key=lambda kv: -kv[1]):
        print(f"    {name:32s} needs {need:6.2f} nodes")
    first = max(p["node_limits"], key=p["node_limits"].get)
    print(f"  -> {p['nodes']} nodes (bound by {first})")
    rest = {k: v for k, v in p["node_limits"].items() if not k.startswith("sockets")}
    print(f"     without the socket cap: {max(2, math.ceil(max(rest.values())))} nodes "
          f"(bound by {max(rest, key=rest.get)})")
    print(f"Redis: {p['publishes']:,.0f} PUBLISH/s (batch envelopes), each to {p['subscribed_nodes']:.1f} nodes"
          f"{', durable' if a.durable else ''}: {p['redis_cores']:.2f} cores of Redis' single thread")
    one = "holds" if p["redis_cores"] <= HEADROOM else "does NOT hold"
    print(f"  one Redis (or Sentinel): {one} ({p['redis_cores'] / HEADROOM:.0%} of its usable core)")
    print(f"  Redis Cluster (SPUBLISH) or independent shards: {p['shards']} masters/shards, "
          f"{p['redis_cores'] / p['shards']:.2f} cores each")
    if p["shards"] > 1:
        print(f"  (plain PUBLISH in a cluster copies every message to every master: each of the "
              f"{p['shards']} would carry about {p['redis_cores']:.2f} cores, more with each master added)")


def check():
    """The model against the runs in tuning.md (two nodes, ticker load)."""
    print("ticker load: 500 sockets, 200 rooms, 20 rooms per socket (fan-out 50), 2 000 messages/s, 2 nodes")
    a = argparse.Namespace(connections=500, deliveries=100_000, fanout=50, rooms_per_socket=20,
                           window_ms=50, durable=False, payload=60, node_cores=2,
                           node_memory_gib=24, node_nic_gbps=10, max_sockets_per_node=100_000)
    p = plan(a)
    publishes = publishes_per_s(p["messages"], p["rooms"], 2, 0.05)
    subscribers = subscribed_nodes(50, 2)
    redis_ms = publishes * (REDIS_US_PER_PUBLISH + REDIS_US_PER_SUBSCRIBER * subscribers) / 1000
    print(f"  node CPU/delivery: model {p['node_us']:.2f} µs; measured 1.55-1.92 µs (one Redis), 1.72-1.86 (3 shards), 1.58-1.67 (cluster)")
    print(f"  PUBLISH/s: model {publishes:,.0f}; measured 2 001 (one Redis)")
    print(f"  per shard of 3: model {publishes / 3:,.0f}; measured 538-838 (shards, rendezvous), 690 (cluster, with probes)")
    print(f"  Redis CPU: model {redis_ms:.1f} ms/s; measured 6-8 ms/s (0.06-0.08 s over 10 s, 10 ms ticks)")
    print(f"  per shard of 3: model {redis_ms / 3:.1f} ms/s; measured 4-5 ms/s over the whole run (start-up")
    print("    included): at this light load each server's fixed cost (its cron, the nodes' probes,")
    print("    about 2-3 ms/s) is most of it; the model leaves it out, it does not grow with the load")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=float, default=1_000_000)
    ap.add_argument("--deliveries", type=float, default=500_000, help="messages written to sockets per second")
    ap.add_argument("--fanout", type=float, default=1000, help="subscribers per room")
    ap.add_argument("--rooms-per-socket", type=float, default=1)
    ap.add_argument("--window-ms", type=float, default=50, help="batch.delivery_window_ms = publish window")
    ap.add_argument("--durable", action="store_true", help="every room durable")
    ap.add_argument("--payload", type=float, default=100, help="content bytes per message")
    ap.add_argument("--node-cores", type=float, default=8)
    ap.add_argument("--node-memory-gib", type=float, default=16)
    ap.add_argument("--node-nic-gbps", type=float, default=10)
    ap.add_argument("--max-sockets-per-node", type=float, default=100_000,
                    help="sockets one node may hold (a node lost sends them all reconnecting)")
    ap.add_argument("--check", action="store_true", help="compare the model with the measured runs")
    a = ap.parse_args()
    if a.check:
        check()
    else:
        report(a)


if __name__ == "__main__":
    main()
