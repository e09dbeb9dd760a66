//! The real binary's lifecycle: SIGTERM drains in-flight requests and the ledger, then exits 0;
//! JSON logs carry one line per request and no secrets.

mod common;

use std::time::Duration;

use common::process::ChildGateway;
use common::{CONFIG, header};
use flowgate::demo::backend::MockBackend;
use flowgate::store::Store;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_flushes_the_ledger_and_exits_0() {
    let backend = MockBackend::start().await.expect("backend");
    let dir = tempfile::tempdir().expect("tempdir");
    let store_url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let config = CONFIG
        .replace("127.0.0.1:0", "__LISTEN__")
        .replace("__STORE__", &store_url)
        .replace("__BACKEND__", &backend.url())
        .replace("[store]", "[log]\nformat = \"json\"\n\n[store]");
    let mut gateway = ChildGateway::start(dir.path(), "gw", &config).await;
    let http = reqwest::Client::new();

    // A slow request is in flight when the signal arrives.
    let slow = {
        let http = http.clone();
        let url = format!("{}/v1/tasks", gateway.base);
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth("sk-alice")
                .header("x-units", 5)
                .header("x-mock-delay-ms", "800")
                .header("x-request-id", "req-slow")
                .body("{}")
                .send()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    gateway.signal("TERM");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // No new work is accepted once draining.
    let refused = http
        .post(format!("{}/v1/tasks", gateway.base))
        .bearer_auth("sk-alice")
        .header("x-units", 1)
        .body("{}")
        .send()
        .await;
    assert!(
        refused.is_err(),
        "a new connection during drain: {refused:?}"
    );

    let r = slow
        .await
        .expect("task")
        .expect("in-flight request completes");
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-credits-remaining"), "90");
    r.text().await.expect("body");
    let status = gateway.wait(Duration::from_secs(10)).await;
    assert!(status.success(), "exit {status:?}; log:\n{}", gateway.log());

    // Its charge was committed before exit.
    let store = Store::open(&store_url).await.expect("store");
    let grants = store.grants("alice").await.expect("grants");
    assert_eq!(grants.iter().map(|g| g.balance).sum::<u64>(), 90);
    let events = store.usage_events("alice", 10).await.expect("events");
    assert_eq!(events.len(), 1);
    assert!(events[0].charged);

    // JSON logs: one access line per request, parseable, without the API key.
    let log = gateway.log();
    assert!(!log.contains("sk-alice"), "the API key leaked into the log");
    let access: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|v| v["target"] == "flowgate::access")
        .collect();
    assert_eq!(access.len(), 1, "{log}");
    let line = &access[0];
    assert_eq!(line["account"], "alice");
    assert_eq!(line["feature"], "task");
    assert_eq!(line["status"], 200);
    assert!(
        line["decision"]
            .as_str()
            .unwrap_or("")
            .starts_with("admitted")
    );
    assert!(line["latency_us"].as_u64().unwrap_or(0) >= 800_000);
    assert_eq!(line["decision_id"], events[0].decision_id);
    assert_eq!(line["request_id"], "req-slow");
}
