//! `kill -9` under steady load, restart on the same store, finish the load, reconcile: nothing
//! charged twice, no balance update without its charge, and no more usage lost than the
//! durability window (what was queued but not yet committed) allows.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::process::ChildGateway;
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
        let answered = match r {
            Ok(r) if r.status() == 200 => r
                .headers()
                .get("x-flowgate-decision-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .filter(|_| true),
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
async fn kill_9_mid_flight_loses_at_most_the_durability_window_and_charges_nothing_twice() {
    let backend = MockBackend::start().await.expect("backend");
    let dir = tempfile::tempdir().expect("tempdir");
    let store_url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let config = CONFIG
        .replace("__STORE__", &store_url)
        .replace("__BACKEND__", &backend.url());
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
    tokio::time::sleep(Duration::from_millis(1500)).await;
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
    assert!(answered.len() > 100, "the load ran: {}", answered.len());
    let rate = answered.len() as f64 / 1.5;

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
    // The durability window: what was queued but not committed, bounded by ledger_queue_max
    // (plus one request per client that was admitted just before the queue filled).
    let window = 200 + 8;
    println!(
        "kill -9: {} answered at {rate:.0}/s, {lost} lost (allowed {window}), {} in flight",
        answered.len(),
        unanswered.len()
    );
    assert!(
        lost <= window,
        "{lost} answered requests lost, more than {window}"
    );
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
    let store = Store::open(&store_url).await.expect("store");
    let counts = store.counts().await.expect("counts");
    let charged_keys = answered.len() + unanswered.len();
    assert!(
        counts.monetization_events as usize <= charged_keys,
        "{} charges for {charged_keys} keys",
        counts.monetization_events
    );
    let credits_left: u64 = store
        .grants("alice")
        .await
        .expect("grants")
        .iter()
        .map(|g| g.balance)
        .sum();
    assert!(credits_left <= 1_000_000);
}
