//! `flowgate serve` reloads its configuration on SIGHUP, as nginx does: new routes, prices,
//! limits and accounts apply to new requests; a request in flight finishes under the plan it
//! was decided with; a bad file is refused with the start-up error and changes nothing.

mod common;

use std::time::Duration;

use common::process::ChildGateway;
use common::{PgDatabase, StoreKind};
use flowgate::demo::backend::MockBackend;
use tokio::time::Instant; // waits for real processes

const V1: &str = r#"
[server]
listen = "__LISTEN__"
upstream_timeout_ms = 10000
credits_denial = "payment_required"

[store]
url = "__STORE__"
ledger_flush_interval_ms = 2

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
price_version = "v1"
prices = { task = 3 }

[[plans.pro.layers]]
kind = "usage_limit"
name = "limits"
windows = [{ name = "day", duration = "1day", limit = 2 }]

[[plans.pro.layers]]
kind = "credits"

[[accounts]]
id = "alice"
plan = "pro"
api_keys = ["sk-alice"]

[[accounts.grants]]
id = "g"
kind = "credits"
amount = 1000
"#;

/// V1 with a new price version and price, a larger window, a new route and a new account.
fn v2(v1: &str) -> String {
    v1.replace("price_version = \"v1\"", "price_version = \"v2\"")
        .replace(
            "prices = { task = 3 }",
            "prices = { task = 5, video_second = 1 }",
        )
        .replace("limit = 2 }", "limit = 4 }")
        .replace(
            "[plans.pro]",
            "[[routes]]\nmethod = \"POST\"\npath = \"/v1/videos\"\nfeature = \"video_second\"\nupstream = \"backend\"\ncost = { fixed = 1 }\n\n[plans.pro]",
        )
        + "\n[[accounts]]\nid = \"bob\"\nplan = \"pro\"\napi_keys = [\"sk-bob\"]\n\n[[accounts.grants]]\nid = \"g\"\nkind = \"credits\"\namount = 10\n"
}

async fn task(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    units: u64,
    delay_ms: u64,
) -> reqwest::Response {
    http.post(format!("{base}/v1/tasks"))
        .bearer_auth(key)
        .header("x-units", units)
        .header("x-mock-delay-ms", delay_ms)
        .body("{}")
        .send()
        .await
        .expect("request")
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

async fn sighup_reloads_routes_prices_limits_and_accounts(kind: StoreKind) {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = match kind {
        StoreKind::Postgres => Some(PgDatabase::create().await),
        StoreKind::Sqlite => None,
    };
    let store = match &pg {
        Some(db) => db.url.clone(),
        None => format!("sqlite://{}", dir.path().join("ledger.db").display()),
    };
    let backend = MockBackend::start().await.expect("backend");
    let v1 = V1
        .replace("__STORE__", &store)
        .replace("__BACKEND__", &backend.url());
    let mut gw = ChildGateway::start(dir.path(), "gw", &v1).await;
    let config = dir.path().join("gw.toml");
    let listen = std::fs::read_to_string(&config).expect("config");
    let http = reqwest::Client::new();
    let base = gw.base.clone();

    for _ in 0..2 {
        assert_eq!(task(&http, &base, "sk-alice", 1, 0).await.status(), 200);
    }
    // In flight across the reload: decided under v1 (the window is full: 10 × 3 credits).
    let slow = tokio::spawn({
        let (http, base) = (http.clone(), base.clone());
        async move {
            let r = task(&http, &base, "sk-alice", 10, 1500).await;
            (r.status().as_u16(), header(&r, "x-flowgate-pools"))
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    std::fs::write(&config, v2(&listen)).expect("write v2");
    gw.signal("HUP");
    let started = Instant::now();
    loop {
        let r = http
            .post(format!("{base}/v1/videos"))
            .bearer_auth("sk-alice")
            .body("{}")
            .send()
            .await
            .expect("video");
        if r.status() == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the new route is not served: {}; log:\n{}",
            r.status(),
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, pools) = slow.await.expect("slow request");
    assert_eq!((status, pools.as_str()), (200, "credits=10"));

    // The window kept its usage (2) under its new limit (4).
    let r = task(&http, &base, "sk-alice", 1, 0).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-remaining-day"), "1");
    let r = task(&http, &base, "sk-alice", 2, 0).await;
    assert_eq!(header(&r, "x-flowgate-pools"), "limits=1,credits=1");
    // The new account works.
    assert_eq!(task(&http, &base, "sk-bob", 1, 0).await.status(), 200);

    // A bad file: refused with the error start-up gives, and v2 stays in force.
    let bad = v2(&listen).replace(
        "plan = \"pro\"\napi_keys = [\"sk-bob\"]",
        "plan = \"gold\"\napi_keys = [\"sk-bob\"]",
    );
    std::fs::write(dir.path().join("bad.toml"), &bad).expect("write bad");
    let startup = std::process::Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["serve", "--config"])
        .arg(dir.path().join("bad.toml"))
        .output()
        .expect("flowgate runs");
    assert!(!startup.status.success());
    let startup_error = String::from_utf8_lossy(&startup.stderr)
        .trim()
        .trim_start_matches("flowgate: ")
        .to_owned();
    assert!(startup_error.contains("gold"), "{startup_error}");
    std::fs::write(&config, &bad).expect("write bad");
    gw.signal("HUP");
    let started = Instant::now();
    while !gw.log().contains("configuration not reloaded") {
        assert!(started.elapsed() < Duration::from_secs(10), "{}", gw.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refusal = gw
        .log()
        .lines()
        .find(|l| l.contains("configuration not reloaded"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(
        refusal.contains(&startup_error),
        "reload: {refusal}\nstart-up: {startup_error}"
    );
    let r = task(&http, &base, "sk-bob", 1, 0).await;
    assert_eq!(r.status(), 200, "bob is still on pro");
    assert_eq!(header(&r, "x-flowgate-pools"), "limits=1");

    assert!(gw.terminate().await.success(), "{}", gw.log());
    // Each charge names the price it was decided under.
    let rows: Vec<(String, i64, String)> = match &pg {
        Some(db) => {
            let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
            sqlx::query_as(
                "SELECT account_id, credits_per_unit, price_version FROM monetization_events ORDER BY id",
            )
            .fetch_all(&pool)
            .await
            .expect("charges")
        }
        None => {
            let pool = sqlx::SqlitePool::connect(&store).await.expect("connect");
            sqlx::query_as(
                "SELECT account_id, credits_per_unit, price_version FROM monetization_events ORDER BY id",
            )
            .fetch_all(&pool)
            .await
            .expect("charges")
        }
    };
    // Two tasks before the reload and the one in flight across it: v1, at 3 a unit.
    let v1: Vec<i64> = rows
        .iter()
        .filter(|(_, _, v)| v == "v1")
        .map(|(_, price, _)| *price)
        .collect();
    assert_eq!(v1, [3, 3, 3], "{rows:?}");
    assert!(
        rows.iter()
            .filter(|(_, _, v)| v == "v2")
            .all(|(_, price, _)| *price == 5 || *price == 1),
        "{rows:?}"
    );
    assert!(rows.iter().any(|(a, _, v)| a == "alice" && v == "v2"));
}

store_tests!(sighup_reloads_routes_prices_limits_and_accounts);
