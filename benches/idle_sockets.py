#!/usr/bin/env python3
"""Memory per idle socket: opens N WebSockets to a running node, each joined to one room,
reads nothing more, and prints the node's RSS growth per socket.

    ulimit -n 20000
    target/release/volley --listen 127.0.0.1:23100 --log warn \\
        --set limits.join_rate=0 --set limits.notices=false &
    python3 benches/idle_sockets.py 23100 $! 15000

(joins are not rate-limited and notices are off so the measure is the sockets alone; a
port below the ephemeral range, so the clients' own ports never take it). Over TLS: start
the node with `--set tls.cert=cert.pem --set tls.key=key.pem` (a self-signed pair:
`openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout
key.pem -out cert.pem -days 1 -subj /CN=localhost`) and add `tls` after the count.
Raw sockets with a fixed mask, standard library only; the sockets close when it exits.

Where the bytes go, with a heap profiler: `cargo build --profile release-with-debug
--features system-alloc`, run that binary under `valgrind --tool=massif`, open 2 000
sockets, then `ms_print massif.out.PID`.
"""
import socket
import ssl
import sys
import time


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    raise SystemExit("no such process")


def text_frame(text):
    data = text.encode()
    mask = b"\x01\x02\x03\x04"
    return bytes([0x81, 0x80 | len(data)]) + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(data))


UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def main():
    port, pid, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    tls = sys.argv[4:5] == ["tls"]
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    before = rss_kib(pid)
    sockets = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        if tls:
            s = context.wrap_socket(s, server_hostname="localhost")
        s.sendall(UPGRADE)
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        s.sendall(text_frame('{"type":"join","roomId":"idle"}'))
        sockets.append(s)
    time.sleep(2)
    for s in sockets:
        s.setblocking(False)
        try:
            while s.recv(65536):
                pass
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
    time.sleep(1)
    after = rss_kib(pid)
    print(f"{n} idle {'TLS ' if tls else ''}sockets: RSS {before} KiB -> {after} KiB = {(after - before) * 1024 / n:.0f} bytes per socket")


if __name__ == "__main__":
    main()
