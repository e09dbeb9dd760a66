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

/// A gateway in this process on `config`, on an ephemeral port: its view can be read directly.
async fn in_process(config: &str) -> flowgate::gateway::Gateway {
    let settings = flowgate::config::Settings::parse(config).expect("config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    flowgate::gateway::Gateway::start(settings, listener, flowgate::clock::Clock::System)
        .await
        .expect("gateway")
}

/// The credits `account` may spend on a task, as `g`'s view has them.
fn spendable(g: &flowgate::gateway::Gateway, account: &str) -> u64 {
    let app = g.app();
    let feature = app.settings.feature_id("task").expect("feature");
    app.accounts
        .get(account)
        .expect("account")
        .with_state(|_, s| s.spendable_credits(feature, flowgate::clock::now_ms()))
}

/// A replica's view follows what another replica spends (PostgreSQL LISTEN/NOTIFY), without
/// waiting to write to the same grant itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_learns_what_another_spent() {
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
    let a = in_process(&config).await;
    let b = in_process(&config).await;
    let credits = |g: &Gateway| spendable(g, "alice");
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

/// Three replicas: a plan with a daily window of 30 tasks, then credits at 1 a task (`pro`,
/// and `exact`, the same in strict mode).
const SHARED: &str = r#"
[server]
listen = "__LISTEN__"
upstream_timeout_ms = 5000
shutdown_grace_ms = 10000
credits_denial = "payment_required"

[store]
url = "__STORE__"
ledger_flush_interval_ms = 2
ledger_batch_size_max = 64
# Strict plans: leases renewed every second, idle slices given back after 200 ms.
strict_lease_ttl_ms = 3000
strict_lease_idle_ms = 200

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

[plans.pro]
price_version = "shared-1"
prices = { task = 1 }

[[plans.pro.layers]]
kind = "usage_limit"
name = "limits"
windows = [{ name = "day", duration = "1day", limit = 30 }]

[[plans.pro.layers]]
kind = "credits"

[plans.payg]
price_version = "shared-1"
prices = { task = 1 }

[[plans.payg.layers]]
kind = "credits"

[plans.exact]
price_version = "shared-1"
prices = { task = 1 }
strict = true

[[plans.exact.layers]]
kind = "usage_limit"
name = "limits"
windows = [{ name = "day", duration = "1day", limit = 30 }]

[[plans.exact.layers]]
kind = "credits"
"#;

/// Three replicas on one database, each given the same config.
struct Replicas {
    db: PgDatabase,
    _backend: MockBackend,
    dir: tempfile::TempDir,
    config: String,
    nodes: Vec<ChildGateway>,
    http: reqwest::Client,
}

impl Replicas {
    async fn start(n: usize, accounts: &str) -> Replicas {
        let db = PgDatabase::create().await;
        let backend = MockBackend::start().await.expect("backend");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = common::api::with_admin(
            format!("{SHARED}{accounts}")
                .replace("__STORE__", &db.url)
                .replace("__BACKEND__", &backend.url()),
        );
        let mut replicas = Replicas {
            db,
            _backend: backend,
            dir,
            config,
            nodes: Vec::new(),
            http: reqwest::Client::new(),
        };
        for _ in 0..n {
            replicas.add().await;
        }
        replicas
    }

    /// Starts one more replica.
    async fn add(&mut self) -> usize {
        let i = self.nodes.len();
        let node = ChildGateway::start(self.dir.path(), &format!("r{i}"), &self.config).await;
        self.nodes.push(node);
        i
    }

    fn admin(&self, node: usize, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.nodes[node].base))
            .bearer_auth(common::api::ADMIN_TOKEN)
    }

    /// One task of `units` on `node` as `key`: the status.
    async fn task(&self, node: usize, key: &str, units: u64) -> u16 {
        let r = self
            .http
            .post(format!("{}/v1/tasks", self.nodes[node].base))
            .bearer_auth(key)
            .header("x-units", units)
            .body("{}")
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        r.bytes().await.expect("body");
        status
    }

    /// Polls `node` with a 1-unit task as `key` until `seen` holds of its status; how long
    /// that took. Panics after 10 s.
    async fn until(&self, node: usize, key: &str, seen: impl Fn(u16) -> bool) -> Duration {
        let started = Instant::now();
        loop {
            let status = self.task(node, key, 1).await;
            if seen(status) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "replica {node} still answers {status}; its log:\n{}",
                self.nodes[node].log()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// A replica's ledger commit can wait for grant rows another replica's commit holds (PostgreSQL
/// row locks). Meanwhile the other replicas' notices are applied, not queued behind the wait:
/// the view's follower and its writer do not wait for each other (`Accounts::apply_lock`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_hears_others_while_its_own_commit_waits() {
    use flowgate::gateway::Gateway;
    use std::time::Duration;
    use tokio::time::Instant; // waits for real processes

    let db = PgDatabase::create().await;
    let backend = MockBackend::start().await.expect("backend");
    let config = CONFIG
        .replace("__LISTEN__", "127.0.0.1:0")
        .replace("__STORE__", &db.url)
        .replace("__BACKEND__", &backend.url());
    let a = in_process(&config).await;
    let b = in_process(&config).await;
    let task = |g: &Gateway, key: &'static str, units: u64| {
        let url = format!("http://{}/v1/tasks", g.addr());
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .bearer_auth(key)
                .header("x-units", units)
                .body("{}")
                .send()
                .await
                .expect("request");
            assert_eq!(r.status(), 200);
            r.text().await.expect("body");
        }
    };
    // A re-read waits for a commit (it must not land between a commit and its settle), so
    // first A hears a commit of B's: the account notices of both starts, sent before it, are
    // then applied, and no re-read is left to queue behind A's commit below.
    task(&b, "sk-bob", 10).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while spendable(&a, "bob") != 99_970 {
        assert!(Instant::now() < deadline, "A never heard B");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Alice's grant rows held, as another replica's long commit would hold them.
    let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
    let mut holder = pool.begin().await.expect("begin");
    sqlx::query("SELECT id FROM grants WHERE account_id = 'alice' FOR UPDATE")
        .fetch_all(&mut *holder)
        .await
        .expect("lock alice's grants");
    // A charges alice: its writer's commit waits for those rows.
    task(&a, "sk-alice", 10).await;
    let waiting = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&pool)
        .await
        .expect("pg_stat_activity")
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while waiting().await == 0 {
        assert!(Instant::now() < deadline, "A's commit never waited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // B charges bob; A hears it while its own commit still waits.
    task(&b, "sk-bob", 100).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while spendable(&a, "bob") != 99_670 {
        assert!(
            Instant::now() < deadline,
            "A did not hear B's commit while its own waited: bob has {} there",
            spendable(&a, "bob")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(waiting().await, 1, "A's commit still waits");

    // The rows free, A's commit lands and B hears it.
    holder.rollback().await.expect("rollback");
    let deadline = Instant::now() + Duration::from_secs(5);
    while spendable(&b, "alice") != 100_470 {
        assert!(
            Instant::now() < deadline,
            "B still sees {} credits for alice",
            spendable(&b, "alice")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(spendable(&a, "alice"), 100_470);
    a.shutdown().await;
    b.shutdown().await;
}

async fn json_of(r: reqwest::Response) -> serde_json::Value {
    let status = r.status();
    let body: serde_json::Value = r.json().await.expect("json");
    assert!(status.is_success(), "{status}: {body}");
    body
}

use std::time::Duration;
use tokio::time::Instant; // waits for real processes

/// Every change made through one replica's admin API (account, key, grant, suspension, plan,
/// revocation) works on the others within the notification lag; a replica that starts later
/// and one whose listener was cut see everything too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_change_reaches_every_replica() {
    use reqwest::Method;
    let mut r = Replicas::start(3, "").await;
    let rounds: usize = std::env::var("FLOWGATE_REPLICA_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let mut lags: Vec<Duration> = Vec::new();
    let mut live_keys = Vec::new();
    let mut revoked_keys = Vec::new();
    let others = |x: usize| (0..3).filter(move |&y| y != x);
    for round in 0..rounds {
        let (x, y, z) = (round % 3, (round + 1) % 3, (round + 2) % 3);
        let id = format!("acct-{round}");
        json_of(
            r.admin(x, Method::POST, "/admin/v1/accounts")
                .json(&serde_json::json!({ "id": id, "plan": "payg" }))
                .send()
                .await
                .expect("create"),
        )
        .await;
        let key = json_of(
            r.admin(
                x,
                Method::POST,
                &format!("/admin/v1/accounts/{id}/api-keys"),
            )
            .send()
            .await
            .expect("key"),
        )
        .await;
        let (key, prefix) = (
            key["api_key"].as_str().expect("key").to_owned(),
            key["prefix"].as_str().expect("prefix").to_owned(),
        );
        // Known everywhere: no credits yet, so 402 rather than 401.
        for o in others(x) {
            lags.push(r.until(o, &key, |s| s == 402).await);
        }
        json_of(
            r.admin(y, Method::POST, &format!("/admin/v1/accounts/{id}/grants"))
                .header("idempotency-key", format!("g-{round}"))
                .json(&serde_json::json!({ "kind": "credits", "amount": 1000 }))
                .send()
                .await
                .expect("grant"),
        )
        .await;
        for o in others(y) {
            lags.push(r.until(o, &key, |s| s == 200).await);
        }
        json_of(
            r.admin(z, Method::PATCH, &format!("/admin/v1/accounts/{id}"))
                .json(&serde_json::json!({ "suspended": true }))
                .send()
                .await
                .expect("suspend"),
        )
        .await;
        for o in others(z) {
            lags.push(r.until(o, &key, |s| s == 403).await);
        }
        json_of(
            r.admin(x, Method::PATCH, &format!("/admin/v1/accounts/{id}"))
                .json(&serde_json::json!({ "suspended": false, "plan": "pro" }))
                .send()
                .await
                .expect("resume on another plan"),
        )
        .await;
        for o in others(x) {
            lags.push(r.until(o, &key, |s| s == 200).await);
            let usage = json_of(
                r.admin(o, Method::GET, &format!("/admin/v1/accounts/{id}/balances"))
                    .send()
                    .await
                    .expect("balances"),
            )
            .await;
            assert_eq!(usage["plan"], "pro", "replica {o}: {usage}");
        }
        if round % 2 == 0 {
            json_of(
                r.admin(
                    y,
                    Method::DELETE,
                    &format!("/admin/v1/accounts/{id}/api-keys/{prefix}"),
                )
                .send()
                .await
                .expect("revoke"),
            )
            .await;
            for o in 0..3 {
                lags.push(r.until(o, &key, |s| s == 401).await);
            }
            revoked_keys.push(key);
        } else {
            live_keys.push(key);
        }
    }
    lags.sort_unstable();
    let p = |q: f64| lags[((lags.len() as f64 * q).ceil() as usize).clamp(1, lags.len()) - 1];
    println!(
        "change visible on another replica: {} samples, p50 {:?}, p99 {:?}, max {:?}",
        lags.len(),
        p(0.5),
        p(0.99),
        p(1.0)
    );
    // The bound the README states. Each sample includes a poll's round trip.
    assert!(p(0.99) <= Duration::from_millis(100), "p99 {:?}", p(0.99));

    // A replica that starts later has all of it.
    let late = r.add().await;
    for key in &live_keys {
        assert_eq!(r.task(late, key, 1).await, 200);
    }
    for key in &revoked_keys {
        assert_eq!(r.task(late, key, 1).await, 401);
    }

    // Cut every replica's listener: what changes meanwhile is read from the store.
    PgDatabase::admin(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = '{}' AND query ILIKE 'LISTEN%'",
        r.db.name()
    ))
    .await;
    json_of(
        r.admin(0, Method::POST, "/admin/v1/accounts")
            .json(&serde_json::json!({ "id": "after-the-cut", "plan": "payg" }))
            .send()
            .await
            .expect("create"),
    )
    .await;
    let key = json_of(
        r.admin(0, Method::POST, "/admin/v1/accounts/after-the-cut/api-keys")
            .send()
            .await
            .expect("key"),
    )
    .await["api_key"]
        .as_str()
        .expect("key")
        .to_owned();
    for o in 1..4 {
        r.until(o, &key, |s| s == 402).await;
    }
    for (i, node) in r.nodes.iter().enumerate() {
        assert!(
            node.log().contains("change listener lost its connection"),
            "replica {i} did not notice its listener was cut"
        );
    }
    for node in &mut r.nodes {
        assert!(node.terminate().await.success(), "{}", node.log());
    }
}

/// Usage admitted on one replica counts against the window on the others once committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_window_counts_every_replicas_usage() {
    let accounts = "\n[[accounts]]\nid = \"w\"\nplan = \"pro\"\napi_keys = [\"sk-w\"]\n\n\
                    [[accounts.grants]]\nid = \"g\"\nkind = \"credits\"\namount = 60\n";
    let mut r = Replicas::start(3, accounts).await;
    for _ in 0..30 {
        assert_eq!(r.task(0, "sk-w", 1).await, 200);
    }
    for o in [1, 2] {
        let started = Instant::now();
        loop {
            let usage = json_of(
                r.admin(o, reqwest::Method::GET, "/admin/v1/accounts/w/balances")
                    .send()
                    .await
                    .expect("balances"),
            )
            .await;
            if usage["layers"][0]["windows"][0]["used"] == 30 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "replica {o}: {usage}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // The others measured how late replica 0's commits reached them.
    for o in [1, 2] {
        let metrics = r
            .http
            .get(format!("{}/metrics", r.nodes[o].base))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let heard: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("flowgate_replica_notification_lag_seconds_count "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        assert!(
            heard > 0,
            "replica {o} measured no notification lag:\n{metrics}"
        );
    }
    // The window is full everywhere: the next task is paid by credits, wherever it goes.
    for o in [1, 2] {
        let resp = r
            .http
            .post(format!("{}/v1/tasks", r.nodes[o].base))
            .bearer_auth("sk-w")
            .header("x-units", 1)
            .send()
            .await
            .expect("task");
        assert_eq!(resp.status(), 200);
        let pools = resp.headers()["x-flowgate-pools"]
            .to_str()
            .expect("ascii")
            .to_owned();
        assert_eq!(pools, "credits=1", "replica {o}");
    }
    for node in &mut r.nodes {
        assert!(node.terminate().await.success(), "{}", node.log());
    }
}

/// Three replicas hammer one account whose plan allows 30 tasks a day from a window and 60
/// more from credits (an entitlement of 90). Each replica counts what the others committed, so
/// together they admit the entitlement plus what they admit within the lag from an admission
/// to its commit being heard (docs/BENCHMARKS.md has the numbers) — the store still debits no
/// more credits than there are and forgives the rest, on the record. Several accounts, one run
/// each; `FLOWGATE_REPLICA_PACE_MS` sets each client's pause between requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_hammer_one_account() {
    let runs: usize = std::env::var("FLOWGATE_REPLICA_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut accounts = String::new();
    for run in 0..runs {
        accounts.push_str(&format!(
            "\n[[accounts]]\nid = \"shared-{run}\"\nplan = \"pro\"\napi_keys = [\"sk-shared-{run}\"]\n\n\
             [[accounts.grants]]\nid = \"g\"\nkind = \"credits\"\namount = 60\n"
        ));
    }
    let pace = Duration::from_millis(
        std::env::var("FLOWGATE_REPLICA_PACE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10),
    );
    let mut r = Replicas::start(3, &accounts).await;
    let mut admitted_by_run = Vec::new();
    for run in 0..runs {
        let key = format!("sk-shared-{run}");
        let started = Instant::now();
        // Eight clients per replica, each until it is refused five times running.
        let admitted: usize = futures_util::future::join_all((0..24).map(|c| {
            let (r, key) = (&r, key.as_str());
            async move {
                let (mut ok, mut refused) = (0, 0);
                while refused < 5 {
                    match r.task(c % 3, key, 1).await {
                        200 => {
                            ok += 1;
                            refused = 0;
                        }
                        402 | 429 => refused += 1,
                        other => panic!(
                            "unexpected status {other}; the replica's log:\n{}",
                            r.nodes[c % 3].log()
                        ),
                    }
                    tokio::time::sleep(pace).await;
                }
                ok
            }
        }))
        .await
        .into_iter()
        .sum();
        println!(
            "run {run}: {admitted} admitted of an entitlement of 90, in {:?}",
            started.elapsed()
        );
        admitted_by_run.push(admitted);
    }
    for node in &mut r.nodes {
        assert!(node.terminate().await.success(), "{}", node.log());
    }
    let pool = sqlx::PgPool::connect(&r.db.url).await.expect("connect");
    for (run, admitted) in admitted_by_run.iter().enumerate() {
        assert!(*admitted >= 90, "run {run}: only {admitted} admitted");
        // Replicas deciding apart admit up to three entitlements (270) when hammered: each
        // counts at least its own admissions, so no replica passes 90 on its own. How far below
        // 270 sharing keeps them depends on the load and the commit lag (docs/BENCHMARKS.md;
        // on a loaded CI machine a run can end before any commit is heard), so only the
        // ceiling is asserted here: that the windows are shared at all is
        // `a_window_counts_every_replicas_usage`'s exact check. A balance heard late that
        // replaced a newer one once took runs to 275 and 286.
        assert!(*admitted <= 270, "run {run}: {admitted} admitted of 90");
        // The ledger has every admitted task; credits beyond the grant are forgiven, never
        // debited.
        let (units, credits): (i64, i64) = sqlx::query_as(
            "SELECT COALESCE(SUM(units), 0)::BIGINT, COALESCE(SUM(credits), 0)::BIGINT
             FROM monetization_events WHERE account_id = $1",
        )
        .bind(format!("shared-{run}"))
        .fetch_one(&pool)
        .await
        .expect("charges");
        assert_eq!(units as usize, *admitted, "run {run}");
        let (debited, forgiven): (i64, i64) = sqlx::query_as(
            "SELECT COALESCE(-SUM(delta) FILTER (WHERE reason = 'debit'), 0)::BIGINT,
                    COALESCE(SUM(forgiven), 0)::BIGINT
             FROM balance_updates WHERE account_id = $1",
        )
        .bind(format!("shared-{run}"))
        .fetch_one(&pool)
        .await
        .expect("debits");
        assert!(debited <= 60, "run {run}: {debited} debited of 60");
        assert_eq!(debited + forgiven, credits, "run {run}");
    }
    pool.close().await;
}

/// The hammer of `three_replicas_hammer_one_account` on a strict plan: the replicas lease
/// slices of the window and the credits, so together they admit at most the entitlement of 90
/// — no overspend at all, nothing forgiven — and once idle slices are given back, one replica
/// can use what is left: exactly 90 in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_strict_replicas_never_overspend() {
    let runs: usize = std::env::var("FLOWGATE_REPLICA_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut accounts = String::new();
    for run in 0..runs {
        accounts.push_str(&format!(
            "\n[[accounts]]\nid = \"exact-{run}\"\nplan = \"exact\"\napi_keys = [\"sk-exact-{run}\"]\n\n\
             [[accounts.grants]]\nid = \"g\"\nkind = \"credits\"\namount = 60\n"
        ));
    }
    let mut r = Replicas::start(3, &accounts).await;
    let mut results = Vec::new();
    for run in 0..runs {
        let key = format!("sk-exact-{run}");
        let started = Instant::now();
        let (admitted, requests): (usize, usize) =
            futures_util::future::join_all((0..24).map(|c| {
                let (r, key) = (&r, key.as_str());
                async move {
                    let (mut ok, mut refused, mut sent) = (0, 0, 0);
                    while refused < 5 {
                        sent += 1;
                        match r.task(c % 3, key, 1).await {
                            200 => {
                                ok += 1;
                                refused = 0;
                            }
                            402 | 429 => refused += 1,
                            other => panic!(
                                "unexpected status {other}; the replica's log:\n{}",
                                r.nodes[c % 3].log()
                            ),
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    (ok, sent)
                }
            }))
            .await
            .into_iter()
            .fold((0, 0), |(a, s), (ok, sent)| (a + ok, s + sent));
        let hammer = started.elapsed();
        assert!(admitted <= 90, "run {run}: {admitted} admitted of 90");
        // What the other replicas leased and did not use comes back once idle: one replica
        // then spends exactly what is left.
        let mut swept = 0;
        let mut refused = 0;
        while refused < 3 {
            match r.task(run % 3, &key, 1).await {
                200 => swept += 1,
                402 | 429 => {
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                }
                other => panic!("unexpected status {other}"),
            }
        }
        println!(
            "strict run {run}: {admitted} admitted by 24 clients in {hammer:?} ({requests} requests), \
             {swept} more once idle slices came back: {} of 90",
            admitted + swept
        );
        results.push((admitted, admitted + swept));
    }
    // A refund gives the window its unit back in the store's counters (run 0's first charge
    // the window paid), through another replica than the one that charged it.
    let pool = sqlx::PgPool::connect(&r.db.url).await.expect("connect");
    let refunded: String = sqlx::query_scalar(
        "SELECT u.decision_id FROM usage_events u JOIN monetization_events m ON m.usage_event_id = u.id
         WHERE m.account_id = 'exact-0' AND m.draws LIKE '%\"window\"%' AND m.credits = 0
         ORDER BY m.id LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .expect("a window charge");
    let refund = r
        .admin(
            1,
            reqwest::Method::POST,
            &format!("/admin/v1/decisions/{refunded}/refund"),
        )
        .send()
        .await
        .expect("refund");
    assert!(
        refund.status().is_success(),
        "{}",
        refund.text().await.unwrap_or_default()
    );
    for node in &mut r.nodes {
        assert!(node.terminate().await.success(), "{}", node.log());
    }
    for (run, (_, total)) in results.iter().enumerate() {
        assert_eq!(*total, 90, "run {run}: {total} admitted in all, of 90");
        let account = format!("exact-{run}");
        let (units, credits): (i64, i64) = sqlx::query_as(
            "SELECT COALESCE(SUM(units), 0)::BIGINT, COALESCE(SUM(credits), 0)::BIGINT
             FROM monetization_events WHERE account_id = $1",
        )
        .bind(&account)
        .fetch_one(&pool)
        .await
        .expect("charges");
        assert_eq!(
            (units, credits),
            (90, 60),
            "run {run}: units and credits charged"
        );
        let (debited, forgiven): (i64, i64) = sqlx::query_as(
            "SELECT COALESCE(-SUM(delta) FILTER (WHERE reason = 'debit'), 0)::BIGINT,
                    COALESCE(SUM(forgiven), 0)::BIGINT
             FROM balance_updates WHERE account_id = $1",
        )
        .bind(&account)
        .fetch_one(&pool)
        .await
        .expect("debits");
        assert_eq!((debited, forgiven), (60, 0), "run {run}: nothing forgiven");
        let window: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(units), 0)::BIGINT FROM usage_counters WHERE account_id = $1 AND layer = 0",
        )
        .bind(&account)
        .fetch_one(&pool)
        .await
        .expect("counters");
        let expected = if run == 0 { 29 } else { 30 };
        assert_eq!(
            window, expected,
            "run {run}: the window's committed usage, refunds out"
        );
        // A clean stop gave every lease back.
        let leased: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM leases WHERE account_id = $1")
            .bind(&account)
            .fetch_one(&pool)
            .await
            .expect("leases");
        assert_eq!(leased, 0, "run {run}: leases left after shutdown");
    }
    pool.close().await;
}
