//! The store going away: the gateway keeps serving from memory, keeps every usage event queued,
//! says so on `/readyz`, and writes everything once the store is back.

mod common;

use std::time::Duration;
// Waits for real processes and servers: tokio's clock (clippy.toml keeps std's out).
use tokio::time::Instant;

use common::{Harness, PgDatabase, StoreKind, header};
use serde_json::Value;

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
    let metrics = h
        .http
        .get(format!("{}/metrics", h.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
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
