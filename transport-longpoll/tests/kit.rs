//! The conformance kit over long-poll, request by request against the service.

mod common;

use std::collections::VecDeque;
use std::time::Duration;

use base64::Engine as _;
use fawkes_channel::{Endpoint, Frame};
use fawkes_testkit::{Capabilities, Connection, Received, Refused, Transport};
use fawkes_transport_longpoll::{LongPollOptions, LongPollService};

struct Lp(LongPollService);

struct LpConn {
    svc: LongPollService,
    token: String,
    received: VecDeque<Received>,
}

impl Transport for Lp {
    type Connection = LpConn;

    async fn connect(&self, params: &[(&str, &str)]) -> Result<LpConn, Refused> {
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let body = common::envelope(&self.0, common::get(&query.join("&"))).await;
        match (body["status"].as_u64(), body["token"].as_str()) {
            (Some(410), Some(token)) => {
                Ok(LpConn { svc: self.0.clone(), token: token.to_owned(), received: VecDeque::new() })
            }
            (Some(403), _) => Err(Refused("status 403".into())),
            _ => panic!("expected 410 with a token or 403, got {body}"),
        }
    }
}

impl Connection for LpConn {
    async fn send(&mut self, frames: Vec<Frame>) {
        let lines: Vec<String> = frames
            .iter()
            .map(|f| match f {
                Frame::Text(t) => String::from_utf8_lossy(t).into_owned(),
                Frame::Binary(b) => base64::engine::general_purpose::STANDARD.encode(b),
            })
            .collect();
        // 400 (a malformed line) and 410 end the session: the next poll tells the kit.
        common::envelope(&self.svc, common::post(&format!("vsn=2.0.0&token={}", self.token), &lines)).await;
    }

    async fn recv(&mut self) -> Received {
        loop {
            if let Some(received) = self.received.pop_front() {
                return received;
            }
            let body = common::envelope(&self.svc, common::get(&format!("vsn=2.0.0&token={}", self.token))).await;
            match body["status"].as_u64() {
                Some(200) => {
                    for m in body["messages"].as_array().expect("messages") {
                        let text = m.as_str().expect("messages are strings");
                        self.received.push_back(Received::Frame(Frame::text(text)));
                    }
                }
                Some(204) => {}
                _ => return Received::Closed(format!("poll answered {body}")),
            }
        }
    }

    async fn close(&mut self) {}
}

#[tokio::test]
async fn longpoll_passes_the_conformance_kit() {
    let caps = Capabilities::all().without_binary_frames().without_idle_close();
    let report = fawkes_testkit::run("longpoll", caps, |endpoint: Endpoint| async move {
        Lp(LongPollService::with_options(endpoint, LongPollOptions::default().poll_window(Duration::from_secs(2))))
    })
    .await;
    eprintln!("{report}");
    let skipped: Vec<&str> = report.skipped.iter().map(|(name, _)| *name).collect();
    assert_eq!(skipped, ["idle_close", "binary"], "polling keeps sessions alive; long-poll carries text only");
}
