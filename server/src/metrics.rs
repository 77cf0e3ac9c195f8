//! `GET /metrics`: the endpoint's and the cluster link's counters in Prometheus's text format,
//! each metric with its `# HELP` and `# TYPE` lines.

use std::fmt::Write as _;

use axum::http::header;
use axum::response::IntoResponse;
use fawkes::{Endpoint, LATENCY_BOUNDS};

/// Prometheus text for `endpoint`.
pub(crate) fn metrics(endpoint: &Endpoint, more: String) -> impl IntoResponse + use<> {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], render(endpoint) + &more)
}

/// The text itself.
pub fn render(endpoint: &Endpoint) -> String {
    let c = endpoint.pubsub().stats();
    let s = endpoint.stats();
    let presence = endpoint.pubsub().presence();
    let history = endpoint.history().size();
    let mut out = Text(String::with_capacity(4096));

    out.gauge("fawkes_sockets", "Open sockets.", endpoint.connected());
    out.gauge(
        "fawkes_draining",
        "Whether the server is draining (1 from the first moment of SIGTERM).",
        u8::from(endpoint.is_shutting_down()),
    );

    out.counter("fawkes_joins_total", "Channel joins answered ok.", s.joins);
    out.head("fawkes_join_refusals_total", "counter", "Channel joins answered with an error, by the reply's reason.");
    for (reason, n) in &s.join_refusals {
        out.sample("fawkes_join_refusals_total", &[("reason", reason)], *n);
    }
    out.head("fawkes_messages_in_total", "counter", "Messages received from clients, by transport.");
    for (transport, n) in &s.messages_in {
        out.sample("fawkes_messages_in_total", &[("transport", transport)], *n);
    }
    out.head(
        "fawkes_messages_out_total",
        "counter",
        "Messages taken from the outbound queues to be sent to clients (replies, pushes, broadcasts), by transport.",
    );
    for (transport, n) in &s.messages_out {
        out.sample("fawkes_messages_out_total", &[("transport", transport)], *n);
    }
    out.counter(
        "fawkes_outbound_dropped_total",
        "Messages dropped from a full outbound queue (slow_consumer = drop_oldest).",
        s.outbound_dropped,
    );
    out.counter(
        "fawkes_slow_consumer_closes_total",
        "Sockets closed because their outbound queue was full (slow_consumer = disconnect).",
        s.slow_consumer_closes,
    );

    out.gauge("fawkes_presence_topics", "Topics with anyone present, on every node.", presence.topic_count());
    out.gauge(
        "fawkes_presence_entries",
        "Presence entries held here (one per key per tracking socket, every node's).",
        presence.entry_count(),
    );
    if let Some(h) = history {
        out.gauge("fawkes_history_topics", "Topics with a history in this node's store.", h.topics);
        out.gauge("fawkes_history_entries", "Broadcasts kept in this node's history store.", h.entries);
    }
    let errors = endpoint.history().stats();
    out.head(
        "fawkes_history_errors_total",
        "counter",
        "History store failures: broadcasts not sent (append), joins not recovered or missed broadcasts not read back (read).",
    );
    out.sample("fawkes_history_errors_total", &[("op", "append")], errors.append_errors);
    out.sample("fawkes_history_errors_total", &[("op", "read")], errors.read_errors);

    out.gauge(
        "fawkes_pubsub_connected",
        "Whether the PubSub backend is reachable (1 on a single node).",
        u8::from(c.connected),
    );
    out.counter("fawkes_pubsub_disconnects_total", "Times the PubSub backend was lost.", c.disconnects);
    out.counter("fawkes_pubsub_sent_total", "Messages handed to the PubSub backend for other nodes.", c.sent);
    out.counter("fawkes_pubsub_received_total", "Messages from other nodes delivered here.", c.received);
    out.counter(
        "fawkes_pubsub_dropped_total",
        "Messages not sent because the backend was away and the queue was full.",
        c.dropped,
    );
    out.counter("fawkes_pubsub_malformed_total", "Messages from the backend that could not be read.", c.malformed);
    let h = c.publish_latency;
    let name = "fawkes_pubsub_publish_seconds";
    out.head(
        name,
        "histogram",
        "Broadcast latency to the backend: from the adapter taking a message off its send queue to the backend accepting it.",
    );
    let mut cumulative = 0;
    for (bound, n) in LATENCY_BOUNDS.iter().zip(h.buckets) {
        cumulative += n;
        out.sample(&format!("{name}_bucket"), &[("le", &bound.to_string())], cumulative);
    }
    out.sample(&format!("{name}_bucket"), &[("le", "+Inf")], h.count);
    let _ = writeln!(out.0, "{name}_sum {}", h.sum_micros as f64 / 1e6);
    let _ = writeln!(out.0, "{name}_count {}", h.count);
    out.0
}

struct Text(String);

impl Text {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn gauge(&mut self, name: &str, help: &str, value: impl std::fmt::Display) {
        self.head(name, "gauge", help);
        let _ = writeln!(self.0, "{name} {value}");
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.head(name, "counter", help);
        let _ = writeln!(self.0, "{name} {value}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
        let _ = writeln!(self.0, "{name}{{{}}} {value}", labels.join(","));
    }
}

/// A label value as Prometheus's text format writes it: `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a "b" \c"#), r#"a \"b\" \\c"#);
        assert_eq!(escape("x\ny"), "x\\ny");
    }
}
