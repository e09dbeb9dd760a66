//! Two gateway processes on one PostgreSQL ledger, hammering the same accounts with the same and
//! different idempotency keys: every key is charged exactly once, and every balance equals its
//! grants minus its balance updates.

mod common;

use std::collections::{BTreeMap, HashSet};

use common::PgDatabase;
use common::process::ChildGateway;
use flowgate::demo::backend::MockBackend;
use futures_util::StreamExt;
use sqlx::Row;

const CONFIG: &str = r#"
[server]
listen = "__LISTEN__"
upstream_timeout_ms = 5000
shutdown_grace_ms = 10000

[store]
url = "__STORE__"
ledger_flush_interval_ms = 2
ledger_batch_size_max = 16

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
price_version = "replicas-1"
prices = { task = 3 }

[[plans.payg.layers]]
kind = "credits"

[[accounts]]
id = "alice"
plan = "payg"
api_keys = ["sk-alice"]

[[accounts.grants]]
id = "g1"
kind = "credits"
amount = 100000

[[accounts.grants]]
id = "g2"
kind = "credits"
amount = 500
expires_at = "2099-01-01T00:00:00Z"

[[accounts]]
id = "bob"
plan = "payg"
api_keys = ["sk-bob"]

[[accounts.grants]]
id = "g1"
kind = "credits"
amount = 100000
"#;

/// One request of the load.
#[derive(Debug, Clone)]
struct Call {
    replica: usize,
    key: &'static str,
    idempotency_key: Option<String>,
    units: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_charge_every_key_once() {
    let db = PgDatabase::create().await;
    let backend = MockBackend::start().await.expect("backend");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = CONFIG
        .replace("__STORE__", &db.url)
        .replace("__BACKEND__", &backend.url());
    // Both start together: they race to migrate and seed the same database.
    let (mut a, mut b) = tokio::join!(
        ChildGateway::start(dir.path(), "a", &config),
        ChildGateway::start(dir.path(), "b", &config),
    );
    let bases = [a.base.clone(), b.base.clone()];

    let mut calls = Vec::new();
    for i in 0..80u64 {
        let key = if i % 2 == 0 { "sk-alice" } else { "sk-bob" };
        let units = i % 5 + 1;
        // The same key twice on each replica: replays within one replica, and across replicas
        // two charges that only the store's unique key can tell apart.
        for replica in [0, 1, 0, 1] {
            calls.push(Call {
                replica,
                key,
                idempotency_key: Some(format!("same-{i}")),
                units,
            });
        }
        calls.push(Call {
            replica: (i % 2) as usize,
            key,
            idempotency_key: Some(format!("unique-{i}")),
            units,
        });
        calls.push(Call {
            replica: ((i + 1) % 2) as usize,
            key,
            idempotency_key: None,
            units,
        });
    }

    let http = reqwest::Client::new();
    let results: Vec<(Call, u16, String)> = futures_util::stream::iter(calls)
        .map(|call| {
            let http = http.clone();
            let url = format!("{}/v1/tasks", bases[call.replica]);
            async move {
                let mut req = http
                    .post(url)
                    .bearer_auth(call.key)
                    .header("x-units", call.units)
                    .body("{}");
                if let Some(k) = &call.idempotency_key {
                    req = req.header("idempotency-key", k);
                }
                let r = req.send().await.expect("request reaches a replica");
                let decision = r
                    .headers()
                    .get("x-flowgate-decision-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                (call, r.status().as_u16(), decision)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;

    // SIGTERM flushes each replica's ledger before it exits.
    assert!(a.terminate().await.success(), "a: {}", a.log());
    assert!(b.terminate().await.success(), "b: {}", b.log());

    // What must have been charged: every key that got a 2xx once, every keyless 2xx.
    let mut expected_credits: BTreeMap<&str, u64> = BTreeMap::new();
    let mut charged_keys = HashSet::new();
    let mut decisions = Vec::new();
    let mut ok_by_replica = [0usize; 2];
    for (call, status, decision) in &results {
        // 409 only where a duplicate of the same key could be in flight at that moment.
        let may_conflict = call
            .idempotency_key
            .as_deref()
            .is_some_and(|k| k.starts_with("same-"));
        assert!(
            *status == 200 || (*status == 409 && may_conflict),
            "unexpected status {status} for {call:?}"
        );
        if *status != 200 {
            continue;
        }
        ok_by_replica[call.replica] += 1;
        let account = if call.key == "sk-alice" {
            "alice"
        } else {
            "bob"
        };
        let first = match &call.idempotency_key {
            Some(k) => charged_keys.insert((account, k.clone())),
            None => true,
        };
        if first {
            *expected_credits.entry(account).or_default() += call.units * 3;
        }
        decisions.push(decision.clone());
    }

    // Both replicas did real work (each was sent ~240 calls, 160 of them unconflicted).
    assert!(
        ok_by_replica.iter().all(|&n| n >= 160),
        "200s per replica: {ok_by_replica:?}"
    );
    // Every duplicated key ran once somewhere.
    for i in 0..80 {
        let key = format!("same-{i}");
        assert!(
            results
                .iter()
                .any(|(c, s, _)| *s == 200 && c.idempotency_key.as_deref() == Some(&key)),
            "{key} never answered 200"
        );
    }

    let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
    for (account, credits) in &expected_credits {
        let row = sqlx::query(
            "SELECT COALESCE(SUM(credits), 0)::BIGINT AS credits, COUNT(*) AS n
             FROM monetization_events WHERE account_id = $1",
        )
        .bind(account)
        .fetch_one(&pool)
        .await
        .expect("monetization");
        assert_eq!(
            row.get::<i64, _>("credits") as u64,
            *credits,
            "{account}: credits charged"
        );
        let granted_minus_balance: i64 = sqlx::query_scalar(
            "SELECT SUM(amount - balance)::BIGINT FROM grants WHERE account_id = $1",
        )
        .bind(account)
        .fetch_one(&pool)
        .await
        .expect("grants");
        assert_eq!(
            granted_minus_balance as u64, *credits,
            "{account}: balance taken"
        );
    }
    let keyed_charges: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM usage_events WHERE charge_key LIKE '%:same-%' OR charge_key LIKE '%:unique-%'",
    )
    .fetch_one(&pool)
    .await
    .expect("charges");
    assert_eq!(
        keyed_charges as usize,
        charged_keys.len(),
        "one charge per idempotency key"
    );

    // Each grant's balance is its grant minus its balance updates.
    let drift: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT g.id, g.balance, COALESCE(SUM(b.delta), 0)::BIGINT
         FROM grants g LEFT JOIN balance_updates b ON b.grant_id = g.id
         GROUP BY g.id, g.balance HAVING g.balance <> COALESCE(SUM(b.delta), 0)",
    )
    .fetch_all(&pool)
    .await
    .expect("drift");
    assert!(
        drift.is_empty(),
        "balances differ from their updates: {drift:?}"
    );
    // Debits add up to the charges.
    let (charged, debited): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COALESCE(SUM(credits), 0)::BIGINT FROM monetization_events),
                (SELECT COALESCE(-SUM(delta), 0)::BIGINT FROM balance_updates WHERE reason = 'debit')",
    )
    .fetch_one(&pool)
    .await
    .expect("sums");
    assert_eq!(charged, debited);
    // Both replicas spent g2 (500 credits, spent first) on stale numbers; the store moved each
    // shortfall to g1 instead of forgiving it, because the accounts could pay.
    let forgiven: i64 =
        sqlx::query_scalar("SELECT COALESCE(SUM(forgiven), 0)::BIGINT FROM balance_updates")
            .fetch_one(&pool)
            .await
            .expect("forgiven");
    assert_eq!(forgiven, 0, "nothing forgiven while the account could pay");

    // Every answered request left its usage event.
    let stored: HashSet<String> = sqlx::query_scalar("SELECT decision_id FROM usage_events")
        .fetch_all(&pool)
        .await
        .expect("usage")
        .into_iter()
        .collect();
    for d in &decisions {
        assert!(stored.contains(d), "decision {d} has no usage event");
    }
    pool.close().await;
}

/// A replica's view follows what another replica spends (PostgreSQL LISTEN/NOTIFY), without
/// waiting to write to the same grant itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_learns_what_another_spent() {
    use flowgate::clock::Clock;
    use flowgate::config::Settings;
    use flowgate::gateway::Gateway;
    use std::time::Duration;
    use tokio::time::Instant; // waits for real processes

