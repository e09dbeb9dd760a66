//! The store's commit of one ledger batch, on both stores: within a batch and across batches a
//! charge key is charged once, a repeated entry is written once, and each result says which.

mod common;

use common::{PgDatabase, StoreKind};
use flowgate::accounts::Accounts;
use flowgate::config::Settings;
use flowgate::store::{Committed, GrantBalance, Page, Refund, Store};
use flowgate::usage::{LedgerEntry, Outcome};
use flowgate::waterfall;

store_tests!(
    a_batch_charges_each_key_once_and_writes_each_entry_once,
    charge_keys_never_collide_across_accounts,
    old_joined_charge_keys_are_migrated_per_account,
    a_request_without_a_key_is_charged_once_by_its_decision_id,
    every_balance_change_moves_its_grant_one_version_up,
);

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
[[accounts]]
id = "a"
plan = "p"
[[accounts.grants]]
id = "g"
kind = "credits"
amount = 100
[[accounts]]
id = "a:b"
plan = "p"
[[accounts.grants]]
id = "g"
kind = "credits"
amount = 100
[[accounts]]
id = "ü:ñ/ 😀"
plan = "p"
[[accounts.grants]]
id = "g"
kind = "credits"
amount = 100
[[accounts]]
id = "exp"
plan = "p"
[[accounts.grants]]
id = "g"
kind = "credits"
amount = 100
expires_at = "1970-01-01T00:00:05Z"
"#;

/// A completed request of `units` with the client's `key`, decided and held by the engine.
fn entry(accounts: &Accounts, settings: &Settings, units: u64, key: &str) -> LedgerEntry {
    entry_of(accounts, settings, "acct", units, key)
}

/// A completed request of `account`, with the client's `key`.
fn entry_of(
    accounts: &Accounts,
    settings: &Settings,
    account: &str,
    units: u64,
    key: &str,
) -> LedgerEntry {
    let account = accounts.get(account).expect("account");
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
        model: None,
        quantities: None,
        forgiven_units: 0,
        decision,
        outcome: Outcome::Completed,
        code: None,
        upstream_status: Some(200),
        idempotency_key: Some(flowgate::ids::IdempotencyKey::parse(key).expect("a valid key")),
        decided_at: 1_000,
        completed_at: 1_000,
        committed: None,
        shadow: None,
    }
}

async fn a_batch_charges_each_key_once_and_writes_each_entry_once(kind: StoreKind) {
    let (store, settings, accounts, _pg, _dir) = open(kind).await;

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
        // Usage: k1, k1 duplicate, k2, k1 duplicate. Balance updates: the five accounts'
        // grants, two debits.
        (4, 2, 7)
    );
    let grants = store.grants("acct").await.unwrap();
    assert_eq!(grants[0].balance, 79);
}

/// A request sent without a key is charged under its decision id, which has no unique index of
/// its own as a charge key (migration 0012/0013): the decision id's index is what keeps a
/// repeated commit of it, in the same batch or a retried one, from charging twice.
async fn a_request_without_a_key_is_charged_once_by_its_decision_id(kind: StoreKind) {
    let (store, settings, accounts, _pg, _dir) = open(kind).await;
    let keyless = LedgerEntry {
        idempotency_key: None,
        ..entry(&accounts, &settings, 2, "unused")
    };
    let report = store
        .commit(&[keyless.clone(), keyless.clone()], 2_000)
        .await
        .unwrap();
    assert_eq!(
        report.results,
        vec![Committed::Recorded, Committed::AlreadyRecorded]
    );
    let report = store.commit(&[keyless], 3_000).await.unwrap();
    assert_eq!(report.results, vec![Committed::AlreadyRecorded]);
    assert!(report.balances.is_empty(), "nothing debited again");

    let counts = store.counts().await.unwrap();
    assert_eq!(
        (counts.usage_events, counts.monetization_events),
        (1, 1),
        "one usage event, one charge"
    );
    // 2 units at 7 credits, once.
    assert_eq!(store.grants("acct").await.unwrap()[0].balance, 100 - 2 * 7);
}

