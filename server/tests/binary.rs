//! `fawkes` driven as a user drives it: a child process started from a config file, flags and
//! environment variables, reached over HTTP and WebSocket, stopped with SIGTERM.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(10);

/// A fresh directory for one server's files (its SQLite database among them).
fn scratch() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "fawkes-server-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn fawkes(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fawkes"));
    cmd.current_dir(dir).env_remove("RUST_LOG");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FAWKES_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// A running `fawkes serve`.
struct Server {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Server {
    /// Starts `fawkes serve --config fawkes.toml ARGS` with `config` as the file; waits for the
    /// URL it prints.
    fn start(config: &str, args: &[&str], env: &[(&str, &str)]) -> Server {
        let dir = scratch();
        std::fs::write(dir.join("fawkes.toml"), config).expect("write config");
        let mut cmd = fawkes(&dir);
        cmd.args(["serve", "--config", "fawkes.toml"]).args(args).envs(env.iter().copied());
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn fawkes");
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let _ = stdout.read_line(&mut line);
        let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) else {
            let _ = child.kill();
            let mut err = String::new();
            let _ = child.stderr.take().expect("stderr").read_to_string(&mut err);
            panic!("fawkes did not start: {line}{err}");
        };
        let addr = url.trim_start_matches("http://").trim_end_matches('/').parse().expect("printed address");
        // Keep reading stdout so that the server never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || std::io::copy(&mut BufReader::new(stderr), &mut std::io::sink()));
        Server { child, addr, dir }
    }

    fn sigterm(&self) {
        let ok = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill");
        assert!(ok.success());
    }

    /// Waits for the process to exit; returns how long that took.
    fn exited(&mut self, within: Duration) -> Duration {
        let start = Instant::now();
        while start.elapsed() < within {
            if self.child.try_wait().expect("wait").is_some() {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("fawkes still running {within:?} after SIGTERM");
    }

    async fn ws(&self, origin: Option<&str>) -> Result<Ws, tungstenite::Error> {
        let mut req = format!("ws://{}/socket/websocket?vsn=2.0.0", self.addr).into_client_request()?;
        if let Some(origin) = origin {
            req.headers_mut().insert("origin", origin.parse().expect("origin header"));
        }
        tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
            .await
            .expect("connect in time")
            .map(|(ws, _)| ws)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A plain HTTP/1.1 GET: status and body.
fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).expect("write");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

/// The status of a GET whose body may never end (an event stream).
fn status_line(addr: SocketAddr, path: &str, origin: &str) -> u16 {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nOrigin: {origin}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).expect("write");
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).expect("status line");
    line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Reads until the server's close frame; returns its code.
async fn closed(ws: &mut Ws) -> Option<u16> {
    let close = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    });
    close.await.expect("the server closes within the wait")
}

