//! Shadow mode: a plan, route or account whose requests are decided and recorded exactly as
//! enforcing would, forwarded whatever the waterfall says, and never charged. Real gateway,
//! real upstream on loopback, both stores.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Harness, StoreKind, header};
use flowgate::config::Settings;
use flowgate::store::{Page, Store};
use reqwest::Method;

store_tests!(
    a_shadowed_plan_admits_past_its_limit_and_charges_nothing,
    a_reload_switches_a_plan_between_shadow_and_enforcing,
    an_account_is_shadowed_through_the_admin_api,
    a_shadowed_route_counts_in_the_windows_it_would_fill,
);

/// `[plans.NAME]` of the test config with `shadow = true`.
fn shadow_plan(config: &str, plan: &str) -> String {
    let table = format!("[plans.{plan}]\n");
    assert!(config.contains(&table), "no {table}");
    config.replace(&table, &format!("{table}shadow = true\n"))
}

/// Row counts of the ledger's money tables, and every grant's balance, in the store.
async fn money(store: &Store) -> (u64, u64, Vec<(i64, u64)>) {
    let counts = store.counts().await.unwrap();
    let mut balances = Vec::new();
    for account in ["alice", "carol", "dave"] {
        for g in store.grants(account).await.unwrap() {
            balances.push((g.id, g.balance));
        }
    }
    (counts.monetization_events, counts.balance_updates, balances)
}

/// Every usage event of `account`, oldest first.
async fn events(store: &Store, account: &str) -> Vec<flowgate::store::UsageEventRecord> {
    store
        .ledger_page(account, Page::After(0), 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| {
            assert!(e.monetization.is_none(), "a shadow event has no charge");
            e.usage
        })
        .collect()
}

/// What the account's windows hold unsettled, in the view (0 once the ledger has committed).
fn unsettled(h: &Harness, account: &str) -> u64 {
    let acct = h.gateway().app().accounts.get(account).expect("account");
    acct.with_state(|_, s| {
        s.layers
            .iter()
            .map(|l| match l {
                flowgate::waterfall::LayerState::UsageLimit { log } => log.unsettled(),
                _ => 0,
            })
            .sum()
    })
}

