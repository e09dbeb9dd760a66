//! Workspace pools: member accounts draw their workspace's credit grants in the waterfall, each
//! within its own cap per period; every decision says what the pool held and the cap had left.

mod common;

use common::{Harness, StoreKind, api::with_admin, header};
use flowgate::config::Settings;
use reqwest::Method;
use serde_json::Value;

/// Two members of `acme` on the `team` plan: own credits (none), then the pool, at most 15
/// credits (3 tasks) per member per day. `acme` holds 100 credits.
fn with_workspace(config: String) -> String {
    config
        + r#"
[plans.team]
price_version = "test-1"
prices = { task = 5 }

[[plans.team.layers]]
kind = "credits"

[[plans.team.layers]]
kind = "workspace"
name = "acme-pool"
member_cap = 15
period = "day"

[[accounts]]
id = "acme"
plan = "lite"

[[accounts.grants]]
id = "contract-1"
kind = "credits"
amount = 100

[[accounts]]
id = "m1"
plan = "team"
workspace = "acme"
api_keys = ["sk-m1"]

[[accounts]]
id = "m2"
plan = "team"
workspace = "acme"
api_keys = ["sk-m2"]
"#
}

async fn json(r: reqwest::Response) -> Value {
    r.json().await.expect("JSON body")
}

fn pool_layer(layers: &Value) -> &Value {
    layers
        .as_array()
        .and_then(|l| l.iter().find(|l| l["kind"] == "workspace"))
        .unwrap_or_else(|| panic!("no workspace layer in {layers}"))
}

async fn members_share_the_pool_within_their_caps(store: StoreKind) {
    let mut h = Harness::start_with(store, |c| with_admin(with_workspace(c))).await;
    let r = h.task("sk-m1", 2).await;
    assert_eq!(r.status(), 200);
    let first = header(&r, "x-flowgate-decision-id");
    r.text().await.unwrap();

    // m1's cap has 5 credits left: a 2-task request is denied, naming the pool and the cap.
    let r = h.task("sk-m1", 2).await;
    assert_eq!(r.status(), 402);
    let denied = header(&r, "x-flowgate-decision-id");
    let body = json(r).await;
    let layer = pool_layer(&body["error"]["layers"]);
    assert_eq!(layer["layer"], "acme-pool", "{body}");
    assert_eq!(layer["pool_credits"], 90, "{body}");
    assert_eq!(layer["cap_left"], 5, "{body}");
    assert_eq!(layer["member_cap"], 15, "{body}");

    // m2 has a cap of its own and goes on.
    let r = h.task("sk-m2", 3).await;
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    assert_eq!(h.stored_balance("acme").await, 75);
    assert_eq!(h.stored_balance("m1").await, 0);

    // The decision explains the pool draw; the ledger debited the workspace's grant, with
    // the charged member as the balance update's account.
    let path = format!("/v1/decisions/{first}");
    let d = json(h.admin(Method::GET, &path).send().await.unwrap()).await;
    let layer = pool_layer(&d["layers"]);
    assert_eq!(
        (
            &layer["pool_credits"],
            &layer["cap_left"],
            &layer["gave_credits"]
        ),
        (&Value::from(100), &Value::from(15), &Value::from(10)),
        "{d}"
    );
    assert_eq!(
        d["monetization_event"]["draws"][0]["pool"], "workspace",
        "{d}"
    );
    let acme = h.store().await.grants("acme").await.expect("grants");
    assert_eq!(d["balance_updates"][0]["grant_id"], acme[0].id, "{d}");
    assert_eq!(d["balance_updates"][0]["delta"], -10, "{d}");
    assert_eq!(d["balance_updates"][0]["balance_after"], 90, "{d}");
    let event = h
        .store()
        .await
        .ledger_event(&first)
        .await
        .expect("read")
        .expect("event");
    assert_eq!(event.balance_updates.len(), 1);
    let d = json(
        h.admin(Method::GET, &format!("/v1/decisions/{denied}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(d["denial"]["reason"], "insufficient_credits", "{d}");
    assert_eq!(pool_layer(&d["layers"])["cap_left"], 5, "{d}");

    let settings = Settings::parse(&h.config).expect("config");
    let report = h
        .store()
        .await
        .reconcile(0, &settings)
        .await
        .expect("reconcile");
    assert!(report.differences.is_empty(), "{:?}", report.differences);

    // After a restart the view is rebuilt from the ledger with the same numbers: the pool's
    // balance, and what each member drew against its cap today.
    h.restart().await;
    assert_eq!(h.cached_credits("acme", "task"), 75);
    let r = h.task("sk-m1", 1).await;
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    let r = h.task("sk-m1", 1).await;
    assert_eq!(r.status(), 402);
    let body = json(r).await;
    let layer = pool_layer(&body["error"]["layers"]);
    assert_eq!(
        (&layer["pool_credits"], &layer["cap_left"]),
        (&Value::from(70), &Value::from(0)),
        "{body}"
    );
    let r = h.task("sk-m2", 1).await;
    assert_eq!(r.status(), 402, "m2 drew its 15 before the restart");
    r.text().await.unwrap();
    assert_eq!(h.stored_balance("acme").await, 70);
    let report = h
        .store()
        .await
        .reconcile(0, &settings)
        .await
        .expect("reconcile");
    assert!(report.differences.is_empty(), "{:?}", report.differences);

    // A refund of m1's first charge credits the workspace's grant back, in the view too, and
    // gives m1 its cap back.
    let r = h
        .admin(Method::POST, &format!("/admin/v1/decisions/{first}/refund"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(h.stored_balance("acme").await, 80);
    assert_eq!(h.cached_credits("acme", "task"), 80);
    let r = h.task("sk-m1", 2).await;
    assert_eq!(
        r.status(),
        200,
        "the refund gave m1 10 credits of its cap back"
    );
    r.text().await.unwrap();
    assert_eq!(h.stored_balance("acme").await, 70);
    let report = h
        .store()
        .await
        .reconcile(0, &settings)
        .await
        .expect("reconcile");
    assert!(report.differences.is_empty(), "{:?}", report.differences);
    h.gateway.take().expect("running").shutdown().await;
}

store_tests!(members_share_the_pool_within_their_caps);
