//! The conformance kit over SSE: the adapter is the SSE client of `common`.

mod common;

use std::collections::VecDeque;

use bytes::Bytes;
use common::{Stream, open, post_body};
use fawkes_channel::{Endpoint, Frame};
use fawkes_testkit::{Capabilities, Connection, Received, Refused, Transport};
use fawkes_transport_sse::SseService;

struct Sse(SseService);

struct SseConn {
    svc: SseService,
    stream: Stream,
    received: VecDeque<Received>,
}

impl Transport for Sse {
    type Connection = SseConn;

    async fn connect(&self, params: &[(&str, &str)]) -> Result<SseConn, Refused> {
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        match open(&self.0, &query.join("&")).await {
            Ok(stream) => Ok(SseConn { svc: self.0.clone(), stream, received: VecDeque::new() }),
            Err(status) => Err(Refused(format!("HTTP {status}"))),
        }
    }
}

impl Connection for SseConn {
    async fn send(&mut self, frames: Vec<Frame>) {
        use base64::Engine as _;
        let lines: Vec<String> = frames
            .iter()
            .map(|f| match f {
                Frame::Text(t) => String::from_utf8_lossy(t).into_owned(),
                Frame::Binary(b) => base64::engine::general_purpose::STANDARD.encode(b),
            })
            .collect();
        // Any answer but 200 ends the session; the stream tells the kit how.
        post_body(&self.svc, &self.stream.token, Bytes::from(lines.join("\n"))).await;
    }

    async fn recv(&mut self) -> Received {
        if let Some(received) = self.received.pop_front() {
            return received;
        }
        match self.stream.event().await {
            Some(e) if e.name.as_deref() == Some("phx_socket_close") => Received::Closed(e.data),
            Some(e) if e.name.is_none() => Received::Frame(Frame::text(e.data)),
            Some(e) => panic!("unexpected SSE event {e:?}"),
            None => Received::Closed("the stream ended".into()),
        }
    }

    async fn close(&mut self) {}
}

#[tokio::test]
async fn sse_passes_the_conformance_kit() {
    let caps = Capabilities::all().without_binary_frames();
    let report =
        fawkes_testkit::run("sse", caps, |endpoint: Endpoint| async move { Sse(SseService::new(endpoint)) }).await;
    eprintln!("{report}");
    let skipped: Vec<&str> = report.skipped.iter().map(|(name, _)| *name).collect();
    assert_eq!(skipped, ["binary"], "SSE carries text only; everything else runs");
}
