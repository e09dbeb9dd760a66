//! Black-box tests of the admin API: a real gateway, backend and store (each test once per
//! store). What the API says is checked against what the store holds and what the proxy does.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use common::api::{ADMIN_TOKEN, start};
use common::{Harness, StoreKind, has_header, header};
use reqwest::Method;
use serde_json::{Value, json};

store_tests!(
    admin_auth_needs_the_right_token_and_never_logs_it,
    admin_api_is_disabled_without_a_token,
    grant_is_idempotent_per_key,
    grant_sent_twice_at_once_grants_once,
    grant_then_proxied_request_spends_it,
    invalid_requests_name_the_field_and_write_nothing,
    new_account_and_key_work_on_the_proxy_at_once,
    keys_are_listed_by_prefix_and_revoked_for_good,
    plan_change_and_suspension_reach_the_proxy,
    balances_and_windows_match_the_proxys_numbers,
    ledger_pages_return_each_event_once,
    decision_is_explained_to_its_owner_and_admins_only,
    refund_gives_a_charge_back_once,
);

/// Everything logged by this test binary (all tests share one subscriber).
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .try_init();
        buffer
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn json(r: reqwest::Response) -> Value {
    r.json().await.expect("a JSON body")
}

/// Grants through the admin API.
async fn grant(h: &Harness, account: &str, key: &str, body: Value) -> reqwest::Response {
    h.admin(
        Method::POST,
        &format!("/admin/v1/accounts/{account}/grants"),
    )
    .header("idempotency-key", key)
    .json(&body)
    .send()
    .await
    .unwrap()
}

async fn admin_auth_needs_the_right_token_and_never_logs_it(store: StoreKind) {
    let logs = logs();
    let h = start(store).await;
    let path = format!("{}/admin/v1/accounts/alice", h.base);

    let r = h.http.get(&path).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let e = json(r).await["error"].clone();
    assert_eq!(e["code"], "missing_admin_token");
    assert_eq!(e["field"], "header:authorization");

    let wrong = "adm-wrong-guess-token";
    let r = h.http.get(&path).bearer_auth(wrong).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(json(r).await["error"]["code"], "invalid_admin_token");

    // An API key is not an admin token.
    let r = h
        .http
        .get(&path)
        .bearer_auth("sk-alice")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let r = h
        .admin(Method::GET, "/admin/v1/accounts/alice")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let account = json(r).await;
    assert_eq!(account["id"], "alice");
    assert_eq!(account["plan"], "pro");
    assert_eq!(account["in_config"], true);
    assert_eq!(account["grants"][0]["external_id"], "purchase-1");
    assert_eq!(account["grants"][0]["balance"], 100);

    // Logging works (an admin action is there) and no token or key is in it.
    let r = h
        .admin(Method::POST, "/admin/v1/accounts/alice/api-keys")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let key = json(r).await["api_key"].as_str().unwrap().to_owned();
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(text.contains("admin: API key created"), "logs are captured");
    for secret in [ADMIN_TOKEN, wrong, key.as_str()] {
        assert!(!text.contains(secret), "{secret} appears in the logs");
    }
}

async fn admin_api_is_disabled_without_a_token(store: StoreKind) {
    let h = Harness::start(store).await;
    for (method, path) in [
        (Method::GET, "/admin/v1/accounts/alice"),
        (Method::POST, "/admin/v1/accounts"),
        (Method::POST, "/admin/v1/accounts/alice/grants"),
        (Method::GET, "/admin/v1/accounts/alice/ledger"),
    ] {
        let r = h.admin(method, path).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(json(r).await["error"]["code"], "admin_api_disabled");
    }
    // The user API does not depend on it.
    let r = h.get_as("/v1/me/usage", "sk-alice").send().await.unwrap();
    assert_eq!(r.status(), 200);
}

