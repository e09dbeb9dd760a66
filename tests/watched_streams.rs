//! Streams watched while they flow (a route's `watch`): the hold grows with the progress the
//! upstream reports, other requests of the account see it at once, and a stream the account
//! cannot pay for is stopped cleanly (`on_exhausted = "stop"`: an error event, then the end,
//! charged what was delivered) or let finish (`"finish"`: the rest forgiven). Against a real
//! streaming upstream on loopback that reports its usage in every event, on both stores.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Notify;

use common::{Harness, StoreKind};

/// A render service: `{"seconds": n, "pause_after": k}` streams one chat-chunk-shaped event
/// per second rendered, each with the usage so far (`usage.seconds`), then `[DONE]`; after
/// event `k` it waits until the test calls `resume`.
struct Renderer {
    url: String,
    resume: Arc<Notify>,
    /// A stream's receiver went away before its last event: the gateway cut it off.
    cut: Arc<AtomicBool>,
}

impl Renderer {
    async fn start() -> Renderer {
        let resume = Arc::new(Notify::new());
        let cut = Arc::new(AtomicBool::new(false));
        let state = (resume.clone(), cut.clone());
        let app = Router::new()
            .route("/v1/render", post(render))
            .route("/v1/render-on", post(render))
            .route("/v1/chat/completions", post(render))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Renderer { url, resume, cut }
    }
}

async fn render(
    axum::extract::State((resume, cut)): axum::extract::State<(Arc<Notify>, Arc<AtomicBool>)>,
    axum::Json(req): axum::Json<Value>,
) -> axum::response::Response {
    let seconds = req["seconds"].as_u64().unwrap_or(1);
    let pause_after = req["pause_after"].as_u64();
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
    tokio::spawn(async move {
        for i in 1..=seconds {
            let event = json!({
                "id": "render-1", "object": "chat.completion.chunk", "created": 0,
                "model": "render-1",
                "choices": [{ "index": 0, "delta": { "content": format!("frame {i} ") } }],
                "usage": { "seconds": i },
            });
            if tx.send(format!("data: {event}\n\n").into()).await.is_err() {
                cut.store(true, Ordering::SeqCst);
                return;
            }
            if pause_after == Some(i) {
                resume.notified().await;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let _ = tx.send("data: [DONE]\n\n".into()).await;
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    axum::response::Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(body))
        .expect("response")
}

/// The test config with the render routes (dave has 12 credits; a rendered second costs 1).
fn config(renderer: &str) -> impl FnOnce(String) -> String {
    let extra = format!(
        r#"
[upstreams.render]
url = "{renderer}"

[[routes]]
method = "POST"
path = "/v1/render"
feature = "render_second"
upstream = "render"
cost = {{ json = "/estimate" }}
watch = {{ sse = "/usage/seconds", on_exhausted = "stop" }}

[[routes]]
method = "POST"
path = "/v1/render-on"
feature = "render_second"
upstream = "render"
cost = {{ json = "/estimate" }}
watch = {{ sse = "/usage/seconds" }}

[[routes]]
method = "POST"
path = "/v1/chat/completions"
feature = "render_second"
upstream = "render"
cost = {{ json = "/estimate" }}
watch = {{ sse = "/usage/seconds", on_exhausted = "stop" }}
"#
    );
    move |c: String| {
        c.replace(
            "prices = { task = 5, video_second = 2 }",
            "prices = { task = 5, video_second = 2, render_second = 1 }",
        ) + &extra
    }
}

async fn start(kind: StoreKind) -> (Harness, Renderer) {
    let renderer = Renderer::start().await;
    let h = Harness::start_with(kind, config(&renderer.url)).await;
    (h, renderer)
}

async fn render_request(h: &Harness, path: &str, body: Value) -> reqwest::Response {
    h.post(path, "sk-dave")
        .json(&body)
        .send()
        .await
        .expect("request reaches the gateway")
}

/// The `data:` payloads of an event stream's text.
fn events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// The frames (`usage.seconds`) the events delivered.
fn frames(events: &[String]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| v["usage"]["seconds"].as_u64())
        .collect()
}

/// The one charge in the ledger: (units, credits, estimated, forgiven).
async fn only_charge(h: &Harness) -> (i64, i64, i64, i64) {
    h.settle_ledger().await;
    let store = h.store().await;
    let report = store
        .reconcile(0, &h.gateway().app().settings)
        .await
        .expect("reconcile");
    let snapshot = store.snapshot(0).await.expect("snapshot");
    assert!(report.differences.is_empty(), "{:?}", report.differences);
    let [m] = &snapshot.monetization[..] else {
        panic!("one charge expected: {:?}", snapshot.monetization);
    };
    (m.units, m.credits, m.estimated_units, m.forgiven_units)
}

fn watched(h: &Harness, ending: &str) -> bool {
    h.gateway().app().metrics.render().contains(&format!(
        "flowgate_watched_streams_total{{ending=\"{ending}\"}} 1"
    ))
}

async fn a_stream_the_account_cannot_pay_for_is_stopped_and_charged_what_it_delivered(
    kind: StoreKind,
) {
    let (h, renderer) = start(kind).await;
    let r = render_request(&h, "/v1/render", json!({ "estimate": 2, "seconds": 20 })).await;
    assert_eq!(r.status(), 200);
    let events = events(&r.text().await.expect("the stream ends cleanly"));
    assert_eq!(frames(&events), (1..=12).collect::<Vec<_>>(), "{events:?}");
    let last: Value = serde_json::from_str(events.last().expect("events")).expect("json");
    assert_eq!(last["error"]["code"], "stream_stopped", "{last}");
    assert_eq!(last["error"]["type"], "insufficient_credits", "{last}");
    assert_eq!(last["error"]["units_delivered"], 12, "{last}");
    assert!(
        !events.iter().any(|e| e == "[DONE]"),
        "a stopped stream is not done"
    );
    assert_eq!(only_charge(&h).await, (12, 12, 2, 0));
    assert_eq!(h.stored_balance("dave").await, 0);
    for _ in 0..200 {
        if renderer.cut.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        renderer.cut.load(Ordering::SeqCst),
        "the upstream's stream was closed"
    );
    assert!(watched(&h, "stopped"));
}

async fn finish_lets_the_stream_run_and_forgives_what_nobody_could_pay(kind: StoreKind) {
    let (h, _renderer) = start(kind).await;
    let r = render_request(&h, "/v1/render-on", json!({ "estimate": 2, "seconds": 20 })).await;
    assert_eq!(r.status(), 200);
    let events = events(&r.text().await.expect("stream"));
    assert_eq!(frames(&events), (1..=20).collect::<Vec<_>>());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let (units, credits, estimated, forgiven) = only_charge(&h).await;
    assert_eq!((credits, estimated, forgiven), (12, 2, 8), "units {units}");
    assert_eq!(
        units + forgiven,
        20,
        "every second delivered is either paid or forgiven"
    );
    assert_eq!(h.stored_balance("dave").await, 0);
    assert!(watched(&h, "forgiven"));
}

async fn other_requests_see_the_growing_hold_at_once(kind: StoreKind) {
    let (h, renderer) = start(kind).await;
    let r = render_request(
        &h,
        "/v1/render",
        json!({ "estimate": 2, "seconds": 20, "pause_after": 8 }),
    )
    .await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut text = String::new();
    while !text.contains("\"seconds\":8}") {
        let chunk = body.next().await.expect("more").expect("bytes");
        text.push_str(std::str::from_utf8(&chunk).expect("utf-8"));
    }
    // Eight seconds delivered: eight credits held, not the estimate's two.
    assert_eq!(h.cached_credits("dave", "render_second"), 4);
    let denied = render_request(&h, "/v1/render", json!({ "estimate": 5, "seconds": 1 })).await;
    assert_eq!(denied.status(), 402, "only 4 credits are left");
    let other = render_request(&h, "/v1/render", json!({ "estimate": 4, "seconds": 4 })).await;
    assert_eq!(other.status(), 200);
    assert_eq!(
        frames(&events(&other.text().await.expect("stream"))),
        [1, 2, 3, 4]
    );
    renderer.resume.notify_one();
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.expect("bytes")).expect("utf-8"));
    }
    let events = events(&text);
    assert_eq!(
        frames(&events),
        (1..=8).collect::<Vec<_>>(),
        "nothing left for a ninth"
    );
    assert!(events.last().is_some_and(|e| e.contains("stream_stopped")));
    h.settle_ledger().await;
    let snapshot = h.store().await.snapshot(0).await.expect("snapshot");
    let mut charged: Vec<(i64, i64)> = snapshot
        .monetization
        .iter()
        .map(|m| (m.units, m.credits))
        .collect();
    charged.sort();
    assert_eq!(charged, [(4, 4), (8, 8)]);
    assert_eq!(h.stored_balance("dave").await, 0);
}

