//! `kill -9` under steady load, restart on the same store, finish the load, reconcile. Checked
//! per idempotency key: every key is charged once or not at all, as the client saw it; with
//! batched durability no more answered usage is lost than the durability window (what was
//! queued but not yet committed) allows, and with strict durability none. Both stores.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::process::ChildGateway;
use common::{PgDatabase, StoreKind};
use flowgate::demo::backend::MockBackend;
use flowgate::store::Store;
use parking_lot::Mutex;

const CONFIG: &str = r#"
[server]
listen = "__LISTEN__"
upstream_timeout_ms = 5000
shutdown_grace_ms = 5000

[store]
url = "__STORE__"
durability = "__DURABILITY__"
# The durability window: at most this many usage events wait uncommitted. Past it the gateway
# answers 503 until the writer catches up.
ledger_queue_max = 200

[identity]
mode = "api_key"

[upstreams.backend]
url = "__BACKEND__"

[[routes]]
method = "POST"
path = "/v1/tasks"
feature = "task"
upstream = "backend"
cost = { header = "x-units" }

[plans.payg]
price_version = "crash-1"
prices = { task = 1 }

[[plans.payg.layers]]
kind = "usage_limit"
name = "limits"
windows = [{ name = "5h", duration = "5h", limit = 500 }]

[[plans.payg.layers]]
kind = "credits"

[[accounts]]
id = "alice"
plan = "payg"
api_keys = ["sk-alice"]

[[accounts.grants]]
id = "g1"
kind = "credits"
amount = 1000000
"#;

/// What the clients saw: for each idempotency key, the decision ids of its 200 answers, and
/// when (relative to the kill) they arrived.
#[derive(Default)]
struct Seen {
    answered_before_kill: HashMap<String, String>,
    unanswered: HashSet<String>,
}

