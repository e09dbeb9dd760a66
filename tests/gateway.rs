//! Black-box tests of the gateway: a real backend and a real gateway on loopback ports, a real
//! ledger store. Each test runs once per store.

mod common;

use std::time::Duration;
// Waits for real processes and servers: tokio's clock (clippy.toml keeps std's out).
use tokio::time::Instant;

use common::{Harness, StoreKind, has_header, header};
use futures_util::StreamExt;
use serde_json::Value;

store_tests!(
    a_forwarding_route_runs_and_charges_every_repeat,
    a_default_estimate_settles_from_json_or_a_stream,
    split_from_usage_limit_into_credits,
    usage_limit_denial_says_when_and_why,
    credit_denial_is_402_and_not_retryable,
    credit_denial_can_be_openai_insufficient_quota,
    identity_failures_are_401_and_403,
    invalid_cost_names_the_field_and_charges_nothing,
    streaming_passes_through_event_by_event,
    upstream_error_charges_nothing,
    upstream_timeout_is_504_and_releases_the_hold,
    idempotency_key_replayed_charges_once,
    idempotency_key_sent_twice_at_once_charges_once,
    client_disconnect_mid_stream_leaves_no_hold,
    restart_keeps_balances_and_windows,
    metrics_count_decisions_and_the_ledger,
    settle_below_the_estimate_gives_back_the_last_pools,
    settle_above_the_estimate_from_the_last_event_charges_more,
    settle_above_what_the_account_has_is_forgiven_not_denied,
    a_missing_settle_value_charges_the_estimate,
    expired_grants_are_never_drawn_and_are_written_off,
    a_refund_goes_back_to_exactly_the_pools_that_paid,
    a_calendar_window_resets_at_the_next_local_midnight,
    a_strict_calendar_window_leases_the_new_day_at_local_midnight,
);

async fn split_from_usage_limit_into_credits(store: StoreKind) {
    let h = Harness::start(store).await;
    let r = h.task("sk-alice", 2).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-flowgate-pools"), "limits=2");
    assert_eq!(header(&r, "x-ratelimit-remaining-5h"), "1");
    assert_eq!(header(&r, "x-ratelimit-limit-5h"), "3");
    assert_eq!(header(&r, "x-ratelimit-remaining-week"), "8");
    assert_eq!(header(&r, "x-credits-remaining"), "100");
    assert!(!header(&r, "x-flowgate-decision-id").is_empty());
    r.text().await.unwrap();

    // 5 units: the last unit of the 5-hour window, then 4 units × 5 credits.
    let r = h.task("sk-alice", 5).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-flowgate-pools"), "limits=1,credits=4");
    assert_eq!(header(&r, "x-ratelimit-remaining-5h"), "0");
    assert_eq!(header(&r, "x-credits-remaining"), "80");
    let reset = header(&r, "x-ratelimit-reset-5h");
    assert!(
        reset.starts_with("4h59m") || reset.starts_with("5h0m"),
        "reset {reset}"
    );
    r.text().await.unwrap();

    assert_eq!(h.stored_balance("alice").await, 80);
    let events = h.store().await.usage_events("alice", 10).await.unwrap();
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|e| e.charged && e.outcome == "completed"));
    assert_eq!(events[0].credits, 20);
    let counts = h.store().await.counts().await.unwrap();
    assert_eq!(counts.monetization_events, 2);
}

async fn usage_limit_denial_says_when_and_why(store: StoreKind) {
    let h = Harness::start(store).await;
    for _ in 0..2 {
        assert_eq!(h.task("sk-carol", 1).await.status(), 200);
    }
    let r = h.task("sk-carol", 1).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = header(&r, "retry-after")
        .parse()
        .expect("Retry-After in seconds");
    assert!(
        (4 * 3600..=5 * 3600).contains(&retry),
        "retry after {retry}"
    );
    assert_eq!(header(&r, "x-ratelimit-remaining-5h"), "0");
    assert!(
        !has_header(&r, "x-should-retry"),
        "waiting helps: no x-should-retry: false"
    );
    assert!(!header(&r, "x-flowgate-decision-id").is_empty());
    let body: Value = r.json().await.unwrap();
    let e = &body["error"];
    assert_eq!(e["type"], "usage_limit_reached");
    assert_eq!(e["code"], "usage_limit_reached");
    assert!(e["message"].as_str().unwrap().contains("retry after"));
    assert!(e["reset_at"].is_string());
    let limits = &e["layers"][0];
    assert_eq!(limits["layer"], "limits");
    assert_eq!(limits["available_units"], 0);
    assert_eq!(limits["windows"][0]["name"], "5h");
    assert_eq!(limits["windows"][0]["used"], 2);
    assert_eq!(limits["windows"][0]["remaining"], 0);

    h.settle_ledger().await;
    let events = h.store().await.usage_events("carol", 10).await.unwrap();
    assert_eq!(events[0].outcome, "denied");
    assert_eq!(events[0].code.as_deref(), Some("usage_limit_reached"));
    assert!(!events[0].charged);
}

