//! `flowgate reconcile` on a real ledger: clean after real traffic (splits, settlement,
//! replays, expiry), and failing, naming the record, once a balance is tampered with or a
//! balance update deleted.

mod common;

use std::process::Command;

use common::{Harness, StoreKind};
use serde_json::Value;

store_tests!(reconcile_is_clean_after_traffic_and_names_tampering);

/// Runs SQL on the test's store directly (the tampering).
async fn tamper(h: &Harness, sql: &str) {
    if h.pg().is_some() {
        let pool = sqlx::PgPool::connect(&h.store_url).await.unwrap();
        sqlx::query(sql).execute(&pool).await.unwrap();
        pool.close().await;
    } else {
        let pool = sqlx::SqlitePool::connect(&h.store_url).await.unwrap();
        sqlx::query(sql).execute(&pool).await.unwrap();
        pool.close().await;
    }
}

/// Runs `flowgate reconcile --json` on the harness's store; returns (exit code, report).
fn reconcile(h: &Harness, dir: &std::path::Path) -> (i32, Value) {
    let config = dir.join("reconcile.toml");
    std::fs::write(&config, &h.config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["reconcile", "--json", "--config"])
        .arg(&config)
        .env_remove("FLOWGATE_STORE_URL")
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

fn checks(report: &Value) -> Vec<(String, String)> {
    report["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["check"].as_str().unwrap().to_owned(),
                d["record"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn reconcile_is_clean_after_traffic_and_names_tampering(store: StoreKind) {
    let h = Harness::start_with(store, |c| {
        c.replace(
            "cost = { json = \"/seconds\" }",
            "cost = { json = \"/seconds\" }\nsettle = { sse = \"/usage/seconds\" }",
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    for units in [2, 3, 1] {
        h.task("sk-alice", units).await.text().await.unwrap(); // limits, then a split, then credits
    }
    for key in ["k1", "k1"] {
        let r = h
            .post("/v1/tasks", "sk-alice")
            .header("x-units", 2)
            .header("idempotency-key", key)
            .body("{}")
            .send()
            .await
            .unwrap();
        r.text().await.unwrap();
    }
    let r = h
        .post("/v1/videos", "sk-dave")
        .header("x-mock-usage", 9) // 18 credits; dave has 12: 6 seconds paid, 3 forgiven
        .json(&serde_json::json!({"seconds": 2}))
        .send()
        .await
        .unwrap();
    r.text().await.unwrap();
    h.settle_ledger().await;

    let (code, report) = reconcile(&h, dir.path());
    assert_eq!(checks(&report), vec![], "{report}");
    assert_eq!(code, 0);
    assert!(report["monetization_events"].as_u64().unwrap() >= 5);

    // A balance changed behind the ledger's back.
    tamper(
        &h,
        "UPDATE grants SET balance = balance - 7 WHERE account_id = 'alice'",
    )
    .await;
    let (code, report) = reconcile(&h, dir.path());
    assert_eq!(code, 1);
    let found = checks(&report);
    assert_eq!(found.len(), 1, "{report}");
    assert_eq!(found[0].0, "grant_balance");
    assert!(found[0].1.contains("purchase-1"), "{report}");
    assert_eq!(report["differences"][0]["account"], "alice");
    tamper(
        &h,
        "UPDATE grants SET balance = balance + 7 WHERE account_id = 'alice'",
    )
    .await;
    assert_eq!(reconcile(&h, dir.path()).0, 0);

    // A balance update deleted: the charge no longer adds up, nor does the balance.
    tamper(
        &h,
        "DELETE FROM balance_updates WHERE id = (SELECT MAX(id) FROM balance_updates WHERE reason = 'debit' AND account_id = 'alice')",
    )
    .await;
    let (code, report) = reconcile(&h, dir.path());
    assert_eq!(code, 1);
    let found = checks(&report);
    let kinds: Vec<&str> = found.iter().map(|(c, _)| c.as_str()).collect();
    assert!(kinds.contains(&"debits"), "{report}");
    assert!(kinds.contains(&"grant_balance"), "{report}");
    // Each difference names the account and the record at fault.
    for d in report["differences"].as_array().expect("differences") {
        assert_eq!(d["account"], "alice", "{report}");
    }
    let record = |check: &str| {
        found
            .iter()
            .find(|(c, _)| c == check)
            .map(|(_, r)| r.clone())
            .expect("found")
    };
    assert!(record("grant_balance").contains("purchase-1"), "{report}");
    assert!(record("debits").contains("monetization_event"), "{report}");
}

/// `flowgate reconcile` only reads: pointed at a SQLite file that does not exist (a mistyped
/// path), it says so and fails, and leaves no new, empty ledger behind to be found clean.
#[tokio::test]
async fn reconcile_of_a_missing_ledger_fails_and_creates_nothing() {
    let h = Harness::start(StoreKind::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo.db");
    let config = dir.path().join("reconcile.toml");
    let url = format!("sqlite://{}", missing.display());
    std::fs::write(&config, h.config.replace(&h.store_url, &url)).unwrap();
    assert_ne!(std::fs::read_to_string(&config).unwrap(), h.config);
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["reconcile", "--config"])
        .arg(&config)
        .env_remove("FLOWGATE_STORE_URL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no ledger at") && stderr.contains("typo.db"),
        "{stderr}"
    );
    assert!(!missing.exists(), "a read created the file");
}
