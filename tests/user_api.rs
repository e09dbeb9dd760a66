//! Black-box tests of the user API (`/v1/me/...`) and of the OpenAPI document: a real gateway,
//! backend and store. A caller sees its own numbers and decisions, and never another's.

mod common;

use std::collections::BTreeSet;

use common::api::start;
use common::{Harness, StoreKind, header};
use reqwest::Method;
use serde_json::{Value, json};

store_tests!(
    usage_shows_the_callers_own_limits_and_balances,
    decisions_are_the_callers_own_newest_first,
    trusted_header_identifies_the_caller,
);

async fn json(r: reqwest::Response) -> Value {
    r.json().await.expect("a JSON body")
}

async fn usage_shows_the_callers_own_limits_and_balances(store: StoreKind) {
    let h = start(store).await;
    let r = h.task("sk-alice", 5).await;
    let credits = header(&r, "x-credits-remaining");
    r.text().await.unwrap();
    h.task("sk-dave", 1).await.text().await.unwrap();

    let me = json(h.get_as("/v1/me/usage", "sk-alice").send().await.unwrap()).await;
    assert_eq!(me["account"], "alice");
    assert_eq!(me["layers"][0]["windows"][0]["used"], 3);
    assert_eq!(me["layers"][0]["windows"][0]["remaining"], 0);
    assert!(me["layers"][0]["windows"][0]["reset_at"].is_string());
    assert_eq!(me["pools"]["credits"].to_string(), credits);

    // Nothing in the request can point at another account.
    let r = h
        .get_as("/v1/me/usage?account=dave", "sk-alice")
        .header("x-flowgate-account", "dave")
        .send()
        .await
        .unwrap();
    assert_eq!(json(r).await["account"], "alice");
    let dave = json(h.get_as("/v1/me/usage", "sk-dave").send().await.unwrap()).await;
    assert_eq!(dave["account"], "dave");
    assert_eq!(dave["layers"][0]["windows"][0]["used"], 1);
    assert_eq!(dave["pools"]["credits"], 12);

    // Identified as the proxy identifies: no key 401, unknown key 401, admin token 401.
    let r = h
        .http
        .get(format!("{}/v1/me/usage", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(json(r).await["error"]["code"], "missing_api_key");
    let r = h.get_as("/v1/me/usage", "sk-nobody").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = h.admin(Method::GET, "/v1/me/usage").send().await.unwrap();
    assert_eq!(r.status(), 401, "an admin has no \"me\"");
    // A suspended account may still read its own numbers.
    let r = h.get_as("/v1/me/usage", "sk-bob").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["suspended"], true);
}

async fn decisions_are_the_callers_own_newest_first(store: StoreKind) {
    let h = start(store).await;
    let mut mine = Vec::new();
    for units in [1, 1, 1, 1] {
        let r = h.task("sk-carol", units).await;
        mine.push(header(&r, "x-flowgate-decision-id"));
        r.text().await.unwrap();
    }
    let r = h.task("sk-alice", 1).await;
    let theirs = header(&r, "x-flowgate-decision-id");
    r.text().await.unwrap();
    h.settle_ledger().await;

    let mut seen = Vec::new();
    let mut path = "/v1/me/decisions?limit=3".to_owned();
    loop {
        let page = json(h.get_as(&path, "sk-carol").send().await.unwrap()).await;
        assert_eq!(page["account"], "carol");
        for e in page["events"].as_array().unwrap() {
            seen.push(e.clone());
        }
        match page["next"].as_i64() {
            Some(before) => path = format!("/v1/me/decisions?limit=3&before={before}"),
            None => break,
        }
    }
    let ids: Vec<&str> = seen
        .iter()
        .map(|e| e["usage_event"]["decision_id"].as_str().unwrap())
        .collect();
    let expected: Vec<&str> = mine.iter().rev().map(String::as_str).collect();
    assert_eq!(ids, expected, "newest first, each once, only carol's");
    assert!(!ids.contains(&theirs.as_str()));
    // The reasons: lite allows 2 per 5 hours.
    let newest = &seen[0];
    assert_eq!(newest["usage_event"]["outcome"], "denied");
    assert_eq!(newest["usage_event"]["code"], "usage_limit_reached");
    assert_eq!(
        newest["usage_event"]["decision"]["denial"]["reason"],
        "usage_limit_reached"
    );
    assert_eq!(seen[3]["usage_event"]["outcome"], "completed");
    assert_eq!(
        seen[3]["usage_event"]["decision"]["layers"][0]["gave_units"],
        1
    );

    let r = h
        .get_as("/v1/me/decisions?before=0", "sk-carol")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(json(r).await["error"]["field"], "query:before");
}

async fn trusted_header_identifies_the_caller(store: StoreKind) {
    let h = Harness::start_with(store, |c| {
        common::api::with_admin(c.replace(
            "mode = \"api_key\"",
            "mode = \"trusted_header\"\nheader = \"x-account-id\"",
        ))
    })
    .await;
    let r = h
        .post("/v1/tasks", "ignored")
        .header("x-account-id", "dave")
        .header("x-units", 1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = header(&r, "x-flowgate-decision-id");
    r.text().await.unwrap();
    h.settle_ledger().await;
    let get = |path: String, account: &'static str| {
        h.http
            .get(format!("{}{path}", h.base))
            .header("x-account-id", account)
            .send()
    };
    let me = json(get("/v1/me/usage".into(), "dave").await.unwrap()).await;
    assert_eq!(me["account"], "dave");
    assert_eq!(me["layers"][0]["windows"][0]["used"], 1);
    let r = get(format!("/v1/decisions/{id}"), "dave").await.unwrap();
    assert_eq!(r.status(), 200);
    let r = get(format!("/v1/decisions/{id}"), "alice").await.unwrap();
    assert_eq!(r.status(), 404);
    // In this mode the admin token travels in Authorization and still works.
    let r = h
        .admin(Method::GET, &format!("/v1/decisions/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Every admin and user endpoint the gateway has, as (method, path template).
const ENDPOINTS: &[(&str, &str)] = &[
    ("post", "/admin/v1/accounts"),
    ("get", "/admin/v1/accounts/{account_id}"),
    ("patch", "/admin/v1/accounts/{account_id}"),
    ("post", "/admin/v1/accounts/{account_id}/api-keys"),
    ("get", "/admin/v1/accounts/{account_id}/api-keys"),
    (
        "delete",
        "/admin/v1/accounts/{account_id}/api-keys/{prefix}",
    ),
    ("post", "/admin/v1/accounts/{account_id}/grants"),
    ("post", "/admin/v1/decisions/{decision_id}/refund"),
    ("get", "/admin/v1/accounts/{account_id}/balances"),
    ("get", "/admin/v1/accounts/{account_id}/ledger"),
    ("get", "/v1/me/usage"),
    ("get", "/v1/me/decisions"),
    ("get", "/v1/decisions/{decision_id}"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_is_valid_and_complete() {
    let h = start(StoreKind::Sqlite).await;
    let r = h
        .http
        .get(format!("{}/openapi.json", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "application/json");
    let text = r.text().await.unwrap();
    let spec = oas3::from_json(&text).expect("a valid OpenAPI 3.1 document");
    assert!(spec.openapi.starts_with("3."), "{}", spec.openapi);
    let doc: Value = serde_json::from_str(&text).unwrap();

    // Documented = served: the lists agree, and every documented operation is routed (its
    // answer is never the gateway's "no route" 404).
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "patch", "put", "delete"].contains(&method.as_str()) {
                documented.insert((method.clone(), path.clone()));
            }
        }
    }
    let expected: BTreeSet<(String, String)> = ENDPOINTS
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, expected);
    for (method, path) in &documented {
        let concrete = path
            .replace("{account_id}", "alice")
            .replace("{prefix}", "no-such-prefix")
            .replace("{decision_id}", &uuid::Uuid::now_v7().to_string());
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let r = h
            .admin(method.clone(), &concrete)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{method} {concrete}: {status}, not JSON: {text:?}"));
        assert_ne!(
            body["error"]["code"], "route_not_found",
            "{method} {concrete} is not served"
        );
        let operation = &doc["paths"][path][method.as_str().to_lowercase()];
        assert!(
            operation["summary"].is_string() || operation["description"].is_string(),
            "{path} is described"
        );
        assert!(
            operation["security"].is_array(),
            "{path} says how to authenticate"
        );
    }
    // A route nobody documented answers the gateway's 404.
    let r = h
        .admin(Method::GET, "/admin/v1/nothing")
        .send()
        .await
        .unwrap();
    assert_eq!(json(r).await["error"]["code"], "route_not_found");

    // Every $ref points at a schema that is there.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        let name = r
            .strip_prefix("#/components/schemas/")
            .expect("a schema ref");
        assert!(schemas.contains_key(name), "{r} is not defined");
    }
    for scheme in ["admin_token", "api_key"] {
        assert!(
            doc["components"]["securitySchemes"][scheme].is_object(),
            "{scheme}"
        );
    }
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => collect_refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_routes_beside_the_api_do_not_clash() {
    // A parameterised operator route overlapping the API's prefixes: both are served.
    let h = Harness::start_with(StoreKind::Sqlite, |c| {
        common::api::with_admin(
            c.replace("path = \"/v1/videos\"", "path = \"/v1/{resource}/{id}\""),
        )
    })
    .await;
    let r = h.get_as("/v1/me/usage", "sk-alice").send().await.unwrap();
    assert_eq!(json(r).await["account"], "alice");
    let r = h
        .post("/v1/clips/7", "sk-alice")
        .json(&json!({"seconds": 1}))
        .send()
        .await
        .unwrap();
    assert!(
        !header(&r, "x-flowgate-pools").is_empty(),
        "the operator's route is decided and proxied"
    );
    // The same path as the API: a config error naming the route, not a panic.
    let config = common::CONFIG
        .replace("__BACKEND__", "http://127.0.0.1:1")
        .replace("path = \"/v1/videos\"", "path = \"/v1/me/usage\"");
    let e = flowgate::config::Settings::parse(&config).expect_err("reserved path");
    assert_eq!(e.key, "routes[1].path", "{e}");
}
