//! Prices for a real AI API, through `config/examples/openai.toml` in front of the mock
//! OpenAI-compatible upstream: chat completions and embeddings charged per model and per token
//! dimension, plain and streamed; price versions in force from their dates; reconciliation
//! checking every charge against the version it was made under, after the config has moved on.

mod common;

use std::time::Duration;

use common::StoreKind;
use flowgate::clock::Clock;
use flowgate::config::Settings;
use flowgate::gateway::Gateway;
use flowgate::store::{MonetizationRow, Store};
use serde_json::{Value, json};

/// The example gateway and a client for it.
struct OpenAiGateway {
    g: common::openai::OpenAiGateway,
    http: reqwest::Client,
}

async fn start(kind: StoreKind, clock: Clock) -> OpenAiGateway {
    OpenAiGateway {
        g: common::openai::start(kind, clock, "").await,
        http: reqwest::Client::new(),
    }
}

impl OpenAiGateway {
    async fn post(&self, path: &str, body: Value, cached: u64) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.g.base))
            .bearer_auth("sk-demo")
            .header("x-mock-cached-tokens", cached)
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    /// Waits for the ledger, then reads its charges, oldest first.
    async fn charges(&self) -> Vec<MonetizationRow> {
        let app = self.g.gateway.app();
        for _ in 0..500 {
            if app.ledger.depth() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.store()
            .await
            .snapshot(0)
            .await
            .expect("snapshot")
            .monetization
    }

    async fn store(&self) -> Store {
        Store::open(&self.g.store_url).await.expect("store")
    }
}

fn chat(model: &str, words: usize, max: Option<u64>, stream: bool) -> Value {
    let content: Vec<String> = (0..words).map(|i| format!("word{i}")).collect();
    let mut body = json!({
        "model": model,
        "messages": [{ "role": "user", "content": content.join(" ") }],
    });
    if let Some(max) = max {
        body["max_completion_tokens"] = json!(max);
    }
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({ "include_usage": true });
    }
    body
}

fn quantities(m: &MonetizationRow) -> Value {
    serde_json::from_str(m.dimensions.as_deref().expect("dimensions recorded")).expect("json")
}

/// ⌈Σ tokens × rate ÷ 1 000 000⌉, the example's pricing, worked out here independently.
fn credits(tokens_and_rates: &[(u64, u64)]) -> i64 {
    let sum: u64 = tokens_and_rates.iter().map(|(t, r)| t * r).sum();
    sum.div_ceil(1_000_000) as i64
}

async fn chat_is_charged_per_model_and_dimension_plain_and_streamed(kind: StoreKind) {
    let g = start(kind, Clock::System).await;
    // Plain, gpt-4o: 5 prompt tokens of which 2 cached, 10 completion tokens.
    let r = g
        .post(
            "/v1/chat/completions",
            chat("gpt-4o", 5, Some(10), false),
            2,
        )
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["usage"]["completion_tokens"], 10);
    // Streamed, gpt-4o-mini: 4 prompt tokens, 12 completion tokens (the mock's default).
    let r = g
        .post(
            "/v1/chat/completions",
            chat("gpt-4o-mini", 4, None, true),
            0,
        )
        .await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/event-stream")
    );
    let text = r.text().await.expect("stream");
    assert!(text.contains("\"usage\""), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    // Embeddings: 3 tokens.
    let r = g
        .post(
            "/v1/embeddings",
            json!({ "model": "text-embedding-3-small", "input": "a b c" }),
            0,
        )
        .await;
    assert_eq!(r.status(), 200);
    // A model the plan does not price: refused before the upstream, naming the field.
    let r = g
        .post(
            "/v1/chat/completions",
            chat("o9-preview", 3, None, false),
            0,
        )
        .await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["field"], "/model", "{e}");

    let charges = g.charges().await;
    assert_eq!(charges.len(), 3, "{charges:?}");
    let expected = [
        credits(&[(3, 2_500_000), (2, 1_250_000), (10, 10_000_000)]),
        credits(&[(4, 150_000), (12, 600_000)]),
        credits(&[(3, 20_000)]),
    ];
    assert_eq!(expected, [110, 8, 1]);
    for (m, want) in charges.iter().zip(expected) {
        assert_eq!(m.units + m.forgiven_units, want, "{m:?}");
        assert_eq!(m.credits_per_unit, 1);
        assert_eq!(m.price_version, "2026-12-openai-1");
    }
    assert_eq!(charges[0].model.as_deref(), Some("gpt-4o"));
    assert_eq!(
        quantities(&charges[0]),
        json!({ "input_tokens": 3, "cached_input_tokens": 2, "output_tokens": 10 })
    );
    assert_eq!(
        quantities(&charges[1]),
        json!({ "input_tokens": 4, "cached_input_tokens": 0, "output_tokens": 12 })
    );
    assert_eq!(quantities(&charges[2]), json!({ "input_tokens": 3 }));
    // The included window paid: nothing came out of the credits.
    assert!(charges.iter().all(|m| m.credits == 0));
    let settings = Settings::parse(&g.g.config).expect("config");
    let report = g
        .store()
        .await
        .reconcile(0, &settings)
        .await
        .expect("reconcile");
    assert!(report.differences.is_empty(), "{:?}", report.differences);
    assert_eq!(report.unknown_price_versions, 0);
    g.g.gateway.shutdown().await;
}

