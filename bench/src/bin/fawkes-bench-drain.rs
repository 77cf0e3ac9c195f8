//! A staggered drain measured: two `fawkes serve` nodes of one cluster over Redis, N WebSocket
//! clients joined on node A, SIGTERM to A. Every client, when A closes its socket, reconnects to
//! node B the way phoenix.js does (first retry after 10 ms, then 50, 100, 150, 200, 250, 500 ms,
//! 1 s, 2 s, 5 s) and joins its room again. The run reports how long A took to drain and exit,
//! over how long the closes were spread, how many clients were back on B and how fast, and the
//! peak rate at which they arrived at B: the stampede a zero drain causes and a staggered one
//! spreads.
//!
//! ```sh
//! cargo build --release -p fawkes-server -p fawkes-bench
//! target/release/fawkes-bench-drain --clients 5000 --drain-duration 0
//! target/release/fawkes-bench-drain --clients 5000 --drain-duration 10 --drain-batches 20
//! ```
//!
//! The nodes are `--fawkes` (default `target/release/fawkes`) child processes on 127.0.0.1 with
//! ephemeral ports and SQLite files in a temporary directory; the backend is `--redis` (default
//! `FAWKES_TEST_REDIS` or `redis://127.0.0.1:6379`), under a cluster name of the run's own. Every
//! run ends on its own: clients not back on B within the drain deadline plus 15 s are counted as
//! lost. One line of results goes to stdout, progress to stderr.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Debug)]
#[command(about = "SIGTERM a node holding N clients; measure the drain and the reconnections to the other node")]
struct Args {
    /// WebSocket clients on node A.
    #[arg(long, default_value_t = 5000)]
    clients: usize,
    /// Seconds over which A closes its sockets (0: all at once, the stampede).
    #[arg(long, default_value_t = 10.0)]
    drain_duration: f64,
    /// Batches A closes them in.
    #[arg(long, default_value_t = 10)]
    drain_batches: u32,
    /// The `fawkes` binary.
    #[arg(long, default_value = "target/release/fawkes")]
    fawkes: PathBuf,
    /// The cluster backend.
    #[arg(long, env = "FAWKES_TEST_REDIS", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Rooms the clients are spread over.
    #[arg(long, default_value_t = 50)]
    rooms: usize,
}

/// phoenix.js's `reconnectAfterMs` for a socket.
const RECONNECT_MS: [u64; 10] = [10, 50, 100, 150, 200, 250, 500, 1000, 2000, 5000];

struct Node {
    child: Child,
    addr: SocketAddr,
}

