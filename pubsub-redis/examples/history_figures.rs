//! Figures for `RedisHistory` on a real Redis (`FAWKES_TEST_REDIS`, default
//! `redis://127.0.0.1:6379`): broadcasts per second written and delivered back to a subscriber,
//! one publisher and several concurrent ones, against the same PubSub without history; and the
//! time to read back 1,000 missed broadcasts (what a recovering join waits for).
//!
//! `cargo run --release -p fawkes-pubsub-redis --example history_figures [-- MESSAGES]`
//! Wall-clock figures: quote them with the machine's load.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fawkes_channel::{HistoryOptions, HistoryStore, Position, PubSub};
use fawkes_pubsub_redis::{RedisAdapter, RedisHistory, RedisOptions};
use serde_json::json;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("FAWKES_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let messages: usize = std::env::args().nth(1).map_or(Ok(5_000), |n| n.parse())?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    let options = RedisOptions::default().cluster(format!("figures_{nanos:x}"));
    let pubsub = PubSub::with_adapter(RedisAdapter::with_options(&url, options.clone())?);
    let store = Arc::new(RedisHistory::with_options(&url, options)?);
    let history = pubsub.history();
    history.set_store(store.clone());
    let keep = HistoryOptions::default().max_len(10_000).max_age(Duration::from_secs(600));
    history.keep("feed:*", keep);
    // Let both subscriptions come up: a first broadcast each way must come back.
    let mut warm = pubsub.subscribe("feed:warm", 16);
    history.broadcast("feed:warm", "w", |_| json!({}).into()).await?;
    tokio::time::timeout(Duration::from_secs(5), warm.recv()).await?;

    println!("redis history, {messages} broadcasts of ~40 bytes, subscriber on the same node");
    for publishers in [1usize, 4] {
        let topic = format!("feed:pub{publishers}");
        let mut sub = pubsub.subscribe(&topic, messages + 16);
        let started = Instant::now();
        let tasks: Vec<_> = (0..publishers)
            .map(|p| {
                let (history, topic) = (history.clone(), topic.clone());
                tokio::spawn(async move {
                    for n in 0..messages / publishers {
                        let body = format!("{p}-{n}");
                        history.broadcast(&topic, "m", |pos| json!({"b": body, "pos": pos.to_string()}).into()).await?;
                    }
                    Ok::<_, fawkes_channel::HistoryError>(())
                })
            })
            .collect();
        for t in tasks {
            t.await??;
        }
        let written = started.elapsed();
        for _ in 0..(messages / publishers) * publishers {
            tokio::time::timeout(Duration::from_secs(10), sub.recv()).await?;
        }
        let delivered = started.elapsed();
        let n = (messages / publishers * publishers) as f64;
        println!(
            "  {publishers} publisher(s): written {:.0}/s, delivered back {:.0}/s",
            n / written.as_secs_f64(),
            n / delivered.as_secs_f64()
        );
    }
    {
        let mut sub = pubsub.subscribe("room:plain", messages + 16);
        let started = Instant::now();
        for n in 0..messages {
            pubsub.broadcast("room:plain", "m", json!({"b": n}));
        }
        for _ in 0..messages {
            tokio::time::timeout(Duration::from_secs(10), sub.recv()).await?;
        }
        println!(
            "  without history (same PubSub, local delivery): {:.0}/s",
            messages as f64 / started.elapsed().as_secs_f64()
        );
    }

    // Recovering 1,000 missed broadcasts: the read a join makes, barrier included.
    let topic = "feed:pub1";
    let current = store.read_after(topic, &keep, None).await?.current;
    let since = Position::new(current.epoch(), current.offset().saturating_sub(1_000));
    let mut times = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let read = store.read_after(topic, &keep, Some(since)).await?;
        times.push(started.elapsed());
        assert!(read.recovered && read.entries.len() == 1_000);
    }
    times.sort();
    println!("  recovering 1,000 missed broadcasts: median {:?}, max {:?} (20 reads)", times[10], times[19]);
    Ok(())
}