async fn a_price_change_applies_from_its_date_and_every_charge_keeps_its_version(kind: StoreKind) {
    let feb = flowgate::config::parse_instant("2027-02-01T00:00:00Z").expect("instant");
    let clock = Clock::manual(feb - 60_000);
    let g = start(kind, clock.clone()).await;
    let ask = || chat("gpt-4o", 2, Some(100), false);
    assert_eq!(g.post("/v1/chat/completions", ask(), 0).await.status(), 200);
    clock.advance_ms(120_000); // now February: the second version is in force
    assert_eq!(g.post("/v1/chat/completions", ask(), 0).await.status(), 200);
    let charges = g.charges().await;
    let versions: Vec<&str> = charges.iter().map(|m| m.price_version.as_str()).collect();
    assert_eq!(versions, ["2026-12-openai-1", "2027-02-openai-2"]);
    let used: Vec<i64> = charges.iter().map(|m| m.units + m.forgiven_units).collect();
    assert_eq!(
        used,
        [
            credits(&[(2, 2_500_000), (100, 10_000_000)]),
            credits(&[(2, 2_000_000), (100, 8_000_000)]),
        ]
    );

    // Later the config lists only a third version: reconcile still checks both charges
    // against the versions the ledger stored.
    let later = g.g.config.replace(
        "price_version = \"2026-12-openai-1\"",
        "price_version = \"2027-06-openai-3\"",
    );
    let start_ = later
        .find("[[plans.developer.price_changes]]")
        .expect("change");
    let end = start_ + later[start_..].find("# An enterprise").expect("next");
    let later = format!("{}{}", &later[..start_], &later[end..]);
    let settings = Settings::parse(&later).expect("later config");
    assert_eq!(settings.plans["developer"].prices.len(), 1);
    let store = g.store().await;
    let report = store.reconcile(0, &settings).await.expect("reconcile");
    assert!(report.differences.is_empty(), "{:?}", report.differences);
    assert_eq!(
        report.unknown_price_versions, 0,
        "versions come from the ledger"
    );

    // A charge whose recorded usage no longer matches its price is found.
    let tampered = r#"{"cached_input_tokens":0,"input_tokens":2,"output_tokens":101}"#;
    let sql = format!(
        "UPDATE monetization_events SET dimensions = '{tampered}' WHERE id = {}",
        charges[1].id
    );
    execute(&g.g.store_url, &sql).await;
    let report = store.reconcile(0, &settings).await.expect("reconcile");
    let found: Vec<&str> = report.differences.iter().map(|d| d.check).collect();
    assert_eq!(found, ["dimension_price"], "{:?}", report.differences);

    // A version stored before cannot silently change its prices: start-up refuses.
    g.g.gateway.shutdown().await;
    let changed =
        g.g.config
            .replace("output_tokens = 8000000", "output_tokens = 7000000");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let refused = Gateway::start(
        Settings::parse(&changed).expect("parses"),
        listener,
        clock.clone(),
    )
    .await;
    let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("2027-02-openai-2") && message.contains("new price_version"),
        "{message}"
    );
}

async fn execute(url: &str, sql: &str) {
    if url.starts_with("sqlite") {
        let pool = sqlx::SqlitePool::connect(url).await.expect("sqlite");
        sqlx::query(sql).execute(&pool).await.expect("update");
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.expect("postgres");
        sqlx::query(sql).execute(&pool).await.expect("update");
        pool.close().await;
    }
}

store_tests!(
    chat_is_charged_per_model_and_dimension_plain_and_streamed,
    a_price_change_applies_from_its_date_and_every_charge_keeps_its_version,
);