async fn credit_denial_is_402_and_not_retryable(store: StoreKind) {
    let h = Harness::start(store).await;
    // dave: 3 units of window + 12 credits (2 units at 5): 6 units is one too many.
    let r = h.task("sk-dave", 6).await;
    assert_eq!(r.status(), 402);
    assert_eq!(header(&r, "x-should-retry"), "false");
    assert_eq!(header(&r, "x-credits-remaining"), "12");
    let body: Value = r.json().await.unwrap();
    let e = &body["error"];
    assert_eq!(e["type"], "insufficient_credits");
    assert_eq!(e["credits_needed"], 5);
    assert_eq!(e["credits_available"], 12);
    let layers = e["layers"].as_array().unwrap();
    assert_eq!(layers[0]["available_units"], 3);
    assert_eq!(layers[1]["layer"], "credits");
    assert_eq!(layers[1]["available_credits"], 12);
    // Nothing was held: the same account can still spend all it has.
    let r = h.task("sk-dave", 5).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-flowgate-pools"), "limits=3,credits=2");
    assert_eq!(header(&r, "x-credits-remaining"), "2");
}

async fn credit_denial_can_be_openai_insufficient_quota(store: StoreKind) {
    let h = Harness::start_with(store, |c| {
        c.replace("\"payment_required\"", "\"insufficient_quota\"")
    })
    .await;
    let r = h.task("sk-dave", 6).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-should-retry"), "false");
    assert!(!has_header(&r, "retry-after"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "insufficient_quota");
    assert_eq!(body["error"]["code"], "insufficient_quota");
}

async fn identity_failures_are_401_and_403(store: StoreKind) {
    let h = Harness::start(store).await;
    let r = h.task("sk-nobody", 1).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_api_key"
    );
    let r = h
        .http
        .post(format!("{}/v1/tasks", h.base))
        .header("x-units", 1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "missing_api_key"
    );
    let r = h.task("sk-bob", 1).await;
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "account_suspended"
    );
    // carol's plan does not include video.
    let r = h
        .post("/v1/videos", "sk-carol")
        .json(&serde_json::json!({"seconds": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "not_entitled"
    );
    assert_eq!(
        h.backend
            .counters()
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

async fn invalid_cost_names_the_field_and_charges_nothing(store: StoreKind) {
    let h = Harness::start(store).await;
    let r = h.post("/v1/tasks", "sk-alice").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let e = r.json::<Value>().await.unwrap()["error"].clone();
    assert_eq!(e["code"], "invalid_cost");
    assert_eq!(e["field"], "header:x-units");
    let r = h
        .post("/v1/videos", "sk-alice")
        .json(&serde_json::json!({"seconds": "ten"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["field"],
        "/seconds"
    );
    let r = h.post("/v1/nowhere", "sk-alice").send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(h.stored_balance("alice").await, 100);
    assert_eq!(
        h.backend
            .counters()
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

async fn streaming_passes_through_event_by_event(store: StoreKind) {
    let h = Harness::start(store).await;
    let started = Instant::now();
    let r = h
        .post("/v1/videos", "sk-alice")
        .header("x-mock-interval-ms", "300")
        .json(&serde_json::json!({"seconds": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "text/event-stream");
    let mut stream = r.bytes_stream();
    let first = stream.next().await.expect("an event").unwrap();
    let first_at = started.elapsed();
    assert!(String::from_utf8_lossy(&first).contains("rendered_seconds\":1"));
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let total = started.elapsed();
    assert!(String::from_utf8_lossy(&rest).contains("event: done"));
    // The first event arrived long before the stream ended: nothing was buffered.
    assert!(total >= Duration::from_millis(850), "total {total:?}");
    assert!(
        first_at < total - Duration::from_millis(500),
        "first event at {first_at:?}, end at {total:?}"
    );
    // Charged once the stream completed: 3 s × 2 credits.
    assert_eq!(h.stored_balance("alice").await, 94);
}

async fn upstream_error_charges_nothing(store: StoreKind) {
    let h = Harness::start(store).await;
    let r = h
        .post("/v1/tasks", "sk-alice")
        .header("x-units", 5)
        .header("x-mock-status", "500")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    r.text().await.unwrap();
    // The hold (3 units of window + 10 credits) went back.
    let r = h.task("sk-alice", 1).await;
    assert_eq!(header(&r, "x-ratelimit-remaining-5h"), "2");
    assert_eq!(header(&r, "x-credits-remaining"), "100");
    r.text().await.unwrap();
    assert_eq!(h.stored_balance("alice").await, 100);
    let events = h.store().await.usage_events("alice", 10).await.unwrap();
    let failed = events
        .iter()
        .find(|e| e.outcome == "upstream_error")
        .expect("failure recorded");
    assert_eq!(failed.upstream_status, Some(500));
    assert!(!failed.charged);
}

async fn upstream_timeout_is_504_and_releases_the_hold(store: StoreKind) {
    let h = Harness::start(store).await;
    let r = h
        .post("/v1/tasks", "sk-alice")
        .header("x-units", 4)
        .header("x-mock-delay-ms", "3000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "upstream_timeout"
    );
    assert_eq!(h.cached_credits("alice", "task"), 100);
    let r = h.task("sk-alice", 1).await;
    assert_eq!(header(&r, "x-ratelimit-remaining-5h"), "2");
    r.text().await.unwrap();
    h.settle_ledger().await;
    let events = h.store().await.usage_events("alice", 10).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.outcome == "upstream_timeout" && !e.charged)
    );
}

/// Requests the mock upstream has received.
fn h_calls(h: &Harness) -> u64 {
    h.backend
        .counters()
        .requests
        .load(std::sync::atomic::Ordering::Relaxed)
}

async fn idempotency_key_replayed_charges_once(store: StoreKind) {
    let mut h = Harness::start(store).await;
    let send = |h: &Harness| {
        h.post("/v1/tasks", "sk-alice")
            .header("x-units", 4)
            .header("idempotency-key", "retry-1")
            .send()
    };
    let first = send(&h).await.unwrap();
    assert_eq!(first.status(), 200);
    let first_id = header(&first, "x-flowgate-decision-id");
    let first_type = header(&first, "content-type");
    let first_body = first.text().await.unwrap();
    assert!(!first_body.is_empty());
    let calls = h_calls(&h);

    // The repeat is answered with the kept response: same status and body, no upstream work.
    let second = send(&h).await.unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(header(&second, "x-flowgate-replay-of"), first_id);
    assert_eq!(header(&second, "idempotent-replayed"), "true");
    assert_eq!(header(&second, "content-type"), first_type);
    assert_eq!(second.text().await.unwrap(), first_body);
    assert_eq!(
        h_calls(&h),
        calls,
        "a replay must not make the upstream work again"
    );
    assert_eq!(h.stored_balance("alice").await, 95);

    // The same key for a different request: 422, nothing forwarded, nothing charged.
    let other = h
        .post("/v1/tasks", "sk-alice")
        .header("x-units", 4)
        .header("idempotency-key", "retry-1")
        .body("another body")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 422);
    assert_eq!(header(&other, "x-should-retry"), "false");
    let e = other.json::<Value>().await.unwrap();
    assert_eq!(e["error"]["code"], "idempotency_key_reused");
    assert_eq!(e["error"]["original_decision_id"], first_id.as_str());
    assert_eq!(h_calls(&h), calls);
    h.settle_ledger().await;
    assert_eq!(h.stored_balance("alice").await, 95);

    // After a restart the in-memory registry is empty: the store's unique key still holds.
    h.restart().await;
    let third = send(&h).await.unwrap();
    assert_eq!(third.status(), 200);
    third.text().await.unwrap();
    h.settle_ledger().await;
    assert_eq!(h.stored_balance("alice").await, 95);
    assert_eq!(
        h.cached_credits("alice", "task"),
        95,
        "the duplicate's hold was given back"
    );
    let events = h.store().await.usage_events("alice", 10).await.unwrap();
    assert_eq!(events.iter().filter(|e| e.charged).count(), 1);
    assert!(events.iter().any(|e| e.outcome == "duplicate"));
}

/// A route configured with `idempotency = "forward"` runs and charges every request; the key
/// only travels to the upstream.
async fn a_forwarding_route_runs_and_charges_every_repeat(store: StoreKind) {
    let h = Harness::start_with(store, |c| {
        c.replacen(
            "cost = { header = \"x-units\" }",
            "cost = { header = \"x-units\" }\nidempotency = \"forward\"",
            1,
        )
    })
    .await;
    let calls = h_calls(&h);
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let r = h
            .post("/v1/tasks", "sk-alice")
            .header("x-units", 4)
            .header("idempotency-key", "run-it-again")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(!has_header(&r, "idempotent-replayed"));
        bodies.push(r.text().await.unwrap());
    }
    assert_eq!(h_calls(&h), calls + 2, "the upstream ran both");
    assert_ne!(bodies[0], bodies[1]);
    h.settle_ledger().await;
    // Both charged: 3 units from the window and 1 × 5 credits, then 4 × 5 credits.
    assert_eq!(h.stored_balance("alice").await, 75);
    let events = h.store().await.usage_events("alice", 10).await.unwrap();
    assert_eq!(events.iter().filter(|e| e.charged).count(), 2);
}

/// A request that does not state its cost is held at the route's default; `settle = { body =
/// … }` reads the true cost from a JSON body or from an event stream, whichever comes back.
async fn a_default_estimate_settles_from_json_or_a_stream(store: StoreKind) {
    let h = Harness::start_with(store, |c| {
        c.replacen(
            "cost = { header = \"x-units\" }",
            "cost = { header = \"x-units\" }\ncost_default = 3\nsettle = { body = \"/usage/units\" }",
            1,
        )
        .replacen(
            "cost = { json = \"/seconds\" }",
            "cost = { json = \"/seconds\" }\ncost_default = 4\nsettle = { body = \"/usage/seconds\" }",
            1,
        )
    })
    .await;
    // A render with no length asked for: held at 4 seconds, settled at the 6 its stream reports.
    let r = h
        .post("/v1/videos", "sk-alice")
        .header("x-mock-usage", 6)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("\"seconds\":6"));
    h.settle_ledger().await;
    assert_eq!(h.stored_balance("alice").await, 100 - 6 * 2);
    // A task with no x-units: held at 3 (the whole 5h window), settled at the JSON body's 2.
    let r = h
        .post("/v1/tasks", "sk-alice")
        .header("x-mock-usage", 2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-ratelimit-remaining-5h"),
        "0",
        "held at the default"
    );
    r.text().await.unwrap();
    h.settle_ledger().await;
    let r = h.task("sk-alice", 1).await;
    assert_eq!(
        header(&r, "x-flowgate-pools"),
        "limits=1",
        "one unit came back"
    );
    r.text().await.unwrap();
    // A stated but wrong cost is still refused.
    let r = h
        .post("/v1/tasks", "sk-alice")
        .header("x-units", "lots")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

async fn idempotency_key_sent_twice_at_once_charges_once(store: StoreKind) {
    let h = Harness::start(store).await;
    let send = || {
        h.post("/v1/tasks", "sk-alice")
            .header("x-units", 4)
            .header("idempotency-key", "same-moment")
            .header("x-mock-delay-ms", "200")
            .send()
    };
    let (a, b) = tokio::join!(send(), send());
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut statuses = [a.status().as_u16(), b.status().as_u16()];
    statuses.sort();
    assert_eq!(
        statuses,
        [200, 409],
        "one runs, the other is told the key is in use"
    );
    let conflict = if a.status() == 409 { a } else { b };
    assert_eq!(header(&conflict, "retry-after"), "1");
    assert_eq!(
        conflict.json::<Value>().await.unwrap()["error"]["code"],
        "idempotency_key_in_use"
    );
    assert_eq!(h.stored_balance("alice").await, 95);
    let charged = h
        .store()
        .await
        .usage_events("alice", 10)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.charged)
        .count();
    assert_eq!(charged, 1);
}

async fn client_disconnect_mid_stream_leaves_no_hold(store: StoreKind) {
    let h = Harness::start(store).await;
    let r = h
        .post("/v1/videos", "sk-alice")
        .header("x-mock-interval-ms", "200")
        .json(&serde_json::json!({"seconds": 20}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&r, "x-credits-remaining"),
        "60",
        "40 credits held while streaming"
    );
    let mut stream = r.bytes_stream();
    stream.next().await.expect("first event").unwrap();
    drop(stream);
    // The gateway notices on its next write and drops the body: the hold is released.
    for _ in 0..100 {
        if h.cached_credits("alice", "video_second") == 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.cached_credits("alice", "video_second"), 100);
    assert_eq!(h.stored_balance("alice").await, 100);
    let events = h.store().await.usage_events("alice", 10).await.unwrap();
    assert_eq!(events[0].outcome, "client_aborted");
    assert!(!events[0].charged);
}

async fn restart_keeps_balances_and_windows(store: StoreKind) {
    let mut h = Harness::start(store).await;
    let r = h.task("sk-alice", 5).await; // 3 from the window, 2 × 5 credits
    assert_eq!(header(&r, "x-credits-remaining"), "90");
    r.text().await.unwrap();
    h.restart().await;
    assert_eq!(h.cached_credits("alice", "task"), 90);
    let r = h.task("sk-alice", 1).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-flowgate-pools"),
        "credits=1",
        "the window is still used up"
    );
    // Units paid by credits do not count against the included limits.
    assert_eq!(header(&r, "x-ratelimit-remaining-week"), "7");
    assert_eq!(header(&r, "x-credits-remaining"), "85");
    r.text().await.unwrap();
    // Grants from the config are given once, not again on restart.
    h.restart().await;
    assert_eq!(h.stored_balance("alice").await, 85);
}

/// The value of the sample `name` (with its labels exactly as exported) in a scrape.
/// The value of the sample `name` (with its labels) in a scrape; a missing sample fails the
/// test, so that an assertion on a metric cannot pass because the metric is gone.
fn sample(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in the scrape:\n{scrape}"))
}

async fn metrics_count_decisions_and_the_ledger(store: StoreKind) {
    let h = Harness::start(store).await;
    for units in [2, 3] {
        let r = h.task("sk-alice", units).await; // 3 from the 5h window, 2 × 5 credits
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
    }
    let r = h.task("sk-carol", 2).await; // lite: 2 per 5h, no credits
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    let r = h.task("sk-carol", 1).await;
    assert_eq!(r.status(), 429);
    h.settle_ledger().await;
    let scrape = h
        .http
        .get(format!("{}/metrics", h.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let admitted = r#"flowgate_decisions_total{feature="task",outcome="admitted"}"#;
    assert_eq!(sample(&scrape, admitted), 3.0, "{scrape}");
    let denied = r#"flowgate_decisions_total{feature="task",outcome="usage_limit_reached"}"#;
    assert_eq!(sample(&scrape, denied), 1.0, "{scrape}");
    let credits = r#"flowgate_credits_consumed_total{pool="credits"}"#;
    assert_eq!(sample(&scrape, credits), 10.0, "{scrape}");
    assert!(sample(&scrape, "flowgate_ledger_commit_duration_seconds_count") >= 1.0);
    assert_eq!(sample(&scrape, "flowgate_ledger_queue_depth"), 0.0);
    assert!(scrape.contains("flowgate_decision_duration_seconds_bucket"));
    assert!(scrape.contains("flowgate_upstream_duration_seconds_bucket"));
    assert!(scrape.contains("flowgate_ledger_lag_seconds_bucket"));
}

/// The test config with settlement on both routes: tasks from a header, videos from the last
/// SSE event.
async fn settling(store: StoreKind) -> Harness {
    Harness::start_with(store, |c| {
        c.replace(
            "cost = { header = \"x-units\" }",
            "cost = { header = \"x-units\" }\nsettle = { header = \"x-usage-units\" }",
        )
        .replace(
            "cost = { json = \"/seconds\" }",
            "cost = { json = \"/seconds\" }\nsettle = { sse = \"/usage/seconds\" }",
        )
    })
    .await
}

async fn settle_below_the_estimate_gives_back_the_last_pools(store: StoreKind) {
    let h = settling(store).await;
    // Estimate 5: 3 from the 5h window, 2 × 5 credits. The task used 4: one credit-paid unit
    // goes back to the grant; the window keeps its 3.
    let r = h
        .post("/v1/tasks", "sk-alice")
        .header("x-units", 5)
        .header("x-mock-usage", 4)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-credits-remaining"),
        "90",
        "the hold is the estimate"
    );
    r.text().await.unwrap();
    assert_eq!(h.stored_balance("alice").await, 95);
    assert_eq!(h.cached_credits("alice", "task"), 95);
    let events = h.store().await.usage_events("alice", 1).await.unwrap();
    assert_eq!((events[0].units, events[0].credits), (4, 5));
    let r = h.task("sk-alice", 1).await;
    assert_eq!(
        header(&r, "x-flowgate-pools"),
        "credits=1",
        "the window stays used"
    );
}

async fn settle_above_the_estimate_from_the_last_event_charges_more(store: StoreKind) {
    let h = settling(store).await;
    // Videos are not in the limits layer: 2 credits a second from the grant. Estimated 2
    // seconds, rendered 5: the stream's last event says so.
    let r = h
        .post("/v1/videos", "sk-alice")
        .header("x-mock-usage", 5)
        .json(&serde_json::json!({"seconds": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert!(body.contains("\"seconds\":5"), "{body}");
    assert_eq!(h.stored_balance("alice").await, 90);
    let events = h.store().await.usage_events("alice", 1).await.unwrap();
    assert_eq!((events[0].units, events[0].credits), (5, 10));
}

async fn settle_above_what_the_account_has_is_forgiven_not_denied(store: StoreKind) {
    let h = settling(store).await;
    // Dave has 12 credits: 6 seconds. Estimated 2, rendered 10: 6 are paid, 4 forgiven.
    let r = h
        .post("/v1/videos", "sk-dave")
        .header("x-mock-usage", 10)
        .json(&serde_json::json!({"seconds": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    assert_eq!(h.stored_balance("dave").await, 0);
    assert_eq!(h.cached_credits("dave", "video_second"), 0);
    let events = h.store().await.usage_events("dave", 1).await.unwrap();
    assert_eq!((events[0].units, events[0].credits), (10, 12));
}

async fn a_missing_settle_value_charges_the_estimate(store: StoreKind) {
    let h = settling(store).await;
    let r = h.task("sk-alice", 5).await; // no x-mock-usage: no x-usage-units in the answer
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    assert_eq!(h.stored_balance("alice").await, 90);
    let events = h.store().await.usage_events("alice", 1).await.unwrap();
    assert_eq!(events[0].code.as_deref(), Some("settle_missing"));
    assert_eq!(events[0].credits, 10);
}

/// The stored balance of alice's grant `id`.
async fn balance_of(h: &Harness, id: &str) -> u64 {
    let grants = h.store().await.grants("alice").await.unwrap();
    grants.iter().find(|g| g.external_id == id).unwrap().balance
}

async fn expired_grants_are_never_drawn_and_are_written_off(store: StoreKind) {
    // Alice also has a promotion that expires 1.5 s from now, spent before her purchase (earliest
    // expiry first), and an old grant that expired long ago. Expiry runs at start-up, then hourly.
    // The gateway's clock is manual: the test moves it past the expiry instead of sleeping.
    let clock = flowgate::clock::Clock::manual(flowgate::clock::now_ms());
    let soon = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(clock.now_ms() + 1500)
        .expect("a valid instant");
    let grants = format!(
        r#"[[accounts.grants]]
id = "promo"
kind = "credits"
amount = 30
expires_at = "{}"

[[accounts.grants]]
id = "old"
kind = "credits"
amount = 50
expires_at = "2020-01-01T00:00:00Z"

[[accounts]]
id = "bob""#,
        soon.to_rfc3339()
    );
    let h = Harness::start_with_clock(store, clock.clone(), |c| {
        c.replacen("[[accounts]]\nid = \"bob\"", &grants, 1)
            .replace(
                "ledger_flush_interval_ms = 1",
                "ledger_flush_interval_ms = 1\nexpiry_interval_ms = 3600000",
            )
    })
    .await;
    // The old grant is written off at start-up (by the writer, soon after); it never counted.
    let deadline = Instant::now() + Duration::from_secs(5);
    while balance_of(&h, "old").await != 0 {
        assert!(
            Instant::now() < deadline,
            "the old grant was not written off"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.cached_credits("alice", "task"), 130);
    let r = h.task("sk-alice", 4).await; // 3 from the window, 1 × 5 credits from the promo
    assert_eq!(header(&r, "x-credits-remaining"), "125");
    r.text().await.unwrap();
    h.settle_ledger().await;
    assert_eq!(balance_of(&h, "promo").await, 25);

    // Past its expiry, before the job runs again: the store still shows 25, the engine draws
    // nothing from it.
    clock.advance_ms(1600);
    assert_eq!(h.cached_credits("alice", "task"), 100);
    let r = h.task("sk-alice", 1).await;
    assert_eq!(header(&r, "x-credits-remaining"), "95");
    r.text().await.unwrap();
    h.settle_ledger().await;
    assert_eq!(balance_of(&h, "promo").await, 25);
    assert_eq!(balance_of(&h, "purchase-1").await, 95);

    // The write-off at the next start: 25 expired, with its balance update.
    let mut h = h;
    h.restart().await;
    let h = &h;
    let deadline = Instant::now() + Duration::from_secs(5);
    while balance_of(h, "promo").await != 0 {
        assert!(
            Instant::now() < deadline,
            "the promotion was not written off"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.stored_balance("alice").await, 95);
}

async fn a_refund_goes_back_to_exactly_the_pools_that_paid(store: StoreKind) {
    use flowgate::store::Refund;
    let mut h = Harness::start(store).await;
    let r = h.task("sk-alice", 5).await; // 3 from the 5h window, 2 × 5 credits
    let decision = header(&r, "x-flowgate-decision-id");
    r.text().await.unwrap();
    assert_eq!(h.stored_balance("alice").await, 90);

    let store = h.store().await;
    let now = flowgate::clock::now_ms();
    let refund = store.refund(&decision, now).await.unwrap();
    let Refund::Refunded {
        account,
        draws,
        balances,
        credits,
    } = &refund
    else {
        panic!("not refunded: {refund:?}");
    };
    assert_eq!((account.as_str(), *credits), ("alice", 10));
    h.gateway()
        .app()
        .accounts
        .refunded(account, draws, balances);
    assert_eq!(
        store.refund(&decision, now).await.unwrap(),
        Refund::AlreadyRefunded
    );
    assert_eq!(
        store.refund("no-such-decision", now).await.unwrap(),
        Refund::NotCharged
    );

    // Credits back in the grant, units back in the window: the next 3 units are included.
    assert_eq!(h.stored_balance("alice").await, 100);
    let r = h.task("sk-alice", 1).await;
    assert_eq!(header(&r, "x-ratelimit-remaining-5h"), "2");
    assert_eq!(header(&r, "x-credits-remaining"), "100");
    r.text().await.unwrap();
    // A restart does not count the refunded charge against the window again.
    h.restart().await;
    let r = h.task("sk-alice", 1).await;
    assert_eq!(header(&r, "x-ratelimit-remaining-5h"), "1");
    r.text().await.unwrap();
    h.settle_ledger().await;
    let settings = flowgate::config::Settings::parse(&h.config).unwrap();
    let report = h.store().await.reconcile(0, &settings).await.unwrap();
    assert_eq!(report.differences, vec![]);
}

async fn a_calendar_window_resets_at_the_next_local_midnight(store: StoreKind) {
    // Carol's plan counts 2 tasks per New York day. The gateway's clock is manual: 2026-11-24
    // 03:00 UTC is 22:00 on the 23rd in New York (EST, UTC−5), two hours before its midnight.
    let evening = chrono::DateTime::parse_from_rfc3339("2026-11-24T03:00:00Z")
        .expect("an instant")
        .timestamp_millis();
    let clock = flowgate::clock::Clock::manual(evening);
    let h = Harness::start_with_clock(store, clock.clone(), |c| {
        c.replacen(
            r#"windows = [{ name = "5h", duration = "5h", limit = 2 }]"#,
            r#"windows = [{ name = "day", reset = "daily", limit = 2, time_zone = "America/New_York" }]"#,
            1,
        )
    })
    .await;
    let r = h.task("sk-carol", 1).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit-day"), "2");
    assert_eq!(header(&r, "x-ratelimit-remaining-day"), "1");
    assert_eq!(header(&r, "x-ratelimit-reset-day"), "2h0m0s");
    r.text().await.unwrap();
    clock.advance_ms(30 * 60_000); // 22:30
    assert_eq!(h.task("sk-carol", 1).await.status(), 200);

    let r = h.task("sk-carol", 1).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "retry-after"), "5400");
    assert_eq!(header(&r, "x-ratelimit-remaining-day"), "0");
    assert_eq!(header(&r, "x-ratelimit-reset-day"), "1h30m0s");
    let body: Value = r.json().await.unwrap();
    let e = &body["error"];
    assert_eq!(e["type"], "usage_limit_reached");
    assert_eq!(e["reset_at"], "2026-11-24T05:00:00Z");
    let day = &e["layers"][0]["windows"][0];
    assert_eq!(day["name"], "day");
    assert_eq!(day["reset"], "daily");
    assert_eq!(day["time_zone"], "America/New_York");
    assert_eq!(day["used"], 2);
    assert_eq!(day["reset_at"], "2026-11-24T05:00:00Z");

    // The user API shows the same window.
    let me: Value = h
        .http
        .get(format!("{}/v1/me/usage", h.base))
        .bearer_auth("sk-carol")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let w = &me["layers"][0]["windows"][0];
    assert_eq!(w["reset"], "daily");
    assert_eq!(w["time_zone"], "America/New_York");
    assert_eq!(w["minutes"], 24 * 60);
    assert_eq!(
        (w["used"].as_u64(), w["remaining"].as_u64()),
        (Some(2), Some(0))
    );
    assert_eq!(w["reset_at"], "2026-11-24T05:00:00Z");

    // A minute before midnight: still used up. At midnight: a new day, with its own reset.
    clock.advance_ms(89 * 60_000);
    assert_eq!(h.task("sk-carol", 1).await.status(), 429);
    clock.advance_ms(60_000);
    let r = h.task("sk-carol", 1).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-remaining-day"), "1");
    assert_eq!(header(&r, "x-ratelimit-reset-day"), "24h0m0s");
    r.text().await.unwrap();

    // A restart rebuilds the day from the ledger: only today's task counts.
    h.settle_ledger().await;
    let mut h = h;
    h.restart().await;
    let r = h.task("sk-carol", 1).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-remaining-day"), "0");
    r.text().await.unwrap();
}

async fn a_strict_calendar_window_leases_the_new_day_at_local_midnight(store: StoreKind) {
    // The same day in strict mode: on PostgreSQL the replica leases the window's room from the
    // store, which counts the committed usage since New York's midnight (on SQLite, strict
    // changes nothing).
    let late = chrono::DateTime::parse_from_rfc3339("2026-11-24T04:59:00Z")
        .expect("an instant")
        .timestamp_millis();
    let clock = flowgate::clock::Clock::manual(late);
    let h = Harness::start_with_clock(store, clock.clone(), |c| {
        c.replacen(
            "[plans.lite]\nprice_version = \"test-1\"",
            "[plans.lite]\nprice_version = \"test-1\"\nstrict = true",
            1,
        )
        .replacen(
            r#"windows = [{ name = "5h", duration = "5h", limit = 2 }]"#,
            r#"windows = [{ name = "day", reset = "daily", limit = 2, time_zone = "America/New_York" }]"#,
            1,
        )
    })
    .await;
    for _ in 0..2 {
        let r = h.task("sk-carol", 1).await;
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
    }
    h.settle_ledger().await;
    let r = h.task("sk-carol", 1).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "retry-after"), "60");
    // Midnight in New York: yesterday's committed usage no longer counts at the store.
    clock.advance_ms(60_000);
    for left in ["1", "0"] {
        let r = h.task("sk-carol", 1).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-remaining-day"), left);
        r.text().await.unwrap();
    }
    assert_eq!(h.task("sk-carol", 1).await.status(), 429);
    h.settle_ledger().await;
    if let Some(db) = h.pg() {
        let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
        let counted: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT at_ms, units FROM usage_counters WHERE account_id = 'carol' ORDER BY at_ms",
        )
        .fetch_all(&pool)
        .await
        .expect("counters");
        assert_eq!(counted, vec![(late, 2), (late + 60_000, 2)]);
        pool.close().await;
    }
}
