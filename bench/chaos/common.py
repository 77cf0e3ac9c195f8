"""What the chaos scripts share: starting `fawkes serve`, a process's resident memory, and one
plain HTTP/1.1 request."""
import socket
import subprocess
import tempfile
import time


def start_server(binary, extra):
    """Starts `binary serve` on an ephemeral loopback port with a SQLite file of its own and `extra`
    flags; returns the process and its (host, port) once it listens and has settled for a second."""
    scratch = tempfile.mkdtemp()
    server = subprocess.Popen(
        [binary, "serve", "--bind", "127.0.0.1:0", "--database", f"sqlite://{scratch}/fawkes.db", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    url = next(w for w in server.stdout.readline().split() if w.startswith("http://"))
    host, port = url[len("http://"):].rstrip("/").split(":")
    time.sleep(1)
    return server, (host, int(port))


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
