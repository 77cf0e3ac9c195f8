"""What the chaos scripts share: a process's resident memory, and one plain HTTP/1.1 request."""
import socket


def rss_kib(pid):
    """The VmRSS of process `pid`, in KiB (0 once it is gone)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def request(addr, method, path, body=b"", content_type="application/x-ndjson"):
    """Sends one request on a connection of its own; returns the status and the body."""
    s = socket.create_connection(addr)
    head = f"{method} {path} HTTP/1.1\r\nHost: {addr[0]}:{addr[1]}\r\nConnection: close\r\n"
    if body:
        head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    s.sendall(head.encode() + b"\r\n" + body)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[1]