/// Every change of a grant's balance (a commit's debit, a refund, an expiry) moves the grant one
/// version up, and the store says the version with the balance: a replica hears balances from
/// its own commits and from other replicas' notices in no common order, and keeps the newest.
async fn every_balance_change_moves_its_grant_one_version_up(kind: StoreKind) {
    let (store, settings, accounts, _pg, _dir) = open(kind).await;
    let of = |balances: &[GrantBalance]| {
        balances
            .iter()
            .find(|b| b.account == "exp")
            .map(|b| (b.balance, b.version))
    };
    let first = entry_of(&accounts, &settings, "exp", 2, "v1");
    let report = store
        .commit(std::slice::from_ref(&first), 2_000)
        .await
        .unwrap();
    assert_eq!(of(&report.balances), Some((86, Some(1))));
    let second = entry_of(&accounts, &settings, "exp", 1, "v2");
    let report = store.commit(&[second], 2_100).await.unwrap();
    let after_second = report.balances.clone();
    assert_eq!(of(&after_second), Some((79, Some(2))));
    let Refund::Refunded { balances, .. } = store
        .refund(&first.decision_id.to_string(), 3_000)
        .await
        .unwrap()
    else {
        panic!("the first charge is refunded");
    };
    assert_eq!(of(&balances), Some((93, Some(3))));
    let expired = store.expire_grants(10_000).await.unwrap();
    assert_eq!(of(&expired), Some((0, Some(4))));
    let grants = store.grants("exp").await.unwrap();
    assert_eq!((grants[0].balance, grants[0].version), (0, 4));

    // The view hears them newest first: the older balances change nothing.
    let left = || {
        accounts
            .get("exp")
            .unwrap()
            .with_state(|_, s| s.grants()[0].balance)
    };
    accounts.settled("exp", &first.decision.draws, |_| None);
    accounts.sync_balances(&expired);
    assert_eq!(left(), 0);
    accounts.sync_balances(&balances);
    accounts.sync_balances(&after_second);
    assert_eq!(
        left(),
        0,
        "a refund or debit heard after the expiry gives nothing back"
    );
}

/// A fresh store of `kind` with the config's accounts, and its view.
async fn open(
    kind: StoreKind,
) -> (
    Store,
    Settings,
    Accounts,
    Option<PgDatabase>,
    tempfile::TempDir,
) {
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
    let accounts = Accounts::load(&store, &std::sync::Arc::new(settings.clone()), 1_000)
        .await
        .unwrap();
    (store, settings, accounts, pg, dir)
}

/// Account "a" with key "b:c" and account "a:b" with key "c" joined to the same string once;
/// so did a client key shaped like an assigned one. Each is its own charge now.
async fn charge_keys_never_collide_across_accounts(kind: StoreKind) {
    let (store, settings, accounts, _pg, _dir) = open(kind).await;
    let longest = "k".repeat(255);
    let assigned = entry_of(&accounts, &settings, "a", 1, "x"); // its decision id below
    let forged = format!("d:{}", assigned.decision_id);
    let batch = vec![
        entry_of(&accounts, &settings, "a", 1, "b:c"),
        entry_of(&accounts, &settings, "a:b", 1, "c"),
        entry_of(&accounts, &settings, "ü:ñ/ 😀", 1, "c"),
        entry_of(&accounts, &settings, "a", 1, &longest),
        entry_of(&accounts, &settings, "a:b", 1, &longest),
        entry_of(&accounts, &settings, "a", 1, &forged),
        LedgerEntry {
            idempotency_key: None,
            ..assigned
        },
    ];
    let report = store.commit(&batch, 2_000).await.unwrap();
    assert_eq!(report.results, vec![Committed::Recorded; batch.len()]);
    // The same account and key again: one charge, ever.
    let again = vec![
        entry_of(&accounts, &settings, "a", 1, "b:c"),
        entry_of(&accounts, &settings, "a:b", 1, "c"),
        entry_of(&accounts, &settings, "a:b", 1, &longest),
    ];
    let report = store.commit(&again, 3_000).await.unwrap();
    assert_eq!(report.results, vec![Committed::Duplicate; again.len()]);
    let balance = |id: &'static str| {
        let store = store.clone();
        async move { store.grants(id).await.unwrap()[0].balance }
    };
    // 7 credits per unit: "a" paid 4 charges, "a:b" 2, the unicode account 1.
    assert_eq!(balance("a").await, 100 - 4 * 7);
    assert_eq!(balance("a:b").await, 100 - 2 * 7);
    assert_eq!(balance("ü:ñ/ 😀").await, 100 - 7);
    // The client's key is stored as sent.
    let page = store.ledger_page("a:b", Page::After(0), 10).await.unwrap();
    let keys: Vec<&str> = page
        .iter()
        .map(|e| e.usage.idempotency_key.as_str())
        .collect();
    assert!(keys.contains(&"c"), "{keys:?}");
}

