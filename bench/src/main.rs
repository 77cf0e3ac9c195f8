//! `fawkes-bench`: loads a real Fawkes server over real sockets with long-poll or WebSocket
//! clients and prints throughput and latency percentiles, one greppable line per run.
//!
//! By default the `fawkes serve` demo app runs in this process, on its own one-thread tokio
//! runtime, so the server and the load generator never share a worker thread; `--url` targets a
//! server already running on this machine instead. See `bench/README.md`.

mod ctx;
mod longpoll;
mod net;
mod presence;
mod sio;
mod sse;
mod ws;

use std::future::Future;
use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};

use crate::ctx::{Ctx, Phase, Res};
use crate::net::Target;

/// Most clients one run may open (this machine allows 20,000 open files per process).
const MAX_CLIENTS: usize = 19_900;
/// File descriptors the process needs besides client and server sockets.
const SPARE_FILES: u64 = 64;
/// How long in-flight pushes (echo) or undelivered broadcasts may take after the window ends.
const ECHO_DRAIN: Duration = Duration::from_secs(10);
const BROADCAST_DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, Parser)]
#[command(name = "fawkes-bench", about = "Measure a Fawkes server over real sockets: long-poll and WebSocket clients")]
struct Cli {
    /// A running server to measure, e.g. http://127.0.0.1:4000 (loopback only; the socket path
    /// defaults to /socket). Without it, the `fawkes serve` demo app runs in-process.
    #[arg(long, global = true)]
    url: Option<String>,
    /// Worker threads of the load generator's runtime (the in-process server has its own one).
    #[arg(long, global = true, default_value_t = 1)]
    client_threads: usize,
    /// Seconds allowed for every client to connect and join before the run fails.
    #[arg(long, global = true, default_value_t = 60)]
    ramp_seconds: u64,
    /// The protocol the WebSocket clients speak: Phoenix V2 JSON, or Socket.IO (Engine.IO v4) to
    /// measure a Socket.IO server doing the same job (see bench/peers/).
    #[arg(long, global = true, value_enum, default_value_t = Protocol::Phoenix)]
    protocol: Protocol,
    /// The server's process id: its resident memory (VmRSS) is read before the clients connect
    /// and once all have joined, and the growth per client is reported.
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// Clients connecting and joining at once (the rest wait their turn). `--mode storm` sends
    /// them all at once.
    #[arg(long, global = true, default_value_t = ctx::CONNECTING_AT_ONCE)]
    connect_at_once: usize,
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Debug, Subcommand)]
enum Workload {
    /// Long-poll sessions speaking Phoenix's long-poll protocol as phoenix.js does.
    Longpoll {
        /// Long-poll sessions.
        #[arg(long, default_value_t = 200)]
        sessions: usize,
        #[command(flatten)]
        run: RunArgs,
    },
    /// WebSocket clients (`/socket/websocket?vsn=2.0.0`).
    Ws {
        /// WebSocket clients.
        #[arg(long, default_value_t = 200)]
        clients: usize,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Server-Sent Events clients (`/socket/sse`: a stream down, ndjson POSTs up).
    Sse {
        /// SSE clients.
        #[arg(long, default_value_t = 200)]
        clients: usize,
        #[command(flatten)]
        run: RunArgs,
    },
}

#[derive(Debug, Clone, clap::Args)]
struct RunArgs {
    /// Length of the measured window.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// echo: each client pushes `ping` and awaits the reply, one at a time. broadcast: one extra
    /// publisher sends `new_msg` at --rate and every client receives it.
    #[arg(long, value_enum, default_value_t = Mode::Echo)]
    mode: Mode,
    /// Messages per second the broadcast publisher sends.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// broadcast: the publisher stops after this many messages, and the window ends once every
    /// subscriber has them all (or --seconds pass).
    #[arg(long)]
    count: Option<u64>,
    /// broadcast (ws only, with --count): instead of --rate, keep at most this many broadcasts in
    /// flight end to end; the publisher sends the next only once the oldest has reached every
    /// subscriber.
    #[arg(long)]
    window: Option<u64>,
    /// echo: each client pings once per this many milliseconds instead of again as soon as the
    /// reply comes.
    #[arg(long)]
    ping_every_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Echo,
    Broadcast,
    /// Clients join and stay quiet (heartbeats only) for the window: memory per connection.
    Idle,
    /// Every client connects and joins at once; failures are counted, not fatal: time to all joined.
    Storm,
    /// Every client joins as its own user (`{"user": "u<i>"}`, tracked in presence), --connect-at-once
    /// at a time; failures are counted, and each client keeps its presence list as phoenix.js does:
    /// time to all joined, and whether every list ends complete.
    Presence,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Protocol {
    Phoenix,
    Socketio,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    LongPoll,
    WebSocket,
    Sse,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::LongPoll => "longpoll",
            Transport::WebSocket => "ws",
            Transport::Sse => "sse",
        }
    }

