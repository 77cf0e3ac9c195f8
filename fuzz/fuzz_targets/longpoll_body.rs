//! Long-poll POST bodies, through the public `LongPollService` with in-memory requests: the first
//! input byte picks the content type (ndjson batch or a single JSON message), the rest is the
//! body. Every answer is one the client understands, and the service keeps serving.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use fawkes_channel::{Channel, Endpoint, HandleIn, Payload, Router, SocketRef};
use fawkes_transport_longpoll::{LongPollOptions, LongPollService};
use http::{Method, Request};
use http_body_util::{BodyExt as _, Full};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

#[derive(Default)]
struct Echo;

impl Channel for Echo {
    async fn join(&mut self, _: Payload, _: &mut SocketRef) -> Result<Value, Value> {
        Ok(Value::Null)
    }

    async fn handle_in(&mut self, _: &str, payload: Payload, _: &mut SocketRef) -> HandleIn {
        HandleIn::ok(payload)
    }
}

struct Harness {
    runtime: tokio::runtime::Runtime,
    service: LongPollService,
    token: std::sync::Mutex<Option<String>>,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let endpoint = Endpoint::new(Router::new().channel("room:*", Echo::default));
        let options = LongPollOptions::default().session_idle(Duration::from_secs(5)).max_body_size(64 * 1024);
        let service = LongPollService::with_options(endpoint, options);
        Harness { runtime, service, token: std::sync::Mutex::new(None) }
    })
}

async fn send(service: &LongPollService, method: Method, uri: &str, ct: &str, body: Bytes) -> (u16, Value) {
    let req = Request::builder().method(method).uri(uri).header("content-type", ct).body(Full::new(body));
    let res = service.handle(req.expect("request")).await;
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else { return };
    let h = harness();
    h.runtime.block_on(async {
        let mut token = h.token.lock().unwrap_or_else(|e| e.into_inner());
        if token.is_none() {
            let (status, envelope) =
                send(&h.service, Method::GET, "/socket/longpoll?vsn=2.0.0", "text/plain", Bytes::new()).await;
            assert_eq!((status, envelope["status"].as_u64()), (200, Some(410)), "{envelope}");
            *token = envelope["token"].as_str().map(str::to_owned);
        }
        let Some(t) = token.clone() else { panic!("the open answer carries a token") };
        let ct = if kind & 1 == 0 { "application/x-ndjson" } else { "application/json" };
        let uri = format!("/socket/longpoll?vsn=2.0.0&token={t}");
        let (status, envelope) = send(&h.service, Method::POST, &uri, ct, Bytes::copy_from_slice(body)).await;
        match (status, envelope["status"].as_u64()) {
            (200, Some(200)) => {}
            // The batch closed the session (a malformed line, a limit): open a new one next time.
            (200, Some(400 | 410)) | (413, _) => *token = None,
            other => panic!("unexpected answer {other:?}: {envelope}"),
        }
        // Drain what the session queued, so replies never pile up into a slow-consumer close.
        if token.is_some() {
            let _ = tokio::time::timeout(
                Duration::from_millis(1),
                send(&h.service, Method::GET, &uri, "text/plain", Bytes::new()),
            )
            .await;
        }
    });
});
