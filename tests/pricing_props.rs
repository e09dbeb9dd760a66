//! Property: for random per-model, per-dimension rates in two price versions (the second in
//! force from a random instant) and random requests, every charge the SQLite ledger commits is
//! exactly Σ quantity × rate ÷ per (rounded up) of the version in force when it was decided —
//! worked out here from the raw numbers, not by flowgate's pricing — and `flowgate reconcile`
//! stays clean, also once the configuration lists only a later version.

use std::sync::Arc;

use flowgate::accounts::Accounts;
use flowgate::config::Settings;
use flowgate::store::Store;
use flowgate::usage::{LedgerEntry, Outcome};
use flowgate::waterfall::{self, Quantities};
use proptest::prelude::*;

/// Rates (input, output) per model "a" and "b", per 1 000 tokens.
type Rates = [(u64, u64); 2];

fn config(v1: &Rates, v2: &Rates, change_at: &str) -> String {
    let row = |r: &Rates| {
        format!(
            "{{ \"a\" = {{ input = {}, output = {} }}, \"b\" = {{ input = {}, output = {} }} }}",
            r[0].0, r[0].1, r[1].0, r[1].1
        )
    };
    format!(
        r#"
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
path = "/v1/chat"
feature = "chat"
upstream = "api"
model = "/model"
cost = {{ fixed = 1 }}
settle = {{ dimensions = {{ input = "/usage/in", output = "/usage/out" }} }}
[plans.p]
price_version = "v1"
[plans.p.prices.chat]
per = 1000
models = {}
[[plans.p.price_changes]]
price_version = "v2"
effective_from = "{change_at}"
[plans.p.price_changes.prices.chat]
per = 1000
models = {}
[[plans.p.layers]]
kind = "enterprise"
postpaid = true
[[accounts]]
id = "acct"
plan = "p"
"#,
        row(v1),
        row(v2)
    )
}

const START: i64 = 1_800_000_000_000;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn charges_are_their_dimensions_at_the_version_in_force(
        v1 in prop::array::uniform2((0u64..5_000, 0u64..20_000)),
        v2 in prop::array::uniform2((0u64..5_000, 0u64..20_000)),
        change_after in 0i64..10_000,
        // Each request: when (ms after the start), model "b" (else "a"), input and output tokens.
        requests in prop::collection::vec((0i64..20_000, any::<bool>(), 0u64..100_000, 0u64..10_000), 1..30),
    ) {
        let change_at = START + change_after;
        let instant = chrono::DateTime::from_timestamp_millis(change_at).expect("instant").to_rfc3339();
        let settings = Arc::new(Settings::parse(&config(&v1, &v2, &instant)).expect("config"));
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
            let store = Store::open(&url).await.expect("store");
            store.migrate().await.expect("migrate");
            store.seed_prices(&flowgate::gateway::price_tables(&settings)).await.expect("prices");
            store.seed(&settings.accounts, START).await.expect("seed");
            let accounts = Accounts::load(&store, &settings, START).await.expect("view");
            let account = accounts.get("acct").expect("account");
            let chat = settings.feature_id("chat").expect("chat");
            let mut batch = Vec::new();
            let mut expected = Vec::new();
            for (i, &(at, is_b, input, output)) in requests.iter().enumerate() {
                let now = START + at;
                let model = if is_b { "b" } else { "a" };
                // The independent reference: the raw rates of the version in force.
                let (r_in, r_out) = if now >= change_at { v2 } else { v1 }[usize::from(is_b)];
                let want = (input * r_in + output * r_out).div_ceil(1000);
                expected.push((want as i64, if now >= change_at { "v2" } else { "v1" }));
                let (table, prices) = account.plan.prices_at(now);
                let rates = prices.rates(chat).expect("rated");
                let units = rates
                    .units(Some(model), [("input", input), ("output", output)])
                    .expect("priced");
                let decision = account.with_state(|plan, state| {
                    let d = waterfall::decide(plan, state, chat, units, now);
                    waterfall::reserve(plan, state, &d, now);
                    d
                });
                prop_assert!(decision.admitted());
                prop_assert_eq!(decision.price_table, table);
                let quantities: Quantities =
                    [("input".into(), input), ("output".into(), output)].into_iter().collect();
                batch.push(LedgerEntry {
                    decision_id: uuid::Uuid::now_v7(),
                    account: account.id.clone(),
                    plan: account.plan.clone(),
                    feature: settings.features[chat.0 as usize].clone(),
                    used_units: units,
                    model: Some(model.into()),
                    quantities: Some(quantities),
                    forgiven_units: 0,
                    decision,
                    outcome: Outcome::Completed,
                    code: None,
                    upstream_status: Some(200),
                    idempotency_key: flowgate::ids::IdempotencyKey::parse(&format!("k{i}")).ok(),
                    decided_at: now,
                    completed_at: now,
                    committed: None,
                    shadow: None,
                });
            }
            store.commit(&batch, START + 30_000).await.expect("commit");
            let snapshot = store.snapshot(0).await.expect("snapshot");
            let charged: Vec<(i64, &str)> = snapshot
                .monetization
                .iter()
                .map(|m| (m.units + m.forgiven_units, m.price_version.as_str()))
                .collect();
            let postpaid: Vec<i64> = snapshot.monetization.iter().map(|m| m.postpaid_credits).collect();
            prop_assert_eq!(&charged, &expected);
            prop_assert_eq!(postpaid, expected.iter().map(|e| e.0).collect::<Vec<_>>());
            let report = store.reconcile(0, &settings).await.expect("reconcile");
            prop_assert!(report.differences.is_empty(), "{:?}", report.differences);
            prop_assert_eq!(report.unknown_price_versions, 0);
            // The config moves on to a third version only: the ledger's stored versions still
            // explain every charge.
            let later = config(&v2, &v2, "2099-01-01T00:00:00Z")
                .replace("price_version = \"v1\"", "price_version = \"v3\"")
                .replace("price_version = \"v2\"", "price_version = \"v4\"");
            let later = Settings::parse(&later).expect("later config");
            let report = store.reconcile(0, &later).await.expect("reconcile");
            prop_assert!(report.differences.is_empty(), "{:?}", report.differences);
            prop_assert_eq!(report.unknown_price_versions, 0);
            Ok(())
        })?;
    }
}
