//! Test harness: a real mock backend on a loopback port, a real gateway on another, and a real
//! ledger store, one fresh database per test.
#![allow(dead_code)]

pub mod api;
pub mod browser;
pub mod openai;
pub mod process;
pub mod receiver;

use std::time::Duration;

use flowgate::clock::Clock;
use flowgate::config::Settings;
use flowgate::demo::backend::MockBackend;
use flowgate::gateway::Gateway;
use flowgate::store::Store;

/// Which ledger store a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// A SQLite file in a temporary folder.
    Sqlite,
    /// A fresh database on the test PostgreSQL server (see [`PgDatabase`]).
    Postgres,
}

/// The server the PostgreSQL tests use: `FLOWGATE_TEST_PG_URL` (scripts/test sets it), else the
/// machine's server. The URL names a database the user may `CREATE DATABASE` from.
pub fn pg_admin_url() -> String {
    std::env::var("FLOWGATE_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database of its own for one test, dropped (with any connections left to it) when dropped.
/// A server that cannot be reached fails the test: PostgreSQL is never silently skipped.
pub struct PgDatabase {
    /// Its URL.
    pub url: String,
    name: String,
}

impl PgDatabase {
    /// Its name on the server.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `sql` as the admin user, on the admin database.
    pub async fn admin(sql: &str) {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&pg_admin_url())
            .await
            .expect("admin connection");
        sqlx::query(sql).execute(&mut conn).await.expect(sql);
    }

    /// Creates a database with a unique name.
    pub async fn create() -> PgDatabase {
        use sqlx::Connection;
        let admin = pg_admin_url();
        let name = format!("flowgate_test_{}", uuid::Uuid::now_v7().simple());
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL is required for the tests and is not reachable ({e}); \
                 run ./scripts/test, which finds or starts one, or set FLOWGATE_TEST_PG_URL"
                )
            });
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let (base, query) = match admin.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (admin.as_str(), String::new()),
        };
        let server = base.rsplit_once('/').map_or(base, |(s, _)| s);
        PgDatabase {
            url: format!("{server}/{name}{query}"),
            name,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.name);
        // Drop runs inside the test's runtime: do the async work on a thread of its own.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&pg_admin_url()).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await
                    .map(|_| ())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("warning: test database was not dropped: {dropped:?}");
        }
    }
}

/// The configuration the tests run with; `__STORE__`, `__BACKEND__` are filled in.
pub const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
upstream_timeout_ms = 1000
shutdown_grace_ms = 3000
credits_denial = "payment_required"

[store]
url = "__STORE__"
ledger_flush_interval_ms = 1

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

[[routes]]
method = "POST"
path = "/v1/videos"
feature = "video_second"
upstream = "backend"
cost = { json = "/seconds" }

[plans.pro]
price_version = "test-1"
prices = { task = 5, video_second = 2 }

[[plans.pro.layers]]
kind = "usage_limit"
name = "limits"
features = ["task"]
windows = [
  { name = "5h", duration = "5h", limit = 3 },
  { name = "week", duration = "7days", limit = 10 },
]

[[plans.pro.layers]]
kind = "credits"

[[plans.pro.layers]]
kind = "promotions"

[plans.lite]
price_version = "test-1"
prices = { task = 5 }

[[plans.lite.layers]]
kind = "usage_limit"
name = "limits"
windows = [{ name = "5h", duration = "5h", limit = 2 }]

[[accounts]]
id = "alice"
plan = "pro"
api_keys = ["sk-alice"]

[[accounts.grants]]
id = "purchase-1"
kind = "credits"
amount = 100

[[accounts]]
id = "bob"
plan = "pro"
suspended = true
api_keys = ["sk-bob"]

[[accounts]]
id = "carol"
plan = "lite"
api_keys = ["sk-carol"]

[[accounts]]
id = "dave"
plan = "pro"
api_keys = ["sk-dave"]

[[accounts.grants]]
id = "purchase-1"
kind = "credits"
amount = 12
"#;

/// A backend, a gateway and a store for one test.
pub struct Harness {
    /// The upstream.
    pub backend: MockBackend,
    /// The gateway (taken while restarting).
    pub gateway: Option<Gateway>,
    /// A client for the gateway.
    pub http: reqwest::Client,
    /// `http://127.0.0.1:port` of the gateway.
    pub base: String,
    /// The store's URL.
    pub store_url: String,
    /// The configuration text in use.
    pub config: String,
    /// The gateway's clock (the system's unless the test moves time itself).
    pub clock: Clock,
    // Declared last: dropped after the gateway has let go of the store.
    _pg: Option<PgDatabase>,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// Starts with the default test configuration.
    pub async fn start(kind: StoreKind) -> Harness {
        Harness::start_with(kind, |c| c).await
    }

    /// Starts with the test configuration as changed by `edit`.
    pub async fn start_with(kind: StoreKind, edit: impl FnOnce(String) -> String) -> Harness {
        Harness::start_with_clock(kind, Clock::System, edit).await
    }