    fn clients_word(self) -> &'static str {
        match self {
            Transport::LongPoll => "sessions",
            Transport::WebSocket | Transport::Sse => "clients",
        }
    }

    /// Sockets the load generator opens for `n` clients in `mode`.
    fn client_sockets(self, n: usize, mode: Mode) -> u64 {
        let n = n as u64;
        match (self, mode) {
            (Transport::LongPoll, Mode::Echo) => 2 * n,
            (Transport::LongPoll, _) => n + 2,
            (Transport::WebSocket, Mode::Broadcast) => n + 1,
            (Transport::WebSocket, _) => n,
            (Transport::Sse, _) => 2 * n + 1,
        }
    }
}

/// What one run measured.
#[derive(Debug)]
struct Report {
    transport: Transport,
    mode: Mode,
    clients: usize,
    rate: u32,
    window: Duration,
    counted: u64,
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
    published: u64,
    delivered: u64,
    connect: Duration,
    rss_per_client_kib: Option<f64>,
    in_process: bool,
    /// Echo replies per client while measuring: fewest, median, most.
    spread: (u64, u64, u64),
    /// CPU used while measuring, as a share of one core: server (in-process only), load generator.
    server_cpu: Option<f64>,
    client_cpu: Option<f64>,
    protocol: Protocol,
    /// The server process's VmRSS in KiB before the clients connected and once all had joined.
    server_rss_kib: Option<(u64, u64)>,
    /// CPU the server process (`--server-pid`) used from the start of the window to the end of
    /// the drain, and how long that was.
    server_process_cpu: Option<(Duration, Duration)>,
    /// Clients whose connect or join failed (storm).
    failed: usize,
    /// Broadcast: deliveries per second from the first broadcast to the last delivery, and the
    /// time until the last subscriber had each broadcast (p50, p99, max µs, broadcasts).
    fanout_rate: Option<f64>,
    last_subscriber: (u64, u64, u64, usize),
    /// Broadcast: the most broadcasts in flight end to end (instead of a rate).
    in_flight_window: Option<u64>,
    /// CPU the server process used from before the first client connected until all had joined.
    connect_server_cpu: Option<Duration>,
    /// CPU the load generator's threads used over the same time.
    connect_client_cpu: Option<Duration>,
    /// Presence: clients whose list ended complete, clients that joined, and when (since the
    /// first connect) every list was complete, if it was.
    presence: Option<(usize, usize, Option<Duration>)>,
}

