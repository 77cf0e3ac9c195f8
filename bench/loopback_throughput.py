#!/usr/bin/env python3
"""The ceiling of one loopback TCP stream on this machine: a sender pinned to core 1 writes
8 GiB in CHUNK-byte writes (default 65536) to a reader pinned to core 0, and prints GB/s.
A bound for workloads that move bytes, such as the presence storm (docs/benchmarks.md).

    python3 bench/loopback_throughput.py 8192
"""
import os
import socket
import sys
import time

TOTAL = 8 << 30
PORT = 4899


def read_all(port):
    os.sched_setaffinity(0, {0})
    conn = socket.create_connection(("127.0.0.1", port))
    buf = bytearray(1 << 20)
    while conn.recv_into(buf):
        pass


def main():
    chunk = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", PORT))
    listener.listen(1)
    reader = os.fork()
    if reader == 0:
        read_all(PORT)
        os._exit(0)
    os.sched_setaffinity(0, {1})
    conn, _ = listener.accept()
    data = b"x" * chunk
    start, cpu_start, sent = time.time(), time.process_time(), 0
    while sent < TOTAL:
        conn.sendall(data)
        sent += chunk
    conn.close()
    wall, cpu = time.time() - start, time.process_time() - cpu_start
    os.waitpid(reader, 0)
    print(f"{chunk}-byte writes: {sent / wall / 1e9:.2f} GB/s, {sent / cpu / 1e9:.2f} GB per sender CPU-second")


if __name__ == "__main__":
    main()