async fn metrics(h: &Harness) -> String {
    h.http
        .get(format!("{}/metrics", h.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Both plans shadowed: carol's window of 2 fills and her next tasks would be denied, alice's
/// tasks past her window would draw credits; all are forwarded and nothing is charged, in
/// memory or in the store, before and after a restart, and reconciliation is clean.
async fn a_shadowed_plan_admits_past_its_limit_and_charges_nothing(kind: StoreKind) {
    let mut h = Harness::start_with(kind, |c| shadow_plan(&shadow_plan(&c, "lite"), "pro")).await;
    h.settle_ledger().await;
    let before = money(&h.store().await).await;

    let mut verdicts = Vec::new();
    let mut denied_id = String::new();
    for _ in 0..4 {
        let r = h.task("sk-carol", 1).await;
        assert_eq!(r.status(), 200, "a shadow request is never blocked");
        verdicts.push(header(&r, "x-flowgate-shadow"));
        denied_id = header(&r, "x-flowgate-decision-id");
        assert!(!r.text().await.unwrap().is_empty(), "the upstream's answer");
    }
    assert_eq!(
        verdicts,
        [
            "would-admit; credits=0",
            "would-admit; credits=0",
            "would-deny; code=usage_limit_reached",
            "would-deny; code=usage_limit_reached",
        ]
    );
    // alice: 3 in the window, then 2 from credits (5 each), never charged.
    let mut credits = Vec::new();
    for _ in 0..5 {
        let r = h.task("sk-alice", 1).await;
        assert_eq!(r.status(), 200);
        credits.push(header(&r, "x-flowgate-shadow"));
        r.text().await.unwrap();
    }
    assert_eq!(credits[2], "would-admit; credits=0");
    assert_eq!(credits[3], "would-admit; credits=5");
    assert_eq!(credits[4], "would-admit; credits=5");
    assert_eq!(
        h.backend.counters().requests.load(Ordering::Relaxed),
        9,
        "every request was forwarded"
    );
    assert_eq!(
        h.cached_credits("alice", "task"),
        100,
        "no balance moved in memory"
    );
    h.settle_ledger().await;
    let store = h.store().await;
    assert_eq!(money(&store).await, before, "no charge, no balance update");
    assert_eq!(h.stored_balance("alice").await, 100);
    assert_eq!(
        unsettled(&h, "carol"),
        0,
        "committed shadow draws are settled"
    );

    let carol = events(&store, "carol").await;
    assert_eq!(carol.len(), 4);
    for (i, e) in carol.iter().enumerate() {
        assert_eq!(e.outcome, "completed");
        let decision: serde_json::Value = serde_json::from_str(&e.decision).unwrap();
        assert_eq!(decision["plan"], "lite");
        assert!(decision["layers"].as_array().is_some_and(|l| !l.is_empty()));
        if i < 2 {
            assert_eq!(e.shadow.as_deref(), Some("admit"));
            assert_eq!(e.code, None);
            assert_eq!(decision["shadow"], "admit");
            assert_eq!(decision["draws"].as_array().map(Vec::len), Some(1));
        } else {
            assert_eq!(e.shadow.as_deref(), Some("deny"));
            assert_eq!(e.code.as_deref(), Some("usage_limit_reached"));
            assert_eq!(decision["shadow"], "deny");
            assert_eq!(decision["admitted"], false);
        }
    }
    let explained: serde_json::Value = h
        .get_as(&format!("/v1/decisions/{denied_id}"), "sk-carol")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(explained["shadow"], "deny", "{explained}");
    assert_eq!(explained["admitted"], false);
    assert_eq!(explained["usage_event"]["code"], "usage_limit_reached");
    assert_eq!(explained["usage_event"]["outcome"], "completed");
    assert!(explained["monetization_event"].is_null());
    let alice = events(&store, "alice").await;
    let last: serde_json::Value = serde_json::from_str(&alice[4].decision).unwrap();
    assert_eq!(
        last["draws"][0]["credits"], 5,
        "the would-be draw is recorded"
    );

    let m = metrics(&h).await;
    for line in [
        r#"flowgate_shadow_decisions_total{feature="task",outcome="would_deny",reason="usage_limit_reached"} 2"#,
        r#"flowgate_shadow_decisions_total{feature="task",outcome="would_admit",reason="admitted"} 7"#,
    ] {
        assert!(m.contains(line), "{line} not in\n{m}");
    }
    assert!(
        !m.contains(r#"flowgate_decisions_total{feature="task",outcome="usage_limit_reached"}"#),
        "a would-be denial is not a denial"
    );

    // A restart rebuilds the windows from the shadow draws: carol's is still full.
    h.restart().await;
    let r = h.task("sk-carol", 1).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-flowgate-shadow"),
        "would-deny; code=usage_limit_reached"
    );
    r.text().await.unwrap();
    h.settle_ledger().await;
    let report = h
        .store()
        .await
        .reconcile(0, &h.gateway().app().settings)
        .await
        .unwrap();
    assert!(report.differences.is_empty(), "{:?}", report.differences);
    assert_eq!(money(&h.store().await).await, before);
}

/// A reload turns a shadowed plan into an enforcing one for the next request (its shadow
/// usage counts: the window is full), and back.
async fn a_reload_switches_a_plan_between_shadow_and_enforcing(kind: StoreKind) {
    let h = Harness::start_with(kind, |c| shadow_plan(&c, "lite")).await;
    for _ in 0..3 {
        let r = h.task("sk-carol", 1).await;
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
    }
    let enforcing = h
        .config
        .replace("[plans.lite]\nshadow = true\n", "[plans.lite]\n");
    assert_ne!(enforcing, h.config);
    h.gateway()
        .reload(Settings::parse(&enforcing).unwrap())
        .await
        .unwrap();
    let r = h.task("sk-carol", 1).await;
    assert_eq!(
        r.status(),
        429,
        "enforced now, on the window shadow usage filled"
    );
    assert!(!r.headers().contains_key("x-flowgate-shadow"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "usage_limit_reached", "{body}");

    h.gateway()
        .reload(Settings::parse(&h.config).unwrap())
        .await
        .unwrap();
    let r = h.task("sk-carol", 1).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-flowgate-shadow"),
        "would-deny; code=usage_limit_reached"
    );
    r.text().await.unwrap();
    h.settle_ledger().await;
    let outcomes: Vec<(String, Option<String>)> = events_all(&h.store().await, "carol").await;
    assert_eq!(
        outcomes,
        [
            ("completed".into(), Some("admit".into())),
            ("completed".into(), Some("admit".into())),
            ("completed".into(), Some("deny".into())),
            ("denied".into(), None),
            ("completed".into(), Some("deny".into())),
        ]
    );
}

async fn events_all(store: &Store, account: &str) -> Vec<(String, Option<String>)> {
    store
        .ledger_page(account, Page::After(0), 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.usage.outcome, e.usage.shadow))
        .collect()
}

/// An account created in shadow mode through the admin API, then switched to enforcing: on
/// PostgreSQL a second gateway on the same database follows both changes.
async fn an_account_is_shadowed_through_the_admin_api(kind: StoreKind) {
    let h = common::api::start(kind).await;
    let r = h
        .admin(Method::POST, "/admin/v1/accounts")
        .json(&serde_json::json!({"id": "frank", "plan": "lite", "shadow": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["shadow"], true);
    let r = h
        .admin(Method::POST, "/admin/v1/accounts/frank/api-keys")
        .send()
        .await
        .unwrap();
    let key = r.json::<serde_json::Value>().await.unwrap()["api_key"]
        .as_str()
        .unwrap()
        .to_owned();

    // A second replica (PostgreSQL only: SQLite is one process's store).
    let second = match kind {
        StoreKind::Postgres => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let settings = Settings::parse(&h.config).unwrap();
            Some(
                flowgate::gateway::Gateway::start(settings, listener, h.clock.clone())
                    .await
                    .unwrap(),
            )
        }
        StoreKind::Sqlite => None,
    };
    let shadow_on =
        |g: &flowgate::gateway::Gateway| g.app().accounts.get("frank").map(|a| a.shadow);
    if let Some(g) = &second {
        assert_eq!(shadow_on(g), Some(true));
    }

    // The other replica counts each shadow unit too, announced with its commit.
    if let Some(g) = &second {
        // Wait until the other replica hears changes: a second key is known to it only then
        // (or after the resync its listener makes on connecting, which it has then done).
        let r = h
            .admin(Method::POST, "/admin/v1/accounts/frank/api-keys")
            .send()
            .await
            .unwrap();
        let key2 = r.json::<serde_json::Value>().await.unwrap()["api_key"]
            .as_str()
            .unwrap()
            .to_owned();
        let mut waited = 0;
        while g.app().accounts.by_api_key(&key2).is_none() {
            assert!(waited < 200, "the other replica never heard of the new key");
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
        }
    }
    let counted_there = |g: &flowgate::gateway::Gateway| {
        g.app().accounts.get("frank").map_or(0, |a| {
            a.with_state(|_, s| match &s.layers[0] {
                flowgate::waterfall::LayerState::UsageLimit { log } => log.used_since(0),
                _ => 0,
            })
        })
    };
    for (i, expected) in [
        "would-admit; credits=0",
        "would-admit; credits=0",
        "would-deny; code=usage_limit_reached",
    ]
    .into_iter()
    .enumerate()
    {
        let r = h.task(&key, 1).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-flowgate-shadow"), expected);
        r.text().await.unwrap();
        if let Some(g) = &second {
            h.settle_ledger().await;
            let want = (i as u64 + 1).min(2);
            let mut waited = 0;
            while counted_there(g) != want {
                assert!(
                    waited < 200,
                    "the other replica counted {} shadow units, not {want}",
                    counted_there(g)
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
                waited += 1;
            }
        }
    }
    let r = h
        .admin(Method::PATCH, "/admin/v1/accounts/frank")
        .json(&serde_json::json!({"shadow": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["shadow"],
        false
    );
    let r = h.task(&key, 1).await;
    assert_eq!(r.status(), 429, "enforced at once");
    r.text().await.unwrap();
    if let Some(g) = &second {
        let mut waited = 0;
        while shadow_on(g) != Some(false) {
            assert!(waited < 200, "the other replica never left shadow mode");
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
        }
    }
    // Bad input changes nothing.
    let r = h
        .admin(Method::PATCH, "/admin/v1/accounts/frank")
        .json(&serde_json::json!({"shadow": "yes"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body.to_string().contains("shadow"), "{body}");
    if let Some(g) = second {
        g.shutdown().await;
    }
    h.settle_ledger().await;
    assert_eq!(
        h.store().await.counts().await.unwrap().monetization_events,
        0
    );
}

/// A shadowed route in front of an enforcing plan: what it forwards fills the window the
/// plan enforces on its other routes.
async fn a_shadowed_route_counts_in_the_windows_it_would_fill(kind: StoreKind) {
    let h = Harness::start_with(kind, |c| {
        c.replace(
            "[plans.pro]",
            "[[routes]]\nmethod = \"GET\"\npath = \"/v1/tasks/{id}\"\nfeature = \"task\"\nupstream = \"backend\"\ncost = { header = \"x-units\" }\nshadow = true\n\n[plans.pro]",
        )
    })
    .await;
    let trial = |units: u64| {
        h.get_as("/v1/tasks/t-1", "sk-carol")
            .header("x-units", units)
            .send()
    };
    let r = trial(2).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-flowgate-shadow"), "would-admit; credits=0");
    assert_eq!(
        header(&r, "x-ratelimit-remaining-5h"),
        "0",
        "quota headers count it"
    );
    r.text().await.unwrap();
    let r = trial(1).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-flowgate-shadow"),
        "would-deny; code=usage_limit_reached"
    );
    r.text().await.unwrap();
    let r = h.task("sk-carol", 1).await;
    assert_eq!(
        r.status(),
        429,
        "the enforcing route sees the shadow route's usage"
    );
    assert!(!r.headers().contains_key("x-flowgate-shadow"));
    r.text().await.unwrap();
    h.settle_ledger().await;
    assert_eq!(
        events_all(&h.store().await, "carol").await,
        [
            ("completed".into(), Some("admit".into())),
            ("completed".into(), Some("deny".into())),
            ("denied".into(), None),
        ]
    );
}