impl Report {
    fn line(&self) -> String {
        let ms = |us: u64| format!("{:.2}ms", us as f64 / 1000.0);
        let per_sec = self.counted as f64 / self.window.as_secs_f64();
        let mode = match self.mode {
            Mode::Echo => "echo",
            Mode::Broadcast => "broadcast",
            Mode::Idle => "idle",
            Mode::Storm => "storm",
            Mode::Presence => "presence",
        };
        let transport = match (self.transport, self.protocol) {
            (Transport::WebSocket, Protocol::Socketio) => "socketio",
            (t, _) => t.name(),
        };
        let mut line = format!(
            "{:<8}  mode={mode:<9}  {}={}  seconds={}",
            transport,
            self.transport.clients_word(),
            self.clients,
            self.window.as_secs_f64().round(),
        );
        match (self.mode, self.in_flight_window) {
            (Mode::Broadcast, Some(window)) => line += &format!("  window={window}"),
            (Mode::Broadcast, None) => line += &format!("  rate={}/s", self.rate),
            _ => {}
        }
        if matches!(self.mode, Mode::Echo | Mode::Broadcast) {
            line += &format!(
                "  msgs/s={per_sec:.0}  p50={}  p99={}  max={}",
                ms(self.p50_us),
                ms(self.p99_us),
                ms(self.max_us)
            );
        }
        match self.mode {
            Mode::Idle => {}
            Mode::Storm => line += &format!("  joined={}  failed={}", self.clients - self.failed, self.failed),
            Mode::Presence => {
                line += &format!("  joined={}  failed={}", self.clients.saturating_sub(self.failed), self.failed);
                if let Some((complete, joined, done)) = self.presence {
                    let done = done.map_or_else(|| "never".to_owned(), |d| format!("{:.2}s", d.as_secs_f64()));
                    line += &format!("  lists_complete={complete}/{joined}  lists_done={done}");
                }
            }
            Mode::Echo => {
                let (fewest, median, most) = self.spread;
                line += &format!("  answered={}  per-client=min:{fewest}/median:{median}/max:{most}", self.counted);
            }
            Mode::Broadcast => {
                let expected = self.published * self.clients as u64;
                line += &format!(
                    "  published={}({:.0}/s)  delivered={}  undelivered={}",
                    self.published,
                    self.published as f64 / self.window.as_secs_f64(),
                    self.delivered,
                    expected.saturating_sub(self.delivered)
                );
                if let Some(rate) = self.fanout_rate {
                    line += &format!("  fanout={rate:.0}/s");
                }
                let (p50, p99, max, n) = self.last_subscriber;
                line +=
                    &format!("  last_subscriber=p50:{}/p99:{}/max:{}(over {n} broadcasts)", ms(p50), ms(p99), ms(max));
            }
        }
        if let Some(cpu) = self.server_cpu {
            line += &format!("  server_cpu={:.0}%", cpu * 100.0);
        }
        if let Some((cpu, wall)) = self.server_process_cpu {
            line += &format!(
                "  server_cpu={:.0}%  server_cpu_s={:.2}",
                cpu.as_secs_f64() / wall.as_secs_f64().max(1e-3) * 100.0,
                cpu.as_secs_f64()
            );
            if self.mode == Mode::Broadcast && cpu > Duration::ZERO {
                line += &format!("  fanout/server_cpu_s={:.0}", self.delivered as f64 / cpu.as_secs_f64());
            }
        }
        if let Some(cpu) = self.client_cpu {
            line += &format!("  client_cpu={:.0}%", cpu * 100.0);
        }
        line += &format!("  connect={:.2}s", self.connect.as_secs_f64());
        if let Some(cpu) = self.connect_server_cpu {
            line += &format!("  connect_server_cpu={:.2}s", cpu.as_secs_f64());
        }
        if let Some(cpu) = self.connect_client_cpu {
            line += &format!("  connect_client_cpu={:.2}s", cpu.as_secs_f64());
        }
        if let Some(kib) = self.rss_per_client_kib {
            let whose = if self.in_process { "client+server" } else { "client" };
            line += &format!("  rss/client={kib:.1}KiB({whose})");
        }
        if let Some((before, after)) = self.server_rss_kib {
            let joined = self.clients.saturating_sub(self.failed).max(1);
            line += &format!(
                "  server_rss={:.1}->{:.1}MiB  server_rss/client={:.2}KiB",
                before as f64 / 1024.0,
                after as f64 / 1024.0,
                after.saturating_sub(before) as f64 / joined as f64
            );
        }
        line
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (transport, clients, run) = match &cli.workload {
        Workload::Longpoll { sessions, run } => (Transport::LongPoll, *sessions, run.clone()),
        Workload::Ws { clients, run } => (Transport::WebSocket, *clients, run.clone()),
        Workload::Sse { clients, run } => (Transport::Sse, *clients, run.clone()),
    };
    match check_args(&cli, transport, clients, &run) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("fawkes-bench: {e}");
            return ExitCode::from(2);
        }
    }

    let server = match &cli.url {
        Some(url) => match Target::parse(url) {
            Ok(target) => Server::Remote(target),
            Err(e) => {
                eprintln!("fawkes-bench: {e}");
                return ExitCode::from(2);
            }
        },
        None => match InProcess::start() {
            Ok(server) => Server::InProcess(server),
            Err(e) => {
                eprintln!("fawkes-bench: cannot start the in-process server: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let target = match &server {
        Server::Remote(target) => target.clone(),
        Server::InProcess(s) => Target::local(s.addr),
    };
    eprintln!(
        "fawkes-bench: {} {} {} against {} ({}), measuring {} s",
        clients,
        transport.name(),
        transport.clients_word(),
        target.addr,
        if matches!(server, Server::InProcess(_)) { "in-process demo server, 1 thread" } else { "--url" },
        run.seconds
    );

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.client_threads.max(1))
        .thread_name("bench-client")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fawkes-bench: cannot start the client runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let broadcasts = match run.count {
        Some(count) => count as usize,
        None => (u64::from(run.rate) * (run.seconds + 1)) as usize,
    };
    let storm = run.mode == Mode::Storm;
    let at_once = if storm { clients } else { cli.connect_at_once };
    let count_failures = matches!(run.mode, Mode::Storm | Mode::Presence);
    let ctx = Arc::new(Ctx::new(target, clients, broadcasts, at_once, count_failures));
    let in_process = matches!(server, Server::InProcess(_));
    let how = How { ramp_seconds: cli.ramp_seconds, in_process, protocol: cli.protocol, server_pid: cli.server_pid };
    let result = runtime.block_on(run_workload(ctx, transport, clients, run, how));
    // Cancels every client task and closes its sockets before the server goes.
    runtime.shutdown_timeout(Duration::from_secs(2));
    if let Server::InProcess(s) = server {
        s.stop();
    }
    let mut stdout = std::io::stdout();
    match result {
        Ok(report) => {
            let _ = writeln!(stdout, "{}", report.line());
            let _ = stdout.flush();
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = stdout.flush();
            eprintln!("fawkes-bench: error: {e}");
            ExitCode::from(1)
        }
    }
}

fn check_args(cli: &Cli, transport: Transport, clients: usize, run: &RunArgs) -> Res<()> {
    if clients == 0 || clients >= MAX_CLIENTS {
        return Err(format!("expected 1 to {} {}, got {clients}", MAX_CLIENTS - 1, transport.clients_word()));
    }
    if run.seconds == 0 || run.seconds > 3600 {
        return Err(format!("expected --seconds from 1 to 3600, got {}", run.seconds));
    }
    if run.mode == Mode::Broadcast && !(1..=100_000).contains(&run.rate) {
        return Err(format!("expected --rate from 1 to 100000, got {}", run.rate));
    }
    if run.count == Some(0) {
        return Err("expected --count of at least 1".to_owned());
    }
    if let Some(window) = run.window {
        if run.mode != Mode::Broadcast || transport != Transport::WebSocket {
            return Err("--window is for the ws workload in --mode broadcast".to_owned());
        }
        if window == 0 {
            return Err("expected --window of at least 1".to_owned());
        }
        match run.count {
            Some(count) if count <= ctx::TRACKED_BROADCASTS as u64 => {}
            _ => return Err(format!("--window needs --count, at most {}", ctx::TRACKED_BROADCASTS)),
        }
    }
    if run.mode == Mode::Presence && cli.protocol != Protocol::Phoenix {
        return Err("the presence mode needs Phoenix presence (--protocol phoenix)".to_owned());
    }
    if run.ping_every_ms == Some(0) {
        return Err("expected --ping-every-ms of at least 1".to_owned());
    }
    if cli.protocol == Protocol::Socketio && (transport != Transport::WebSocket || cli.url.is_none()) {
        return Err("--protocol socketio needs the ws workload and --url of a Socket.IO server".to_owned());
    }
    if transport != Transport::WebSocket && matches!(run.mode, Mode::Idle | Mode::Storm | Mode::Presence) {
        return Err("the idle, storm and presence modes are for the ws workload".to_owned());
    }
    let client_sockets = transport.client_sockets(clients, run.mode);
    let in_process = cli.url.is_none();
    // In-process, every client socket has a server socket in this process too.
    let needed = client_sockets * if in_process { 2 } else { 1 } + SPARE_FILES;
    if let Some((soft, hard)) = net::open_file_limits() {
        if needed > soft {
            let why = if in_process { " (client and in-process server sockets)" } else { "" };
            return Err(format!(
                "{clients} {} {} need about {needed} open files{why}, but this process may open {soft} \
                 (`ulimit -n`; hard limit {hard}). Lower the count, raise `ulimit -n` up to {hard}, or run the \
                 server as its own process and pass --url, which halves what this process holds.",
                transport.name(),
                transport.clients_word(),
            ));
        }
    }
    Ok(())
}

/// How a run is made, besides its workload.
#[derive(Debug, Clone, Copy)]
struct How {
    ramp_seconds: u64,
    in_process: bool,
    protocol: Protocol,
    server_pid: Option<u32>,
}

async fn run_workload(ctx: Arc<Ctx>, transport: Transport, clients: usize, run: RunArgs, how: How) -> Res<Report> {
    let How { ramp_seconds, in_process, protocol, server_pid } = how;
    let server_rss_before = server_pid.and_then(net::process_rss_kib);
    let connect_cpu_before = server_pid.and_then(net::process_cpu);
    let connect_client_cpu_before = net::thread_cpu("bench-client");
    let rss_before = net::rss_kib();
    let ramp_start = Instant::now();
    let label = match transport {
        Transport::LongPoll => "long-poll session",
        Transport::WebSocket => "WebSocket client",
        Transport::Sse => "SSE client",
    };
    let role = match run.mode {
        Mode::Echo => ws::Role::Echo { every: run.ping_every_ms.map(Duration::from_millis) },
        Mode::Broadcast => ws::Role::Subscriber,
        Mode::Idle | Mode::Storm | Mode::Presence => ws::Role::Idle,
    };
    for id in 0..clients {
        let c = ctx.clone();
        match (transport, run.mode, protocol) {
            (Transport::LongPoll, Mode::Broadcast, _) => {
                spawn_client(&ctx, label, id, longpoll::subscriber_session(c, id))
            }
            (Transport::LongPoll, _, _) => spawn_client(&ctx, label, id, longpoll::echo_session(c, id)),
            (Transport::WebSocket, Mode::Presence, _) => {
                spawn_client(&ctx, label, id, presence::client(c, id, clients))
            }
            (Transport::WebSocket, _, Protocol::Phoenix) => {
                spawn_client(&ctx, label, id, ws::client(c, id, clients, role))
            }
            (Transport::WebSocket, _, Protocol::Socketio) => {
                spawn_client(&ctx, label, id, sio::client(c, id, clients, role))
            }
            (Transport::Sse, Mode::Broadcast, _) => spawn_client(&ctx, label, id, sse::subscriber_client(c, id)),
            (Transport::Sse, _, _) => spawn_client(&ctx, label, id, sse::echo_client(c, id)),
        }
    }
    let expected_joins = match run.mode {
        Mode::Broadcast => clients + 1,
        _ => clients,
    };

    // Ramp: every client connected and joined (the publisher last, so it joins a full room).
    let ramp_deadline = ramp_start + Duration::from_secs(ramp_seconds);
    let mut publisher_spawned = false;
    loop {
        if let Some(failure) = ctx.failure() {
            return Err(failure);
        }
        let joined = ctx.joined.load(Ordering::Relaxed);
        if joined == clients && run.mode == Mode::Broadcast && !publisher_spawned {
            publisher_spawned = true;
            let (c, id, rate) = (ctx.clone(), clients, run.rate);
            let publisher = ws::Role::Publisher { rate, count: run.count, window: run.window };
            match (transport, protocol) {
                (Transport::LongPoll, _) => {
                    spawn_client(&ctx, "publisher", id, longpoll::publisher_session(c, id, rate, run.count))
                }
                (Transport::WebSocket, Protocol::Phoenix) => {
                    spawn_client(&ctx, "publisher", id, ws::client(c, id, clients, publisher))
                }
                (Transport::WebSocket, Protocol::Socketio) => {
                    spawn_client(&ctx, "publisher", id, sio::client(c, id, clients, publisher))
                }
                (Transport::Sse, _) => {
                    spawn_client(&ctx, "publisher", id, sse::publisher_client(c, id, rate, run.count))
                }
            }
        }
        if joined >= expected_joins {
            break;
        }
        let failed = ctx.failed.load(Ordering::Relaxed);
        if ctx.count_failures && joined + failed >= expected_joins {
            break;
        }
        if ctx.count_failures && Instant::now() >= ramp_deadline {
            // Clients still trying when the storm's time is up count as failed.
            ctx.failed.fetch_add(expected_joins - joined - failed, Ordering::Relaxed);
            break;
        }
        if Instant::now() >= ramp_deadline {
            return Err(format!(
                "expected all {expected_joins} clients to connect and join {} within {ramp_seconds} s \
                 (--ramp-seconds), but {joined} had",
                ctx::TOPIC
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let connect = ramp_start.elapsed();
    let rss_after = net::rss_kib();
    let mut server_rss_after = server_pid.and_then(net::process_rss_kib);
    let connect_server_cpu = connect_cpu_before
        .zip(server_pid.and_then(net::process_cpu))
        .map(|(before, after)| after.saturating_sub(before));
    let connect_client_cpu = connect_client_cpu_before
        .zip(net::thread_cpu("bench-client"))
        .map(|(before, after)| after.saturating_sub(before));
    eprintln!("fawkes-bench: {expected_joins} joined in {:.2} s; measuring", connect.as_secs_f64());

    // Measure.
    let cpu_before = (net::thread_cpu("bench-server"), net::thread_cpu("bench-client"));
    let server_cpu_before = server_pid.and_then(net::process_cpu);
    ctx.set_phase(Phase::Measure);
    let window_start = Instant::now();
    let window_end = window_start + Duration::from_secs(run.seconds);
    let all_delivered =
        |ctx: &Ctx| run.count.is_some_and(|count| ctx.delivered.load(Ordering::Relaxed) >= count * clients as u64);
    // Presence: the window ends once every client that joined holds every one of them.
    let lists_complete = |ctx: &Ctx| {
        let (complete, joined) = ctx.presence_complete(ctx.joined.load(Ordering::Relaxed));
        (complete, joined, run.mode == Mode::Presence && complete == joined)
    };
    let mut lists_done = None;
    while Instant::now() < window_end && ctx.phase() == Phase::Measure && !all_delivered(&ctx) {
        if run.mode == Mode::Presence && lists_complete(&ctx).2 {
            lists_done = Some(ramp_start.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20).min(window_end.saturating_duration_since(Instant::now()))).await;
    }
    let presence = (run.mode == Mode::Presence).then(|| {
        let (complete, joined, _) = lists_complete(&ctx);
        if complete < joined {
            let expected = ctx.joined.load(Ordering::Relaxed);
            let some: Vec<String> = ctx
                .presence_incomplete(expected, 8)
                .into_iter()
                .map(|(id, keys)| format!("u{id} holds {keys}"))
                .collect();
            eprintln!(
                "fawkes-bench: {} presence lists are not complete (expected {expected} keys): {}",
                joined - complete,
                some.join(", ")
            );
        }
        (complete, joined, lists_done)
    });
    if run.mode == Mode::Presence {
        // While holding: every client joined, and the lists as complete as they got.
        server_rss_after = server_pid.and_then(net::process_rss_kib);
    }
    let window = window_start.elapsed();
    ctx.set_phase(Phase::Drain);
    let cpu_after = (net::thread_cpu("bench-server"), net::thread_cpu("bench-client"));
    let share = |before: Option<Duration>, after: Option<Duration>| {
        Some(after?.saturating_sub(before?).as_secs_f64() / window.as_secs_f64())
    };
    let server_cpu = if in_process { share(cpu_before.0, cpu_after.0) } else { None };
    let client_cpu = share(cpu_before.1, cpu_after.1);

    // Drain: answers to pushes in flight, broadcasts not yet delivered (bounded).
    let drain_start = Instant::now();
    loop {
        if ctx.phase() == Phase::Stop {
            break;
        }
        let drained = match run.mode {
            Mode::Echo => ctx.in_flight.load(Ordering::Relaxed) == 0 || drain_start.elapsed() >= ECHO_DRAIN,
            Mode::Broadcast => {
                let expected = ctx.published.load(Ordering::Relaxed) * clients as u64;
                ctx.delivered.load(Ordering::Relaxed) >= expected || drain_start.elapsed() >= BROADCAST_DRAIN
            }
            Mode::Idle | Mode::Storm | Mode::Presence => true,
        };
        if drained {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let server_cpu_after = server_pid.and_then(net::process_cpu);
    let server_process_cpu = server_cpu_before
        .zip(server_cpu_after)
        .map(|(before, after)| (after.saturating_sub(before), window_start.elapsed()));
    if let Some(failure) = ctx.finish() {
        return Err(failure);
    }

    let (p50_us, p99_us, max_us, _) = ctx.percentiles();
    let rss_per_client_kib = match (rss_before, rss_after) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before) as f64 / clients as f64),
        _ => None,
    };
    Ok(Report {
        transport,
        mode: run.mode,
        clients,
        rate: run.rate,
        window,
        counted: ctx.counted.load(Ordering::Relaxed),
        p50_us,
        p99_us,
        max_us,
        published: ctx.published.load(Ordering::Relaxed),
        delivered: ctx.delivered.load(Ordering::Relaxed),
        connect,
        rss_per_client_kib,
        in_process,
        spread: ctx.per_client_spread(),
        server_cpu,
        client_cpu,
        protocol,
        server_rss_kib: server_rss_before.zip(server_rss_after),
        server_process_cpu,
        failed: ctx.failed.load(Ordering::Relaxed),
        fanout_rate: if run.mode == Mode::Broadcast { ctx.fanout_rate() } else { None },
        last_subscriber: ctx.last_subscriber(clients),
        in_flight_window: run.window,
        connect_server_cpu,
        connect_client_cpu,
        presence,
    })
}

/// Runs one client; its first error fails the run, naming the client.
fn spawn_client(
    ctx: &Arc<Ctx>,
    label: &'static str,
    id: usize,
    client: impl Future<Output = Res<()>> + Send + 'static,
) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        if let Err(e) = client.await {
            ctx.fail(format!("{label} {id}: {e}"));
        }
    });
}

enum Server {
    Remote(Target),
    InProcess(InProcess),
}

/// The `fawkes serve` demo app on 127.0.0.1:0, on a runtime of its own with one worker thread.
struct InProcess {
    runtime: tokio::runtime::Runtime,
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl InProcess {
    fn start() -> std::io::Result<InProcess> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-server")
            .enable_all()
            .build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let endpoint = fawkes::Endpoint::new(fawkes_server::demo::router());
        let app = fawkes_server::app(endpoint.clone());
        let served = runtime.spawn(fawkes_server::serve(listener, app, endpoint, async {
            let _ = stopped.await;
        }));
        Ok(InProcess { runtime, addr, stop, served })
    }

    /// Shuts the server down, waiting a little for it (its clients are already gone).
    fn stop(self) {
        let _ = self.stop.send(());
        let served = self.served;
        let _ = self.runtime.block_on(async { tokio::time::timeout(Duration::from_secs(2), served).await });
        self.runtime.shutdown_timeout(Duration::from_secs(1));
    }
}
