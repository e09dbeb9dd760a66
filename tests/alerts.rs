//! Threshold alerts, black-box: a real gateway and store (each test on both), requests through
//! the proxy, and a real webhook receiver on loopback (`common::receiver`): which alerts arrive,
//! once each across restarts, signed so that the secret verifies them, and retried until a
//! failing webhook takes them.

mod common;

use std::time::Duration;

use common::receiver::{Receiver, Recorded};
use common::{Harness, StoreKind};
use flowgate::clock::Clock;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

store_tests!(
    window_80_then_100_and_low_balance_fire_once_each_across_restarts,
    a_failing_webhook_is_retried_and_delivered_later,
);

const SECRET: &str = "whsec-test-only-3f9a0c7e1b";
const DAY_MS: i64 = 86_400_000;

/// The test config plus erin (a 10-a-day window, then 20 credits at 5 a unit) and three rules
/// posting to `receiver`.
fn with_alerts(config: String, receiver: &Receiver, secret: &std::path::Path) -> String {
    format!(
        r#"{config}
[plans.metered]
price_version = "test-1"
prices = {{ task = 5 }}

[[plans.metered.layers]]
kind = "usage_limit"
name = "daily"
windows = [{{ name = "day", duration = "24h", limit = 10 }}]

[[plans.metered.layers]]
kind = "credits"

[[accounts]]
id = "erin"
plan = "metered"
api_keys = ["sk-erin"]

[[accounts.grants]]
id = "g1"
kind = "credits"
amount = 20

[alerts]
webhook = "{}/hooks/flowgate"
secret_file = "{}"

[[alerts.rules]]
name = "day-80"
kind = "window_percent"
layer = "daily"
window = "day"
percent = 80

[[alerts.rules]]
name = "day-100"
kind = "window_percent"
layer = "daily"
window = "day"
percent = 100

[[alerts.rules]]
name = "low-credits"
kind = "balance_below"
credits = 12
period = "monthly"
"#,
        receiver.url(),
        secret.display()
    )
}

fn secret_file() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    std::fs::write(&path, format!("{SECRET}\n")).unwrap();
    (dir, path)
}

/// Noon (UTC) today: every step of a test stays inside one day's and one month's period.
fn noon() -> i64 {
    let now = flowgate::clock::now_ms();
    now.div_euclid(DAY_MS) * DAY_MS + DAY_MS / 2
}

async fn task(h: &Harness, units: u64) {
    let r = h.task("sk-erin", units).await;
    assert_eq!(r.status(), 200, "erin's task is admitted");
    r.text().await.unwrap();
    h.settle_ledger().await;
}

/// Checks the signature the way a receiver would, with the hmac crate directly: `t=..,v1=..`
/// over `"<t>.<body>"`.
fn signed_with_secret(r: &Recorded) -> bool {
    let header = r.header("flowgate-signature");
    let (t, v1) = header.split_once(',').expect("t=..,v1=..");
    let t = t.strip_prefix("t=").expect("t=");
    let v1 = v1.strip_prefix("v1=").expect("v1=");
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&r.body);
    mac.verify_slice(&hex::decode(v1).unwrap()).is_ok()
}

fn rules(got: &[Recorded]) -> Vec<String> {
    got.iter()
        .filter(|r| (200..300).contains(&r.status))
        .map(|r| r.json()["rule"].as_str().unwrap().to_owned())
        .collect()
}

async fn window_80_then_100_and_low_balance_fire_once_each_across_restarts(store: StoreKind) {
    let receiver = Receiver::start().await;
    let (_dir, secret) = secret_file();
    let mut h = Harness::start_with_clock(store, Clock::manual(noon()), |c| {
        with_alerts(c, &receiver, &secret)
    })
    .await;

    task(&h, 8).await; // 8 of 10: 80 %
    receiver
        .wait_until("the 80 % alert", |got| rules(got) == ["day-80"])
        .await;
    h.restart().await;
    task(&h, 1).await; // 9 of 10: still 80 %, same period
    h.restart().await;
    task(&h, 1).await; // 10 of 10: 100 %
    receiver
        .wait_until("the 100 % alert", |got| rules(got) == ["day-80", "day-100"])
        .await;
    task(&h, 1).await; // credits: 20 → 15
    task(&h, 1).await; // 15 → 10, below 12
    receiver
        .wait_until("the low-balance alert", |got| rules(got).len() == 3)
        .await;
    h.restart().await;
    task(&h, 1).await; // 10 → 5: still below, same month
    // Give a second sending the chance to show.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let got = receiver.requests();
    assert_eq!(
        rules(&got),
        ["day-80", "day-100", "low-credits"],
        "each alert once, in the order crossed: {got:#?}"
    );
    assert_eq!(got.len(), 3, "nothing sent twice");
    for r in &got {
        assert_eq!(r.path, "/hooks/flowgate");
        assert_eq!(r.header("content-type"), "application/json");
        assert!(signed_with_secret(r), "the signature verifies: {r:?}");
        let now_s = h.clock.now_ms() / 1000;
        assert!(flowgate::alerts::verify(
            SECRET.as_bytes(),
            &r.header("flowgate-signature"),
            &r.body,
            now_s,
            300
        ));
        let mut tampered = r.body.to_vec();
        tampered[1] ^= 1;
        assert!(
            !flowgate::alerts::verify(
                SECRET.as_bytes(),
                &r.header("flowgate-signature"),
                &tampered,
                now_s,
                300
            ),
            "a changed body does not verify"
        );
        assert!(
            !flowgate::alerts::verify(
                b"another-secret-of-16+",
                &r.header("flowgate-signature"),
                &r.body,
                now_s,
                300
            ),
            "another secret does not verify"
        );
        assert!(
            !flowgate::alerts::verify(
                SECRET.as_bytes(),
                &r.header("flowgate-signature"),
                &r.body,
                now_s + 301,
                300
            ),
            "an old signature is refused"
        );
        assert_eq!(r.json()["account"], "erin");
    }
    let b: Vec<Value> = got.iter().map(Recorded::json).collect();
    assert_eq!(b[0]["type"], "flowgate.alert.window_percent");
    assert_eq!(b[0]["window_percent"]["used"], 8);
    assert_eq!(b[0]["window_percent"]["limit"], 10);
    assert_eq!(b[0]["window_percent"]["percent"], 80);
    assert_eq!(b[1]["window_percent"]["used"], 10);
    assert_eq!(b[2]["type"], "flowgate.alert.balance_below");
    assert_eq!(b[2]["balance_below"]["credits"], 10);
    assert_eq!(b[2]["balance_below"]["below"], 12);
    let ids: std::collections::HashSet<&str> =
        b.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 3, "each alert has its own id");
}

