//! Where the clients connect, from which source addresses, and how many sockets this process may open.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs as _};

use tokio::net::{TcpSocket, TcpStream};

/// Client sockets are spread round-robin over 127.0.0.2 ..= 127.0.0.(1 + SOURCE_ADDRS), so each
/// source address has its own ephemeral port range and a large run cannot exhaust one.
pub const SOURCE_ADDRS: usize = 32;

/// The server under test.
#[derive(Debug, Clone)]
pub struct Target {
    /// Where to connect.
    pub addr: SocketAddr,
    /// `host:port`, for the `Host` header and the WebSocket URL.
    pub authority: String,
    /// The socket path the phoenix client is given, e.g. `/socket`.
    pub path: String,
}

impl Target {
    /// The in-process server, listening at `addr`.
    pub fn local(addr: SocketAddr) -> Target {
        Target { addr, authority: addr.to_string(), path: fawkes_server::SOCKET_PATH.to_owned() }
    }

    /// Parses `http://HOST:PORT[/socket path]`. Only loopback servers are accepted: this tool
    /// sends load to this machine alone.
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("--url {url:?}: expected http://HOST:PORT (e.g. http://127.0.0.1:4000)"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let path = if path.is_empty() { fawkes_server::SOCKET_PATH } else { path };
        let addrs: Vec<SocketAddr> = authority
            .to_socket_addrs()
            .map_err(|e| format!("--url {url:?}: cannot resolve {authority:?} (expected HOST:PORT): {e}"))?
            .collect();
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| addrs.first())
            .copied()
            .ok_or_else(|| format!("--url {url:?}: {authority:?} resolves to no address"))?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "--url {url:?}: {addr} is not a loopback address; fawkes-bench only loads this machine"
            ));
        }
        Ok(Target { addr, authority: authority.to_owned(), path: path.to_owned() })
    }

    /// The source address for client number `n`, or `None` to let the kernel choose.
    pub fn source_addr(&self, n: usize) -> Option<IpAddr> {
        match self.addr.ip() {
            IpAddr::V4(_) => Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (n % SOURCE_ADDRS) as u8))),
            IpAddr::V6(_) => None,
        }
    }

    /// A TCP connection to the server from `source` (no Nagle: every client message is small and
    /// latency is what is measured).
    pub async fn connect(&self, source: Option<IpAddr>) -> Result<TcpStream, String> {
        let socket = if self.addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() };
        let socket = socket.map_err(|e| format!("cannot create a socket: {e}"))?;
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0)).map_err(|e| format!("cannot bind a client socket to {ip}: {e}"))?;
        }
        let stream = socket.connect(self.addr).await.map_err(|e| {
            let from = source.map(|ip| format!(" from {ip}")).unwrap_or_default();
            format!("cannot connect to {}{from}: {e}", self.addr)
        })?;
        stream.set_nodelay(true).map_err(|e| format!("cannot set TCP_NODELAY: {e}"))?;
        Ok(stream)
    }
}

/// The soft and hard limits on open files (`ulimit -n`, `ulimit -Hn`), from `/proc/self/limits`.
pub fn open_file_limits() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    let soft = fields.next()?.parse().ok()?;
    let hard = fields.next().and_then(|h| h.parse().ok()).unwrap_or(soft);
    Some((soft, hard))
}

/// Resident memory of this process in KiB, from `/proc/self/status`.
pub fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line["VmRSS:".len()..].split_whitespace().next()?.parse().ok()
}

/// Resident memory of process `pid` in KiB, from `/proc/PID/status`.
pub fn process_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line["VmRSS:".len()..].split_whitespace().next()?.parse().ok()
}

/// CPU time process `pid` has used so far (all its threads, user and system), from
/// `/proc/PID/stat` (in USER_HZ ticks, 100 per second on Linux).
pub fn process_cpu(pid: u32) -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which may itself hold spaces and parentheses.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(std::time::Duration::from_millis((utime + stime) * 10))
}

/// Percent-encodes a query value (tokens are URL-safe in practice; this keeps them so).
pub fn query_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// CPU time spent so far by this process's threads whose name starts with `prefix` (the
/// runtimes name their workers `bench-server` and `bench-client`), from `/proc/self/task`.
pub fn thread_cpu(prefix: &str) -> Option<std::time::Duration> {
    let mut total_ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let path = task.path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else { continue };
        if !comm.starts_with(prefix) {
            continue;
        }
        // The first field of schedstat is the time spent running, in nanoseconds.
        let Ok(schedstat) = std::fs::read_to_string(path.join("schedstat")) else { continue };
        total_ns += schedstat.split_whitespace().next().and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    }
    Some(std::time::Duration::from_nanos(total_ns))
}
