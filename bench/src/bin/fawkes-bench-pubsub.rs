//! `fawkes-bench-pubsub`: broadcast throughput and latency between two nodes through each PubSub
//! adapter (Redis, PostgreSQL), beside the local-only figure.
//!
//! Each "node" is a PubSub with its own adapter and backend connections, as separate processes
//! would have; node A publishes, a subscriber on node B receives (local: one PubSub, its own
//! subscriber). Two runs per adapter:
//! - throughput: `--messages` broadcasts of a 100-byte payload published as fast as the
//!   publisher can; msgs/s = messages / time until the last one arrived on B;
//! - latency: `--rate` broadcasts per second for `--seconds`; p50/p99/max from publish to
//!   arrival on B (an unloaded link).
//!
//! Backends: `FAWKES_TEST_REDIS` (default redis://127.0.0.1:6379) and `FAWKES_TEST_POSTGRES`
//! (default postgres://postgres@127.0.0.1:5432/test); an unreachable one is reported and skipped.
//!
//! ```sh
//! cargo run --release -p fawkes-bench --bin fawkes-bench-pubsub -- --messages 100000 --rate 2000 --seconds 5
//! ```

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use fawkes::pubsub_postgres::{PostgresAdapter, PostgresOptions};
use fawkes::pubsub_redis::{RedisAdapter, RedisOptions};
use fawkes::{PubSub, Subscription};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(name = "fawkes-bench-pubsub", about = "Cross-node broadcast throughput and latency per PubSub adapter")]
struct Cli {
    /// Broadcasts in the throughput run.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Broadcasts per second in the latency run.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// Length of the latency run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Adapters to measure (local, redis, postgres).
    #[arg(long, value_delimiter = ',', default_value = "local,redis,postgres")]
    adapters: Vec<String>,
}

struct Pair {
    publisher: PubSub,
    /// Keeps node B alive.
    _receiver: PubSub,
    sub: Subscription,
}

fn pair(adapter: &str, run: &str) -> Result<Pair, String> {
    let cluster = format!("bench_{run}_{}", std::process::id());
    let node = |()| -> Result<PubSub, String> {
        match adapter {
            "redis" => {
                let url = std::env::var("FAWKES_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
                let a = RedisAdapter::with_options(&url, RedisOptions::default().cluster(&cluster).queue(1 << 20))
                    .map_err(|e| e.to_string())?;
                Ok(PubSub::with_adapter(a))
            }
            "postgres" => {
                let url = std::env::var("FAWKES_TEST_POSTGRES")
                    .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
                let a =
                    PostgresAdapter::with_options(&url, PostgresOptions::default().cluster(&cluster).queue(1 << 20))
                        .map_err(|e| e.to_string())?;
                Ok(PubSub::with_adapter(a))
            }
            other => Err(format!("unknown adapter {other}")),
        }
    };
    if adapter == "local" {
        let pubsub = PubSub::new();
        let sub = pubsub.subscribe("bench", 1 << 20);
        return Ok(Pair { publisher: pubsub.clone(), _receiver: pubsub, sub });
    }
    let (a, b) = (node(())?, node(())?);
    let sub = b.subscribe("bench", 1 << 20);
    Ok(Pair { publisher: a, _receiver: b, sub })
}

/// Probes until a broadcast from A reaches B (the adapters subscribe in the background).
async fn linked(p: &mut Pair) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        p.publisher.broadcast("bench", "probe", json!({}));
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), p.sub.recv()).await {
            break;
        }
        if Instant::now() > deadline {
            return Err("no broadcast crossed between the nodes in 10 s (backend unreachable?)".into());
        }
    }
    p.publisher.broadcast("bench", "probes_done", json!({}));
    loop {
        match tokio::time::timeout(Duration::from_secs(10), p.sub.recv()).await {
            Ok(Some(b)) if b.event == "probes_done" => return Ok(()),
            Ok(Some(_)) => {}
            _ => return Err("probes did not drain".into()),
        }
    }
}

fn payload(epoch: Instant, seq: u64) -> Value {
    // About 100 bytes once encoded.
    json!({ "t": epoch.elapsed().as_micros() as u64, "seq": seq, "body": "x".repeat(48) })
}

/// Receives until `seq == last`; returns the latency histogram (µs) and the messages received.
async fn receive(sub: &mut Subscription, epoch: Instant, last: u64) -> Result<(Histogram<u64>, u64), String> {
    let mut hist = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut got = 0;
    loop {
        let b = match tokio::time::timeout(Duration::from_secs(15), sub.recv()).await {
            Ok(Some(b)) => b,
            _ => return Err(format!("stalled after {got} messages")),
        };
        let p = b.payload.as_json().cloned().unwrap_or_default();
        let (Some(t), Some(seq)) = (p["t"].as_u64(), p["seq"].as_u64()) else { continue };
        got += 1;
        let _ = hist.record((epoch.elapsed().as_micros() as u64).saturating_sub(t).max(1));
        if seq == last {
            return Ok((hist, got));
        }
    }
}

async fn measure(adapter: &str, cli: &Cli) -> Result<String, String> {
    // Throughput: publish everything at once.
    let mut p = pair(adapter, "tput")?;
    linked(&mut p).await?;
    let epoch = Instant::now();
    let n = cli.messages;
    let publisher = p.publisher.clone();
    let publish = tokio::spawn(async move {
        for seq in 0..n {
            publisher.broadcast("bench", "m", payload(epoch, seq));
            if seq % 1024 == 0 {
                tokio::task::yield_now().await;
            }
        }
    });
    let (_, got) = receive(&mut p.sub, epoch, n - 1).await?;
    let elapsed = epoch.elapsed().as_secs_f64();
    let _ = publish.await;
    let lost = n - got;
    let dropped = p.publisher.stats().dropped;

    // Latency: a steady rate.
    let mut q = pair(adapter, "lat")?;
    linked(&mut q).await?;
    let epoch = Instant::now();
    let total = cli.rate * cli.seconds;
    let publisher = q.publisher.clone();
    let rate = cli.rate;
    let pace = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let mut sent = 0;
        while sent < total {
            tick.tick().await;
            let due = (epoch.elapsed().as_secs_f64() * rate as f64) as u64;
            while sent < due.min(total) {
                publisher.broadcast("bench", "m", payload(epoch, sent));
                sent += 1;
            }
        }
    });
    let (hist, _) = receive(&mut q.sub, epoch, total - 1).await?;
    let _ = pace.await;
    Ok(format!(
        "{adapter:<9} {:>12.0} {:>8} {:>9.2} {:>9.2} {:>9.2}",
        n as f64 / elapsed,
        lost + dropped,
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.max() as f64 / 1000.0,
    ))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    println!(
        "cross-node broadcast, 100-byte payload: throughput of {} messages; latency at {} msg/s for {} s",
        cli.messages, cli.rate, cli.seconds
    );
    println!("{:<9} {:>12} {:>8} {:>9} {:>9} {:>9}", "adapter", "msgs/s", "lost", "p50 ms", "p99 ms", "max ms");
    let mut failed = false;
    for adapter in &cli.adapters {
        match measure(adapter, &cli).await {
            Ok(line) => println!("{line}"),
            Err(e) => {
                failed = true;
                println!("{adapter:<9} failed: {e}");
            }
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
