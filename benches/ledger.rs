//! Ledger throughput and lag (docs/BENCHMARKS.md), on SQLite and on PostgreSQL.
//!
//!     cargo bench --bench ledger
//!
//! Each usage event here is a completed request paid from a credit grant, so every commit
//! writes all three datasets and a balance: a usage event, a monetization event, a balance
//! update and the grant's new balance, through the same `ledger::channel` writer the gateway
//! runs. Two measurements per store:
//! - throughput: `EVENTS` entries queued at once, timed until the writer has committed them all;
//! - lag: entries queued at `RATE` per second for `LAG_SECONDS`, the writer's own
//!   `flowgate_ledger_lag_seconds` histogram read back (p50/p99 are bucket upper bounds).
//!
//! `LEDGER_KEYS` says which idempotency keys the entries carry: `ordered` (the default: client
//! keys that grow with time), `random` (client keys in no order, as UUIDv4 keys are) or `none`
//! (no client key: the gateway assigns the decision id, as for every request sent without one).
//!
//! PostgreSQL: `FLOWGATE_BENCH_PG_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`)
//! names a database from which a throwaway one is created and dropped. Set `LEDGER_STORES=sqlite`
//! to skip it.

use std::sync::Arc;
use std::time::Duration;

use flowgate::accounts::Accounts;
use flowgate::config::Settings;
use flowgate::ledger::{self, WriterSettings};
use flowgate::metrics::Metrics;
use flowgate::store::Store;
use flowgate::usage::{LedgerEntry, Outcome};
use flowgate::waterfall::{self, FeatureId};
use sqlx::Connection;

/// The allocator `flowgate serve` runs on, so that the writer's own allocations cost here what
/// they cost there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ACCOUNTS: usize = 1_000;
const EVENTS: usize = 100_000;
const RATE: usize = 10_000;
const LAG_SECONDS: usize = 5;
const SETTLE_SECONDS: u64 = 3;

fn config(url: &str) -> String {
    // LEDGER_BATCH sets the writer's largest batch, LEDGER_FLUSH_MS how long a small batch
    // waits to fill (the product's defaults otherwise).
    let mut batch = std::env::var("LEDGER_BATCH")
        .map(|b| format!("ledger_batch_size_max = {b}\n"))
        .unwrap_or_default();
    if let Ok(ms) = std::env::var("LEDGER_FLUSH_MS") {
        batch.push_str(&format!("ledger_flush_interval_ms = {ms}\n"));
    }
    let mut text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[identity]
mode = "api_key"
[store]
url = "{url}"
{batch}
[upstreams.api]
url = "http://127.0.0.1:9"
[[routes]]
method = "POST"
path = "/v1/tasks"
feature = "task"
upstream = "api"
cost = {{ fixed = 1 }}
[plans.bench]
price_version = "bench-1"
prices = {{ task = 3 }}
[[plans.bench.layers]]
kind = "credits"
"#
    );
    for i in 0..ACCOUNTS {
        text.push_str(&format!(
            "[[accounts]]\nid = \"acct-{i}\"\nplan = \"bench\"\n\
             [[accounts.grants]]\nid = \"g-{i}\"\nkind = \"credits\"\namount = 1000000000\n"
        ));
    }
    text
}

struct Bench {
    store: Store,
    settings: std::sync::Arc<Settings>,
    accounts: Accounts,
    feature: FeatureId,
    /// `LEDGER_KEYS`: `ordered`, `random` or `none`.
    keys: String,
}

