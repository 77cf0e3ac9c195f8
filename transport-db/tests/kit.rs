//! The conformance kit over the database transport: the adapter is a database client (a client
//! id, inbox rows in, outbox rows out), on a real SQLite file and on the machine's PostgreSQL.

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{postgres, sqlite};
use fawkes_channel::{Endpoint, Frame};
use fawkes_testkit::{Capabilities, Connection, Received, Refused, Transport};
use fawkes_transport_db::{Db, DbClients, DbClientsOptions};

static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

struct DbTransport {
    db: Db,
    _clients: DbClients,
}

struct DbConn {
    db: Db,
    client: String,
    seen: i64,
    received: VecDeque<Received>,
}

async fn serve(db: Db, endpoint: Endpoint) -> DbTransport {
    let options = DbClientsOptions::default().poll_interval(Duration::from_millis(10));
    let clients = DbClients::start(db.clone(), endpoint, options).await.expect("db clients");
    DbTransport { db, _clients: clients }
}

impl Transport for DbTransport {
    type Connection = DbConn;

    async fn connect(&self, _params: &[(&str, &str)]) -> Result<DbConn, Refused> {
        let client = format!("kit-{}", NEXT_CLIENT.fetch_add(1, Ordering::Relaxed));
        Ok(DbConn { db: self.db.clone(), client, seen: 0, received: VecDeque::new() })
    }
}

type Row = (i64, Option<String>, Option<String>);

impl Connection for DbConn {
    async fn send(&mut self, frames: Vec<Frame>) {
        let sql = "INSERT INTO fawkes_inbox (client_id, frame) VALUES ($1, $2)";
        macro_rules! insert {
            ($pool:expr) => {{
                let mut tx = $pool.begin().await.expect("begin");
                for frame in &frames {
                    let text = String::from_utf8_lossy(frame.as_bytes()).into_owned();
                    sqlx::query(sql).bind(&self.client).bind(text).execute(&mut *tx).await.expect("insert");
                }
                tx.commit().await.expect("commit");
            }};
        }
        match &self.db {
            Db::Sqlite(p) => insert!(p),
            Db::Postgres(p) => insert!(p),
        }
    }

    async fn recv(&mut self) -> Received {
        let sql = "SELECT id, frame, closed FROM fawkes_outbox WHERE client_id = $1 AND id > $2 ORDER BY id";
        loop {
            if let Some(received) = self.received.pop_front() {
                return received;
            }
            let rows: Vec<Row> = match &self.db {
                Db::Sqlite(p) => sqlx::query_as(sql).bind(&self.client).bind(self.seen).fetch_all(p).await,
                Db::Postgres(p) => sqlx::query_as(sql).bind(&self.client).bind(self.seen).fetch_all(p).await,
            }
            .expect("read the outbox");
            if rows.is_empty() {
                // The outbox is a table: reading it is polling.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            for (id, frame, closed) in rows {
                self.seen = id;
                self.received.push_back(match (frame, closed) {
                    (_, Some(why)) => Received::Closed(why),
                    (Some(frame), None) => Received::Frame(Frame::text(frame)),
                    (None, None) => panic!("outbox row {id} has neither frame nor closed"),
                });
            }
        }
    }

    async fn close(&mut self) {}
}

fn capabilities() -> Capabilities {
    Capabilities::all().without_binary_frames().without_connect_params().wait(Duration::from_secs(10))
}

fn check(report: &fawkes_testkit::Report) {
    eprintln!("{report}");
    let skipped: Vec<&str> = report.skipped.iter().map(|(name, _)| *name).collect();
    assert_eq!(skipped, ["refused_connect", "binary"], "rows carry a client id and text frames only");
}

#[tokio::test]
async fn sqlite_passes_the_conformance_kit() {
    let t = sqlite().await;
    let report = fawkes_testkit::run("db-sqlite", capabilities(), |endpoint| serve(t.db.clone(), endpoint)).await;
    check(&report);
}

#[tokio::test]
async fn postgres_passes_the_conformance_kit() {
    if let Some(t) = postgres().await {
        let report = fawkes_testkit::run("db-postgres", capabilities(), |endpoint| serve(t.db.clone(), endpoint)).await;
        check(&report);
    }
}
