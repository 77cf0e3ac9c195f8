//! `rediss://`: two nodes reach each other through a Redis server that speaks only TLS, started
//! by the test with a certificate from a CA made on the spot; a client trusting another CA, or
//! connecting by a name the certificate does not carry, is refused with a TLS error.

use std::time::Duration;

use fawkes_channel::PubSub;
use fawkes_pubsub_redis::{RedisAdapter, RedisAdapterError, RedisOptions};
use fawkes_testkit::tls::{Pki, TlsRedis};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

fn cluster() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("t_tls_{}_{nanos}", std::process::id())
}

fn adapter(url: &str, ca: &std::path::Path, cluster: &str) -> RedisAdapter {
    let pem = std::fs::read(ca).expect("read CA");
    RedisAdapter::with_options(url, RedisOptions::default().cluster(cluster).tls_ca(pem)).expect("a rediss URL")
}

#[tokio::test]
async fn nodes_broadcast_to_each_other_over_tls() {
    let pki = Pki::new();
    let Some(redis) = TlsRedis::start(&pki) else { return };
    let url = redis.url("localhost");
    let cluster = cluster();
    let first = adapter(&url, &pki.ca, &cluster);
    first.check().await.expect("the TLS handshake succeeds with the CA that signed the server");
    let (a, b) = (PubSub::with_adapter(first), PubSub::with_adapter(adapter(&url, &pki.ca, &cluster)));
    let mut sub = b.subscribe("room:tls", 64);
    let deadline = tokio::time::Instant::now() + WAIT;
    let got = loop {
        a.broadcast("room:tls", "new_msg", json!({"body": "over TLS"}));
        if let Ok(Some(got)) = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await {
            break got;
        }
        assert!(tokio::time::Instant::now() < deadline, "no broadcast crossed over TLS within {WAIT:?}");
    };
    assert_eq!(got.event, "new_msg");
    assert!(a.stats().connected && b.stats().connected);
}

#[tokio::test]
async fn a_server_signed_by_another_ca_is_refused() {
    let pki = Pki::new();
    let Some(redis) = TlsRedis::start(&pki) else { return };
    let adapter = adapter(&redis.url("localhost"), &pki.other_ca, &cluster());
    match adapter.check().await {
        Err(RedisAdapterError::Tls(e)) => assert!(e.contains("UnknownIssuer"), "{e}"),
        other => panic!("expected a TLS refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_host_name_the_certificate_does_not_carry_is_refused() {
    let pki = Pki::new();
    let Some(redis) = TlsRedis::start(&pki) else { return };
    // The certificate names localhost and 127.0.0.1; 127.0.0.2 reaches the same server.
    let adapter = adapter(&redis.url("127.0.0.2"), &pki.ca, &cluster());
    match adapter.check().await {
        Err(RedisAdapterError::Tls(e)) => assert!(e.contains("not valid for name \"127.0.0.2\""), "{e}"),
        other => panic!("expected a TLS refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_ca_for_a_plain_url_is_refused() {
    let e = RedisAdapter::with_options("redis://127.0.0.1:6379", RedisOptions::default().tls_ca(b"pem".to_vec()))
        .expect_err("redis:// with a CA");
    assert!(matches!(e, RedisAdapterError::CaWithoutTls), "{e}");
}
