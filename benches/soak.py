#!/usr/bin/env python3
"""Soak: two volley nodes on one redis-server under churn, steady publishing and Redis
connection kills, for a bounded time (default 10 minutes). Checks, and exits 1 if any
fails:

  - RSS flat after warm-up: sampled every 10 s; over the samples after the first third,
    the fitted growth is under 1 MiB per minute per node (a leak of a few bytes per
    message or per connection shows up well above that);
  - no panic in either node's log, both nodes still running;
  - nothing lost on the durable room: two followers (one per node, coming back with
    `since` whenever their socket ends) see offsets 1..n with no gap and every message
    the API accepted (HTTP 200), each publisher's in its order;
  - every error the nodes met is counted in /metrics: the summary lists each non-zero
    error, drop and reconnect counter.

Load: 200 churning clients (connect to either node, join 1-3 of 10 plain rooms and
sometimes the durable one, read for 1-10 s, sometimes leave a room, then close cleanly
or just drop the TCP connection, and again); the API publishes 20 msg/s to the durable
room and 100 msg/s over the plain rooms; every 60 s every Redis client connection is
killed (CLIENT KILL TYPE pubsub, then TYPE normal).

    cargo build --release
    pip install websockets
    python3 benches/soak.py [--minutes 10] [--volley target/release/volley] [--json FILE]

Only 127.0.0.1, ports 23400-23402; everything it starts it stops.
"""
import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import websockets

REDIS_PORT, PORTS = 23400, (23401, 23402)  # below the ephemeral range
DURABLE, PLAIN = "soak:durable", [f"soak:plain{i}" for i in range(10)]
API_KEY = "soak-key"
CHURNERS = 200


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


