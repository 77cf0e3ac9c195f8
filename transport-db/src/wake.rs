//! The one LISTEN loop: what an idle reader waits for before reading again.
//!
//! Readers poll; on PostgreSQL a trigger's `NOTIFY fawkes_changes` wakes them at once, and
//! polling stays the safety net for a lost notification or a LISTEN connection that is down.

use std::time::Duration;

use sqlx::postgres::PgListener;

use crate::db::Db;

/// Waits between reads: a notification, or the poll interval, doubling while reads find nothing.
pub(crate) struct Wakeup {
    listener: Option<PgListener>,
    poll_interval: Duration,
    max_idle_interval: Duration,
    empty: u32,
}

impl Wakeup {
    /// Listens on `fawkes_changes` where there is LISTEN (PostgreSQL); polls only otherwise, or
    /// when the listener cannot connect (logged).
    pub(crate) async fn new(db: &Db, poll_interval: Duration, max_idle_interval: Duration) -> Wakeup {
        let listener = match db {
            Db::Postgres(pool) => match PgListener::connect_with(pool).await {
                Ok(mut listener) => match listener.listen("fawkes_changes").await {
                    Ok(()) => Some(listener),
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN failed; polling only");
                        None
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN unavailable; polling only");
                    None
                }
            },
            Db::Sqlite(_) => None,
        };
        Wakeup { listener, poll_interval, max_idle_interval, empty: 0 }
    }

    /// Records what the last read found: an empty read lengthens the next idle wait.
    pub(crate) fn read(&mut self, found_rows: bool) {
        self.empty = if found_rows { 0 } else { self.empty.saturating_add(1) };
    }

    /// Completes on a notification or when the idle interval has passed. Cancel-safe.
    pub(crate) async fn wait(&mut self) {
        let idle = idle_wait(self.poll_interval, self.max_idle_interval, self.empty);
        tokio::select! {
            () = notified(&mut self.listener) => self.empty = 0,
            () = tokio::time::sleep(idle) => {}
        }
    }
}

/// How long an idle reader sleeps after `empty` reads in a row found nothing: `base` doubling up
/// to `max` (a notification still wakes it at once).
fn idle_wait(base: Duration, max: Duration, empty: u32) -> Duration {
    base.saturating_mul(1 << empty.min(16)).min(max.max(base))
}

/// Completes on the next notification. A broken listener reconnects on its next `recv`; until
/// then this waits a little, so a database that is down is not spun on.
async fn notified(listener: &mut Option<PgListener>) {
    match listener {
        Some(l) => {
            if let Err(e) = l.recv().await {
                tracing::debug!(error = %e, "LISTEN connection lost");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn idle_readers_back_off_to_the_cap_and_retries_grow_to_five_seconds() {
        let ms = Duration::from_millis;
        let waits: Vec<_> = (0..6).map(|n| super::idle_wait(ms(50), ms(500), n)).collect();
        assert_eq!(waits, [ms(50), ms(100), ms(200), ms(400), ms(500), ms(500)]);
        assert_eq!(super::idle_wait(ms(800), ms(500), 3), ms(800), "never below the base interval");
        // Failed reads and writes retry with the one backoff of the codebase.
        let mut backoff = fawkes_channel::Backoff::new();
        let mut retries = Vec::new();
        for _ in 0..8 {
            let started = tokio::time::Instant::now();
            backoff.wait().await;
            retries.push(started.elapsed());
        }
        assert_eq!((retries[0], retries[1], retries[7]), (ms(100), ms(200), ms(5000)));
    }
}
