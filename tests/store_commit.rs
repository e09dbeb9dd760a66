//! The store's commit of one ledger batch, on both stores: within a batch and across batches a
//! charge key is charged once, a repeated entry is written once, and each result says which.

mod common;

use common::{PgDatabase, StoreKind};
use flowgate::accounts::Accounts;
use flowgate::config::Settings;
use flowgate::store::{Committed, Store};
use flowgate::usage::{LedgerEntry, Outcome};
use flowgate::waterfall;

store_tests!(a_batch_charges_each_key_once_and_writes_each_entry_once);

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
[identity]
mode = "api_key"
[store]
url = "sqlite://unused"
[upstreams.api]
url = "http://127.0.0.1:9"
[[routes]]
method = "POST"
path = "/v1/tasks"
feature = "task"
upstream = "api"
cost = { fixed = 1 }
[plans.p]
price_version = "v1"
prices = { task = 7 }
[[plans.p.layers]]
kind = "credits"
[[accounts]]
id = "acct"
plan = "p"
[[accounts.grants]]
id = "g"
kind = "credits"
amount = 100
"#;

/// A completed request of `units` with the client's `key`, decided and held by the engine.
fn entry(accounts: &Accounts, settings: &Settings, units: u64, key: &str) -> LedgerEntry {
    let account = accounts.get("acct").expect("account");
    let feature = settings.feature_id("task").expect("feature");
    let decision = account.with_state(|plan, state| {
        let d = waterfall::decide(plan, state, feature, units, 1_000);
        waterfall::reserve(plan, state, &d, 1_000);
        d
    });
    assert!(decision.admitted());
    LedgerEntry {
        decision_id: uuid::Uuid::now_v7(),
        account: account.id.clone(),
        plan: account.plan.clone(),
        feature: settings.features[feature.0 as usize].clone(),
        used_units: units,
        forgiven_units: 0,
        decision,
        outcome: Outcome::Completed,
        code: None,
        upstream_status: Some(200),
        idempotency_key: Some(flowgate::ids::IdempotencyKey::parse(key).expect("a valid key")),
        decided_at: 1_000,
        completed_at: 1_000,
        committed: None,
    }
}

async fn a_batch_charges_each_key_once_and_writes_each_entry_once(kind: StoreKind) {
    let dir = tempfile::tempdir().unwrap();
    let pg = match kind {
        StoreKind::Sqlite => None,
        StoreKind::Postgres => Some(PgDatabase::create().await),
    };
    let url = match &pg {
        Some(db) => db.url.clone(),
        None => format!("sqlite://{}", dir.path().join("l.db").display()),
    };
    let settings = Settings::parse(CONFIG).unwrap();
    let store = Store::open(&url).await.unwrap();
    store.migrate().await.unwrap();
    store.seed(&settings.accounts, 1_000).await.unwrap();
    let accounts = Accounts::load(&store, &settings, 1_000).await.unwrap();

    let first = entry(&accounts, &settings, 2, "k1");
    let same_key = entry(&accounts, &settings, 3, "k1");
    let other = entry(&accounts, &settings, 1, "k2");
    let batch = vec![first.clone(), same_key, other, first.clone()];
    let report = store.commit(&batch, 2_000).await.unwrap();
    assert_eq!(
        report.results,
        vec![
            Committed::Recorded,
            Committed::Duplicate,
            Committed::Recorded,
            Committed::AlreadyRecorded
        ]
    );
    // 100 - 2×7 (k1) - 1×7 (k2): the duplicate's 3 units are not charged.
    let balance = report
        .balances
        .iter()
        .find(|b| b.account == "acct")
        .unwrap();
    assert_eq!(balance.balance, 79);

    // A retried batch writes nothing again; a later copy of k1 is a duplicate.
    let later = entry(&accounts, &settings, 5, "k1");
    let report = store
        .commit(&[first.clone(), later, first], 3_000)
        .await
        .unwrap();
    assert_eq!(
        report.results,
        vec![
            Committed::AlreadyRecorded,
            Committed::Duplicate,
            Committed::AlreadyRecorded
        ]
    );
    assert!(report.balances.is_empty(), "nothing debited");

    let counts = store.counts().await.unwrap();
    assert_eq!(
        (
            counts.usage_events,
            counts.monetization_events,
            counts.balance_updates
        ),
        // Usage: k1, k1 duplicate, k2, k1 duplicate. Balance updates: the grant, two debits.
        (4, 2, 3)
    );
    let grants = store.grants("acct").await.unwrap();
    assert_eq!(grants[0].balance, 79);
}
