//! Billing export, black-box: a real gateway and store (each test on both), requests through the
//! proxy, and a real HTTP receiver on loopback that records what it got
//! (`common::receiver`): what arrives, in which shape and order, and that an outage of the
//! receiver or a restart of the gateway loses nothing and sends nothing twice.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::receiver::{Receiver, Recorded};
use common::{Harness, StoreKind, header};
use flowgate::config::Settings;
use flowgate::gateway::Gateway;
use reqwest::Method;
use serde_json::Value;

store_tests!(
    charges_and_refunds_reach_both_sinks_in_order_and_shape,
    receiver_outage_and_gateway_restart_lose_nothing_and_send_nothing_twice,
);

const TOKEN: &str = "tok-export-7f3a";

/// The test config with the admin API and two sinks on `receiver`: CloudEvents (`meter`, at
/// most `batch` events a request) and Stripe (`stripe`); both read their token from `token`.
fn with_sinks(config: String, receiver: &Receiver, token: &std::path::Path, batch: u32) -> String {
    let url = receiver.url();
    let token = token.display();
    format!(
        r#"{}
[[export]]
name = "meter"
kind = "cloudevents"
url = "{url}/api/v1/events"
token_file = "{token}"
batch_size = {batch}

[[export]]
name = "stripe"
kind = "stripe"
url = "{url}"
token_file = "{token}"
event_name = "flowgate_{{feature}}"
customers = {{ alice = "cus_alice" }}
"#,
        common::api::with_admin(config)
    )
}

fn token_file() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    (dir, path)
}

/// A task of one unit for `key`; its decision id.
async fn task(h: &Harness, key: &str) -> String {
    let r = h.task(key, 1).await;
    assert_eq!(r.status(), 200, "task admitted");
    let id = header(&r, "x-flowgate-decision-id");
    r.text().await.unwrap();
    h.settle_ledger().await;
    id
}

/// Every CloudEvent the receiver accepted, in the order received.
fn cloudevents(got: &[Recorded]) -> Vec<Value> {
    got.iter()
        .filter(|r| r.path == "/api/v1/events" && (200..300).contains(&r.status))
        .flat_map(|r| r.json().as_array().cloned().unwrap_or_default())
        .collect()
}

/// The accepted Stripe requests to `path`, in order.
fn stripe(got: &[Recorded], path: &str) -> Vec<Recorded> {
    got.iter()
        .filter(|r| r.path == path && (200..300).contains(&r.status))
        .cloned()
        .collect()
}

