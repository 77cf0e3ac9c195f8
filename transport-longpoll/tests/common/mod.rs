//! What the long-poll scenario tests share: requests sent to the service itself, answers read back
//! as status, headers and the JSON envelope.
#![allow(dead_code)]

use std::borrow::Borrow;

use bytes::Bytes;
use fawkes_transport_longpoll::LongPollService;
use http_body_util::{BodyExt as _, Full};
use serde_json::Value;

/// Sends `req`; returns the HTTP status, the headers and the body as JSON (`null` when empty).
pub async fn request(svc: &LongPollService, req: http::Request<Full<Bytes>>) -> (u16, http::HeaderMap, Value) {
    let res = svc.handle(req).await;
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    let value = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).expect("JSON body") };
    (status, headers, value)
}

/// Sends `req`; returns the JSON envelope, which long-poll answers with HTTP 200.
pub async fn envelope(svc: &LongPollService, req: http::Request<Full<Bytes>>) -> Value {
    let (status, _, body) = request(svc, req).await;
    assert_eq!(status, 200, "long-poll answers in its envelope");
    assert!(!body.is_null(), "a JSON envelope");
    body
}

/// A poll (or, without a token, an opening request) with `query`.
pub fn get(query: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(format!("/socket/longpoll?{query}")).body(Full::default()).expect("request")
}

/// A POST of ndjson `lines` with `query`.
pub fn post<S: Borrow<str>>(query: &str, lines: &[S]) -> http::Request<Full<Bytes>> {
    http::Request::post(format!("/socket/longpoll?{query}"))
        .header("content-type", "application/x-ndjson")
        .body(Full::new(Bytes::from(lines.join("\n"))))
        .expect("request")
}