/// A ledger written before charge keys were per account: its joined keys are split on
/// migration, charges stay unique, and the same client key is then free for other accounts.
async fn old_joined_charge_keys_are_migrated_per_account(kind: StoreKind) {
    let (store, settings, accounts, pg, dir) = open(kind).await;
    // Write rows the way the old code did, straight into the migrated table, then undo the
    // new format to the old one to stand for a ledger from before the migration.
    let batch = vec![
        entry_of(&accounts, &settings, "a", 1, "b:c"),
        LedgerEntry {
            idempotency_key: None,
            ..entry_of(&accounts, &settings, "acct", 1, "unused")
        },
    ];
    store.commit(&batch, 2_000).await.unwrap();
    let to_old = "UPDATE usage_events SET
            charge_key = CASE WHEN charge_key LIKE 'd:%' THEN decision_id
                              ELSE account_id || ':' || substr(charge_key, 3) END,
            idempotency_key = CASE WHEN idempotency_key = decision_id THEN idempotency_key
                                   ELSE account_id || ':' || idempotency_key END";
    let redo = "DELETE FROM _sqlx_migrations WHERE version = 4";
    match &pg {
        Some(db) => {
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::raw_sql(&format!(
                "DROP INDEX usage_events_client_charge;
                 {to_old};
                 ALTER TABLE usage_events ADD CONSTRAINT usage_events_charge_key_key UNIQUE (charge_key);
                 {redo}; DELETE FROM _sqlx_migrations WHERE version = 13"
            ))
            .execute(&mut c)
            .await
            .unwrap();
        }
        None => {
            use sqlx::Connection;
            let url = format!("sqlite://{}", dir.path().join("l.db").display());
            let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
            // SQLite's 0004 rebuilds usage_events with the columns it knew: later migrations
            // that add to it (0010's shadow columns) or rebuild it (0012) run again after it,
            // as on an old ledger.
            sqlx::raw_sql(&format!(
                "{to_old}; {redo}; ALTER TABLE accounts DROP COLUMN shadow;
                 DELETE FROM _sqlx_migrations WHERE version IN (10, 12)"
            ))
            .execute(&mut c)
            .await
            .unwrap();
        }
    }
    store.migrate().await.unwrap();
    let page = store.ledger_page("a", Page::After(0), 10).await.unwrap();
    assert_eq!(
        page[0].usage.idempotency_key, "b:c",
        "the client's key, as sent"
    );
    // Migrated keys still guard their charges, and no longer block another account.
    let again = vec![
        entry_of(&accounts, &settings, "a", 1, "b:c"),
        entry_of(&accounts, &settings, "a:b", 1, "c"),
    ];
    let report = store.commit(&again, 3_000).await.unwrap();
    assert_eq!(
        report.results,
        vec![Committed::Duplicate, Committed::Recorded]
    );
}
