//! Strict durability (`[store] durability = "strict"`): a charged response does not complete
//! until its usage event is committed, so a client never sees a completed request whose usage a
//! crash could lose. Shown by locking the ledger from outside: a strict response waits for the
//! lock, a batched one does not. Both stores.

mod common;

use std::time::Duration;

use common::{Harness, StoreKind};
use sqlx::Connection;

store_tests!(
    a_strict_response_completes_only_after_its_commit,
    a_batched_response_does_not_wait_for_its_commit,
);

/// A connection holding the ledger's write lock until it is dropped or committed.
enum Lock {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl Lock {
    /// Takes the lock the ledger writer needs: SQLite's write lock, or PostgreSQL's exclusive
    /// lock on `usage_events`.
    async fn take(h: &Harness) -> Lock {
        if h.pg().is_some() {
            let mut c = sqlx::PgConnection::connect(&h.store_url).await.unwrap();
            sqlx::raw_sql("BEGIN; LOCK TABLE usage_events IN ACCESS EXCLUSIVE MODE")
                .execute(&mut c)
                .await
                .unwrap();
            Lock::Postgres(c)
        } else {
            let mut c = sqlx::SqliteConnection::connect(&h.store_url).await.unwrap();
            sqlx::raw_sql("BEGIN IMMEDIATE")
                .execute(&mut c)
                .await
                .unwrap();
            Lock::Sqlite(c)
        }
    }

    async fn release(self) {
        match self {
            Lock::Sqlite(mut c) => sqlx::raw_sql("COMMIT").execute(&mut c).await.map(drop),
            Lock::Postgres(mut c) => sqlx::raw_sql("COMMIT").execute(&mut c).await.map(drop),
        }
        .unwrap();
    }
}

async fn start(store: StoreKind, durability: &str) -> Harness {
    let line = format!("ledger_flush_interval_ms = 1\ndurability = \"{durability}\"");
    Harness::start_with(store, |c| {
        c.replacen("ledger_flush_interval_ms = 1", &line, 1)
    })
    .await
}

async fn a_strict_response_completes_only_after_its_commit(store: StoreKind) {
    let h = start(store, "strict").await;
    h.settle_ledger().await; // start-up's own writes (expiry) are done
    let lock = Lock::take(&h).await;
    let request = {
        let send = h
            .post("/v1/tasks", "sk-alice")
            .header("x-units", 4) // 3 from the window, 1 × 5 credits
            .json(&serde_json::json!({"prompt": "test"}))
            .send();
        tokio::spawn(async move {
            let r = send.await.unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !request.is_finished(),
        "the response completed while its usage could not be committed"
    );
    lock.release().await;
    let body = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .expect("completes once the commit is through")
        .unwrap();
    assert!(!body.is_empty());
    // Completed means committed: the charge is in the store the moment the client has it.
    let events = h.store().await.usage_events("alice", 10).await.unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].charged);
    assert_eq!(events[0].credits, 5);
}

async fn a_batched_response_does_not_wait_for_its_commit(store: StoreKind) {
    let h = start(store, "batched").await;
    h.settle_ledger().await;
    let lock = Lock::take(&h).await;
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        let r = h.task("sk-alice", 4).await;
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    })
    .await
    .expect("a batched response completes while the ledger is locked");
    assert!(!r.is_empty());
    lock.release().await;
    h.settle_ledger().await;
    let events = h.store().await.usage_events("alice", 10).await.unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
}
