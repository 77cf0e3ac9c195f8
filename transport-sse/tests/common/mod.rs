//! An SSE client over the service itself: requests in, responses and event streams out.
#![allow(dead_code)]

use bytes::Bytes;
use fawkes_http::ConnectionCut;
use fawkes_transport_sse::{SseBody, SseService};
use http_body_util::{BodyExt as _, Full};

/// One event of a stream; `None` fields were absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: Option<String>,
    pub id: Option<u64>,
    pub data: String,
}

/// What a stream yields next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Event(Event),
    Comment(String),
    End,
}

/// An open event stream and its session token.
pub struct Stream {
    body: SseBody,
    buf: String,
    pub token: String,
    /// The response's request to close its connection.
    pub cut: ConnectionCut,
}

impl Stream {
    /// The next event or comment, as the server wrote it.
    pub async fn next(&mut self) -> Next {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut event = Event { name: None, id: None, data: String::new() };
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(comment) = line.strip_prefix(':') {
                        return Next::Comment(comment.trim().to_owned());
                    } else if let Some(name) = line.strip_prefix("event: ") {
                        event.name = Some(name.to_owned());
                    } else if let Some(id) = line.strip_prefix("id: ") {
                        event.id = Some(id.parse().expect("numeric id"));
                    } else if let Some(line) = line.strip_prefix("data: ") {
                        data.push(line);
                    }
                }
                event.data = data.join("\n");
                return Next::Event(event);
            }
            match self.body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.buf.push_str(std::str::from_utf8(&data).expect("UTF-8 stream")),
                    Err(_) => continue,
                },
                Some(Err(e)) => match e {},
                None => return Next::End,
            }
        }
    }

    /// The next event, skipping comments.
    pub async fn event(&mut self) -> Option<Event> {
        loop {
            match self.next().await {
                Next::Event(e) => return Some(e),
                Next::Comment(_) => continue,
                Next::End => return None,
            }
        }
    }
}

/// Sends a request; returns the status, the content type and the body (unread).
pub async fn request(svc: &SseService, req: http::Request<Full<Bytes>>) -> (u16, http::HeaderMap, SseBody) {
    let res = svc.handle(req).await;
    let (parts, body) = res.into_parts();
    (parts.status.as_u16(), parts.headers, body)
}

/// `GET /socket/sse?{query}` with extra headers; a stream, or the refusal's status.
pub async fn open_with(svc: &SseService, query: &str, headers: &[(&str, &str)]) -> Result<Stream, u16> {
    let mut req = http::Request::get(format!("/socket/sse?{query}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (parts, body) = svc.handle(req.body(Full::default()).expect("request")).await.into_parts();
    if parts.status != 200 {
        return Err(parts.status.as_u16());
    }
    assert_eq!(parts.headers["content-type"], "text/event-stream");
    assert_eq!(parts.headers["access-control-allow-origin"], "*");
    let cut = parts.extensions.get::<ConnectionCut>().cloned().expect("a stream carries a connection cut");
    let mut stream = Stream { body, buf: String::new(), token: String::new(), cut };
    let first = stream.event().await.expect("a first event");
    assert_eq!(first.name.as_deref(), Some("phx_session"), "{first:?}");
    stream.token = first.data;
    Ok(stream)
}

/// `GET /socket/sse?{query}`.
pub async fn open(svc: &SseService, query: &str) -> Result<Stream, u16> {
    open_with(svc, query, &[]).await
}

/// `POST /socket/sse?token={token}` with ndjson `lines`; returns the answer's status.
pub async fn post(svc: &SseService, token: &str, lines: &[String]) -> u16 {
    post_body(svc, token, Bytes::from(lines.join("\n"))).await
}

/// `POST /socket/sse?token={token}` with `body` as ndjson; returns the answer's status. As over
/// long-poll, that is HTTP 200 with the status in a JSON envelope, except HTTP 413 for a body
/// over the limit.
pub async fn post_body(svc: &SseService, token: &str, body: Bytes) -> u16 {
    let req = http::Request::post(format!("/socket/sse?token={token}"))
        .header("content-type", "application/x-ndjson")
        .body(Full::new(body))
        .expect("request");
    let (status, headers, body) = request(svc, req).await;
    assert_eq!(headers["content-type"], "application/json");
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let answer: serde_json::Value = serde_json::from_slice(&body).expect("a JSON answer");
    if status == 413 {
        assert_eq!(answer, serde_json::json!({"status": 413}));
        return 413;
    }
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["token"], serde_json::Value::Null, "{answer}");
    assert_eq!(answer["messages"], serde_json::json!([]), "{answer}");
    answer["status"].as_u64().and_then(|s| u16::try_from(s).ok()).expect("a status in the envelope")
}
