//! `sslmode=require` and `verify-full`: two nodes reach each other through a PostgreSQL cluster
//! with `ssl = on` that the test creates, with a certificate from a CA made on the spot; a
//! client trusting another CA, or connecting by a name the certificate does not carry, is refused
//! with a TLS error.

use std::time::Duration;

use fawkes_channel::PubSub;
use fawkes_pubsub_postgres::{PostgresAdapter, PostgresAdapterError, PostgresOptions};
use fawkes_testkit::tls::{Pki, TlsPostgres};
use serde_json::json;
use sqlx::Connection as _;

const WAIT: Duration = Duration::from_secs(10);

fn cluster() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("t_tls_{}_{nanos}", std::process::id())
}

fn adapter(url: &str, cluster: &str) -> PostgresAdapter {
    PostgresAdapter::with_options(url, PostgresOptions::default().cluster(cluster)).expect("a postgres URL")
}

async fn nodes_broadcast(url: &str) {
    let cluster = cluster();
    let first = adapter(url, &cluster);
    first.check().await.expect("the connection succeeds");
    let (a, b) = (PubSub::with_adapter(first), PubSub::with_adapter(adapter(url, &cluster)));
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
    // The server's view: this URL's connections are encrypted.
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .expect("pg_stat_ssl");
    assert!(ssl, "the connection is not encrypted");
}

#[tokio::test]
async fn nodes_broadcast_with_verify_full() {
    let pki = Pki::new();
    let Some(pg) = TlsPostgres::start(&pki) else { return };
    let query = format!("sslmode=verify-full&sslrootcert={}", pki.ca.display());
    nodes_broadcast(&pg.url("localhost", &query)).await;
}

#[tokio::test]
async fn nodes_broadcast_with_require() {
    let pki = Pki::new();
    let Some(pg) = TlsPostgres::start(&pki) else { return };
    nodes_broadcast(&pg.url("127.0.0.1", "sslmode=require")).await;
}

#[tokio::test]
async fn verify_full_refuses_a_server_signed_by_another_ca() {
    let pki = Pki::new();
    let Some(pg) = TlsPostgres::start(&pki) else { return };
    let query = format!("sslmode=verify-full&sslrootcert={}", pki.other_ca.display());
    match adapter(&pg.url("localhost", &query), &cluster()).check().await {
        Err(PostgresAdapterError::Tls(e)) => assert!(e.contains("UnknownIssuer"), "{e}"),
        other => panic!("expected a TLS refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn verify_full_refuses_a_host_name_the_certificate_does_not_carry() {
    let pki = Pki::new();
    let Some(pg) = TlsPostgres::start(&pki) else { return };
    let query = format!("sslmode=verify-full&sslrootcert={}", pki.ca.display());
    match adapter(&pg.url("127.0.0.2", &query), &cluster()).check().await {
        Err(PostgresAdapterError::Tls(e)) => assert!(e.contains("not valid for name \"127.0.0.2\""), "{e}"),
        other => panic!("expected a TLS refusal, got {other:?}"),
    }
}