async def http(port, method, path, body=b""):
    """One HTTP/1.1 exchange; (status, body) or (None, error)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Authorization: apikey {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        data = await asyncio.wait_for(reader.read(-1), 15)
        writer.close()
        status = int(data.split(b" ", 2)[1])
        return status, data.split(b"\r\n\r\n", 1)[1]
    except Exception as e:  # noqa: BLE001 - any failure is "not accepted"
        return None, str(e)


class Soak:
    def __init__(self, args):
        self.args = args
        self.stop = asyncio.Event()
        self.accepted = {0: [], 1: []}  # publisher -> accepted seqs, in order
        self.refused = 0
        self.samples = []  # (seconds, rss0, rss1)
        self.churn = {"connects": 0, "connect_failures": 0, "drops": 0, "closes": 0, "messages": 0}
        self.dir = tempfile.mkdtemp(prefix="volley-soak-")
        self.procs = []

    # -- processes ---------------------------------------------------------------------

    def start(self):
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL)
        config = os.path.join(self.dir, "volley.toml")
        with open(config, "w") as f:
            f.write(f'[api]\nkey = "{API_KEY}"\n[redis]\nurl = "redis://127.0.0.1:{REDIS_PORT}"\n'
                    f'[[rooms]]\nmatch = "{DURABLE}"\nhistory_size = 100000\n')
        for i, port in enumerate(PORTS):
            log = open(os.path.join(self.dir, f"n{i}.log"), "w")
            self.procs.append(subprocess.Popen(
                [self.args.volley, "--config", config, "--listen", f"127.0.0.1:{port}",
                 "--node-id", f"soak-{i}", "--log", "warn"],
                stdout=subprocess.DEVNULL, stderr=log, env={k: v for k, v in os.environ.items()
                                                            if not k.startswith(("VOLLEY_", "REDIS_"))}))

    async def wait_ready(self):
        for port in PORTS:
            for _ in range(300):
                if (await http(port, "GET", "/readyz"))[0] == 200:
                    break
                await asyncio.sleep(0.1)
            else:
                sys.exit(f"node on {port} never became ready")

    def stop_all(self):
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.redis.kill()
        self.redis.wait()

    # -- load --------------------------------------------------------------------------

    async def publisher(self, p, port, room, rate, record):
        seq = 0
        while not self.stop.is_set():
            target = room if isinstance(room, str) else random.choice(room)
            body = json.dumps({"roomId": target, "content": {"p": p, "seq": seq}}).encode()
            status, _ = await http(port, "POST", "/api/publish", body)
            if status == 200:
                if record:
                    self.accepted[p].append(seq)
            else:
                self.refused += 1
            seq += 1
            await asyncio.sleep(1 / rate)

    async def churner(self):
        while not self.stop.is_set():
            port = random.choice(PORTS)
            try:
                ws = await asyncio.wait_for(websockets.connect(
                    f"ws://127.0.0.1:{port}/ws", compression=None, max_size=None), 5)
            except Exception:  # noqa: BLE001
                self.churn["connect_failures"] += 1
                await asyncio.sleep(1)
                continue
            self.churn["connects"] += 1
            rooms = random.sample(PLAIN, random.randint(1, 3))
            if random.random() < 0.2:
                rooms.append(DURABLE)
            try:
                for room in rooms:
                    join = {"type": "join", "roomId": room}
                    if room == DURABLE:
                        join["history"] = 1
                    await ws.send(json.dumps(join))
                end = time.monotonic() + random.uniform(1, 10)
                left = False
                while time.monotonic() < end and not self.stop.is_set():
                    try:
                        await asyncio.wait_for(ws.recv(), 0.5)
                        self.churn["messages"] += 1
                    except asyncio.TimeoutError:
                        pass
                    if not left and random.random() < 0.05:
                        await ws.send(json.dumps({"type": "leave", "roomId": rooms[0]}))
                        left = True
                if random.random() < 0.5:
                    await ws.close()
                    self.churn["closes"] += 1
                else:
                    ws.transport.abort()  # gone without a close frame
                    self.churn["drops"] += 1
            except websockets.ConnectionClosed:
                pass

    async def follower(self, port, ends):
        """Offsets seen on the durable room, coming back with since after any end."""
        seen, epoch = [], None
        while True:
            try:
                async with websockets.connect(f"ws://127.0.0.1:{port}/ws", compression=None,
                                              max_size=None) as ws:
                    join = {"type": "join", "roomId": DURABLE}
                    if epoch is None:
                        join["history"] = 100000
                    else:
                        join["since"] = {"offset": seen[-1][0] if seen else 0, "epoch": epoch}
                    await ws.send(json.dumps(join))
                    async for raw in ws:
                        frame = json.loads(raw)
                        for m in frame["messages"] if frame.get("type") == "batch" else [frame]:
                            if m.get("type") == "history":
                                if epoch is not None and (m["epoch"] != epoch or not m.get("recovered", True)):
                                    raise SystemExit(f"follower on {port}: history lost: {m['epoch']} "
                                                     f"(was {epoch}), recovered={m.get('recovered')}")
                                epoch = m["epoch"]
                                seen += [(h["offset"], h["content"]) for h in m["messages"]]
                            elif m.get("type") == "message":
                                seen.append((m["offset"], m["content"]))
                        if sum(1 for _, c in seen if "end" in c) >= ends:
                            return seen
            except (OSError, websockets.ConnectionClosed, asyncio.TimeoutError):
                await asyncio.sleep(0.2)

    async def redis_killer(self):
        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), 60)
                return
            except asyncio.TimeoutError:
                pass
            for kind in ("pubsub", "normal"):
                subprocess.run(["redis-cli", "-p", str(REDIS_PORT), "CLIENT", "KILL", "TYPE", kind],
                               stdout=subprocess.DEVNULL)
            print(f"  {time.monotonic() - self.t0:5.0f} s: killed every Redis client connection", flush=True)

    async def sampler(self):
        while not self.stop.is_set():
            self.samples.append((time.monotonic() - self.t0, *(rss_kib(p.pid) for p in self.procs)))
            s = self.samples[-1]
            print(f"  {s[0]:5.0f} s: RSS {s[1] / 1024:.1f} / {s[2] / 1024:.1f} MiB, "
                  f"connects {self.churn['connects']}, accepted {sum(map(len, self.accepted.values()))}",
                  flush=True)
            try:
                await asyncio.wait_for(self.stop.wait(), 10)
            except asyncio.TimeoutError:
                pass

    # -- run ---------------------------------------------------------------------------

    async def run(self):
        self.start()
        try:
            await self.wait_ready()
            return await self.load()
        finally:
            self.stop.set()
            self.stop_all()

    async def load(self):
        self.t0 = time.monotonic()
        followers = [asyncio.create_task(self.follower(port, 2)) for port in PORTS]
        tasks = [asyncio.create_task(self.publisher(i, port, DURABLE, 10, True)) for i, port in enumerate(PORTS)]
        tasks += [asyncio.create_task(self.publisher(9, port, PLAIN, 50, False)) for port in PORTS]
        tasks += [asyncio.create_task(self.churner()) for _ in range(CHURNERS)]
        tasks += [asyncio.create_task(self.redis_killer()), asyncio.create_task(self.sampler())]
        await asyncio.sleep(self.args.minutes * 60)
        self.stop.set()
        await asyncio.gather(*tasks)
        for p, port in enumerate(PORTS):
            status, body = await http(port, "POST", "/api/publish",
                                      json.dumps({"roomId": DURABLE, "content": {"end": p}}).encode())
            if status != 200:
                sys.exit(f"end marker refused: {status} {body}")
        seen = await asyncio.wait_for(asyncio.gather(*followers), 60)
        return self.report(seen, [await self.metrics(port) for port in PORTS])

    async def metrics(self, port):
        _, body = await http(port, "GET", "/metrics")
        counters = {}
        for line in body.decode(errors="replace").splitlines() if isinstance(body, bytes) else []:
            if line.startswith("#") or " " not in line:
                continue
            name, value = line.rsplit(" ", 1)
            if any(w in name for w in ("error", "dropped", "unconfirmed", "bad", "slow", "lost",
                                       "fail", "reconnect", "restart", "disconnect", "repair",
                                       "oversized", "overflow", "closed")):
                try:
                    if float(value) > 0:
                        counters[name] = float(value)
                except ValueError:
                    pass
        return counters

    def report(self, seen, metrics):
        failures = []
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                failures.append(f"node {i} exited with {proc.returncode}")
            log = open(os.path.join(self.dir, f"n{i}.log")).read()
            if "panicked" in log:
                failures.append(f"node {i} panicked")
        for i, got in enumerate(seen):
            offsets = [o for o, _ in got]
            if offsets != list(range(1, len(offsets) + 1)):
                failures.append(f"follower {i}: offsets not 1..{len(offsets)} without gaps")
            for p, accepted in self.accepted.items():
                mine = [c["seq"] for _, c in got if c.get("p") == p and "seq" in c]
                wanted = set(accepted)
                if [s for s in mine if s in wanted] != accepted:
                    failures.append(f"follower {i}: publisher {p}'s accepted messages missing or out of order")
        if seen[0] != seen[1]:
            failures.append("the followers saw different sequences")
        growth = []
        after = [s for s in self.samples if s[0] >= self.samples[-1][0] / 3]
        for node in (1, 2):
            xs = [s[0] / 60 for s in after]
            ys = [s[node] / 1024 for s in after]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-9)
            growth.append(slope)
            if slope > 1.0:
                failures.append(f"node {node - 1}: RSS grows {slope:.2f} MiB/min after warm-up")
        summary = {
            "minutes": self.args.minutes,
            "churn": self.churn,
            "durable_accepted": sum(map(len, self.accepted.values())),
            "durable_seen_per_follower": [len(s) for s in seen],
            "publishes_refused": self.refused,
            "rss_mib_first_last": [[round(self.samples[0][n] / 1024, 1), round(self.samples[-1][n] / 1024, 1)]
                                   for n in (1, 2)],
            "rss_mib_max": [round(max(s[n] for s in self.samples) / 1024, 1) for n in (1, 2)],
            "rss_growth_mib_per_min_after_warmup": [round(g, 3) for g in growth],
            "error_counters": metrics,
            "failures": failures,
        }
        print(json.dumps(summary, indent=2))
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump(summary, f, indent=2)
        shutil.rmtree(self.dir, ignore_errors=True)
        return 1 if failures else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--volley", default="target/release/volley")
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args()
    sys.exit(asyncio.run(Soak(args).run()))


if __name__ == "__main__":
    main()