/// The official OpenAI SDK reads the stop event as an error (`openai.APIError`) after the
/// chunks that were paid for.
async fn the_openai_sdk_raises_a_stopped_stream_as_an_error(kind: StoreKind) {
    let python = common::openai::python();
    let (h, _renderer) = start(kind).await;
    let script = r#"
import json, sys
import openai
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="sk-dave", max_retries=0)
chunks = 0
try:
    stream = client.chat.completions.create(
        model="render-1", messages=[{"role": "user", "content": "go"}], stream=True,
        extra_body={"estimate": 2, "seconds": 20})
    for chunk in stream:
        chunks += 1
    print(json.dumps({"chunks": chunks, "error": None}))
except openai.APIError as e:
    print(json.dumps({"chunks": chunks, "error": e.message, "body": e.body}))
"#;
    let base = h.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .args(["-c", script, &base])
            .output()
            .expect("run python")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.trim()).expect("its JSON");
    assert_eq!(seen["chunks"], 12, "{seen}");
    assert!(
        seen["error"]
            .as_str()
            .is_some_and(|m| m.contains("stream was stopped after 12 units")),
        "{seen}"
    );
    assert_eq!(seen["body"]["code"], "stream_stopped", "{seen}");
    assert_eq!(only_charge(&h).await, (12, 12, 2, 0));
}

store_tests!(
    a_stream_the_account_cannot_pay_for_is_stopped_and_charged_what_it_delivered,
    finish_lets_the_stream_run_and_forgives_what_nobody_could_pay,
    other_requests_see_the_growing_hold_at_once,
    the_openai_sdk_raises_a_stopped_stream_as_an_error,
);
