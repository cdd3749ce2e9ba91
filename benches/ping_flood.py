#!/usr/bin/env python3
"""A client that floods pings and never reads the pongs, against a node you started on
127.0.0.1; prints the node's RSS before and after. Bounded in time, loopback only.

    target/release/volley --listen 127.0.0.1:7790 --log warn & pid=$!
    python3 benches/ping_flood.py 7790 $pid 3
    curl -s localhost:7790/healthz    # slow_consumers_closed: 1
    kill $pid
"""
import socket
import sys
import time

port, pid, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])


def rss():
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return " ".join(line.split()[1:])


s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills up fast: never read
s.connect(("127.0.0.1", port))
s.sendall(
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(1)
mask = b"\x12\x34\x56\x78"
payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"p" * 125))
burst = (b"\x89\xfd" + mask + payload) * 512  # 512 masked 125-byte pings
print("node RSS before:", rss())
start, sent = time.time(), 0
s.settimeout(2)
try:
    while time.time() - start < seconds:
        s.sendall(burst)
        sent += 512
except OSError as e:
    print("the node stopped reading:", type(e).__name__)
print(f"sent {sent} pings in {time.time() - start:.1f} s; node RSS after: {rss()}")
