//! The official `openai` Python SDK through `config/examples/openai.toml`, unchanged: plain and
//! streamed chat completions (`include_usage`), embeddings, and the denials it surfaces
//! (tests/openai_sdk/check.py), against the mock OpenAI-compatible upstream; then the ledger
//! holds exactly the charges the SDK's usage implies.
//!
//! Needs Python with the `openai` package: `./scripts/test` makes `target/sdk-venv` (or set
//! FLOWGATE_TEST_PYTHON to an interpreter that has it). Without one the test fails, saying so.

mod common;

use std::process::Command;

use common::StoreKind;
use flowgate::clock::Clock;
use flowgate::store::Store;

/// A plan with a 50-credit window and no credits, for the denials.
const TINY: &str = r#"
[plans.tiny]
extends = "developer"
price_version = "tiny-1"

[[plans.tiny.layers]]
kind = "usage_limit"
name = "included"
windows = [{ name = "5h", duration = "5h", limit = 50 }]

[[plans.tiny.layers]]
kind = "credits"

[[accounts]]
id = "tiny"
plan = "tiny"
api_keys = ["sk-tiny"]
"#;

async fn the_openai_sdk_works_through_the_example_gateway(kind: StoreKind) {
    let python = common::openai::python();
    let g = common::openai::start(kind, Clock::System, TINY).await;
    let base = g.base.clone();
    let script = format!("{}/tests/openai_sdk/check.py", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(base)
            .output()
            .expect("run python")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the SDK script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).expect("its JSON");
    assert_eq!(seen["window"]["status"], 429, "{seen}");
    assert_eq!(seen["no_credits"]["status"], 429, "{seen}");
    let (settings, store_url) = (g.settings.clone(), g.store_url.clone());
    g.gateway.shutdown().await; // commits everything queued

    let store = Store::open(&store_url).await.expect("store");
    let snapshot = store.snapshot(0).await.expect("snapshot");
    let used: Vec<(String, i64)> = snapshot
        .monetization
        .iter()
        .map(|m| (m.account_id.clone(), m.units + m.forgiven_units))
        .collect();
    let demo = |n: i64| ("demo".to_owned(), n);
    assert_eq!(
        used,
        [
            demo(113), // gpt-4o: 5 prompt tokens (12.5 credits), 10 completion tokens (100)
            demo(8),   // gpt-4o-mini streamed: 4 prompt, 12 completion (from its usage chunk)
            demo(2),   // streamed without usage: the estimate, 3 completion tokens
            demo(1),   // embeddings: 5 tokens
            ("tiny".to_owned(), 45),
        ],
        "{:?}",
        snapshot.monetization
    );
    let report = store.reconcile(0, &settings).await.expect("reconcile");
    assert!(report.differences.is_empty(), "{:?}", report.differences);
}

store_tests!(the_openai_sdk_works_through_the_example_gateway);
