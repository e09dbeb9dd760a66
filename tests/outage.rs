//! The store going away: the gateway keeps serving from memory, keeps every usage event queued,
//! says so on `/readyz`, and writes everything once the store is back.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
// Waits for real processes and servers: tokio's clock (clippy.toml keeps std's out).
use tokio::time::Instant;

use common::{Harness, PgDatabase, StoreKind, header};
use serde_json::Value;
use sqlx::Connection;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_keeps_usage_queued_and_fails_readiness() {
    let h = Harness::start(StoreKind::Postgres).await;
    let name = h.pg().expect("postgres").name().to_owned();
    let readyz = || async {
        let r = h
            .http
            .get(format!("{}/readyz", h.base))
            .send()
            .await
            .expect("readyz answers");
        (r.status().as_u16(), r.json::<Value>().await.expect("json"))
    };
    assert_eq!(readyz().await.0, 200);
    let before = h.store().await.counts().await.expect("counts");

    // Cut the database off: no new connections, existing ones terminated.
    PgDatabase::admin(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false")).await;
    PgDatabase::admin(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
    ))
    .await;

    // Requests are still decided from memory and answered.
    for _ in 0..5 {
        let r = h.task("sk-alice", 1).await;
        assert_eq!(r.status(), 200);
        r.text().await.expect("body");
    }
    let started = Instant::now();
    let (status, body) = readyz().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["store_reachable"], false);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "readiness answers promptly while the store is down"
    );
    // The writer has tried, failed, and kept all five entries.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = readyz().await;
        if body["ledger_committing"] == false {
            assert_eq!(body["ledger_queue_depth"], 5, "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the writer never noticed: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = h.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("flowgate_store_errors_total ") && !l.ends_with(" 0")),
        "store errors are counted"
    );

    // The store comes back: everything queued is written, once.
    PgDatabase::admin(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true")).await;
    h.settle_ledger().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while readyz().await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = h.store().await.counts().await.expect("counts");
    assert_eq!(after.usage_events - before.usage_events, 5);
    // 3 units from the 5h window, then 2 units × 5 credits from the grant.
    assert_eq!(h.stored_balance("alice").await, 90);
    let r = h.task("sk-alice", 1).await;
    assert_eq!(header(&r, "x-credits-remaining"), "85");
}

// The same outage on both stores, under load: PostgreSQL refusing connections, SQLite's
// write lock held by another process. `FLOWGATE_OUTAGE_S` sets its length (8 s by default;
// docs/BENCHMARKS.md has a 30 s run).

store_tests!(an_outage_under_load_loses_nothing_acknowledged);

/// Cuts the store off from the gateway's writer; `restore` gives it back.
enum Outage {
    Postgres(String),
    Sqlite(sqlx::SqliteConnection),
}

impl Outage {
    async fn begin(h: &Harness) -> Outage {
        match h.pg() {
            Some(db) => {
                let name = db.name().to_owned();
                PgDatabase::admin(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false")).await;
                PgDatabase::admin(&format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
                ))
                .await;
                Outage::Postgres(name)
            }
            None => {
                let mut c = sqlx::SqliteConnection::connect(&h.store_url).await.unwrap();
                sqlx::raw_sql("BEGIN IMMEDIATE")
                    .execute(&mut c)
                    .await
                    .unwrap();
                Outage::Sqlite(c)
            }
        }
    }

    async fn restore(self) {
        match self {
            Outage::Postgres(name) => {
                PgDatabase::admin(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true")).await
            }
            Outage::Sqlite(mut c) => {
                sqlx::raw_sql("ROLLBACK").execute(&mut c).await.unwrap();
            }
        }
    }
}

async fn an_outage_under_load_loses_nothing_acknowledged(store: StoreKind) {
    let outage_s: u64 = std::env::var("FLOWGATE_OUTAGE_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let h = Arc::new(Harness::start(store).await);
    h.settle_ledger().await;
    let stop = Arc::new(AtomicBool::new(false));
    // Four clients, each ~50 requests/s, every request with a key of its own.
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (h, stop) = (h.clone(), stop.clone());
            tokio::spawn(async move {
                let mut answered = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let r = h
                        .post("/v1/tasks", "sk-alice")
                        .header("x-units", 1)
                        .header("idempotency-key", format!("c{c}-{n}"))
                        .send()
                        .await
                        .expect("the gateway answers throughout");
                    let status = r.status().as_u16();
                    let id = (status != 503).then(|| header(&r, "x-flowgate-decision-id"));
                    r.bytes().await.expect("body");
                    answered.push((status, id));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                answered
            })
        })
        .collect();
    // /readyz, every 100 ms, until told to stop (after the load).
    let stop_probe = Arc::new(AtomicBool::new(false));
    let probe = {
        let (h, stop) = (h.clone(), stop_probe.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let r = h
                    .http
                    .get(format!("{}/readyz", h.base))
                    .send()
                    .await
                    .expect("readyz answers");
                seen.push((Instant::now(), r.status().as_u16()));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            seen
        })
    };

    tokio::time::sleep(Duration::from_secs(1)).await;
    let outage = Outage::begin(&h).await;
    tokio::time::sleep(Duration::from_secs(outage_s)).await;
    let restored_at = Instant::now();
    outage.restore().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut answered = Vec::new();
    for c in clients {
        answered.extend(c.await.unwrap());
    }
    // The load has stopped: everything queued is committed once the writer's backoff ends.
    let deadline = Instant::now() + Duration::from_secs(20);
    while h.gateway().app().ledger.depth() > 0 {
        assert!(Instant::now() < deadline, "the queue never drained");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // readyz sees the recovery
    stop_probe.store(true, Ordering::Relaxed);
    let seen = probe.await.unwrap();

    // /readyz told the truth: it failed during the outage, and once it had failed it did
    // not claim readiness again before the store was back; it is ready at the end.
    let first_down = seen
        .iter()
        .position(|(_, s)| *s == 503)
        .expect("readiness failed during the outage");
    assert!(
        seen[first_down..]
            .iter()
            .all(|(at, s)| *s == 503 || *at >= restored_at),
        "ready while the store was still away: {seen:?}"
    );
    assert_eq!(
        seen.last().map(|s| s.1),
        Some(200),
        "ready again at the end"
    );

    // Every answered request is in the ledger exactly as the client saw it.
    let events = h
        .store()
        .await
        .usage_events("alice", 100_000)
        .await
        .unwrap();
    let by_id: HashMap<&str, _> = events.iter().map(|e| (e.decision_id.as_str(), e)).collect();
    assert_eq!(by_id.len(), events.len(), "one event per decision");
    let mut charged = 0;
    for (status, id) in &answered {
        let Some(id) = id else { continue }; // 503 ledger_backlog: refused, never decided
        let event = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("answered {status} as {id} but not in the ledger"));
        assert_eq!(event.charged, *status == 200, "{status}: {event:?}");
        charged += usize::from(*status == 200);
    }
    let decided = answered.iter().filter(|(_, id)| id.is_some()).count();
    let not_ready = seen.iter().filter(|(_, s)| *s == 503).count();
    println!(
        "{store:?} outage {outage_s} s: {} answered ({decided} decided, {charged} charged, {} refused 503), /readyz 503 for {} of {} probes",
        answered.len(),
        answered.len() - decided,
        not_ready,
        seen.len()
    );
    assert_eq!(events.len(), decided, "no event the clients did not see");
    assert!(charged >= 20, "real work was charged: {charged}");
    assert!(decided > 100, "load ran through the outage: {decided}");

    let report = h
        .store()
        .await
        .reconcile(i64::MIN, &h.gateway().app().settings)
        .await
        .unwrap();
    assert!(report.differences.is_empty(), "{:?}", report.differences);
}