fn check(contents: &str) -> (bool, String) {
    let dir = scratch();
    std::fs::write(dir.join("f.toml"), contents).expect("write");
    let out = fawkes(&dir).args(["config", "check", "f.toml"]).output().expect("run config check");
    let _ = std::fs::remove_dir_all(&dir);
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

const LOCAL: &str = "bind = \"127.0.0.1:0\"\n";

#[test]
fn config_check_accepts_the_example_and_the_issue_keys() {
    let example = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fawkes.example.toml"))
        .expect("the example file");
    let (ok, out) = check(&example);
    assert!(ok, "{out}");

    let issue = r#"
bind = "127.0.0.1:4000"
allowed_origins = ["http://localhost:3000", "https://*.example.com"]
database = "sqlite://fawkes.db"        # the demo app's and the history's database
pubsub = "redis://127.0.0.1:6379"      # optional: cluster backend
secret = "..."                         # optional: signs long-poll/SSE sessions

[auth]
jwt_secret = "..."                     # HS256; or jwt_public_key = "key.pem" (RS256/ES256)
anonymous = false                      # true lets clients without a token connect (no user)

[api]
key = "..."                            # Bearer key for /api/*

[[namespace]]
pattern = "chat:*"                     # a topic pattern, `*` matches the rest of the topic
join = "anyone"                        # "anyone" | "authenticated" | "claim" (token's channels claim)
publish = true                         # clients may push any event here
presence = true
"#;
    let (ok, out) = check(issue);
    assert!(ok, "{out}");
    assert!(!out.contains("not yet active"), "{out}");
}

#[test]
fn config_check_names_unknown_keys_and_bad_values_and_what_is_allowed() {
    let cases = [
        ("bindd = \"127.0.0.1:4000\"\n", ["bindd", "expected one of `bind`"]),
        ("[limits]\nmax_frame_size = \"big\"\n", ["max_frame_size", "invalid type"]),
        ("[limits]\nmax_topic_len = 300\n", ["max_topic_len", "1 to 255"]),
        (
            "[[namespace]]\npattern = \"chat:*\"\njoin = \"everyone\"\n",
            ["everyone", "`anyone`, `authenticated`, `claim`"],
        ),
        ("[[namespace]]\npattern = \"a*b\"\n", ["[[namespace]] pattern", "only end the pattern"]),
        ("allowed_origins = [\"https://*\"]\n", ["allowed_origins", "http://localhost:*"]),
        ("bind = \"localhost:http\"\n", ["bind", "expected HOST:PORT"]),
        ("database = \"mysql://u:pw@db/app\"\n", ["database", "u:***@db"]),
        ("pubsub = \"redis://127.0.0.1:6379\"\n", ["secret", "required with pubsub"]),
        ("[drain]\nduration = 10\ndeadline = 5\n", ["[drain] deadline", "at least the duration"]),
        ("[auth]\nbogus = 1\n", ["bogus", "`jwt_secret`"]),
    ];
    for (file, expected) in cases {
        let (ok, out) = check(file);
        assert!(!ok, "{file:?} accepted: {out}");
        for e in expected {
            assert!(out.contains(e), "{file:?}: {e:?} not in {out:?}");
        }
        assert!(!out.contains("pw@"), "a password in an error: {out}");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

#[test]
fn a_flag_wins_over_the_environment_which_wins_over_the_file() {
    let [file, env, flag] = [free_port(), free_port(), free_port()];
    let config = format!("bind = \"127.0.0.1:{file}\"\n");
    let env_bind = format!("127.0.0.1:{env}");
    let flag_bind = format!("127.0.0.1:{flag}");
    assert_eq!(Server::start(&config, &[], &[]).addr.port(), file);
    assert_eq!(Server::start(&config, &[], &[("FAWKES_BIND", &env_bind)]).addr.port(), env);
    assert_eq!(Server::start(&config, &["--bind", &flag_bind], &[("FAWKES_BIND", &env_bind)]).addr.port(), flag);
    // A bare port is 127.0.0.1:PORT.
    let port = free_port().to_string();
    assert_eq!(Server::start("", &["--bind", &port], &[]).addr.to_string(), format!("127.0.0.1:{port}"));

    let dir = scratch();
    let out = fawkes(&dir)
        .args(["serve", "--bind", "127.0.0.1:0"])
        .env("FAWKES_MAX_TOPIC_LEN", "many")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--max-topic-len"), "{err}");
}

#[test]
fn a_port_in_use_is_named_and_nothing_is_created() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = scratch();
    let out = fawkes(&dir).args(["serve", "--bind", &addr]).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr) && err.contains("already in use"), "{err}");
    assert!(!dir.join("fawkes.db").exists(), "the database was created before the bind failed");
    assert!(!err.contains('\u{1b}'), "colour codes on a stderr that is not a terminal: {err:?}");

    let out = fawkes(&dir).args(["serve", "--log-format", "json", "--bind", &addr]).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> =
        err.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"))).collect();
    assert!(lines.iter().any(|l| l["level"] == "ERROR" && l.to_string().contains("already in use")), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unreachable_postgres_is_named_at_once_without_its_password() {
    let url = format!("postgres://app:hunter2@127.0.0.1:{}/app", free_port());
    let dir = scratch();
    let started = Instant::now();
    let out = fawkes(&dir).args(["serve", "--bind", "127.0.0.1:0", "--database", &url]).output().expect("run");
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("app:***@127.0.0.1") && err.contains("cannot reach"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_host_name_binds_and_a_bare_database_path_is_a_sqlite_file() {
    let port = free_port();
    let server = Server::start("", &["--bind", &format!("localhost:{port}"), "--database", "chat.db"], &[]);
    assert_eq!(server.addr.port(), port);
    assert!(server.addr.ip().is_loopback());
    assert!(server.dir.join("chat.db").exists(), "no chat.db in {}", server.dir.display());
}

#[test]
fn serve_help_says_where_things_are() {
    let out = fawkes(&scratch()).args(["serve", "--help"]).output().expect("run");
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "http://127.0.0.1:4000/",
        "/metrics",
        "/health",
        "RUST_LOG",
        "--config",
        "--allowed-origin",
        "sqlite",
        "--jwt-secret",
        "/api/broadcast",
    ] {
        assert!(help.contains(needle), "{needle:?} not in serve --help");
    }
}

#[tokio::test]
async fn every_metric_has_a_help_line() {
    let server = Server::start(LOCAL, &[], &[]);
    let (status, body) = get(server.addr, "/metrics", &[]);
    assert_eq!(status, 200);
    let names: Vec<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split([' ', '{']).next())
        .collect();
    assert!(names.len() >= 3, "{body}");
    for op in ["append", "read"] {
        assert!(body.contains(&format!("fawkes_history_errors_total{{op=\"{op}\"}} 0\n")), "{body}");
    }
    for name in names {
        // A histogram's series (_bucket, _sum, _count) share the histogram's HELP line.
        let histogram = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s));
        let name = histogram.filter(|h| body.contains(&format!("# TYPE {h} histogram"))).unwrap_or(name);
        assert!(body.contains(&format!("# HELP {name} ")), "no HELP for {name}: {body}");
    }
}

