#!/usr/bin/env python3
"""Presence at scale, against one node and its Redis on 127.0.0.1 that you started
(bounded, loopback only): opens N sockets that each identify as their own user, then
reports the Redis commands and the node CPU one presence refresh costs, and how long
get_online_users takes: the first ask reads the listing from Redis, the next ones within
the second share it (the Redis commands the five cost are counted too).

    redis-server --port 7801 --save '' &
    target/release/volley --listen 127.0.0.1:7800 --log warn --set redis.url=redis://127.0.0.1:7801 \
        --set presence.refresh_s=5 --set presence.max_list=10000 --set limits.max_connections=20000 & pid=$!
    python3 benches/presence_load.py 7800 7801 $pid 10000
"""
import asyncio, json, os, socket, sys, time

port, redis_port, pid, users = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
MASK = b"\x01\x02\x03\x04"


def frame(text):
    data = text.encode()
    head = bytes([0x81])
    n = len(data)
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(data))


async def ws(user=None):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    await r.readuntil(b"\r\n\r\n")
    if user:
        w.write(frame(json.dumps({"type": "auth", "userId": user})))
        await read_frame(r)
    return r, w


async def read_frame(r):
    head = await r.readexactly(2)
    n = head[1] & 0x7F
    if n == 126:
        n = int.from_bytes(await r.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await r.readexactly(8), "big")
    return await r.readexactly(n)


def redis(*args):
    s = socket.create_connection(("127.0.0.1", redis_port))
    s.sendall(("*%d\r\n" % len(args) + "".join("$%d\r\n%s\r\n" % (len(a), a) for a in args)).encode())
    data = b""
    while True:
        chunk = s.recv(65536)
        data += chunk
        if not chunk or data.endswith(b"\r\n") and (data.startswith(b"$") and data.count(b"\r\n") >= 2 or not data.startswith(b"$")):
            break
    s.close()
    return data.decode(errors="replace")


def commands():
    stats = redis("INFO", "stats")
    return int(stats.split("total_commands_processed:")[1].split("\r\n")[0])


def cpu():
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main():
    conns = []
    start = time.time()
    for i in range(0, users, 500):
        conns += await asyncio.gather(*(ws(f"user-{j}") for j in range(i, min(users, i + 500))))
    print(f"{users} users identified in {time.time() - start:.1f} s")
    await asyncio.sleep(float(os.environ.get("SETTLE_S", "6")))
    c0, t0, s0 = commands(), cpu(), time.time()
    await asyncio.sleep(float(os.environ.get("MEASURE_S", "20")))
    c1, t1, s1 = commands(), cpu(), time.time()
    refreshes = (s1 - s0) / 5
    print(f"per refresh: {(c1 - c0) / refreshes:.0f} Redis commands, {(t1 - t0) / refreshes * 1000:.0f} ms node CPU")
    r, w = await ws("asker")
    await asyncio.sleep(1.1)  # the asker's own presence aside: the listing is a second old
    times = []
    c0 = commands()
    for _ in range(5):
        t = time.perf_counter()
        w.write(frame(json.dumps({"type": "get_online_users"})))
        answer = json.loads(await read_frame(r))
        times.append((time.perf_counter() - t) * 1000)
    spent = commands() - c0
    shared = sorted(times[1:])
    print(f"get_online_users: {len(answer['users'])} users, truncated {answer['truncated']}, "
          f"first (read from Redis) {times[0]:.1f} ms, next four (shared) median {(shared[1] + shared[2]) / 2:.1f} ms, "
          f"Redis commands for the five: {spent}")
    for _, w in conns:
        w.close()


asyncio.run(main())
