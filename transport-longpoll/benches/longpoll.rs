//! Long-poll throughput and latency with many sessions, over real HTTP on loopback.
//!
//! `cargo bench -p fawkes-transport-longpoll` starts a server on its own single-threaded runtime
//! (an echo channel at `/socket/longpoll`), then runs N sessions as phoenix.js does: open (410 +
//! token), join, then each session in a loop POSTs a `ping` and polls until its reply arrives.
//! It prints replies per second across all sessions and the POST-to-reply latency p50/p99.
//! `FAWKES_BENCH_SESSIONS` (default 200) and `FAWKES_BENCH_SECONDS` (default 5) set the scale.

use std::time::{Duration, Instant};

use bytes::Bytes;
use fawkes_channel::{Channel, Endpoint, HandleIn, Payload, Router, SocketRef};
use fawkes_transport_longpoll::LongPollService;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

struct Echo;
impl Channel for Echo {
    async fn join(&mut self, _: Payload, _: &mut SocketRef) -> Result<Value, Value> {
        Ok(json!({}))
    }
    async fn handle_in(&mut self, _: &str, payload: Payload, _: &mut SocketRef) -> HandleIn {
        HandleIn::ok(payload)
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn request(client: &HttpClient, method: &str, url: &str, body: Option<String>) -> Value {
    let mut req = http::Request::builder().method(method).uri(url);
    if body.is_some() {
        req = req.header("content-type", "application/x-ndjson");
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).expect("request");
    let res = client.request(req).await.expect("HTTP");
    let body = res.into_body().collect().await.expect("body").to_bytes();
    serde_json::from_slice(&body).expect("JSON envelope")
}

/// One session: joins, then pings for `seconds`; returns its latencies.
async fn session(client: HttpClient, base: String, until: Instant) -> Vec<Duration> {
    let opened = request(&client, "GET", &format!("{base}?vsn=2.0.0"), None).await;
    assert_eq!(opened["status"], 410);
    let token = opened["token"].as_str().expect("token").to_owned();
    let url = format!("{base}?vsn=2.0.0&token={token}");
    let mut pending: Option<(String, Instant)> = Some(("1".into(), Instant::now()));
    request(&client, "POST", &url, Some(r#"["1","1","echo:bench","phx_join",{}]"#.into())).await;
    let mut latencies = Vec::new();
    let mut next_ref = 1u64;
    loop {
        let body = request(&client, "GET", &url, None).await;
        if body["status"] == 410 {
            panic!("session ended: {body}");
        }
        for m in body["messages"].as_array().into_iter().flatten() {
            let msg: Value = serde_json::from_str(m.as_str().expect("string")).expect("V2");
            if let Some((r, sent)) = &pending {
                if msg[1].as_str() == Some(r.as_str()) {
                    if r != "1" {
                        latencies.push(sent.elapsed());
                    }
                    pending = None;
                }
            }
        }
        if pending.is_none() {
            if Instant::now() >= until {
                return latencies;
            }
            next_ref += 1;
            let r = next_ref.to_string();
            let line = format!(r#"["1","{r}","echo:bench","ping",{{"n":{next_ref}}}]"#);
            pending = Some((r, Instant::now()));
            request(&client, "POST", &url, Some(line)).await;
        }
    }
}

fn main() {
    let sessions: usize = std::env::var("FAWKES_BENCH_SESSIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let seconds: u64 = std::env::var("FAWKES_BENCH_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);

    // The server on a runtime of its own, one thread.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let endpoint = Endpoint::new(Router::new().channel("echo:*", || Echo));
            let app = axum::Router::new().route_service("/socket/longpoll", LongPollService::new(endpoint));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            addr_tx.send(listener.local_addr().expect("addr")).expect("send addr");
            axum::serve(listener, app).await.expect("serve");
        });
    });
    let addr = addr_rx.recv().expect("server address");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        let client: HttpClient =
            Client::builder(TokioExecutor::new()).pool_max_idle_per_host(sessions * 2).build_http();
        let base = format!("http://{addr}/socket/longpoll");
        let started = Instant::now();
        let until = started + Duration::from_secs(seconds);
        let tasks: Vec<_> = (0..sessions).map(|_| tokio::spawn(session(client.clone(), base.clone(), until))).collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("session"));
        }
        let elapsed = started.elapsed().as_secs_f64();
        all.sort_unstable();
        let pct = |p: f64| all[((all.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3;
        println!(
            "longpoll  sessions={sessions}  replies/s={:.0}  p50={:.2}ms  p99={:.2}ms  ({} round trips in {:.1}s)",
            all.len() as f64 / elapsed,
            pct(0.50),
            pct(0.99),
            all.len(),
            elapsed
        );
    });
}
