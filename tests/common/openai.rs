//! `config/examples/openai.toml` for a test: the example (plus `extra` config) on a store of one
//! kind, in front of the mock OpenAI-compatible upstream, on loopback ports.

use flowgate::clock::Clock;
use flowgate::config::Settings;
use flowgate::demo::openai::MockOpenAi;
use flowgate::gateway::Gateway;

use super::{PgDatabase, StoreKind};

/// The example's text.
pub const EXAMPLE: &str = include_str!("../../config/examples/openai.toml");

/// A running example gateway.
pub struct OpenAiGateway {
    /// The gateway.
    pub gateway: Gateway,
    /// `http://127.0.0.1:port` of the gateway.
    pub base: String,
    /// The ledger's URL.
    pub store_url: String,
    /// The configuration text in use.
    pub config: String,
    /// The settings it started with.
    pub settings: Settings,
    _mock: MockOpenAi,
    // Declared last: dropped after the gateway has let go of the store.
    _pg: Option<PgDatabase>,
    _dir: tempfile::TempDir,
}

/// Starts the example with `extra` appended to its config, on `clock`.
pub async fn start(kind: StoreKind, clock: Clock, extra: &str) -> OpenAiGateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = match kind {
        StoreKind::Sqlite => None,
        StoreKind::Postgres => Some(PgDatabase::create().await),
    };
    let store_url = match &pg {
        None => format!("sqlite://{}", dir.path().join("ledger.db").display()),
        Some(db) => db.url.clone(),
    };
    let mock = MockOpenAi::start("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("mock upstream");
    let config = format!("{EXAMPLE}{extra}")
        .replace("127.0.0.1:8090", "127.0.0.1:0")
        .replace("sqlite://openai-gateway.db", &store_url)
        .replace("http://127.0.0.1:9100", &mock.url());
    let settings = Settings::parse(&config).expect("the example parses");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let gateway = Gateway::start(settings.clone(), listener, clock)
        .await
        .expect("gateway starts");
    OpenAiGateway {
        base: format!("http://{}", gateway.addr()),
        gateway,
        store_url,
        config,
        settings,
        _mock: mock,
        _pg: pg,
        _dir: dir,
    }
}

/// A Python interpreter that has the official `openai` package: FLOWGATE_TEST_PYTHON, or the
/// venv `./scripts/test` makes. Fails the test, saying what to do, when there is none.
pub fn python() -> String {
    let python = std::env::var("FLOWGATE_TEST_PYTHON")
        .unwrap_or_else(|_| format!("{}/target/sdk-venv/bin/python", env!("CARGO_MANIFEST_DIR")));
    let has_sdk = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_sdk,
        "{python} cannot import openai: run ./scripts/test (it makes target/sdk-venv), \
         or set FLOWGATE_TEST_PYTHON to a Python with `pip install openai`"
    );
    python
}