#[tokio::test]
async fn allowed_origins_apply_to_websocket_and_long_poll() {
    let config = format!("{LOCAL}allowed_origins = [\"http://localhost:3000\", \"https://*.example.com\"]\n");
    let server = Server::start(&config, &[], &[]);
    for origin in ["http://localhost:3000", "https://app.example.com"] {
        server.ws(Some(origin)).await.unwrap_or_else(|e| panic!("{origin} refused: {e}"));
    }
    for origin in ["http://localhost:3001", "https://example.com", "http://app.example.com", "https://evil.test"] {
        match server.ws(Some(origin)).await {
            Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403, "{origin}"),
            other => panic!("{origin}: expected 403, got {:?}", other.map(|_| "101")),
        }
    }
    // Long-poll answers in Phoenix's envelope: 410 with a session token, or 403.
    let lp = "/socket/longpoll?vsn=2.0.0";
    let (_, allowed) = get(server.addr, lp, &[("Origin", "http://localhost:3000")]);
    assert!(allowed.contains(r#""status":410"#) && allowed.contains("token"), "{allowed}");
    let (_, refused) = get(server.addr, lp, &[("Origin", "https://evil.test")]);
    assert!(refused.contains(r#""status":403"#), "{refused}");
    let sse = "/socket/sse?vsn=2.0.0";
    assert_eq!(status_line(server.addr, sse, "http://localhost:3000"), 200);
    assert_eq!(status_line(server.addr, sse, "https://evil.test"), 403);

    // --allowed-origin is repeatable and replaces the file's list.
    let flagged = Server::start(
        &config,
        &["--allowed-origin", "http://front.test:*", "--allowed-origin", "http://other.test:8080"],
        &[],
    );
    flagged.ws(Some("http://front.test:5173")).await.expect("first flag");
    flagged.ws(Some("http://other.test:8080")).await.expect("second flag");
    assert!(flagged.ws(Some("http://localhost:3000")).await.is_err(), "the file's list still applies");
}

#[tokio::test]
async fn health_is_200_while_serving_and_503_from_the_first_moment_of_sigterm() {
    let config = format!("{LOCAL}[drain]\nduration = 2\nbatches = 2\ndeadline = 10\n");
    let mut server = Server::start(&config, &[], &[]);
    let mut a = server.ws(None).await.expect("connect");
    let mut b = server.ws(None).await.expect("connect");
    let (status, body) = get(server.addr, "/health", &[]);
    assert_eq!(status, 200, "{body}");
    let sent = Instant::now();
    server.sigterm();
    // The first batch closes one socket at once; the other stays open for a second, and
    // meanwhile the server answers /health with 503 and refuses new sockets.
    let (first, second) = tokio::select! {
        code = closed(&mut a) => (code, &mut b),
        code = closed(&mut b) => (code, &mut a),
    };
    assert_eq!(first, Some(1001));
    let (status, body) = get(server.addr, "/health", &[]);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    match server.ws(None).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        other => panic!("a new socket while draining: {:?}", other.map(|_| "101")),
    }
    assert_eq!(closed(second).await, Some(1001));
    assert!(sent.elapsed() >= Duration::from_millis(900), "the second batch came after {:?}", sent.elapsed());
    server.exited(WAIT);
}

#[tokio::test]
async fn health_is_503_once_the_cluster_backend_has_been_unreachable_too_long() {
    let dead = format!("redis://127.0.0.1:{}", free_port());
    let config = format!("{LOCAL}pubsub = \"{dead}\"\nsecret = \"s\"\n[health]\npubsub_outage = 0.5\n");
    let server = Server::start(&config, &[], &[]);
    let start = Instant::now();
    loop {
        let (status, body) = get(server.addr, "/health", &[]);
        if status == 503 {
            assert!(body.contains("pubsub unreachable"), "{body}");
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(start.elapsed() < WAIT, "still 200 after {:?}", start.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(start.elapsed() >= Duration::from_millis(400), "503 before the outage threshold");
}

#[tokio::test]
async fn a_staggered_drain_closes_sockets_in_batches_over_the_configured_time() {
    let config = format!("{LOCAL}[drain]\nduration = 2\nbatches = 4\ndeadline = 10\n");
    let mut server = Server::start(&config, &[], &[]);
    let mut sockets = Vec::new();
    for _ in 0..20 {
        sockets.push(server.ws(None).await.expect("connect"));
    }
    let sent = Instant::now();
    server.sigterm();
    let closes: Vec<(Option<u16>, Duration)> = futures_util::future::join_all(sockets.iter_mut().map(|ws| async {
        let code = closed(ws).await;
        (code, sent.elapsed())
    }))
    .await;
    let mut times: Vec<Duration> = closes
        .iter()
        .map(|(code, t)| {
            assert_eq!(*code, Some(1001));
            *t
        })
        .collect();
    times.sort();
    // Four batches of five, 0.5 s apart: the last comes about 1.5 s after the first.
    let spread = times[19] - times[0];
    assert!(spread >= Duration::from_millis(1300) && spread < Duration::from_millis(2500), "{times:?}");
    for batch in times.chunks(5) {
        assert!(
            batch[4] - batch[0] < Duration::from_millis(300),
            "a batch closed over {:?}: {times:?}",
            batch[4] - batch[0]
        );
    }
    server.exited(WAIT);
}

#[tokio::test]
async fn the_process_exits_by_the_drain_deadline_whatever_the_peers_do() {
    // A peer that never reads never answers the close handshake, which the server would
    // otherwise wait for (2 s).
    let config = format!("{LOCAL}[drain]\nduration = 0.5\nbatches = 1\ndeadline = 1\n");
    let mut server = Server::start(&config, &[], &[]);
    let _silent = server.ws(None).await.expect("connect");
    let sent = Instant::now();
    server.sigterm();
    let took = server.exited(WAIT);
    let since = sent.elapsed().min(took + Duration::from_millis(50));
    assert!(since < Duration::from_millis(1800), "exited {since:?} after SIGTERM, deadline 1 s");
}
