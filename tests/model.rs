//! The ledger's invariants under random histories: proptest drives a real gateway, backend and
//! store through random sequences of grants (admin API), requests of random cost that settle
//! above or below their estimate or fail, replays of the same idempotency keys, waits that let
//! grants expire, and restarts; after every step it checks:
//!
//! - `flowgate reconcile`'s checks find nothing (each balance equals its grants minus its
//!   balance updates; every monetization event has exactly one usage event; charges add up);
//! - no account ever pays more than it had: debits never exceed grants minus expiries;
//! - the gateway's view, once idle, holds exactly the store's unexpired balances.

mod common;

use common::api::with_admin;
use common::{Harness, StoreKind};
use flowgate::config::Settings;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use reqwest::Method;

#[derive(Debug, Clone)]
enum Op {
    /// An admin grant to alice, perhaps expiring soon.
    Grant {
        amount: u64,
        expires_in_ms: Option<u64>,
    },
    /// A task: estimated `units`, settled to `used` if given, failing upstream if `fail`, with
    /// idempotency key number `key` if given (a small pool: keys repeat).
    Task {
        units: u64,
        used: Option<u64>,
        key: Option<u8>,
        fail: bool,
    },
    /// Time passes on the gateway's manual clock (grants expire).
    Sleep { ms: u64 },
    /// The gateway restarts on the same store.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (1u64..200, prop::option::of(150u64..700))
            .prop_map(|(amount, expires_in_ms)| Op::Grant { amount, expires_in_ms }),
        7 => (1u64..12, prop::option::of(0u64..20), prop::option::of(0u8..4), prop::bool::weighted(0.15))
            .prop_map(|(units, used, key, fail)| Op::Task { units, used, key, fail }),
        1 => (50u64..400).prop_map(|ms| Op::Sleep { ms }),
        1 => Just(Op::Restart),
    ]
}

/// The harness config: tasks settle from the response's `x-usage-units` header.
fn config(c: String) -> String {
    with_admin(c.replace(
        "cost = { header = \"x-units\" }",
        "cost = { header = \"x-units\" }\nsettle = { header = \"x-usage-units\" }",
    ))
}

async fn apply(h: &mut Harness, op: &Op, n: usize) {
    match op {
        Op::Grant {
            amount,
            expires_in_ms,
        } => {
            let mut body = serde_json::json!({ "kind": "credits", "amount": amount });
            if let Some(ms) = expires_in_ms {
                let at = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(
                    h.clock.now_ms() + *ms as i64,
                )
                .unwrap();
                body["expires_at"] = at.to_rfc3339().into();
            }
            let r = h
                .admin(Method::POST, "/admin/v1/accounts/alice/grants")
                .header("idempotency-key", format!("grant-{n}"))
                .json(&body)
                .send()
                .await
                .expect("grant");
            assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
        }
        Op::Task {
            units,
            used,
            key,
            fail,
        } => {
            let mut req = h
                .post("/v1/tasks", "sk-alice")
                .header("x-units", *units)
                .body("{}");
            if let Some(used) = used {
                req = req.header("x-mock-usage", *used);
            }
            if let Some(key) = key {
                req = req.header("idempotency-key", format!("key-{key}"));
            }
            if *fail {
                req = req.header("x-mock-status", "500");
            }
            let r = req.send().await.expect("task");
            let status = r.status().as_u16();
            r.text().await.expect("body");
            // Admitted, replayed, failed upstream, denied for want of limits or credits, or a
            // key reused with another cost (422). tests/reference_model.rs says which, exactly.
            assert!(
                matches!(status, 200 | 402 | 422 | 429 | 500),
                "unexpected status {status}"
            );
        }
        Op::Sleep { ms } => h.clock.advance_ms(*ms as i64),
        Op::Restart => h.restart().await,
    }
}

async fn check_invariants(h: &Harness, settings: &Settings, history: &[Op]) {
    h.settle_ledger().await;
    let store = h.store().await;
    let report = store
        .reconcile(i64::MIN, settings)
        .await
        .expect("reconcile");
    let snapshot = store.snapshot(i64::MIN).await.expect("snapshot");
    assert_eq!(report.differences, vec![], "after {history:?}");

    // Nobody pays more than they had.
    let granted: i64 = snapshot
        .grants
        .iter()
        .filter(|g| g.account_id == "alice")
        .map(|g| g.amount)
        .sum();
    let (mut debited, mut expired, mut refunded) = (0, 0, 0);
    for u in snapshot
        .balance_updates
        .iter()
        .filter(|u| u.account_id == "alice")
    {
        match u.reason.as_str() {
            "debit" => debited -= u.delta,
            "expired" => expired -= u.delta,
            "refund" => refunded += u.delta,
            _ => {}
        }
    }
    assert!(
        debited - refunded <= granted - expired,
        "paid {debited} (refunded {refunded}) of {granted} granted, {expired} expired: {history:?}"
    );

    // The idle view holds the store's balances (skipping the instant a grant expires).
    let now = h.clock.now_ms();
    let grants = store.grants("alice").await.expect("grants");
    if grants
        .iter()
        .filter_map(|g| g.expires_at)
        .all(|at| (at - now).abs() > 50)
    {
        let stored: u64 = grants
            .iter()
            .filter(|g| g.expires_at.is_none_or(|at| now < at))
            .map(|g| g.balance)
            .sum();
        assert_eq!(
            h.cached_credits("alice", "task"),
            stored,
            "view and store differ after {history:?}"
        );
    }
}

async fn run_sequence(kind: StoreKind, ops: Vec<Op>) {
    let clock = flowgate::clock::Clock::manual(flowgate::clock::now_ms());
    let mut h = Harness::start_with_clock(kind, clock, config).await;
    let settings = Settings::parse(&h.config).expect("config");
    for (n, op) in ops.iter().enumerate() {
        apply(&mut h, op, n).await;
        check_invariants(&h, &settings, &ops[..=n]).await;
    }
}

fn run(kind: StoreKind, cases: u32) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&prop::collection::vec(op(), 1..14), |ops| {
        rt.block_on(run_sequence(kind, ops));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn ledger_invariants_hold_under_random_histories_sqlite() {
    run(StoreKind::Sqlite, 24);
}

#[test]
fn ledger_invariants_hold_under_random_histories_postgres() {
    run(StoreKind::Postgres, 12);
}
