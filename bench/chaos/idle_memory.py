#!/usr/bin/env python3
"""Idle memory per WebSocket connection of a `fawkes serve` binary: N clients upgrade, join a
room and stay quiet; prints the server's RSS growth per connection.

    CLIENTS=2000 python3 bench/chaos/idle_memory.py target/release/fawkes --connect-rate 0
"""
import os
import resource
import socket
import sys
import time

from common import start_server, rss_kib


def frame(payload):
    mask = b"\x01\x02\x03\x04"
    head = bytes([0x81, 0x80 | len(payload)])
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def main():
    binary, extra = sys.argv[1], sys.argv[2:]
    n = int(os.environ.get("CLIENTS", "2000"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 100), hard))
    server, (host, port) = start_server(binary, extra)
    base = rss_kib(server.pid)
    clients = []
    for i in range(n):
        s = socket.create_connection((host, int(port)))
        s.sendall(
            f"GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        s.sendall(frame(f'["1","1","room:idle{i % 10}","phx_join",{{}}]'.encode()))
        clients.append(s)
    for s in clients:
        s.recv(4096)  # the join reply
    time.sleep(2)
    held = rss_kib(server.pid)
    print(f"{n} idle joined WebSocket clients: RSS {base / 1024:.1f} -> {held / 1024:.1f} MiB, "
          f"{(held - base) / n:.2f} KiB per connection")
    server.terminate()
    server.wait()


if __name__ == "__main__":
    main()