/// The CloudEvents ids per subject (account), in the order received.
fn ids_by_account(events: &[Value]) -> BTreeMap<String, Vec<String>> {
    let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in events {
        by.entry(e["subject"].as_str().unwrap().to_owned())
            .or_default()
            .push(e["id"].as_str().unwrap().to_owned());
    }
    by
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

async fn charges_and_refunds_reach_both_sinks_in_order_and_shape(store: StoreKind) {
    let receiver = Receiver::start().await;
    let (_dir, token) = token_file();
    let h = Harness::start_with(store, |c| with_sinks(c, &receiver, &token, 2)).await;

    // alice: three units from her 5h window, the fourth bought with 5 credits; dave: one.
    let mut alice = Vec::new();
    for _ in 0..4 {
        alice.push(task(&h, "sk-alice").await);
    }
    let dave = task(&h, "sk-dave").await;
    let refund = h
        .admin(
            Method::POST,
            &format!("/admin/v1/decisions/{}/refund", alice[3]),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(refund.status(), 200);

    receiver
        .wait_until(
            "6 CloudEvents and 5 Stripe events + 1 cancellation",
            |got| {
                cloudevents(got).len() == 6
                    && stripe(got, "/v1/billing/meter_events").len() == 5
                    && stripe(got, "/v1/billing/meter_event_adjustments").len() == 1
            },
        )
        .await;
    let got = receiver.requests();

    // CloudEvents: structured batches, at most 2 per request, in each account's order.
    for r in got.iter().filter(|r| r.path == "/api/v1/events") {
        assert_eq!(
            r.header("content-type"),
            "application/cloudevents-batch+json"
        );
        assert_eq!(r.header("authorization"), format!("Bearer {TOKEN}"));
        assert!(
            r.json().as_array().unwrap().len() <= 2,
            "batch_size bounds a request"
        );
    }
    let events = cloudevents(&got);
    let by = ids_by_account(&events);
    let mut expected_alice = alice.clone();
    expected_alice.push(format!("{}-refund", alice[3]));
    assert_eq!(
        by["alice"], expected_alice,
        "alice's events in commit order"
    );
    assert_eq!(by["dave"], vec![dave.clone()]);
    for e in &events {
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["source"], "flowgate");
        assert_eq!(e["datacontenttype"], "application/json");
        assert!(
            chrono::DateTime::parse_from_rfc3339(e["time"].as_str().unwrap()).is_ok(),
            "time is RFC 3339: {e}"
        );
        assert_eq!(e["data"]["feature"], "task");
        assert_eq!(e["data"]["units"], 1);
    }
    let charge = |id: &str| events.iter().find(|e| e["id"] == id).unwrap().clone();
    assert_eq!(charge(&alice[0])["type"], "flowgate.charge");
    assert_eq!(charge(&alice[0])["data"]["credits"], 0, "the window paid");
    assert_eq!(charge(&alice[3])["data"]["credits"], 5, "credits paid");
    assert_eq!(charge(&alice[3])["data"]["plan"], "pro");
    assert_eq!(charge(&alice[3])["data"]["price_version"], "test-1");
    let refunded = charge(&format!("{}-refund", alice[3]));
    assert_eq!(refunded["type"], "flowgate.refund");
    assert_eq!(refunded["data"]["decision_id"], alice[3].as_str());

    // Stripe: form-encoded meter events, one a request, with a stable identifier.
    let meter = stripe(&got, "/v1/billing/meter_events");
    let identifiers: Vec<String> = meter.iter().map(|r| r.field("identifier")).collect();
    let mut expected: Vec<String> = alice.clone();
    expected.push(dave.clone());
    assert_eq!(
        identifiers, expected,
        "one meter event per charge, in order"
    );
    for r in &meter {
        assert_eq!(
            r.header("content-type"),
            "application/x-www-form-urlencoded"
        );
        assert_eq!(r.header("authorization"), format!("Bearer {TOKEN}"));
        assert_eq!(
            r.header("idempotency-key"),
            format!("flowgate-charge-{}", r.field("identifier"))
        );
        assert_eq!(r.field("event_name"), "flowgate_task");
        assert!(r.field("timestamp").parse::<i64>().unwrap() > 1_600_000_000);
    }
    assert_eq!(
        meter[0].field("payload[stripe_customer_id]"),
        "cus_alice",
        "mapped"
    );
    assert_eq!(
        meter[4].field("payload[stripe_customer_id]"),
        "dave",
        "the template"
    );
    assert_eq!(meter[0].field("payload[value]"), "0");
    assert_eq!(meter[3].field("payload[value]"), "5", "the credits charged");
    let cancel = &stripe(&got, "/v1/billing/meter_event_adjustments")[0];
    assert_eq!(cancel.field("type"), "cancel");
    assert_eq!(cancel.field("cancel[identifier]"), alice[3]);
    assert_eq!(cancel.field("event_name"), "flowgate_task");
    assert_eq!(
        cancel.header("idempotency-key"),
        format!("flowgate-refund-{}", alice[3])
    );
    let last_charge = got
        .iter()
        .position(|r| r.path == "/v1/billing/meter_events" && r.field("identifier") == alice[3])
        .unwrap();
    let cancelled = got
        .iter()
        .position(|r| r.path == "/v1/billing/meter_event_adjustments")
        .unwrap();
    assert!(
        last_charge < cancelled,
        "the cancellation follows its charge"
    );

    // The backlog drains to zero; sent counts every event once.
    for _ in 0..100 {
        let m = metrics(&h).await;
        if m.contains("flowgate_export_backlog{sink=\"meter\"} 0")
            && m.contains("flowgate_export_backlog{sink=\"stripe\"} 0")
        {
            assert!(
                m.contains("flowgate_export_sent_total{sink=\"meter\"} 6"),
                "{m}"
            );
            assert!(
                m.contains("flowgate_export_sent_total{sink=\"stripe\"} 6"),
                "{m}"
            );
            assert!(
                m.contains("flowgate_export_lag_seconds{sink=\"meter\"} 0"),
                "{m}"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("backlog did not drain: {}", metrics(&h).await);
}

async fn receiver_outage_and_gateway_restart_lose_nothing_and_send_nothing_twice(store: StoreKind) {
    let mut receiver = Receiver::start().await;
    let (_dir, token) = token_file();
    let mut h = Harness::start_with(store, |c| with_sinks(c, &receiver, &token, 2)).await;

    // The receiver fails its first 4 requests with 500s, then goes down.
    receiver.fail_next(4, 500);
    let mut charged = Vec::new();
    for key in ["sk-alice", "sk-dave", "sk-alice"] {
        charged.push((key, task(&h, key).await));
    }
    receiver
        .wait_until("4 failed requests", |got| {
            got.iter().filter(|r| r.status == 500).count() == 4
        })
        .await;
    receiver.stop().await;
    for key in ["sk-dave", "sk-alice"] {
        charged.push((key, task(&h, key).await));
    }
    // The backlog is visible while the receiver is away.
    let mut seen = false;
    for _ in 0..100 {
        let m = metrics(&h).await;
        if m.lines()
            .any(|l| l.starts_with("flowgate_export_backlog{sink=\"meter\"}") && !l.ends_with(" 0"))
            && m.lines().any(|l| {
                l.starts_with("flowgate_export_failed_total{")
                    && l.contains("reason=\"connect\"")
                    && l.contains("sink=\"meter\"")
            })
        {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        seen,
        "backlog and failures are metrics: {}",
        metrics(&h).await
    );

    // The gateway restarts while the receiver is down; then the receiver comes back.
    h.restart().await;
    charged.push(("sk-dave", task(&h, "sk-dave").await));
    receiver.restart().await;

    let n = charged.len();
    receiver
        .wait_until("every charge on both sinks", |got| {
            cloudevents(got).len() >= n && stripe(got, "/v1/billing/meter_events").len() >= n
        })
        .await;
    // Give a double send the chance to show.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = receiver.requests();
    let events = cloudevents(&got);
    let ids: Vec<String> = events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        ids.len(),
        "no CloudEvent accepted twice: {ids:?}"
    );
    assert_eq!(ids.len(), n, "every charge exported");
    let stripe_ids: Vec<String> = stripe(&got, "/v1/billing/meter_events")
        .iter()
        .map(|r| r.field("identifier"))
        .collect();
    assert_eq!(
        stripe_ids.iter().collect::<HashSet<_>>().len(),
        n,
        "no Stripe event accepted twice: {stripe_ids:?}"
    );
    assert_eq!(stripe_ids.len(), n);
    // Each account's events in the order they were charged, on both sinks.
    let by = ids_by_account(&events);
    for account in ["alice", "dave"] {
        let expected: Vec<String> = charged
            .iter()
            .filter(|(k, _)| k.ends_with(account))
            .map(|(_, id)| id.clone())
            .collect();
        assert_eq!(by[account], expected, "{account}'s CloudEvents in order");
        let stripe_order: Vec<String> = stripe_ids
            .iter()
            .filter(|id| expected.contains(id))
            .cloned()
            .collect();
        assert_eq!(stripe_order, expected, "{account}'s Stripe events in order");
    }
}

/// Two gateways on one PostgreSQL database, both with the sinks: each event is sent once (one
/// sender per sink holds the lease), in each account's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_postgres_database_send_each_event_once() {
    let receiver = Receiver::start().await;
    let (_dir, token) = token_file();
    let h = Harness::start_with(StoreKind::Postgres, |c| with_sinks(c, &receiver, &token, 3)).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let second = Gateway::start(
        Settings::parse(&h.config).unwrap(),
        listener,
        h.clock.clone(),
    )
    .await
    .expect("second gateway starts");
    let second_base = format!("http://{}", second.addr());

    let mut charged: Vec<(&str, String)> = Vec::new();
    for i in 0..10 {
        let key = if i % 3 == 0 { "sk-dave" } else { "sk-alice" };
        if key == "sk-dave" && i > 3 {
            // dave's window (3 in 5h) and credits (12) run out: keep him at 3.
            continue;
        }
        let base = if i % 2 == 0 { &h.base } else { &second_base };
        let r = h
            .http
            .post(format!("{base}/v1/tasks"))
            .bearer_auth(key)
            .header("x-units", 1)
            .json(&serde_json::json!({"prompt": "test"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let id = header(&r, "x-flowgate-decision-id");
        r.text().await.unwrap();
        // Each committed before the next is sent: the order per account is known.
        h.settle_ledger().await;
        for _ in 0..500 {
            if second.app().ledger.depth() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        charged.push((key, id));
    }
    let n = charged.len();
    receiver
        .wait_until("every charge on both sinks", |got| {
            cloudevents(got).len() >= n && stripe(got, "/v1/billing/meter_events").len() >= n
        })
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = receiver.requests();
    let events = cloudevents(&got);
    let ids: HashSet<String> = events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(events.len(), n, "each event sent once: {events:#?}");
    assert_eq!(ids.len(), n);
    assert_eq!(stripe(&got, "/v1/billing/meter_events").len(), n);
    let by = ids_by_account(&events);
    for account in ["alice", "dave"] {
        let expected: Vec<String> = charged
            .iter()
            .filter(|(k, _)| k.ends_with(account))
            .map(|(_, id)| id.clone())
            .collect();
        assert_eq!(by[account], expected, "{account}'s events in commit order");
    }
    second.shutdown().await;
}

/// A sink's token comes from the environment or a file and is never in the config; a missing
/// one stops the start with an error naming the sink and the variable, not the token.
#[tokio::test]
async fn a_missing_token_is_a_clear_start_error_and_bad_sinks_are_config_errors() {
    let bad = |extra: &str| {
        let config = format!(
            "{}\n[[export]]\nname = \"m\"\n{extra}\n",
            common::CONFIG
                .replace("__STORE__", "sqlite://unused.db")
                .replace("__BACKEND__", "http://127.0.0.1:9")
        );
        Settings::parse(&config)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let e = bad("kind = \"kafka\"\nurl = \"http://x\"");
    assert!(e.contains("export[0].kind"), "{e}");
    let e = bad("kind = \"stripe\"\nurl = \"http://x\"");
    assert!(e.contains("export[0].event_name"), "{e}");
    let e = bad("kind = \"cloudevents\"\nurl = \"https://api.example.com/api/v1/events\"");
    assert!(e.contains("export[0].url") && e.contains("TLS"), "{e}");
    let e = bad("kind = \"cloudevents\"\nurl = \"http://x\"\nbatch_size = 0");
    assert!(e.contains("export[0].batch_size"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}\n[[export]]\nname = \"m\"\nkind = \"cloudevents\"\nurl = \"http://127.0.0.1:9/e\"\ntoken_env = \"FLOWGATE_TEST_EXPORT_TOKEN_THAT_IS_NOT_SET\"\n",
        common::CONFIG
            .replace(
                "__STORE__",
                &format!("sqlite://{}", dir.path().join("l.db").display())
            )
            .replace("__BACKEND__", "http://127.0.0.1:9")
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let Err(e) = Gateway::start(
        Settings::parse(&config).unwrap(),
        listener,
        flowgate::clock::Clock::System,
    )
    .await
    else {
        panic!("a gateway without its sink's token must not start");
    };
    let e = e.to_string();
    assert!(
        e.contains("export[m]") && e.contains("FLOWGATE_TEST_EXPORT_TOKEN_THAT_IS_NOT_SET"),
        "{e}"
    );
}
