#!/usr/bin/env python3
"""Memory per stalled SSE reader: streams that join a room and stop reading while broadcasts flow.

Starts `fawkes serve` (the binary given), opens STREAMS SSE streams from loopback with a small
receive buffer, has each join `room:stall` and then read nothing more. A publisher (an SSE client
that reads everything) pushes BROADCASTS `new_msg`s of PAD bytes to the room; each stalled
stream's queue overflows and it is closed as a slow consumer. Prints the process's RSS before the
streams, once they are joined, at the peak and after SETTLE seconds, per stalled stream; the slow
consumer count and open sockets from /metrics; and how many stalled connections the server has
closed (read to their end, within 0.2 s each, at the very end).

    python3 bench/chaos/sse_stall.py target/debug/fawkes --connect-rate 0 [serve flags...]

Issue 19's row: 200 streams, 3,000 broadcasts of 4 KiB.
"""
import json
import os
import socket
import sys
import threading
import time

from common import start_server, rss_kib, request

STREAMS = int(os.environ.get("STREAMS", "200"))
BROADCASTS = int(os.environ.get("BROADCASTS", "3000"))
PAD = int(os.environ.get("PAD", "4096"))
SETTLE = float(os.environ.get("SETTLE", "10"))
PER_POST = 50


def read_until(s, buf, marker):
    while marker not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError(f"the stream ended before {marker!r}")
        buf += chunk
    return buf


def open_stream(addr, rcvbuf=None):
    """An SSE stream joined to room:stall; returns the socket and its token."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(addr)
    s.sendall(f"GET /socket/sse?vsn=2.0.0 HTTP/1.1\r\nHost: {addr[0]}:{addr[1]}\r\n"
              "Accept: text/event-stream\r\n\r\n".encode())
    marker = b"event: phx_session\ndata: "
    buf = read_until(s, b"", marker)
    while b"\n" not in buf.split(marker, 1)[1]:
        buf += s.recv(4096)
    token = buf.split(marker, 1)[1].split(b"\n", 1)[0].decode()
    join = json.dumps(["1", "1", "room:stall", "phx_join", {}]).encode()
    status, body = request(addr, "POST", f"/socket/sse?token={token}", join, "application/json")
    assert status == 200 and b'"status":200' in body, (status, body)
    read_until(s, buf, b"phx_reply")
    return s, token


def metric(addr, name):
    _, body = request(addr, "GET", "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def main():
    binary, extra = sys.argv[1], sys.argv[2:]
    server, addr = start_server(binary, extra)
    base = rss_kib(server.pid)
    print(f"baseline RSS {base / 1024:.1f} MiB")

    stalled = [open_stream(addr, rcvbuf=4096)[0] for _ in range(STREAMS)]
    joined = rss_kib(server.pid)
    print(f"{STREAMS} stalled streams joined: RSS {joined / 1024:.1f} MiB")

    # The publisher reads its own stream throughout.
    pub, token = open_stream(addr)
    def drain():
        try:
            while pub.recv(65536):
                pass
        except OSError:
            pass
    threading.Thread(target=drain, daemon=True).start()

    peak = [joined]
    sampling = [True]
    def sample():
        while sampling[0]:
            peak[0] = max(peak[0], rss_kib(server.pid))
            time.sleep(0.05)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    pad = "x" * PAD
    started = time.time()
    ref = 2
    for first in range(0, BROADCASTS, PER_POST):
        lines = []
        for n in range(first, min(first + PER_POST, BROADCASTS)):
            lines.append(json.dumps(["1", str(ref), "room:stall", "new_msg", {"body": {"n": n, "pad": pad}}]))
            ref += 1
        status, body = request(addr, "POST", f"/socket/sse?token={token}", "\n".join(lines).encode())
        assert status == 200 and b'"status":200' in body, (status, body)
    print(f"{BROADCASTS} broadcasts of {PAD} bytes sent in {time.time() - started:.1f} s")
    after = rss_kib(server.pid)
    time.sleep(SETTLE)
    sampling[0] = False
    sampler.join()
    settled = rss_kib(server.pid)
    slow = metric(addr, "fawkes_slow_consumer_closes_total")
    sockets = metric(addr, "fawkes_sockets")
    print(f"peak RSS {peak[0] / 1024:.1f} MiB, right after {after / 1024:.1f} MiB, "
          f"after {SETTLE:.0f} s {settled / 1024:.1f} MiB")
    print(f"per stalled stream: peak {(peak[0] - joined) / STREAMS:.0f} KiB, "
          f"after {SETTLE:.0f} s {(settled - joined) / STREAMS:.0f} KiB above the joined baseline")
    print(f"slow consumers closed: {slow:.0f}; sockets still open: {sockets:.0f} (the publisher is one)")

    closed = 0
    for s in stalled:
        s.settimeout(0.2)
        try:
            while s.recv(1 << 20):
                pass
            closed += 1
        except OSError:
            pass
        s.close()
    print(f"stalled connections the server had closed: {closed} of {STREAMS}")
    server.terminate()
    server.wait()


if __name__ == "__main__":
    main()