impl Bench {
    async fn open(url: &str) -> Bench {
        let settings = std::sync::Arc::new(Settings::parse(&config(url)).expect("bench config"));
        let store = Store::open(url).await.expect("open store");
        store.migrate().await.expect("migrate");
        let now = flowgate::clock::now_ms();
        store.seed(&settings.accounts, now).await.expect("seed");
        // LEDGER_EXPORT_SINKS=n: n billing-export sinks registered, so that every charge also
        // writes n outbox rows in its commit (nothing sends them here).
        let sinks: usize = std::env::var("LEDGER_EXPORT_SINKS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let sinks: Vec<(String, String)> = (0..sinks)
            .map(|i| (format!("sink-{i}"), "cloudevents".to_owned()))
            .collect();
        store
            .register_export_sinks(&sinks, now)
            .await
            .expect("register export sinks");
        let accounts = Accounts::load(&store, &settings, now)
            .await
            .expect("load accounts");
        let feature = settings.feature_id("task").expect("feature");
        Bench {
            store,
            settings,
            accounts,
            feature,
            keys: std::env::var("LEDGER_KEYS").unwrap_or_else(|_| "ordered".to_owned()),
        }
    }

    /// Entry `i`'s idempotency key, as `LEDGER_KEYS` says.
    fn key(&self, i: usize) -> Option<flowgate::ids::IdempotencyKey> {
        let key = match self.keys.as_str() {
            "none" => return None,
            // Fibonacci hashing: distinct for distinct `i`, in no order.
            "random" => format!(
                "bench-{:016x}",
                (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ),
            "ordered" => format!("bench-{}", uuid::Uuid::now_v7()),
            other => panic!("LEDGER_KEYS={other}: ordered, random or none"),
        };
        Some(flowgate::ids::IdempotencyKey::parse(&key).expect("a valid key"))
    }

    /// A completed request of one unit by account `i % ACCOUNTS`, decided and held as the
    /// gateway would.
    fn entry(&self, i: usize) -> LedgerEntry {
        let id = format!("acct-{}", i % ACCOUNTS);
        let account = self.accounts.get(&id).expect("account");
        let now = flowgate::clock::now_ms();
        let decision = account.with_state(|plan, state| {
            let d = waterfall::decide(plan, state, self.feature, 1, now);
            waterfall::reserve(plan, state, &d, now);
            d
        });
        assert!(decision.admitted(), "bench grants never run out");
        LedgerEntry {
            decision_id: uuid::Uuid::now_v7(),
            account: account.id.clone(),
            plan: account.plan.clone(),
            feature: self.settings.features[self.feature.0 as usize].clone(),
            used_units: decision.units,
            model: None,
            quantities: None,
            forgiven_units: 0,
            decision,
            outcome: Outcome::Completed,
            code: None,
            upstream_status: Some(200),
            idempotency_key: self.key(i),
            decided_at: now,
            completed_at: now,
            committed: None,
            shadow: None,
        }
    }

    /// Starts a writer with the gateway's default settings; returns its queue, its metrics, and
    /// what stops it (and waits for its last flush).
    fn writer(
        &self,
    ) -> (
        ledger::LedgerQueue,
        Arc<Metrics>,
        impl std::future::Future<Output = ()>,
    ) {
        let metrics = Arc::new(Metrics::new());
        let (queue, writer) = ledger::channel(
            self.store.clone(),
            self.accounts.clone(),
            metrics.clone(),
            WriterSettings {
                batch_size_max: self.settings.store.ledger_batch_size_max,
                flush_interval: Duration::from_millis(self.settings.store.ledger_flush_interval_ms),
                queue_max: usize::MAX,
                expiry_interval: Duration::from_secs(3600),
            },
            flowgate::clock::Clock::System,
        );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(writer.run(async move {
            let _ = stop_rx.await;
        }));
        let stop = async move {
            let _ = stop_tx.send(());
            let _ = task.await;
        };
        (queue, metrics, stop)
    }
}

async fn drained(queue: &ledger::LedgerQueue) {
    while queue.depth() > 0 {
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// Upper bound of the histogram bucket holding quantile `q`.
fn quantile(h: &prometheus::Histogram, q: f64) -> f64 {
    use prometheus::core::Collector;
    let families = h.collect();
    let Some(metric) = families.first().and_then(|f| f.get_metric().first()) else {
        return f64::NAN;
    };
    let hist = metric.get_histogram();
    let target = (hist.get_sample_count() as f64 * q).ceil() as u64;
    hist.get_bucket()
        .iter()
        .find(|b| b.cumulative_count() >= target)
        .map_or(f64::INFINITY, |b| b.upper_bound())
}

/// The share of `h`'s samples above `bound` seconds (a bucket's upper bound).
fn share_over(h: &prometheus::Histogram, bound: f64) -> f64 {
    use prometheus::core::Collector;
    let families = h.collect();
    let Some(metric) = families.first().and_then(|f| f.get_metric().first()) else {
        return f64::NAN;
    };
    let hist = metric.get_histogram();
    let within = hist
        .get_bucket()
        .iter()
        .find(|b| b.upper_bound() >= bound)
        .map_or(0, |b| b.cumulative_count());
    1.0 - within as f64 / hist.get_sample_count().max(1) as f64
}

async fn run(name: &str, url: &str) {
    let bench = Bench::open(url).await;

    // Throughput: everything queued at once; built first so that only commits are timed.
    let entries: Vec<LedgerEntry> = (0..EVENTS).map(|i| bench.entry(i)).collect();
    let (queue, metrics, stop) = bench.writer();
    let started = flowgate::clock::Stopwatch::start();
    for entry in entries {
        queue.push(entry);
    }
    drained(&queue).await;
    let elapsed = started.elapsed();
    stop.await;
    let batches = metrics.ledger_batch_size.get_sample_count();
    println!(
        "{name}: throughput {:.0} events/s ({EVENTS} events in {:.2} s, {batches} batches, mean {:.0}/batch; keys {})",
        EVENTS as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        EVENTS as f64 / batches.max(1) as f64,
        bench.keys,
    );

    // Lag at a steady rate: a tick per millisecond, RATE / 1000 entries each. First the store
    // settles after the burst (SQLite's checkpoint copies its WAL into the database file), so
    // that this measures the steady rate, not the burst's aftermath.
    tokio::time::sleep(Duration::from_secs(SETTLE_SECONDS)).await;
    let (queue, metrics, stop) = bench.writer();
    let per_tick = RATE / 1000;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut next = EVENTS; // after the burst's entries: a key is charged once
    for _ in 0..LAG_SECONDS * 1000 {
        tick.tick().await;
        for _ in 0..per_tick {
            queue.push(bench.entry(next));
            next += 1;
        }
    }
    drained(&queue).await;
    stop.await;
    let lag = &metrics.ledger_lag_seconds;
    let commit = &metrics.ledger_commit_seconds;
    println!(
        "{name}: lag at {RATE}/s over {LAG_SECONDS} s: p50 <= {} ms, p99 <= {} ms, {:.2} % over 20 ms \
         ({} events); its {} commits: p50 <= {} ms, p99 <= {} ms, mean {:.0} events",
        quantile(lag, 0.50) * 1000.0,
        quantile(lag, 0.99) * 1000.0,
        share_over(lag, 0.02) * 100.0,
        lag.get_sample_count(),
        commit.get_sample_count(),
        quantile(commit, 0.50) * 1000.0,
        quantile(commit, 0.99) * 1000.0,
        lag.get_sample_count() as f64 / commit.get_sample_count().max(1) as f64,
    );

    let counts = bench.store.counts().await.expect("counts");
    assert_eq!(
        counts.usage_events, next as u64,
        "every queued event was committed"
    );
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: only benchmark for
    // the former.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let stores = std::env::var("LEDGER_STORES").unwrap_or_else(|_| "sqlite,postgres".into());

    if stores.contains("sqlite") {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
        run("sqlite", &url).await;
    }

    if stores.contains("postgres") {
        let admin = std::env::var("FLOWGATE_BENCH_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let name = format!("flowgate_bench_{}", uuid::Uuid::now_v7().simple());
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .expect("PostgreSQL for the ledger bench (FLOWGATE_BENCH_PG_URL)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create bench database");
        let server = admin.rsplit_once('/').map_or(admin.as_str(), |(s, _)| s);
        run("postgres", &format!("{server}/{name}")).await;
        let _ = sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await;
    }
}
