//! `fawkes serve` for any backend, driven as a user drives it: a child process started from a
//! config file with token auth, namespaces, the HTTP API and the connect/join hooks, reached over
//! WebSocket, long-poll, SSE and plain HTTP.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

mod support;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(10);
const SECRET: &str = "test-secret-0123456789";
const API_KEY: &str = "api-key-0123456789";

use support::scratch;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A running `fawkes serve --config fawkes.toml`.
struct Server {
    /// Kept for its lifetime: dropping it stops the server.
    _process: support::Server,
    addr: SocketAddr,
}

impl Server {
    fn start(config: &str) -> Server {
        let process = support::Server::start(config, &[]);
        Server { addr: process.addr, _process: process }
    }

    async fn ws(&self, query: &str, protocols: Option<&str>) -> Result<Ws, tungstenite::Error> {
        let mut req = format!("ws://{}/socket/websocket?vsn=2.0.0{query}", self.addr).into_client_request()?;
        if let Some(p) = protocols {
            req.headers_mut().insert("sec-websocket-protocol", p.parse().expect("header"));
        }
        tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
            .await
            .expect("connect in time")
            .map(|(ws, _)| ws)
    }

    /// A WebSocket with `token` as connect param.
    async fn client(&self, token: Option<&str>) -> Client {
        let query = token.map_or(String::new(), |t| format!("&token={t}"));
        Client::new(self.ws(&query, None).await.expect("connects"))
    }

    /// The status a WebSocket upgrade is answered with.
    async fn ws_status(&self, query: &str) -> u16 {
        match self.ws(query, None).await {
            Ok(_) => 101,
            Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
            Err(e) => panic!("{e}"),
        }
    }

    fn metrics(&self) -> String {
        http(self.addr, "GET", "/metrics", &[], "").1
    }
}

/// A plain HTTP/1.1 request: status and body.
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(req.as_bytes()).expect("write");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

/// The status of a GET whose body may never end (an event stream).
fn status_line(addr: SocketAddr, path: &str) -> u16 {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).expect("write");
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).expect("status line");
    line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn hs256(claims: Value) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes()))
        .expect("encode")
}

fn token(sub: &str) -> String {
    hs256(json!({"sub": sub, "exp": now() + 600}))
}

/// A phoenix V2 client on one WebSocket.
struct Client {
    ws: Ws,
    next: u64,
    /// Topics joined, with the join's ref.
    joins: Vec<(String, String)>,
    /// Frames read while waiting for a reply.
    pending: std::collections::VecDeque<Value>,
}

impl Client {
    fn new(ws: Ws) -> Client {
        Client { ws, next: 0, joins: Vec::new(), pending: Default::default() }
    }

    async fn send(&mut self, join_ref: Option<&str>, topic: &str, event: &str, payload: Value) -> String {
        self.next += 1;
        let r = self.next.to_string();
        let frame = json!([join_ref, r, topic, event, payload]).to_string();
        self.ws.send(Message::text(frame)).await.expect("send");
        r
    }

    /// The next frame that is not a heartbeat.
    async fn recv(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next()).await.expect("a frame in time");
            match msg {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).expect("JSON frame"),
                Some(Ok(_)) => continue,
                other => panic!("socket ended: {other:?}"),
            }
        }
    }

    /// The reply to `r`, as (status, response); other frames before it are kept for [`Client::event`].
    async fn reply(&mut self, r: &str) -> (String, Value) {
        loop {
            let f = self.recv().await;
            if f[3] == "phx_reply" && f[1] == r {
                return (f[4]["status"].as_str().unwrap_or_default().to_owned(), f[4]["response"].clone());
            }
            self.pending.push_back(f);
        }
    }

    async fn join(&mut self, topic: &str, params: Value) -> (String, Value) {
        let r = self.send(None, topic, "phx_join", params).await;
        let (status, response) = self.reply(&r).await;
        // Later pushes on this topic carry the join's ref.
        self.joins.retain(|(t, _)| t != topic);
        self.joins.push((topic.to_owned(), r));
        (status, response)
    }

    async fn push(&mut self, topic: &str, event: &str, payload: Value) -> (String, Value) {
        let join_ref = self.joins.iter().find(|(t, _)| t == topic).map(|(_, r)| r.clone());
        let r = self.send(join_ref.as_deref(), topic, event, payload).await;
        self.reply(&r).await
    }

    /// The next frame of `event`.
    /// The first meta of `key` in this client's presence list: from `presence_state`, or from
    /// the `presence_diff` that brings it (changes go out once per presence window, so a joiner's
    /// own entry may come just after the state).
    async fn presence_meta(&mut self, key: &str) -> Value {
        let state = self.event("presence_state").await;
        if let Some(meta) = state[4][key]["metas"].get(0) {
            return meta.clone();
        }
        loop {
            let diff = self.event("presence_diff").await;
            if let Some(meta) = diff[4]["joins"][key]["metas"].get(0) {
                return meta.clone();
            }
        }
    }

    async fn event(&mut self, event: &str) -> Value {
        if let Some(i) = self.pending.iter().position(|f| f[3] == event) {
            return self.pending.remove(i).expect("present");
        }
        loop {
            let f = self.recv().await;
            if f[3] == event {
                return f;
            }
        }
    }
}

