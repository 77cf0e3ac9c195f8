#!/usr/bin/env python3
"""Memory after load: long-poll sessions that push big pings and never poll, then are reaped.

Starts `fawkes serve` (the binary given), opens SESSIONS long-poll sessions from loopback, has
each join a room and push PINGS pings of PAD bytes (each answered with its payload, queued for a
client that never polls), then waits for the sessions to be reaped. Prints the process's RSS at
start, at the peak and every few seconds after, and whether it came back to within 25% of the
load's growth above the baseline.

    python3 bench/chaos/longpoll_memory.py target/release/fawkes --connect-rate 0 [serve flags...]

Issue 19's row: 100 sessions, 4 pings of 900 KB. Extra flags go to `fawkes serve`, e.g.
`--outbound-byte-limit 100000000` to let every reply queue as before the byte bound.
"""
import json
import os
import sys
import time

from common import start_server, rss_kib, request

SESSIONS = int(os.environ.get("SESSIONS", "100"))
PINGS = int(os.environ.get("PINGS", "4"))
PAD = int(os.environ.get("PAD", str(900 * 1000)))
SETTLE = float(os.environ.get("SETTLE", "45"))


def main():
    binary, extra = sys.argv[1], sys.argv[2:]
    server, addr = start_server(binary, extra)
    base = rss_kib(server.pid)
    print(f"baseline RSS {base / 1024:.1f} MiB")
    pad = "x" * PAD
    for i in range(SESSIONS):
        _, body = request(addr, "GET", "/socket/longpoll?vsn=2.0.0")
        token = json.loads(body)["token"]
        lines = [json.dumps(["1", "1", f"room:mem{i}", "phx_join", {}])]
        lines += [json.dumps(["1", str(k + 2), f"room:mem{i}", "ping", {"pad": pad}]) for k in range(PINGS)]
        for l in lines:
            request(addr, "POST", f"/socket/longpoll?vsn=2.0.0&token={token}", l.encode())
    peak = rss_kib(server.pid)
    print(f"after {SESSIONS} sessions x {PINGS} pings of {PAD} bytes: RSS {peak / 1024:.1f} MiB")
    start = time.time()
    last = peak
    while time.time() - start < SETTLE:
        time.sleep(5)
        last = rss_kib(server.pid)
        print(f"  +{time.time() - start:4.0f} s: RSS {last / 1024:.1f} MiB")
    growth = peak - base
    kept = last - base
    ok = growth <= 0 or kept <= 0.25 * growth
    print(f"growth {growth / 1024:.1f} MiB, still held {kept / 1024:.1f} MiB "
          f"({100 * kept / max(growth, 1):.0f}% of the growth): {'within' if ok else 'NOT within'} 25%")
    server.terminate()
    server.wait()


if __name__ == "__main__":
    main()
