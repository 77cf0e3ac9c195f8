//! Long-poll and SSE answer every error the same way: one mapping in `fawkes-http`.
//!
//! Each row plays one error against each transport and compares what the client sees: for a
//! `POST`, the HTTP status and the JSON answer; for a `GET` that opens a session, the JSON answer
//! (long-poll carries it with HTTP 200, as phoenix.js reads it; SSE with the same status as the
//! HTTP status too, since an `EventSource` sees nothing else).

use bytes::Bytes;
use fawkes::longpoll::{LongPollOptions, LongPollService};
use fawkes::sse::{SseOptions, SseService};
use fawkes::{Config, Endpoint};
use http_body_util::{BodyExt as _, Full};
use serde_json::{Value, json};

const LIMIT: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    LongPoll,
    Sse,
}

#[derive(Clone)]
enum Service {
    LongPoll(LongPollService),
    Sse(SseService),
}

/// What the client sees: the HTTP status and the JSON body.
type Seen = (u16, Value);

impl Service {
    fn new(transport: Transport, endpoint: Endpoint) -> Service {
        match transport {
            Transport::LongPoll => Service::LongPoll(LongPollService::with_options(
                endpoint,
                LongPollOptions::default().max_body_size(LIMIT),
            )),
            Transport::Sse => {
                Service::Sse(SseService::with_options(endpoint, SseOptions::default().max_body_size(LIMIT)))
            }
        }
    }

    fn path(&self) -> &'static str {
        match self {
            Service::LongPoll(_) => "/socket/longpoll",
            Service::Sse(_) => "/socket/sse",
        }
    }

    async fn send(&self, req: http::Request<Full<Bytes>>) -> (u16, http::HeaderMap, fawkes::sse::SseBody) {
        let res = match self {
            Service::LongPoll(svc) => svc.handle(req).await,
            Service::Sse(svc) => svc.handle(req).await,
        };
        let (parts, body) = res.into_parts();
        (parts.status.as_u16(), parts.headers, body)
    }

    async fn seen(&self, req: http::Request<Full<Bytes>>) -> Seen {
        let (status, headers, body) = self.send(req).await;
        assert_eq!(headers["content-type"], "application/json", "{status}");
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        (status, serde_json::from_slice(&body).expect("a JSON answer"))
    }

    /// `GET` without a token: a session's token, or what the refusal looked like.
    async fn open(&self, query: &str) -> Result<String, Seen> {
        let req = http::Request::get(format!("{}?{query}", self.path())).body(Full::default()).expect("request");
        let (status, headers, mut body) = self.send(req).await;
        let content_type = headers["content-type"].to_str().unwrap_or_default().to_owned();
        if content_type == "text/event-stream" {
            let mut text = String::new();
            while !text.contains("\n\n") {
                let frame = body.frame().await.expect("the first event").expect("infallible");
                text.push_str(std::str::from_utf8(frame.data_ref().expect("data")).expect("UTF-8"));
            }
            let token = text.lines().find_map(|l| l.strip_prefix("data: ")).expect("a token");
            return Ok(token.to_owned());
        }
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let body: Value = serde_json::from_slice(&body).expect("a JSON answer");
        match (&body["status"], body["token"].as_str()) {
            (status, Some(token)) if *status == json!(410) => Ok(token.to_owned()),
            _ => Err((status, body)),
        }
    }

    async fn post(&self, token: &str, body: impl Into<Bytes>) -> Seen {
        let req = http::Request::post(format!("{}?token={token}", self.path()))
            .header("content-type", "application/x-ndjson")
            .body(Full::new(body.into()))
            .expect("request");
        self.seen(req).await
    }
}

const HEARTBEAT: &str = r#"[null,"1","phoenix","heartbeat",{}]"#;

/// Plays one error case against `transport`: what the client sees.
async fn play(case: &str, transport: Transport) -> Seen {
    let endpoint = fawkes_tests::endpoint(Config::default());
    let svc = Service::new(transport, endpoint.clone());
    match case {
        "forged token" => svc.post("forged.token", HEARTBEAT).await,
        "ended session" => {
            let token = svc.open("vsn=2.0.0").await.expect("opens");
            assert_eq!(svc.post(&token, "[not json").await.1["status"], 400);
            svc.post(&token, HEARTBEAT).await
        }
        "malformed line" => {
            let token = svc.open("vsn=2.0.0").await.expect("opens");
            svc.post(&token, format!("{HEARTBEAT}\n[not json")).await
        }
        "oversized body" => {
            let token = svc.open("vsn=2.0.0").await.expect("opens");
            svc.post(&token, vec![b'['; LIMIT + 1]).await
        }
        "refused connect" => svc.open("vsn=2.0.0&reject=true").await.expect_err("refused"),
        "foreign origin" => {
            let req = http::Request::get(format!("{}?vsn=2.0.0", svc.path()))
                .header("origin", "https://evil.example")
                .header("host", "localhost:4000");
            let (status, body) = svc.seen(req.body(Full::default()).expect("request")).await;
            (status, body)
        }
        "shutting down" => {
            endpoint.shutdown();
            svc.open("vsn=2.0.0").await.expect_err("refused")
        }
        "wrong method" => svc.seen(http::Request::delete(svc.path()).body(Full::default()).expect("request")).await,
        _ => unreachable!("{case}"),
    }
}

#[tokio::test]
async fn long_poll_and_sse_answer_every_error_identically() {
    let envelope = |status: u16| json!({"status": status, "token": null, "messages": []});
    // (case, the status the client acts on, whether it is a POST answer (same HTTP status too))
    let table: &[(&str, u16, bool)] = &[
        ("forged token", 410, true),
        ("ended session", 410, true),
        ("malformed line", 400, true),
        ("oversized body", 413, true),
        ("wrong method", 405, true),
        ("refused connect", 403, false),
        ("foreign origin", 403, false),
        ("shutting down", 500, false),
    ];
    for &(case, status, same_http_status) in table {
        let longpoll = play(case, Transport::LongPoll).await;
        let sse = play(case, Transport::Sse).await;
        assert_eq!(longpoll.1, sse.1, "{case}: the same JSON answer");
        assert_eq!(longpoll.1["status"], status, "{case}: {longpoll:?}");
        if matches!(status, 413 | 405) {
            assert_eq!(longpoll.1, json!({"status": status}), "{case}");
        } else {
            assert_eq!(longpoll.1, envelope(status), "{case}");
        }
        if same_http_status {
            assert_eq!(longpoll.0, sse.0, "{case}: the same HTTP status");
        } else {
            assert_eq!((longpoll.0, sse.0), (200, status), "{case}: long-poll's envelope, SSE's HTTP status");
        }
    }
}