/// Sends requests with fresh keys until `stop`, recording answers.
async fn load(base: String, prefix: String, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) {
    let http = reqwest::Client::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = format!("{prefix}-{n}");
        let r = http
            .post(format!("{base}/v1/tasks"))
            .bearer_auth("sk-alice")
            .header("x-units", 1 + n % 3)
            .header("idempotency-key", &key)
            .body("{}")
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        // Answered means a complete response: status 200 and the whole body received.
        let answered = match r {
            Ok(r) if r.status() == 200 => {
                let decision = r
                    .headers()
                    .get("x-flowgate-decision-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                match r.bytes().await {
                    Ok(_) => decision,
                    Err(_) => None,
                }
            }
            _ => None,
        };
        let mut seen = seen.lock();
        match answered {
            Some(decision) => {
                seen.answered_before_kill.insert(key, decision);
            }
            None => {
                seen.unanswered.insert(key);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_batched_loses_at_most_the_window_and_charges_nothing_twice() {
    kill_9_mid_flight(StoreKind::Sqlite, Durability::Batched).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_batched_loses_at_most_the_window_and_charges_nothing_twice() {
    kill_9_mid_flight(StoreKind::Postgres, Durability::Batched).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_strict_loses_nothing_answered_and_charges_nothing_twice() {
    kill_9_mid_flight(StoreKind::Sqlite, Durability::Strict).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_strict_loses_nothing_answered_and_charges_nothing_twice() {
    kill_9_mid_flight(StoreKind::Postgres, Durability::Strict).await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    Batched,
    Strict,
}

/// How many charges the store holds for each client key (charged usage events by key).
async fn charges_by_key(kind: StoreKind, url: &str) -> HashMap<String, i64> {
    let sql = "SELECT idempotency_key, COUNT(*) FROM usage_events
               WHERE charge_key IS NOT NULL GROUP BY idempotency_key";
    match kind {
        StoreKind::Sqlite => {
            let pool = sqlx::SqlitePool::connect(url).await.expect("sqlite");
            sqlx::query_as(sql).fetch_all(&pool).await.expect("charges")
        }
        StoreKind::Postgres => {
            let pool = sqlx::PgPool::connect(url).await.expect("postgres");
            sqlx::query_as(sql).fetch_all(&pool).await.expect("charges")
        }
    }
    .into_iter()
    .collect()
}

async fn kill_9_mid_flight(kind: StoreKind, durability: Durability) {
    let backend = MockBackend::start().await.expect("backend");
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = match kind {
        StoreKind::Sqlite => None,
        StoreKind::Postgres => Some(PgDatabase::create().await),
    };
    let store_url = match &pg {
        Some(db) => db.url.clone(),
        None => format!("sqlite://{}", dir.path().join("ledger.db").display()),
    };
    let config = CONFIG
        .replace("__STORE__", &store_url)
        .replace("__BACKEND__", &backend.url())
        .replace(
            "__DURABILITY__",
            match durability {
                Durability::Batched => "batched",
                Durability::Strict => "strict",
            },
        );
    let gateway = ChildGateway::start(dir.path(), "gw", &config).await;

    // Steady load from 8 clients, then kill -9 while it runs.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|c| {
            tokio::spawn(load(
                gateway.base.clone(),
                format!("c{c}"),
                stop.clone(),
                seen.clone(),
            ))
        })
        .collect();
    // The durability window: what was queued but not committed, bounded by ledger_queue_max
    // (plus one request per client that was admitted just before the queue filled).
    let window = match durability {
        Durability::Batched => 200 + 8,
        Durability::Strict => 0,
    };
    // Enough answered that losing all of them could not pass as "within the window": the load
    // runs at least 2 s, and on a busy machine (CI runs tests side by side) until that many
    // have been answered, up to 30 s.
    let enough = (2 * window).max(100);
    let started = flowgate::clock::Stopwatch::start();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    while seen.lock().answered_before_kill.len() <= enough
        && started.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ran = started.seconds();
    gateway.signal("KILL");
    let mut gateway = gateway;
    gateway.wait(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("client");
    }
    let (answered, unanswered) = {
        let s = seen.lock();
        (s.answered_before_kill.clone(), s.unanswered.clone())
    };
    let rate = answered.len() as f64 / ran;

    // What the ledger kept of the answered requests.
    let store = Store::open(&store_url).await.expect("store");
    let recorded: HashSet<String> = store
        .usage_events("alice", 1_000_000)
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.decision_id)
        .collect();
    let lost = answered.values().filter(|d| !recorded.contains(*d)).count();
    println!(
        "kill -9 ({kind:?}, {durability:?}): {} answered at {rate:.0}/s, {lost} lost (allowed {window}), {} in flight",
        answered.len(),
        unanswered.len()
    );
    assert!(
        answered.len() > enough,
        "the load ran: {} answered",
        answered.len()
    );
    assert!(
        lost <= window,
        "{lost} answered requests lost, more than {window}"
    );
    // Whatever was recorded was charged once per key.
    let before = charges_by_key(kind, &store_url).await;
    assert!(before.values().all(|&n| n == 1), "a key charged twice");
    drop(store);

    // Restart on the same store; clients retry everything they are unsure of, and replay
    // some that succeeded: none may be charged twice.
    let mut gateway = ChildGateway::start(dir.path(), "gw2", &config).await;
    let http = reqwest::Client::new();
    let retries: Vec<String> = unanswered
        .iter()
        .cloned()
        .chain(answered.keys().take(50).cloned())
        .collect();
    for key in &retries {
        // A client retries what failed; a transient 502/503 (the backend still busy with the
        // old load, the queue still full) is retried again, as an SDK would.
        let mut attempts = Vec::new();
        loop {
            let r = http
                .post(format!("{}/v1/tasks", gateway.base))
                .bearer_auth("sk-alice")
                .header("x-units", 1)
                .header("idempotency-key", key)
                .body("{}")
                .send()
                .await
                .expect("retry");
            let status = r.status().as_u16();
            let body = r.text().await.expect("body");
            if status == 200 {
                break;
            }
            attempts.push(format!("{status} {body}"));
            assert!(
                matches!(status, 502 | 503) && attempts.len() < 5,
                "retry of {key}: {attempts:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(gateway.terminate().await.success(), "{}", gateway.log());

    // Each key charged at most once; everything adds up.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["reconcile", "--config"])
        .arg(dir.path().join("gw2.toml"))
        .output()
        .expect("reconcile");
    assert!(
        out.status.success(),
        "reconcile found differences:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Per key: every key a client saw answered (before the kill, or on its retry) is charged
    // exactly once; no key twice; no charge for a key nobody sent.
    let after = charges_by_key(kind, &store_url).await;
    let twice: Vec<_> = after.iter().filter(|&(_, &n)| n != 1).collect();
    assert!(twice.is_empty(), "keys charged more than once: {twice:?}");
    let lost_keys: Vec<&String> = answered
        .keys()
        .chain(retries.iter())
        .filter(|k| !after.contains_key(*k))
        .filter(|k| durability == Durability::Strict || !retries.contains(k))
        .collect();
    assert!(
        lost_keys.is_empty() || durability == Durability::Batched,
        "answered but never charged: {lost_keys:?}"
    );
    for key in &retries {
        assert_eq!(after.get(key), Some(&1), "retried {key} charged once");
    }
    let sent: HashSet<&String> = answered.keys().chain(unanswered.iter()).collect();
    assert!(
        after.keys().all(|k| sent.contains(k)),
        "a charge for a key nobody sent"
    );
    drop(pg);
}