impl Node {
    fn start(args: &Args, dir: &std::path::Path, name: &str, cluster: &str, drain: bool) -> Node {
        let (duration, deadline) =
            if drain { (args.drain_duration, (args.drain_duration + 10.0).max(30.0)) } else { (0.0, 30.0) };
        let mut child = Command::new(&args.fawkes)
            .current_dir(dir)
            .env_remove("RUST_LOG")
            .args(["serve", "--bind", "127.0.0.1:0", "--secret", "drain-bench", "--pubsub", &args.redis])
            .args(["--cluster", cluster, "--database", &format!("sqlite://{name}.db")])
            .args(["--drain-duration", &duration.to_string(), "--drain-batches", &args.drain_batches.to_string()])
            .args(["--drain-deadline", &deadline.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                fail(&format!(
                    "cannot run {}: {e} (build it: cargo build --release -p fawkes-server)",
                    args.fawkes.display()
                ))
            });
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let _ = stdout.read_line(&mut line);
        let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) else {
            let _ = child.kill();
            fail(&format!("node {name} did not start: {line}"));
        };
        let addr = url.trim_start_matches("http://").trim_end_matches('/').parse().expect("the printed address");
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        Node { child, addr }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fail(message: &str) -> ! {
    eprintln!("fawkes-bench-drain: {message}");
    std::process::exit(1)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects to `addr` and joins `topic`; the socket, or why not.
async fn join(addr: SocketAddr, topic: &str) -> Result<Ws, String> {
    let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.map_err(|e| e.to_string())?;
    let frame = format!(r#"["1","1","{topic}","phx_join",{{}}]"#);
    ws.send(Message::text(frame)).await.map_err(|e| e.to_string())?;
    let reply = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(msg) = ws.next().await {
            if let Ok(Message::Text(text)) = msg
                && text.contains("phx_reply")
            {
                return Ok(text);
            }
        }
        Err("closed before the join reply".to_owned())
    });
    let text = reply.await.map_err(|_| "no join reply within 10 s".to_owned())??;
    if text.contains(r#""status":"ok""#) { Ok(ws) } else { Err(format!("join refused: {text}")) }
}

/// What happened to one client after SIGTERM, in time since the signal.
#[derive(Default, Clone, Copy)]
struct Outcome {
    closed: Option<Duration>,
    rejoined: Option<Duration>,
}

/// Waits for A to close the socket, then reconnects to B as phoenix.js would; holds the new
/// socket until `hold` ends.
async fn client(
    mut ws: Ws,
    b: SocketAddr,
    topic: String,
    t0: Arc<tokio::sync::OnceCell<Instant>>,
    give_up: Duration,
    hold: Arc<tokio::sync::Notify>,
) -> Outcome {
    let mut outcome = Outcome::default();
    // A heartbeat-free idle socket: the server closes it (1001) or the connection ends.
    while let Some(Ok(msg)) = ws.next().await {
        if let Message::Close(_) = msg {
            break;
        }
    }
    let Some(t0) = t0.get().copied() else { return outcome };
    outcome.closed = Some(t0.elapsed());
    let mut attempt = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(RECONNECT_MS[attempt.min(RECONNECT_MS.len() - 1)])).await;
        if t0.elapsed() > give_up {
            return outcome;
        }
        match join(b, &topic).await {
            Ok(ws) => {
                outcome.rejoined = Some(t0.elapsed());
                let held = hold.notified();
                held.await;
                drop(ws);
                return outcome;
            }
            Err(_) => attempt += 1,
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let mut args = Args::parse();
    // The nodes run in a temporary directory: the binary's path must not be relative.
    args.fawkes = std::fs::canonicalize(&args.fawkes).unwrap_or_else(|e| {
        fail(&format!("{}: {e} (build it: cargo build --release -p fawkes-server)", args.fawkes.display()))
    });
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let cluster = format!("drain_bench_{}_{nanos}", std::process::id());
    let dir = std::env::temp_dir().join(&cluster);
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let a = Node::start(&args, &dir, "a", &cluster, true);
    let b = Node::start(&args, &dir, "b", &cluster, false);
    eprintln!(
        "node A {} (drain {} s in {} batches), node B {}",
        a.addr, args.drain_duration, args.drain_batches, b.addr
    );

    // Ramp: every client joined on A, 200 connecting at a time.
    let ramp = Instant::now();
    let gate = Arc::new(Semaphore::new(200));
    let t0 = Arc::new(tokio::sync::OnceCell::new());
    let hold = Arc::new(tokio::sync::Notify::new());
    let give_up = Duration::from_secs_f64((args.drain_duration + 10.0).max(30.0) + 15.0);
    let mut joining = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let gate = gate.clone();
        let topic = format!("room:drain{}", i % args.rooms.max(1));
        let addr = a.addr;
        joining.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.expect("open semaphore");
            join(addr, &topic).await.map(|ws| (ws, topic))
        }));
    }
    let mut clients = Vec::with_capacity(args.clients);
    for j in joining {
        match j.await.expect("join task") {
            Ok((ws, topic)) => clients.push(tokio::spawn(client(ws, b.addr, topic, t0.clone(), give_up, hold.clone()))),
            Err(e) => fail(&format!("a client could not join on A: {e}")),
        }
    }
    eprintln!("{} clients joined on A in {:.1} s", clients.len(), ramp.elapsed().as_secs_f64());

    // SIGTERM A; time its exit on a thread of its own.
    let start = Instant::now();
    let _ = t0.set(start);
    let status = Command::new("kill").args(["-TERM", &a.child.id().to_string()]).status().expect("kill");
    if !status.success() {
        fail("kill -TERM failed");
    }
    let mut a = a;
    let exited = std::thread::spawn(move || {
        let _ = a.child.wait();
        start.elapsed()
    });

    // Every client back on B, or given up; then release the sockets.
    let n = clients.len();
    let mut outcomes = Vec::with_capacity(n);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    for task in clients {
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            let _ = done_tx.send(task.await.unwrap_or_default());
        });
    }
    // Outcomes arrive only once the sockets are released; read the progress from the counts.
    let deadline = start + give_up + Duration::from_secs(1);
    let mut b_sockets;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        b_sockets = sockets(b.addr).await.unwrap_or(0);
        if b_sockets >= n || Instant::now() > deadline {
            break;
        }
    }
    let drain_took = exited.join().expect("the waiting thread");
    hold.notify_waiters();
    // Clients still waiting on `hold` missed the notification only if they joined after it; give
    // them a moment and notify again until every outcome is in.
    while outcomes.len() < n {
        match tokio::time::timeout(Duration::from_millis(200), done_rx.recv()).await {
            Ok(Some(outcome)) => outcomes.push(outcome),
            Ok(None) => break,
            Err(_) => hold.notify_waiters(),
        }
    }

    let mut closed: Vec<Duration> = outcomes.iter().filter_map(|o| o.closed).collect();
    let mut rejoined: Vec<Duration> = outcomes.iter().filter_map(|o| o.rejoined).collect();
    let mut gap: Vec<Duration> = outcomes.iter().filter_map(|o| Some(o.rejoined?.saturating_sub(o.closed?))).collect();
    closed.sort();
    rejoined.sort();
    gap.sort();
    // Arrivals at B per 100 ms window: the stampede.
    let mut windows = std::collections::HashMap::<u128, usize>::new();
    for t in &rejoined {
        *windows.entry(t.as_millis() / 100).or_default() += 1;
    }
    let peak = windows.values().copied().max().unwrap_or(0);
    println!(
        "drain {:>4.1} s/{:<3} clients {n}: A exited after {:.2} s; closes from {:.0} to {:.0} ms; \
         back on B {}/{n} (lost {}), last at {:.0} ms; close-to-rejoin p50 {:.0} ms p99 {:.0} ms max {:.0} ms; \
         peak {} rejoins per 100 ms ({}/s)",
        args.drain_duration,
        args.drain_batches,
        drain_took.as_secs_f64(),
        pct(&closed, 0.0),
        pct(&closed, 1.0),
        rejoined.len(),
        n - rejoined.len(),
        pct(&rejoined, 1.0),
        pct(&gap, 0.5),
        pct(&gap, 0.99),
        pct(&gap, 1.0),
        peak,
        peak * 10,
    );
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `fawkes_sockets` from a node's /metrics.
async fn sockets(addr: SocketAddr) -> Option<usize> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await.ok()?;
    body.lines().find_map(|l| l.strip_prefix("fawkes_sockets ")?.trim().parse().ok())
}