/// Moves the gateway's (manual) clock on, a second every 50 ms, until `done`: a retry is due
/// after its backoff on that clock.
async fn advance_until(h: &Harness, receiver: &Receiver, done: impl Fn(&[Recorded]) -> bool) {
    for _ in 0..200 {
        if done(&receiver.requests()) {
            return;
        }
        h.clock.advance_ms(1_000);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("did not happen: {:#?}", receiver.requests());
}

async fn a_failing_webhook_is_retried_and_delivered_later(store: StoreKind) {
    let receiver = Receiver::start().await;
    let (_dir, secret) = secret_file();
    let mut h = Harness::start_with_clock(store, Clock::manual(noon()), |c| {
        with_alerts(c, &receiver, &secret)
    })
    .await;
    receiver.fail_next(3, 500);
    task(&h, 8).await;
    advance_until(&h, &receiver, |got| {
        got.iter().filter(|r| r.status == 500).count() >= 2
    })
    .await;
    // Restarted mid-retry: the retry schedule is in the store.
    h.restart().await;
    advance_until(&h, &receiver, |got| !rules(got).is_empty()).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let got = receiver.requests();
    assert_eq!(rules(&got), ["day-80"], "delivered once: {got:#?}");
    assert_eq!(got.len(), 4, "three failures, then the delivery");
    let id = got[0].json()["id"].clone();
    for r in &got {
        assert_eq!(r.json()["id"], id, "the same alert each time");
        assert!(signed_with_secret(r), "each attempt is signed");
    }
    assert_eq!(got[3].status, 200);
    let m = h
        .http
        .get(format!("{}/metrics", h.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("flowgate_alerts_sent_total 1"), "{m}");
}

/// Two gateways on one PostgreSQL database: usage committed by both crosses 80 % (neither saw
/// it alone), and the alert fires once, sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_postgres_database_fire_an_alert_once() {
    let receiver = Receiver::start().await;
    let (_dir, secret) = secret_file();
    let h = Harness::start_with_clock(StoreKind::Postgres, Clock::manual(noon()), |c| {
        with_alerts(c, &receiver, &secret)
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let second = flowgate::gateway::Gateway::start(
        flowgate::config::Settings::parse(&h.config).unwrap(),
        listener,
        h.clock.clone(),
    )
    .await
    .expect("second gateway starts");
    task(&h, 4).await; // 40 % on the first
    let r = h
        .http
        .post(format!("http://{}/v1/tasks", second.addr()))
        .bearer_auth("sk-erin")
        .header("x-units", 4)
        .json(&serde_json::json!({"prompt": "test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    receiver
        .wait_until("the 80 % alert", |got| rules(got) == ["day-80"])
        .await;
    assert_eq!(
        receiver.requests()[0].json()["window_percent"]["used"],
        8,
        "evaluated on both gateways' committed usage"
    );
    task(&h, 1).await; // 9: no new alert, on either gateway
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(receiver.requests().len(), 1, "{:#?}", receiver.requests());
    second.shutdown().await;
}

/// A rule that names no plan's window, a missing secret or a bad threshold is a config error
/// naming the key; a secret that cannot be read stops the start, without echoing a secret.
#[tokio::test]
async fn bad_alert_settings_are_clear_errors() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-secret");
    let base = with_alerts(
        common::CONFIG
            .replace(
                "__STORE__",
                &format!("sqlite://{}", dir.path().join("l.db").display()),
            )
            .replace("__BACKEND__", "http://127.0.0.1:9"),
        &receiver,
        &missing,
    );
    let err = |from: &str, to: &str| {
        assert!(base.contains(from), "{from}");
        flowgate::config::Settings::parse(&base.replacen(from, to, 1))
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let e = err("window = \"day\"", "window = \"week\"");
    assert!(e.contains("alerts.rules[0].window"), "{e}");
    let e = err("percent = 80", "percent = 0");
    assert!(e.contains("alerts.rules[0].percent"), "{e}");
    let e = err("period = \"monthly\"", "period = \"hourly\"");
    assert!(e.contains("alerts.rules[2].period"), "{e}");
    let e = err(&format!("secret_file = \"{}\"", missing.display()), "");
    assert!(e.contains("alerts.secret_env"), "{e}");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let Err(e) = flowgate::gateway::Gateway::start(
        flowgate::config::Settings::parse(&base).unwrap(),
        listener,
        Clock::System,
    )
    .await
    else {
        panic!("a gateway without its alerts' secret must not start");
    };
    let e = e.to_string();
    assert!(
        e.contains("secret_file") && e.contains("no-such-secret"),
        "{e}"
    );
}
