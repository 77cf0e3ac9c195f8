//! The kit against sessions driven in memory: a faithful transport passes, a faulty one fails
//! naming the scenario and what was expected on the wire.

use fawkes_channel::{CloseReason, ConnectInfo, Endpoint, Frame, Outbound, Session};
use fawkes_testkit::{Capabilities, Connection, Received, Refused, Transport};

/// In memory; `drop_event` makes it lose every frame that mentions that text.
struct Memory {
    endpoint: Endpoint,
    drop_event: Option<&'static str>,
}

struct MemoryConn {
    session: Option<Session>,
    outbound: Outbound,
    drop_event: Option<&'static str>,
}

impl Transport for Memory {
    type Connection = MemoryConn;

    async fn connect(&self, params: &[(&str, &str)]) -> Result<MemoryConn, Refused> {
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let info = ConnectInfo::new("memory", true).with_query(Some(&query.join("&")));
        let session = self.endpoint.connect(info).await.map_err(|e| Refused(e.to_string()))?;
        let outbound = session.outbound();
        Ok(MemoryConn { session: Some(session), outbound, drop_event: self.drop_event })
    }
}

impl Connection for MemoryConn {
    async fn send(&mut self, frames: Vec<Frame>) {
        for frame in frames {
            let Some(session) = &mut self.session else { return };
            if session.handle_frame(frame).await.is_err() {
                return;
            }
        }
    }

    async fn recv(&mut self) -> Received {
        loop {
            match self.outbound.recv().await {
                Ok(frame) => {
                    let text = String::from_utf8_lossy(frame.as_bytes());
                    if self.drop_event.is_some_and(|e| text.contains(e)) {
                        continue;
                    }
                    return Received::Frame(frame);
                }
                Err(reason) => {
                    self.session = None;
                    return Received::Closed(reason.to_string());
                }
            }
        }
    }

    async fn close(&mut self) {
        self.outbound.close(CloseReason::TransportClosed);
        self.session = None;
    }
}

#[tokio::test]
async fn a_faithful_transport_passes_every_scenario() {
    let report =
        fawkes_testkit::run(
            "memory",
            Capabilities::all(),
            |endpoint| async move { Memory { endpoint, drop_event: None } },
        )
        .await;
    assert_eq!(report.passed.len(), fawkes_testkit::SCENARIOS.len() - 1);
    assert_eq!(report.skipped.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ["binary_as_text"]);
}

#[tokio::test]
async fn a_transport_that_loses_phx_close_fails_the_leave_scenario() {
    let caps = Capabilities::all().wait(std::time::Duration::from_millis(500));
    let run = tokio::spawn(fawkes_testkit::run("lossy", caps, |endpoint| async move {
        Memory { endpoint, drop_event: Some("phx_close") }
    }));
    let panic = run.await.expect_err("the kit fails").into_panic();
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        message.starts_with(r#"scenario `leave` (lossy): expected phx_close of join_ref "1" ["1","1","test:leave","phx_close",{}], got nothing within"#),
        "{message}"
    );
}
