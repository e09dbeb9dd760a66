//! `flowgate demo`: the waterfall at work, in one command.
//!
//! Starts the [`backend::MockBackend`], a gateway on a SQLite file in a temporary folder (with
//! `config/demo.toml`), and walks one user through usage limits → free tier → credits →
//! promotions → denials, printing what happened to each request; then stops the gateway (which
//! flushes the ledger) and prints the balances and ledger counts read back from the file.

pub mod backend;
pub mod openai;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::clock::Clock;
use crate::config::Settings;
use crate::gateway::Gateway;
use crate::store::Store;

/// The demo's configuration, with `__DB__` and `__BACKEND__` to fill in.
pub const CONFIG: &str = include_str!("../../config/demo.toml");
const API_KEY: &str = "sk-demo-newcomer";

type DemoClient = Client<HttpConnector, Full<Bytes>>;

/// Runs the demo, printing to stdout.
pub async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("flowgate-demo.db");
    let backend = backend::MockBackend::start().await?;
    let text = CONFIG
        .replace("__DB__", &db.display().to_string())
        .replace("__BACKEND__", &backend.url());
    let settings = Settings::parse(&text)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gateway = Gateway::start(settings.clone(), listener, Clock::System).await?;
    let base = format!("http://{}", gateway.addr());
    let client: DemoClient = Client::builder(TokioExecutor::new()).build(HttpConnector::new());

    println!("flowgate demo");
    println!("  backend (tasks + streaming video) at {}", backend.url());
    println!("  gateway at {base}, ledger in {}", db.display());
    println!(
        "  account \"newcomer\", plan \"starter\": 3 tasks per 5h (20 per week) included, 5 free video seconds a month,"
    );
    println!(
        "  20 purchased credits, a 10-credit video promotion; a task costs 5 credits, a video second 2.\n"
    );

    let task = r#"{"prompt":"fix the failing test"}"#;
    let steps: [(&str, &str, &str, Option<&str>, &str); 10] = [
        (
            "/v1/tasks",
            task,
            "a task, inside the 5-hour limit",
            None,
            "",
        ),
        ("/v1/tasks", task, "another", None, ""),
        (
            "/v1/tasks",
            task,
            "the last one the limit includes",
            None,
            "",
        ),
        (
            "/v1/tasks",
            task,
            "limit used up: credits pay, the request is not interrupted",
            Some("task-42"),
            "",
        ),
        (
            "/v1/tasks",
            task,
            "the same Idempotency-Key again (a client retry): not charged twice",
            Some("task-42"),
            "",
        ),
        (
            "/v1/videos",
            r#"{"seconds":4}"#,
            "4 s of video, streamed: the free tier pays",
            None,
            "stream",
        ),
        (
            "/v1/videos",
            r#"{"seconds":6}"#,
            "6 s: the last free second, then credits (a split)",
            None,
            "stream",
        ),
        (
            "/v1/tasks",
            task,
            "a task paid with the last credits",
            None,
            "",
        ),
        (
            "/v1/tasks",
            task,
            "no limit, no credits: denied, retry after the window resets",
            None,
            "",
        ),
        (
            "/v1/videos",
            r#"{"seconds":8}"#,
            "8 s: the promotion covers 5, denied: waiting will not help",
            None,
            "",
        ),
    ];
    for (n, (path, body, what, key, mode)) in steps.iter().enumerate() {
        println!("{:>2}. POST {path} {body}  — {what}", n + 1);
        request(&client, &base, path, body, *key, *mode == "stream", None).await?;
    }
    println!(
        "11. POST /v1/videos {{\"seconds\":5}}  — the video promotion pays; the render comes out at 3 s, so 2 s go back to it"
    );
    request(
        &client,
        &base,
        "/v1/videos",
        r#"{"seconds":5}"#,
        None,
        true,
        Some(3),
    )
    .await?;

    gateway.shutdown().await;
    let store = Store::open(&format!("sqlite://{}", db.display())).await?;
    println!("\nFinal balances (read back from the ledger):");
    for g in store.grants("newcomer").await? {
        println!(
            "  {:<20} {:<10} {:>3} of {:>3} credits left",
            g.external_id,
            g.kind.as_str(),
            g.balance,
            g.amount
        );
    }
    let counts = store.counts().await?;
    println!(
        "Ledger: {} usage events (every request), {} monetization events (every charge), {} balance updates (every balance change).",
        counts.usage_events, counts.monetization_events, counts.balance_updates
    );
    let report = store.reconcile(0, &settings).await?;
    println!(
        "Reconcile (every charge re-derived from its usage and price, every balance from its updates): {} differences.",
        report.differences.len()
    );
    Ok(())
}

async fn request(
    client: &DemoClient,
    base: &str,
    path: &str,
    body: &str,
    key: Option<&str>,
    stream: bool,
    rendered: Option<u64>,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut req = http::Request::post(format!("{base}{path}"))
        .header("authorization", format!("Bearer {API_KEY}"))
        .header("content-type", "application/json");
    if let Some(seconds) = rendered {
        req = req.header("x-mock-usage", seconds);
    }
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    let started = crate::clock::Stopwatch::start();
    let response = client
        .request(req.body(Full::new(Bytes::from(body.to_owned())))?)
        .await?;
    let status = response.status();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let (pools, credits, remaining, replay) = (
        header("x-flowgate-pools"),
        header("x-credits-remaining"),
        header("x-ratelimit-remaining-5h"),
        header("x-flowgate-replay-of"),
    );
    let retry = header("retry-after");
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if stream && status.is_success() {
                for event in String::from_utf8_lossy(&data)
                    .lines()
                    .filter(|l| l.starts_with("data:"))
                {
                    println!("      {:>4} ms  {event}", started.elapsed().as_millis());
                }
            }
            text.extend_from_slice(&data);
        }
    }
    if status.is_success() {
        let replay = if replay == "-" {
            String::new()
        } else {
            format!(", replay of {replay}: not charged")
        };
        println!(
            "    → {status}  paid by: {pools}  | tasks left in 5h: {remaining}, spendable credits: {credits}{replay}"
        );
    } else {
        let message = serde_json::from_slice::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_default();
        println!("    → {status}  Retry-After: {retry}\n      \"{message}\"");
    }
    Ok(())
}