async fn grant_is_idempotent_per_key(store: StoreKind) {
    let h = start(store).await;
    let body = json!({"kind": "credits", "amount": 50});
    let first = grant(&h, "alice", "order-1", body.clone()).await;
    assert_eq!(first.status(), 201);
    let first = json(first).await;
    let again = grant(&h, "alice", "order-1", body.clone()).await;
    assert_eq!(again.status(), 200);
    let again = json(again).await;
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["external_id"], "order-1");
    assert_eq!(again["amount"], 50);

    // The same key for a different grant: refused, nothing written.
    let r = grant(
        &h,
        "alice",
        "order-1",
        json!({"kind": "credits", "amount": 60}),
    )
    .await;
    assert_eq!(r.status(), 409);
    let e = json(r).await["error"].clone();
    assert_eq!(e["code"], "idempotency_key_reused");
    assert_eq!(e["field"], "header:idempotency-key");

    // A promotion, limited to a feature, is a pool of its own.
    let r = grant(
        &h,
        "alice",
        "promo-1",
        json!({"kind": "promotion", "amount": 10, "features": ["task"], "expires_at": "2099-01-01T00:00:00Z"}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let r = h
        .admin(Method::GET, "/admin/v1/accounts/alice/balances")
        .send()
        .await
        .unwrap();
    let pools = json(r).await["pools"].clone();
    assert_eq!(
        pools,
        json!({"credits": 150, "promotion": 10, "enterprise": 0})
    );

    let store = h.store().await;
    let grants = store.grants("alice").await.unwrap();
    assert_eq!(
        grants.iter().filter(|g| g.external_id == "order-1").count(),
        1
    );
    let id = first["id"].as_i64().unwrap();
    let snapshot = store.snapshot(i64::MIN).await.unwrap();
    let updates: Vec<_> = snapshot
        .balance_updates
        .iter()
        .filter(|b| b.grant_id == id)
        .collect();
    assert_eq!(updates.len(), 1, "one balance update for one grant");
    assert_eq!(
        (updates[0].reason.as_str(), updates[0].delta),
        ("grant", 50)
    );
    assert_eq!(h.cached_credits("alice", "task"), 160);
    assert_eq!(h.cached_credits("alice", "video_second"), 150);
}

async fn grant_sent_twice_at_once_grants_once(store: StoreKind) {
    let h = start(store).await;
    let body = json!({"kind": "credits", "amount": 25});
    let (a, b) = tokio::join!(
        grant(&h, "dave", "same-moment", body.clone()),
        grant(&h, "dave", "same-moment", body.clone()),
    );
    let mut statuses = [a.status().as_u16(), b.status().as_u16()];
    statuses.sort();
    assert_eq!(statuses, [200, 201]);
    assert_eq!(json(a).await["id"], json(b).await["id"]);
    let grants = h.store().await.grants("dave").await.unwrap();
    assert_eq!(grants.len(), 2, "the seeded grant and one new one");
    assert_eq!(h.stored_balance("dave").await, 12 + 25);
    assert_eq!(
        h.cached_credits("dave", "task"),
        12 + 25,
        "the view has it once"
    );
}

async fn grant_then_proxied_request_spends_it(store: StoreKind) {
    let h = start(store).await;
    // dave: 3 units of window + 12 credits (2 units at 5 each): 6 units are one too many.
    let r = h.task("sk-dave", 6).await;
    assert_eq!(r.status(), 402);
    let r = grant(
        &h,
        "dave",
        "top-up-1",
        json!({"kind": "credits", "amount": 50, "expires_at": "2099-01-01T00:00:00Z"}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let grant_id = json(r).await["id"].as_i64().unwrap();

    let r = h.task("sk-dave", 6).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-flowgate-pools"), "limits=3,credits=3");
    assert_eq!(header(&r, "x-credits-remaining"), "47");
    r.text().await.unwrap();
    // The expiring grant is spent first.
    assert_eq!(h.stored_balance("dave").await, 47);
    let grants = h.store().await.grants("dave").await.unwrap();
    let new = grants.iter().find(|g| g.id == grant_id).unwrap();
    assert_eq!(new.balance, 35);
    // The API's grant is on the record like a configured one: reconciliation finds nothing.
    let report = h
        .store()
        .await
        .reconcile(i64::MIN, &h.gateway().app().settings)
        .await
        .unwrap();
    assert!(report.differences.is_empty(), "{:?}", report.differences);
}

/// Method, path, `Idempotency-Key`, body, expected status, expected `error.field`.
type Case<'a> = (Method, &'a str, Option<&'a str>, Value, u16, &'a str);

async fn invalid_requests_name_the_field_and_write_nothing(store: StoreKind) {
    let h = start(store).await;
    let store_before = h.store().await;
    let counts = store_before.counts().await.unwrap();
    let snapshot = store_before.snapshot(i64::MIN).await.unwrap();
    let accounts = store_before.load_accounts().await.unwrap().len();

    let grants = "/admin/v1/accounts/alice/grants";
    let cases: Vec<Case<'_>> = vec![
        (
            Method::POST,
            grants,
            Some("k1"),
            json!({"kind": "credits", "amount": 0}),
            400,
            "amount",
        ),
        (
            Method::POST,
            grants,
            Some("k2"),
            json!({"kind": "credits", "amount": -5}),
            400,
            "amount",
        ),
        (
            Method::POST,
            grants,
            Some("k3"),
            json!({"kind": "credits", "amount": "ten"}),
            400,
            "amount",
        ),
        (
            Method::POST,
            grants,
            Some("k4"),
            json!({"kind": "credits"}),
            400,
            "amount",
        ),
        (
            Method::POST,
            grants,
            Some("k5"),
            json!({"kind": "gold", "amount": 5}),
            400,
            "kind",
        ),
        (
            Method::POST,
            grants,
            Some("k6"),
            json!({"kind": "credits", "amount": 5, "expires_at": "2001-01-01T00:00:00Z"}),
            400,
            "expires_at",
        ),
        (
            Method::POST,
            grants,
            Some("k7"),
            json!({"kind": "credits", "amount": 5, "expires_at": "tomorrow"}),
            400,
            "expires_at",
        ),
        (
            Method::POST,
            grants,
            Some("k8"),
            json!({"kind": "promotion", "amount": 5, "features": ["task", "nope"]}),
            400,
            "features[1]",
        ),
        (
            Method::POST,
            grants,
            Some("k9"),
            json!({"kind": "credits", "amont": 5}),
            400,
            "amont",
        ),
        (
            Method::POST,
            grants,
            None,
            json!({"kind": "credits", "amount": 5}),
            400,
            "header:idempotency-key",
        ),
        (
            Method::POST,
            "/admin/v1/accounts/ghost/grants",
            Some("k10"),
            json!({"kind": "credits", "amount": 5}),
            404,
            "account_id",
        ),
        (
            Method::POST,
            "/admin/v1/accounts",
            None,
            json!({"id": "erin", "plan": "gold"}),
            400,
            "plan",
        ),
        (
            Method::POST,
            "/admin/v1/accounts",
            None,
            json!({"id": "a b", "plan": "pro"}),
            400,
            "id",
        ),
        (
            Method::POST,
            "/admin/v1/accounts",
            None,
            json!({"id": "alice", "plan": "pro"}),
            409,
            "id",
        ),
        (
            Method::PATCH,
            "/admin/v1/accounts/ghost",
            None,
            json!({"plan": "gold"}),
            400,
            "plan",
        ),
        (
            Method::PATCH,
            "/admin/v1/accounts/ghost",
            None,
            json!({"suspended": true}),
            404,
            "account_id",
        ),
        (
            Method::PATCH,
            "/admin/v1/accounts/alice",
            None,
            json!({"suspended": true}),
            409,
            "suspended",
        ),
        (
            Method::PATCH,
            "/admin/v1/accounts/ghost",
            None,
            json!({}),
            400,
            "body",
        ),
        (
            Method::GET,
            "/admin/v1/accounts/alice/ledger?limit=0",
            None,
            Value::Null,
            400,
            "query:limit",
        ),
        (
            Method::GET,
            "/admin/v1/accounts/alice/ledger?bogus=1",
            None,
            Value::Null,
            400,
            "query:bogus",
        ),
        (
            Method::GET,
            "/admin/v1/accounts/ghost/ledger",
            None,
            Value::Null,
            404,
            "account_id",
        ),
        (
            Method::GET,
            "/admin/v1/accounts/ghost/balances",
            None,
            Value::Null,
            404,
            "account_id",
        ),
    ];
    for (method, path, key, body, status, field) in cases {
        let mut req = h.admin(method.clone(), path);
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        if !body.is_null() {
            req = req.json(&body);
        }
        let r = req.send().await.unwrap();
        let got = r.status().as_u16();
        let e = json(r).await["error"].clone();
        assert_eq!(got, status, "{method} {path} {body}: {e}");
        assert_eq!(e["field"], field, "{method} {path} {body}: {e}");
        assert!(e["type"].is_string() && e["code"].is_string() && e["message"].is_string());
    }

    let store = h.store().await;
    assert_eq!(store.counts().await.unwrap(), counts);
    let after = store.snapshot(i64::MIN).await.unwrap();
    assert_eq!(
        after.grants.len(),
        snapshot.grants.len(),
        "no grant written"
    );
    assert_eq!(after.balance_updates.len(), snapshot.balance_updates.len());
    assert_eq!(store.load_accounts().await.unwrap().len(), accounts);
    let alice = store.account("alice").await.unwrap().unwrap();
    assert!(
        !alice.suspended,
        "a config account is not changed by the API"
    );
    assert_eq!(h.cached_credits("alice", "task"), 100);
}

async fn new_account_and_key_work_on_the_proxy_at_once(store: StoreKind) {
    let mut h = start(store).await;
    let r = h
        .admin(Method::POST, "/admin/v1/accounts")
        .json(&json!({"id": "erin", "plan": "pro"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let account = json(r).await;
    assert_eq!(account["plan"], "pro");
    assert_eq!(account["in_config"], false);
    assert_eq!(account["api_keys"], 0);

    let r = h
        .admin(Method::POST, "/admin/v1/accounts/erin/api-keys")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let body = json(r).await;
    let key = body["api_key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("fg_") && key.len() == 3 + 64, "{key}");
    let second = json(
        h.admin(Method::POST, "/admin/v1/accounts/erin/api-keys")
            .send()
            .await
            .unwrap(),
    )
    .await["api_key"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(key, second, "keys are random");

    let r = h.task(&key, 1).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-flowgate-pools"), "limits=1");
    r.text().await.unwrap();
    let r = h
        .admin(Method::GET, "/admin/v1/accounts/erin")
        .send()
        .await
        .unwrap();
    assert_eq!(json(r).await["api_keys"], 2);

    // Stored as a hash only, and still there after a restart.
    let stored = h.store().await.load_accounts().await.unwrap();
    let erin = stored.iter().find(|a| a.id == "erin").unwrap();
    assert!(
        erin.key_hashes
            .contains(&flowgate::config::hash_api_key(&key))
    );
    assert!(!erin.key_hashes.contains(&key));
    h.restart().await;
    let r = h.task(&second, 1).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-remaining-5h"), "1");
}

async fn keys_are_listed_by_prefix_and_revoked_for_good(store: StoreKind) {
    let mut h = start(store).await;
    h.admin(Method::POST, "/admin/v1/accounts")
        .json(&json!({"id": "erin", "plan": "pro"}))
        .send()
        .await
        .unwrap();
    let mut keys = Vec::new();
    for _ in 0..2 {
        let body = json(
            h.admin(Method::POST, "/admin/v1/accounts/erin/api-keys")
                .send()
                .await
                .unwrap(),
        )
        .await;
        let key = body["api_key"].as_str().unwrap().to_owned();
        let prefix = body["prefix"].as_str().unwrap().to_owned();
        assert_eq!(prefix, key[..11], "fg_ and 8 of the key's hex digits");
        keys.push((key, prefix));
    }
    let listed = json(
        h.admin(Method::GET, "/admin/v1/accounts/erin/api-keys")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let text = listed.to_string();
    assert!(
        !text.contains(&keys[0].0) && !text.contains(&keys[1].0),
        "{text}"
    );
    let prefixes: Vec<&str> = listed["api_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["prefix"].as_str().unwrap())
        .collect();
    assert_eq!(prefixes.len(), 2);
    assert!(prefixes.contains(&keys[0].1.as_str()) && prefixes.contains(&keys[1].1.as_str()));

    let (leaked, leaked_prefix) = &keys[0];
    assert_eq!(h.task(leaked, 1).await.status(), 200);
    let r = h
        .admin(
            Method::DELETE,
            &format!("/admin/v1/accounts/erin/api-keys/{leaked_prefix}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let revoked = json(r).await;
    assert!(revoked["revoked_at"].is_string(), "{revoked}");
    assert_eq!(h.task(leaked, 1).await.status(), 401);
    assert_eq!(
        h.task(&keys[1].0, 1).await.status(),
        200,
        "the other key works"
    );
    // Revoking again changes nothing; an unknown prefix is a 404 naming the field.
    let again = json(
        h.admin(
            Method::DELETE,
            &format!("/admin/v1/accounts/erin/api-keys/{leaked_prefix}"),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(again["revoked_at"], revoked["revoked_at"]);
    let r = h
        .admin(
            Method::DELETE,
            "/admin/v1/accounts/erin/api-keys/fg_nothere",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(json(r).await["error"]["field"], "prefix");
    assert_eq!(
        json(
            h.admin(Method::GET, "/admin/v1/accounts/erin")
                .send()
                .await
                .unwrap()
        )
        .await["api_keys"],
        1,
        "live keys"
    );
    // Revoked for good: not after a restart either.
    h.restart().await;
    assert_eq!(h.task(leaked, 1).await.status(), 401);
    assert_eq!(h.task(&keys[1].0, 1).await.status(), 200);
}

async fn plan_change_and_suspension_reach_the_proxy(store: StoreKind) {
    let mut h = start(store).await;
    h.admin(Method::POST, "/admin/v1/accounts")
        .json(&json!({"id": "erin", "plan": "pro"}))
        .send()
        .await
        .unwrap();
    let key = json(
        h.admin(Method::POST, "/admin/v1/accounts/erin/api-keys")
            .send()
            .await
            .unwrap(),
    )
    .await["api_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = h.task(&key, 1).await;
    assert_eq!(header(&r, "x-ratelimit-limit-5h"), "3");
    r.text().await.unwrap();
    h.settle_ledger().await;

    // lite: one 5-hour window of 2. The unit used under pro still counts, as after a restart.
    let r = h
        .admin(Method::PATCH, "/admin/v1/accounts/erin")
        .json(&json!({"plan": "lite"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["plan"], "lite");
    let r = h.task(&key, 1).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit-5h"), "2");
    assert_eq!(header(&r, "x-ratelimit-remaining-5h"), "0");
    assert!(
        !has_header(&r, "x-ratelimit-limit-week"),
        "lite has no weekly window"
    );
    r.text().await.unwrap();
    let r = h.task(&key, 1).await;
    assert_eq!(r.status(), 429);

    let r = h
        .admin(Method::PATCH, "/admin/v1/accounts/erin")
        .json(&json!({"suspended": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(json(r).await["suspended"], true);
    let r = h.task(&key, 1).await;
    assert_eq!(r.status(), 403);
    assert_eq!(json(r).await["error"]["code"], "account_suspended");

    // The store has it: a restart keeps the plan and the suspension.
    h.restart().await;
    assert_eq!(h.task(&key, 1).await.status(), 403);
    h.admin(Method::PATCH, "/admin/v1/accounts/erin")
        .json(&json!({"suspended": false}))
        .send()
        .await
        .unwrap();
    let r = h.task(&key, 1).await;
    assert_eq!(r.status(), 429, "lite's window is still used up");
}

async fn balances_and_windows_match_the_proxys_numbers(store: StoreKind) {
    let h = start(store).await;
    h.task("sk-alice", 2).await.text().await.unwrap();
    let r = h.task("sk-alice", 5).await;
    assert_eq!(header(&r, "x-flowgate-pools"), "limits=1,credits=4");
    let (remaining_5h, remaining_week, credits) = (
        header(&r, "x-ratelimit-remaining-5h"),
        header(&r, "x-ratelimit-remaining-week"),
        header(&r, "x-credits-remaining"),
    );
    r.text().await.unwrap();
    h.settle_ledger().await;

    let r = h
        .admin(Method::GET, "/admin/v1/accounts/alice/balances")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b = json(r).await;
    assert_eq!(b["plan"], "pro");
    let limits = &b["layers"][0];
    assert_eq!(limits["name"], "limits");
    assert_eq!(limits["kind"], "usage_limit");
    assert_eq!(limits["features"], json!(["task"]));
    let (w5h, week) = (&limits["windows"][0], &limits["windows"][1]);
    assert_eq!(
        (w5h["name"].as_str(), w5h["limit"].as_u64()),
        (Some("5h"), Some(3))
    );
    assert_eq!(w5h["used"], 3);
    assert_eq!(w5h["remaining"].to_string(), remaining_5h);
    assert_eq!(week["used"], 3);
    assert_eq!(week["remaining"].to_string(), remaining_week);
    let reset = chrono::DateTime::parse_from_rfc3339(w5h["reset_at"].as_str().unwrap()).unwrap();
    let in_ms = reset.timestamp_millis() - flowgate::clock::now_ms();
    assert!(
        (4 * 3_600_000..=5 * 3_600_000 + 60_000).contains(&in_ms),
        "5h window resets in {in_ms} ms"
    );
    assert_eq!(b["layers"][1]["kind"], "credits");
    assert_eq!(b["layers"][1]["credits"].to_string(), credits);
    assert_eq!(b["pools"]["credits"].to_string(), credits);
    assert_eq!(b["grants"][0]["balance"], 80);
    assert_eq!(b["grants"][0]["held"], 0, "committed: nothing unsettled");
    assert_eq!(h.stored_balance("alice").await, 80);
}

async fn ledger_pages_return_each_event_once(store: StoreKind) {
    let h = start(store).await;
    let mut decisions = Vec::new();
    for units in [1, 1, 1, 2, 1] {
        let r = h.task("sk-alice", units).await;
        assert_eq!(r.status(), 200);
        decisions.push(header(&r, "x-flowgate-decision-id"));
        r.text().await.unwrap();
    }
    let r = h
        .post("/v1/tasks", "sk-alice")
        .header("x-units", 1)
        .header("x-mock-status", "500")
        .send()
        .await
        .unwrap();
    decisions.push(header(&r, "x-flowgate-decision-id"));
    r.text().await.unwrap();
    h.task("sk-dave", 1).await.text().await.unwrap(); // someone else's
    h.settle_ledger().await;

    let mut seen = Vec::new();
    let mut pages = 0;
    let mut after: Option<i64> = None;
    loop {
        let path = match after {
            None => "/admin/v1/accounts/alice/ledger?limit=4".to_owned(),
            Some(a) => format!("/admin/v1/accounts/alice/ledger?limit=4&after={a}"),
        };
        let page = json(h.admin(Method::GET, &path).send().await.unwrap()).await;
        pages += 1;
        for e in page["events"].as_array().unwrap() {
            seen.push(e.clone());
        }
        match page["next"].as_i64() {
            Some(next) => after = Some(next),
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 2);
    let ids: Vec<String> = seen
        .iter()
        .map(|e| e["usage_event"]["decision_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, decisions, "each event once, oldest first");
    assert!(seen.iter().all(|e| e["usage_event"]["account"] == "alice"));

    // Window-only charges have a monetization event and no balance update; credit charges
    // have their debits; the failed request has neither.
    let first = &seen[0];
    assert_eq!(first["monetization_event"]["credits"], 0);
    assert_eq!(first["monetization_event"]["price_version"], "test-1");
    assert_eq!(first["balance_updates"], json!([]));
    assert_eq!(
        seen[3]["monetization_event"]["credits"], 10,
        "2 units past the window"
    );
    assert_eq!(seen[3]["balance_updates"][0]["balance_after"], 90);
    let credited = &seen[4];
    assert_eq!(credited["usage_event"]["outcome"], "completed");
    assert_eq!(credited["monetization_event"]["credits"], 5);
    let debit = &credited["balance_updates"][0];
    assert_eq!(
        (debit["reason"].as_str(), debit["delta"].as_i64()),
        (Some("debit"), Some(-5))
    );
    assert_eq!(debit["balance_after"], 85);
    assert_eq!(
        debit["monetization_event_id"],
        credited["monetization_event"]["id"]
    );
    let failed = &seen[5];
    assert_eq!(failed["usage_event"]["outcome"], "upstream_error");
    assert!(failed["monetization_event"].is_null());
}

async fn decision_is_explained_to_its_owner_and_admins_only(store: StoreKind) {
    let h = start(store).await;
    let r = h.task("sk-alice", 5).await; // 3 from the window, 2 × 5 credits
    let id = header(&r, "x-flowgate-decision-id");
    r.text().await.unwrap();
    for _ in 0..2 {
        h.task("sk-carol", 1).await.text().await.unwrap();
    }
    let r = h.task("sk-carol", 1).await;
    assert_eq!(r.status(), 429);
    let denied = header(&r, "x-flowgate-decision-id");
    h.settle_ledger().await;

    let path = format!("/v1/decisions/{id}");
    let r = h.get_as(&path, "sk-alice").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let d = json(r).await;
    assert_eq!(d["decision_id"], id.as_str());
    assert_eq!(d["account"], "alice");
    assert_eq!(d["admitted"], true);
    assert_eq!(d["price_version"], "test-1");
    let layers = d["layers"].as_array().unwrap();
    assert_eq!(layers[0]["layer"], "limits");
    assert_eq!(
        (
            layers[0]["available_units"].as_u64(),
            layers[0]["gave_units"].as_u64()
        ),
        (Some(3), Some(3))
    );
    assert_eq!(layers[1]["layer"], "credits");
    assert_eq!(layers[1]["available_credits"], 100);
    assert_eq!(layers[1]["gave_credits"], 10);
    assert_eq!(d["usage_event"]["outcome"], "completed");
    assert_eq!(d["monetization_event"]["credits"], 10);
    assert_eq!(d["monetization_event"]["price_version"], "test-1");
    assert_eq!(d["balance_updates"][0]["delta"], -10);
    assert_eq!(d["balance_updates"][0]["balance_after"], 90);

    let r = h.admin(Method::GET, &path).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["usage_event"]["decision_id"], id.as_str());

    for key in ["sk-dave", "sk-carol"] {
        let r = h.get_as(&path, key).send().await.unwrap();
        assert_eq!(r.status(), 404, "{key} sees alice's decision");
        assert_eq!(json(r).await["error"]["code"], "decision_not_found");
    }
    let r = h
        .http
        .get(format!("{}{path}", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = h
        .get_as(
            &format!("/v1/decisions/{}", uuid::Uuid::now_v7()),
            "sk-alice",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = h
        .get_as("/v1/decisions/not-a-uuid", "sk-alice")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(json(r).await["error"]["field"], "decision_id");

    // A denial explains itself: the window had nothing, and nothing was charged.
    let r = h
        .get_as(&format!("/v1/decisions/{denied}"), "sk-carol")
        .send()
        .await
        .unwrap();
    let d = json(r).await;
    assert_eq!(d["admitted"], false);
    assert_eq!(d["denial"]["reason"], "usage_limit_reached");
    assert_eq!(d["layers"][0]["available_units"], 0);
    assert!(d["monetization_event"].is_null());
    assert_eq!(d["balance_updates"], json!([]));
}

/// Two gateways on one PostgreSQL ledger: a grant made through one reaches the other's view
/// (the grant's balance is announced like a debit's) and is spent there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_through_one_replica_reaches_the_other() {
    let h = start(StoreKind::Postgres).await;
    let settings = flowgate::config::Settings::parse(&h.config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other =
        flowgate::gateway::Gateway::start(settings, listener, flowgate::clock::Clock::System)
            .await
            .unwrap();
    let credits = |g: &flowgate::gateway::Gateway| {
        let app = g.app();
        let feature = app.settings.feature_id("task").unwrap();
        let dave = app.accounts.get("dave").unwrap();
        dave.with_state(|_, s| s.spendable_credits(feature, flowgate::clock::now_ms()))
    };
    assert_eq!(credits(&other), 12);
    let r = grant(
        &h,
        "dave",
        "replicated-1",
        json!({"kind": "credits", "amount": 50}),
    )
    .await;
    assert_eq!(r.status(), 201);
    for _ in 0..200 {
        if credits(&other) == 62 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        credits(&other),
        62,
        "the other replica learned of the grant"
    );
    let r = h
        .http
        .post(format!("http://{}/v1/tasks", other.addr()))
        .bearer_auth("sk-dave")
        .header("x-units", 6)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "spent on the other replica");
    r.text().await.unwrap();
    other.shutdown().await;
    assert_eq!(h.stored_balance("dave").await, 62 - 15);
}

async fn refund_gives_a_charge_back_once(store: StoreKind) {
    let h = start(store).await;
    let r = h.task("sk-alice", 5).await; // 3 from the 5h window, 2 × 5 credits
    let decision = header(&r, "x-flowgate-decision-id");
    r.text().await.unwrap();
    h.settle_ledger().await;
    let path = format!("/admin/v1/decisions/{decision}/refund");

    let r = h
        .http
        .post(format!("{}{path}", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "no token, no refund");
    let r = h.admin(Method::POST, &path).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "refunded");
    assert_eq!(body["credits"], 10);
    assert_eq!(body["account"], "alice");
    let again: Value = h
        .admin(Method::POST, &path)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["status"], "already_refunded");
    assert_eq!(again["credits"], 0);
    let r = h
        .admin(Method::POST, "/admin/v1/decisions/nope/refund")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Back in the grant and in the window, once.
    assert_eq!(h.stored_balance("alice").await, 100);
    let r = h.task("sk-alice", 1).await;
    assert_eq!(header(&r, "x-ratelimit-remaining-5h"), "2");
    assert_eq!(header(&r, "x-credits-remaining"), "100");
}