    /// Starts with `clock` (a manual one lets a test move time instead of sleeping) and the
    /// test configuration as changed by `edit`.
    pub async fn start_with_clock(
        kind: StoreKind,
        clock: Clock,
        edit: impl FnOnce(String) -> String,
    ) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let pg = match kind {
            StoreKind::Sqlite => None,
            StoreKind::Postgres => Some(PgDatabase::create().await),
        };
        let store_url = match &pg {
            None => format!("sqlite://{}", dir.path().join("ledger.db").display()),
            Some(db) => db.url.clone(),
        };
        let backend = MockBackend::start().await.expect("backend starts");
        let config = edit(
            CONFIG
                .replace("__STORE__", &store_url)
                .replace("__BACKEND__", &backend.url()),
        );
        let mut h = Harness {
            backend,
            gateway: None,
            http: reqwest::Client::new(),
            base: String::new(),
            store_url,
            config,
            clock,
            _pg: pg,
            _dir: dir,
        };
        h.boot().await;
        h
    }

    async fn boot(&mut self) {
        let settings = Settings::parse(&self.config).expect("test config is valid");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let gateway = Gateway::start(settings, listener, self.clock.clone())
            .await
            .expect("gateway starts");
        self.base = format!("http://{}", gateway.addr());
        self.gateway = Some(gateway);
    }

    /// Stops the gateway (flushing its ledger) and starts a new one on the same store.
    pub async fn restart(&mut self) {
        if let Some(g) = self.gateway.take() {
            g.shutdown().await;
        }
        self.boot().await;
    }

    /// The PostgreSQL database, when the test runs on one.
    pub fn pg(&self) -> Option<&PgDatabase> {
        self._pg.as_ref()
    }

    /// The running gateway.
    pub fn gateway(&self) -> &Gateway {
        self.gateway.as_ref().expect("gateway running")
    }

    /// A POST to the gateway as the holder of `key`.
    pub fn post(&self, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.post_on(&self.http, path, key)
    }

    /// [`Harness::post`] from `client` (another client, with connections of its own).
    pub fn post_on(
        &self,
        client: &reqwest::Client,
        path: &str,
        key: &str,
    ) -> reqwest::RequestBuilder {
        client.post(format!("{}{path}", self.base)).bearer_auth(key)
    }

    /// The gateway's `/metrics`, as text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// A task of `units` units for the holder of `key`.
    pub async fn task(&self, key: &str, units: u64) -> reqwest::Response {
        self.task_on(&self.http, key, units).await
    }

    /// [`Harness::task`] sent by `client`: another client's own connections, say.
    pub async fn task_on(
        &self,
        client: &reqwest::Client,
        key: &str,
        units: u64,
    ) -> reqwest::Response {
        self.post_on(client, "/v1/tasks", key)
            .header("x-units", units)
            .json(&serde_json::json!({"prompt": "test"}))
            .send()
            .await
            .expect("request reaches the gateway")
    }

    /// Waits until everything queued for the ledger has been committed.
    pub async fn settle_ledger(&self) {
        let app = self.gateway().app().clone();
        for _ in 0..500 {
            if app.ledger.depth() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "ledger did not drain: {} entries queued",
            app.ledger.depth()
        );
    }

    /// The ledger store, opened separately.
    pub async fn store(&self) -> Store {
        Store::open(&self.store_url).await.expect("store opens")
    }

    /// Sum of an account's grant balances in the store.
    pub async fn stored_balance(&self, account: &str) -> u64 {
        self.settle_ledger().await;
        self.store()
            .await
            .grants(account)
            .await
            .expect("grants")
            .iter()
            .map(|g| g.balance)
            .sum()
    }

    /// The in-memory spendable credits of an account for `feature` (the hot path's view).
    pub fn cached_credits(&self, account: &str, feature: &str) -> u64 {
        let app = self.gateway().app();
        let feature = app.settings.feature_id(feature).expect("feature");
        let acct = app.accounts.get(account).expect("account cached");
        acct.with_state(|_, s| s.spendable_credits(feature, self.clock.now_ms()))
    }
}

/// A header's value as a string ("" if absent).
pub fn header(r: &reqwest::Response, name: &str) -> String {
    match r.headers().get(name) {
        Some(v) => v
            .to_str()
            .unwrap_or_else(|_| panic!("header {name} is not text: {v:?}"))
            .to_owned(),
        None => panic!("no header {name} in the answer: {:?}", r.headers()),
    }
}

/// Whether the answer carries the header `name` (for asserting that one is absent).
pub fn has_header(r: &reqwest::Response, name: &str) -> bool {
    r.headers().contains_key(name)
}

/// Declares each listed async test function (taking a [`StoreKind`]) once per store.
#[macro_export]
macro_rules! store_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::common::StoreKind::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::common::StoreKind::Postgres).await
                }
            )*
        }
    };
}