const NAMESPACES: &str = r#"
[[namespace]]
pattern = "chat:*"
join = "authenticated"
publish = true
presence = true

[[namespace]]
pattern = "private:*"
join = "claim"
publish = true

[[namespace]]
pattern = "news:*"
join = "anyone"
publish = false

[[namespace]]
pattern = "open:*"
join = "anyone"
publish = true
"#;

fn jwt_config(anonymous: bool) -> String {
    format!(
        "[auth]\njwt_secret = \"{SECRET}\"\nanonymous = {anonymous}\n[api]\nkey = \"{API_KEY}\"\nmax_body_size = 1024\n{NAMESPACES}"
    )
}

fn counter(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in {metrics}"))
}

#[tokio::test]
async fn tokens_are_checked_at_connect_on_every_transport() {
    let server = Server::start(&jwt_config(false));
    let good = token("ann");
    let expired = hs256(json!({"sub": "ann", "exp": now() - 3600}));
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "ann", "exp": now() + 600}),
        &EncodingKey::from_secret(b"not the secret"),
    )
    .expect("encode");

    // WebSocket: the connect param, and phoenix.js's authToken subprotocol.
    assert_eq!(server.ws_status(&format!("&token={good}")).await, 101);
    for bad in [&expired, &forged, &"garbage".to_owned(), &String::new()] {
        assert_eq!(server.ws_status(&format!("&token={bad}")).await, 403, "{bad}");
    }
    assert_eq!(server.ws_status("").await, 403, "no token and anonymous = false");
    let bearer = |t: &str| {
        use base64::Engine as _;
        format!("phoenix, base64url.bearer.phx.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t))
    };
    let mut req = format!("ws://{}/socket/websocket?vsn=2.0.0", server.addr).into_client_request().expect("request");
    req.headers_mut().insert("sec-websocket-protocol", bearer(&good).parse().expect("header"));
    let (_, response) = tokio_tungstenite::connect_async(req).await.expect("authToken accepted");
    assert_eq!(response.headers().get("sec-websocket-protocol").map(|v| v.as_bytes()), Some(&b"phoenix"[..]));
    assert!(
        matches!(server.ws("", Some(&bearer(&expired))).await, Err(tungstenite::Error::Http(r)) if r.status() == 403)
    );

    // Long-poll: phoenix.js sends the app's token first and its own session token last (`null`
    // on the first GET).
    let lp = |t: &str| format!("/socket/longpoll?token={t}&vsn=2.0.0&token=null");
    let (_, opened) = http(server.addr, "GET", &lp(&good), &[], "");
    assert!(opened.contains(r#""status":410"#) && opened.contains(r#""token":""#), "{opened}");
    for bad in [&expired, &forged] {
        let (_, refused) = http(server.addr, "GET", &lp(bad), &[], "");
        assert!(refused.contains(r#""status":403"#), "{refused}");
    }
    let (_, header) = http(server.addr, "GET", "/socket/longpoll?vsn=2.0.0", &[("X-Phoenix-AuthToken", &good)], "");
    assert!(header.contains(r#""status":410"#), "{header}");

    // SSE: the stream opens, or is answered 403.
    assert_eq!(status_line(server.addr, &format!("/socket/sse?vsn=2.0.0&token={good}")), 200);
    assert_eq!(status_line(server.addr, &format!("/socket/sse?vsn=2.0.0&token={expired}")), 403);
    assert_eq!(status_line(server.addr, &format!("/socket/sse?vsn=2.0.0&token={forged}")), 403);
    assert_eq!(status_line(server.addr, "/socket/sse?vsn=2.0.0"), 403);

    let m = server.metrics();
    assert_eq!(counter(&m, r#"fawkes_connects_refused_total{reason="expired_token"}"#), 4);
    assert_eq!(counter(&m, r#"fawkes_connects_refused_total{reason="forged_token"}"#), 3);
    assert_eq!(counter(&m, r#"fawkes_connects_refused_total{reason="malformed_token"}"#), 1);
    assert_eq!(counter(&m, r#"fawkes_connects_refused_total{reason="missing_token"}"#), 3);
}

#[tokio::test]
async fn a_long_poll_session_opened_with_a_token_param_joins_and_publishes() {
    let server = Server::start(&jwt_config(false));
    let jwt = token("ann");
    let (_, opened) = http(server.addr, "GET", &format!("/socket/longpoll?token={jwt}&vsn=2.0.0&token=null"), &[], "");
    let opened: Value = serde_json::from_str(&opened).expect("envelope");
    let session = opened["token"].as_str().expect("session token").to_owned();
    let url = format!("/socket/longpoll?token={jwt}&vsn=2.0.0&token={session}");
    let join = json!(["1", "1", "chat:lp", "phx_join", {}]).to_string();
    let (_, posted) = http(server.addr, "POST", &url, &[("Content-Type", "application/json")], &join);
    assert!(posted.contains(r#""status":200"#), "{posted}");
    let push = json!(["1", "2", "chat:lp", "shout", {"text": "hi"}]).to_string();
    http(server.addr, "POST", &url, &[("Content-Type", "application/json")], &push);
    let mut frames: Vec<Value> = Vec::new();
    for _ in 0..10 {
        if frames.iter().any(|f| f[3] == "shout") {
            break;
        }
        let (_, polled) = http(server.addr, "GET", &url, &[], "");
        let polled: Value = serde_json::from_str(&polled).expect("envelope");
        assert_ne!(polled["status"], 410, "the session survives polls that carry both tokens: {polled}");
        for m in polled["messages"].as_array().cloned().unwrap_or_default() {
            frames.push(serde_json::from_str(m.as_str().expect("text")).expect("frame"));
        }
    }
    assert!(frames.iter().any(|f| f[3] == "shout" && f[4] == json!({"text": "hi", "user": "ann"})), "{frames:?}");
}

#[tokio::test]
async fn namespaces_decide_who_joins_and_who_publishes() {
    let server = Server::start(&jwt_config(true));
    let claimed = hs256(json!({"sub": "bob", "exp": now() + 600, "channels": ["private:bob", "private:team:*"]}));
    let mut bob = server.client(Some(&claimed)).await;
    let mut anon = server.client(None).await;

    // join = "authenticated"
    assert_eq!(bob.join("chat:a", json!({})).await.0, "ok");
    assert_eq!(anon.join("chat:a", json!({})).await, ("error".into(), json!({"reason": "unauthorized"})));
    // join = "claim"
    assert_eq!(bob.join("private:bob", json!({})).await.0, "ok");
    assert_eq!(bob.join("private:team:x", json!({})).await.0, "ok");
    assert_eq!(bob.join("private:alice", json!({})).await, ("error".into(), json!({"reason": "unauthorized"})));
    let mut ann = server.client(Some(&token("ann"))).await;
    assert_eq!(ann.join("private:bob", json!({})).await.1, json!({"reason": "unauthorized"}), "no claim");
    // join = "anyone"; no namespace
    assert_eq!(anon.join("news:today", json!({})).await.0, "ok");
    assert_eq!(anon.join("room:lobby", json!({})).await, ("error".into(), json!({"reason": "unmatched topic"})));

    // publish = true: E with P plus the sender's user, to everyone, the sender included.
    assert_eq!(ann.join("chat:a", json!({})).await.0, "ok");
    let (status, response) = ann.push("chat:a", "shout", json!({"text": "hi", "user": "forged"})).await;
    assert_eq!((status.as_str(), response), ("ok", json!({})));
    let got = bob.event("shout").await;
    assert_eq!(got[4], json!({"text": "hi", "user": "ann"}));
    assert_eq!(ann.event("shout").await[4], json!({"text": "hi", "user": "ann"}), "the sender gets it too");
    // Anonymous publishers have no user; one they write is removed.
    assert_eq!(anon.join("open:x", json!({})).await.0, "ok");
    assert_eq!(anon.push("open:x", "note", json!({"n": 1, "user": "forged"})).await.0, "ok");
    assert_eq!(anon.event("note").await[4], json!({"n": 1}));
    // publish = false, reserved events, payloads that are not objects.
    let reply = anon.push("news:today", "shout", json!({"text": "hi"})).await;
    assert_eq!(reply, ("error".into(), json!({"reason": "unauthorized"})));
    let reply = ann.push("chat:a", "presence_diff", json!({"joins": {}, "leaves": {}})).await;
    assert_eq!(reply, ("error".into(), json!({"reason": "reserved event"})));
    let reply = ann.push("chat:a", "shout", json!("text")).await;
    assert_eq!(reply, ("error".into(), json!({"reason": "payload must be an object"})));

    let m = server.metrics();
    assert_eq!(counter(&m, r#"fawkes_namespace_joins_refused_total{reason="unauthorized"}"#), 3);
    assert_eq!(counter(&m, r#"fawkes_client_publish_refused_total{reason="unauthorized"}"#), 1);
}

#[tokio::test]
async fn presence_tracks_the_token_user_and_the_api_lists_it() {
    let server = Server::start(&jwt_config(false));
    let mut ann = server.client(Some(&token("ann"))).await;
    assert_eq!(ann.join("chat:p", json!({})).await.0, "ok");
    let meta = ann.presence_meta("ann").await;
    assert!(meta["online_at"].is_u64(), "{meta}");

    let auth = format!("Bearer {API_KEY}");
    let (status, body) = http(server.addr, "GET", "/api/presence?topic=chat:p", &[("Authorization", &auth)], "");
    assert_eq!(status, 200);
    let listed: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(listed.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()), Some(vec!["ann".to_owned()]));
    assert!(listed["ann"]["metas"][0]["phx_ref"].is_string(), "{listed}");
    let (status, _) = http(server.addr, "GET", "/api/presence?topic=chat:p", &[], "");
    assert_eq!(status, 401);
    let (status, body) = http(server.addr, "GET", "/api/presence", &[("Authorization", &auth)], "");
    assert_eq!((status, body.contains("error")), (400, true));
}

#[tokio::test]
async fn the_api_broadcasts_with_the_key_and_refuses_the_rest() {
    let server = Server::start(&jwt_config(false));
    let mut ann = server.client(Some(&token("ann"))).await;
    assert_eq!(ann.join("chat:api", json!({})).await.0, "ok");
    let auth = format!("Bearer {API_KEY}");
    let json_headers = [("Authorization", auth.as_str()), ("Content-Type", "application/json")];

    let one = json!({"topic": "chat:api", "event": "announce", "payload": {"n": 1}}).to_string();
    assert_eq!(http(server.addr, "POST", "/api/broadcast", &json_headers, &one), (200, r#"{"ok":true}"#.into()));
    assert_eq!(ann.event("announce").await[4], json!({"n": 1}));
    let list = json!([
        {"topic": "chat:api", "event": "announce", "payload": {"n": 2}},
        {"topic": "chat:api", "event": "announce", "payload": {"n": 3}}
    ])
    .to_string();
    assert_eq!(http(server.addr, "POST", "/api/broadcast", &json_headers, &list).0, 200);
    assert_eq!(ann.event("announce").await[4], json!({"n": 2}));
    assert_eq!(ann.event("announce").await[4], json!({"n": 3}));

    // Wrong or missing key.
    let wrong = [("Authorization", "Bearer nope"), ("Content-Type", "application/json")];
    assert_eq!(http(server.addr, "POST", "/api/broadcast", &wrong, &one).0, 401);
    assert_eq!(http(server.addr, "POST", "/api/broadcast", &[], &one).0, 401);
    // Malformed: nothing of the body is broadcast.
    for bad in [
        "{not json".to_owned(),
        json!({"event": "e"}).to_string(),
        json!([{"topic": "chat:api", "event": "announce", "payload": {"n": 4}}, {"topic": "chat:api"}]).to_string(),
        json!({"topic": "chat:api", "event": "phx_reply"}).to_string(),
        "[]".to_owned(),
    ] {
        let (status, body) = http(server.addr, "POST", "/api/broadcast", &json_headers, &bad);
        assert_eq!(status, 400, "{bad}: {body}");
        let body: Value = serde_json::from_str(&body).expect("JSON error");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
    }
    // Past max_body_size (1024 in this config).
    let big = json!({"topic": "chat:api", "event": "announce", "payload": {"s": "x".repeat(2000)}}).to_string();
    assert_eq!(http(server.addr, "POST", "/api/broadcast", &json_headers, &big).0, 413);

    // None of the refused bodies reached the subscriber: the next event is the next good one.
    let last = json!({"topic": "chat:api", "event": "announce", "payload": {"n": 5}}).to_string();
    assert_eq!(http(server.addr, "POST", "/api/broadcast", &json_headers, &last).0, 200);
    assert_eq!(ann.event("announce").await[4], json!({"n": 5}));
}

#[tokio::test]
async fn history_namespaces_recover_what_a_rejoin_missed() {
    let config = format!(
        "[auth]\njwt_secret = \"{SECRET}\"\n[api]\nkey = \"{API_KEY}\"\n\
         [[namespace]]\npattern = \"feed:*\"\njoin = \"authenticated\"\npublish = true\nhistory_size = 100\nhistory_age = 60\n"
    );
    let server = Server::start(&config);
    let mut ann = server.client(Some(&token("ann"))).await;
    let (status, joined) = ann.join("feed:x", json!({})).await;
    assert_eq!((status.as_str(), &joined["recovered"]), ("ok", &json!(false)));
    let reply = ann.push("feed:x", "msg", json!({"n": 1})).await;
    assert_eq!(reply.0, "ok");
    let first = ann.event("msg").await;
    let pos = first[4]["pos"].as_str().expect("pos").to_owned();
    let auth = format!("Bearer {API_KEY}");
    let missed = json!({"topic": "feed:x", "event": "msg", "payload": {"n": 2}}).to_string();
    drop(ann);
    assert_eq!(http(server.addr, "POST", "/api/broadcast", &[("Authorization", &auth)], &missed).0, 200);

    let mut again = server.client(Some(&token("ann"))).await;
    let (status, joined) = again.join("feed:x", json!({"since": pos})).await;
    assert_eq!((status.as_str(), &joined["recovered"]), ("ok", &json!(true)), "{joined}");
    let replayed = again.event("msg").await;
    assert_eq!(replayed[4]["n"], 2);
}

#[tokio::test]
async fn es256_and_rs256_tokens_are_checked_with_the_public_key() {
    for (public, private, alg) in
        [("ec-public.pem", "ec-private.pem", Algorithm::ES256), ("rsa-public.pem", "rsa-private.pem", Algorithm::RS256)]
    {
        let config = format!(
            "[auth]\njwt_public_key = \"{}\"\n[[namespace]]\npattern = \"chat:*\"\njoin = \"authenticated\"\n",
            fixture(public).display()
        );
        let server = Server::start(&config);
        let pem = std::fs::read(fixture(private)).expect("private key");
        let key = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            _ => EncodingKey::from_rsa_pem(&pem),
        }
        .expect("key");
        let claims = json!({"sub": "ann", "exp": now() + 600});
        let good = jsonwebtoken::encode(&Header::new(alg), &claims, &key).expect("encode");
        let mut ann = server.client(Some(&good)).await;
        assert_eq!(ann.join("chat:a", json!({})).await.0, "ok", "{alg:?}");
        // The public key used as an HS256 secret (algorithm confusion) is refused.
        let public_pem = std::fs::read(fixture(public)).expect("public key");
        let confused =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(&public_pem))
                .expect("encode");
        assert_eq!(server.ws_status(&format!("&token={confused}")).await, 403, "{alg:?}");
        let expired =
            jsonwebtoken::encode(&Header::new(alg), &json!({"sub": "ann", "exp": now() - 600}), &key).expect("encode");
        assert_eq!(server.ws_status(&format!("&token={expired}")).await, 403, "{alg:?}");
    }
}

/// What the test backend was asked, by path.
type Asked = Arc<Mutex<Vec<(String, Value)>>>;

/// A small application backend answering the connect and join hooks: connect params
/// `user=deny` are denied, `user=slow` answered after 5 s, `user=broken` answered 500; other
/// users allowed with data `{"role": "member"}`. Joins of `chat:secret` are denied, of
/// `chat:slow` answered after 5 s, others allowed with data `{"welcome": TOPIC}`.
async fn backend() -> (SocketAddr, Asked) {
    use http_body_util::BodyExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let asked: Asked = Arc::default();
    let log = asked.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let log = log.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let log = log.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        log.lock().expect("log").push((path.clone(), body.clone()));
                        let (status, answer) =
                            match (path.as_str(), body["params"]["user"].as_str(), body["topic"].as_str()) {
                                ("/connect", Some("deny"), _) => (200, json!({"error": {"message": "go away"}})),
                                ("/connect", Some("slow"), _) => {
                                    tokio::time::sleep(Duration::from_secs(5)).await;
                                    (200, json!({"result": {}}))
                                }
                                ("/connect", Some("broken"), _) => (500, json!({})),
                                ("/connect", user, _) => {
                                    (200, json!({"result": {"user": user, "data": {"role": "member"}}}))
                                }
                                ("/join", _, Some("chat:secret")) => (200, json!({"error": {"message": "not you"}})),
                                ("/join", _, Some("chat:slow")) => {
                                    tokio::time::sleep(Duration::from_secs(5)).await;
                                    (200, json!({"result": {}}))
                                }
                                ("/join", _, Some(topic)) => (200, json!({"result": {"data": {"welcome": topic}}})),
                                _ => (404, json!({})),
                            };
                        let response = hyper::Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(http_body_util::Full::new(bytes::Bytes::from(answer.to_string())))
                            .expect("response");
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, asked)
}

// The backend runs on this runtime while the test makes blocking HTTP requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_and_join_hooks_allow_deny_and_fail_safely() {
    let (backend, asked) = backend().await;
    let config = format!(
        "[proxy]\nconnect_url = \"http://{backend}/connect\"\njoin_url = \"http://{backend}/join\"\ntimeout = 0.5\n\
         [[namespace]]\npattern = \"chat:*\"\njoin = \"authenticated\"\npresence = true\n"
    );
    let server = Server::start(&config);

    // Allowed: the hook names the user, who is then tracked in Presence with the hook's data.
    let mut req = format!("ws://{}/socket/websocket?vsn=2.0.0&user=ann&room=1", server.addr)
        .into_client_request()
        .expect("request");
    req.headers_mut().insert("user-agent", "test-agent".parse().expect("header"));
    req.headers_mut().insert("authorization", "Basic c2VjcmV0".parse().expect("header"));
    let (ws, _) = tokio_tungstenite::connect_async(req).await.expect("the hook allows ann");
    let mut ann = Client::new(ws);
    let (status, response) = ann.join("chat:lobby", json!({"hello": 1})).await;
    assert_eq!((status.as_str(), response), ("ok", json!({"welcome": "chat:lobby"})));
    let meta = ann.presence_meta("ann").await;
    assert_eq!(meta["data"], json!({"role": "member"}), "{meta}");
    assert_eq!(ann.join("chat:secret", json!({})).await, ("error".into(), json!({"reason": "unauthorized"})));
    assert_eq!(ann.join("chat:slow", json!({})).await, ("error".into(), json!({"reason": "unauthorized"})));

    let seen = asked.lock().expect("log").clone();
    let (_, connect) = seen.iter().find(|(p, _)| p == "/connect").expect("connect asked");
    assert_eq!(connect["transport"], "websocket");
    assert_eq!(connect["params"], json!({"user": "ann", "room": "1"}));
    assert_eq!(connect["headers"]["user-agent"], "test-agent");
    assert!(connect["headers"].get("authorization").is_none(), "not forwarded: {connect}");
    assert_eq!(connect["user"], Value::Null);
    let (_, join) = seen.iter().find(|(p, _)| p == "/join").expect("join asked");
    assert_eq!(
        (&join["topic"], &join["params"], &join["user"], &join["data"]),
        (&json!("chat:lobby"), &json!({"hello": 1}), &json!("ann"), &json!({"role": "member"}))
    );

    // Denied, failing, slow: 403 at connect, counted.
    assert_eq!(server.ws_status("&user=deny").await, 403);
    assert_eq!(server.ws_status("&user=broken").await, 403);
    assert_eq!(server.ws_status("&user=slow").await, 403);
    assert_eq!(server.ws_status("").await, 403, "the hook named no user and anonymous = false");
    let (_, lp) = http(server.addr, "GET", "/socket/longpoll?vsn=2.0.0&user=deny", &[], "");
    assert!(lp.contains(r#""status":403"#), "{lp}");
    assert_eq!(status_line(server.addr, "/socket/sse?vsn=2.0.0&user=deny"), 403);
    let m = server.metrics();
    assert_eq!(
        counter(&m, r#"fawkes_hook_requests_total{hook="connect",outcome="denied"}"#),
        3,
        "{m} {:?}",
        asked.lock().expect("log")
    );
    assert_eq!(counter(&m, r#"fawkes_hook_requests_total{hook="connect",outcome="failed"}"#), 1);
    assert_eq!(counter(&m, r#"fawkes_hook_requests_total{hook="connect",outcome="timeout"}"#), 1);
    assert_eq!(counter(&m, r#"fawkes_hook_requests_total{hook="join",outcome="denied"}"#), 1);
    assert_eq!(counter(&m, r#"fawkes_hook_requests_total{hook="join",outcome="timeout"}"#), 1);
    assert_eq!(counter(&m, r#"fawkes_namespace_joins_refused_total{reason="hook_failed"}"#), 1);
    assert_eq!(counter(&m, r#"fawkes_connects_refused_total{reason="hook_failed"}"#), 2);
}

#[tokio::test]
async fn a_backend_that_is_down_refuses_connects() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = closed.local_addr().expect("addr");
    drop(closed);
    let config = format!(
        "[auth]\nanonymous = true\n[proxy]\nconnect_url = \"http://{addr}/connect\"\n\
         [[namespace]]\npattern = \"chat:*\"\njoin = \"anyone\"\n"
    );
    let server = Server::start(&config);
    assert_eq!(server.ws_status("&user=ann").await, 403);
    let (_, lp) = http(server.addr, "GET", "/socket/longpoll?vsn=2.0.0", &[], "");
    assert!(lp.contains(r#""status":403"#), "{lp}");
    assert_eq!(status_line(server.addr, "/socket/sse?vsn=2.0.0"), 403);
    assert_eq!(counter(&server.metrics(), r#"fawkes_hook_requests_total{hook="connect",outcome="failed"}"#), 3);
}

#[tokio::test]
async fn a_namespace_nobody_could_join_is_refused_at_start() {
    let dir = scratch();
    std::fs::write(dir.join("f.toml"), "[[namespace]]\npattern = \"chat:*\"\njoin = \"authenticated\"\n")
        .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_fawkes"))
        .current_dir(&dir)
        .args(["config", "check", "f.toml"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("[[namespace]] join") && err.contains("jwt_secret"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_readme_config_for_any_backend_passes_config_check() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).expect("README");
    let section = readme.split("## Running `fawkes serve` for any backend").nth(1).expect("the section");
    let toml = section.split("```toml\n").nth(1).and_then(|b| b.split("```").next()).expect("a toml block");
    let dir = scratch();
    std::fs::write(dir.join("f.toml"), toml).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_fawkes"))
        .current_dir(&dir)
        .args(["config", "check", "f.toml"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn namespace_limits_refuse_large_and_rapid_pushes() {
    let config = "[[namespace]]\npattern = \"chat:*\"\njoin = \"anyone\"\npublish = true\n\
                  max_message_size = 64\nmessage_rate = 1\nmessage_burst = 2\n";
    let server = Server::start(config);
    let mut c = server.client(None).await;
    assert_eq!(c.join("chat:a", json!({})).await.0, "ok");
    let big = c.push("chat:a", "say", json!({"text": "x".repeat(100)})).await;
    assert_eq!(big, ("error".into(), json!({"reason": "message too large"})));
    // A burst of 2, then 1 per second: of 4 pushes sent at once, the first 2 pass and a later
    // one is refused.
    let mut replies = Vec::new();
    for n in 0..4 {
        replies.push(c.push("chat:a", "say", json!({"n": n})).await);
    }
    assert_eq!(replies[0].0, "ok");
    assert_eq!(replies[1].0, "ok");
    assert!(replies.contains(&("error".into(), json!({"reason": "rate limited"}))), "{replies:?}");
    let m = server.metrics();
    assert_eq!(counter(&m, r#"fawkes_client_publish_refused_total{reason="too_large"}"#), 1);
    assert!(counter(&m, r#"fawkes_client_publish_refused_total{reason="rate_limited"}"#) >= 1);
}