    let db = PgDatabase::create().await;
    let backend = MockBackend::start().await.expect("backend");
    let config = CONFIG
        .replace("__LISTEN__", "127.0.0.1:0")
        .replace("__STORE__", &db.url)
        .replace("__BACKEND__", &backend.url())
        .replace(
            "amount = 100000\n\n[[accounts.grants]]",
            "amount = 1000\n\n[[accounts.grants]]",
        );
    let start = || async {
        let settings = Settings::parse(&config).expect("config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        Gateway::start(settings, listener, Clock::System)
            .await
            .expect("gateway")
    };
    let a = start().await;
    let b = start().await;
    let credits = |g: &Gateway| {
        let app = g.app();
        let feature = app.settings.feature_id("task").expect("feature");
        app.accounts
            .get("alice")
            .expect("alice")
            .with_state(|_, s| s.spendable_credits(feature, flowgate::clock::now_ms()))
    };
    assert_eq!(credits(&b), 1500); // g1 1000 + g2 500

    // 100 units × 3 credits through A.
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/tasks", a.addr()))
        .bearer_auth("sk-alice")
        .header("x-units", 100)
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    r.text().await.expect("body");

    let deadline = Instant::now() + Duration::from_secs(5);
    while credits(&b) != 1200 {
        assert!(
            Instant::now() < deadline,
            "B still sees {} credits",
            credits(&b)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(credits(&a), 1200);
    a.shutdown().await;
    b.shutdown().await;
}
