//! Configuration: one TOML file, parsed at the boundary into validated [`Settings`].
//!
//! Parsing happens in two steps. serde turns the text into the `Raw*` structs (rejecting
//! unknown keys and wrong types, with the line of the offence); `compile` then checks
//! what serde cannot (references between sections, positive amounts, durations) and interns
//! feature names, so that nothing downstream handles an unchecked string. Every error names the
//! key and, where the text has one, the line.

pub mod alerts;
mod compile;
pub mod export;
mod usage_page;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use chrono::DateTime;
use serde::Deserialize;
use toml::Spanned;

use crate::waterfall::{FeatureId, FeatureSet, GrantKind, Plan};

pub use usage_page::{
    SESSION_SECRET_BYTES_MIN, SESSION_SECRET_ENV, SecureCookie, SessionSecret, UsagePageSettings,
};

/// A configuration that cannot be used, with the key and line at fault.
#[derive(Debug, thiserror::Error)]
#[error("config error{}: {key}: {message}", line.map(|l| format!(" at line {l}")).unwrap_or_default())]
pub struct ConfigError {
    /// The dotted path of the offending key, e.g. `routes[2].upstream`.
    pub key: String,
    /// The 1-based line in the file, when known.
    pub line: Option<usize>,
    /// What is wrong with it.
    pub message: String,
}

/// The highest price, in credits per unit, a plan may set (with [`crate::cost::UNITS_MAX`] it
/// keeps every `units × price` within an `i64`).
pub const PRICE_MAX: u64 = 1_000_000_000;

/// The environment variable that overrides `store.url` (it may carry a password).
pub const STORE_URL_ENV: &str = "FLOWGATE_STORE_URL";

/// The environment variable holding admin API bearer tokens, comma-separated (added to
/// `admin.token_hashes`; the tokens are hashed on reading and never kept in clear).
pub const ADMIN_TOKENS_ENV: &str = "FLOWGATE_ADMIN_TOKENS";

/// Paths the gateway serves itself (operational endpoints, the admin and user APIs, the
/// OpenAPI document): a configured route may not use them, nor any path below the prefixes
/// ending in `/`.
pub const RESERVED_PATHS: &[&str] = &[
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/admin",
    "/admin/",
    "/v1/me",
    "/v1/me/",
    "/v1/decisions/",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: ServerSettings,
    store: StoreSettings,
    identity: IdentitySettings,
    #[serde(default)]
    log: LogSettings,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    usage_page: UsagePageSettings,
    #[serde(default)]
    upstreams: BTreeMap<String, RawUpstream>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    plans: BTreeMap<String, RawPlan>,
    #[serde(default)]
    accounts: Vec<RawAccount>,
    #[serde(default)]
    export: Vec<export::RawExport>,
    alerts: Option<alerts::RawAlerts>,
}

/// `[log]`: what the process writes to stderr.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `text` (for people) or `json` (one object per line, for collectors).
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter (`info`, `warn,flowgate::access=info`, …); `FLOWGATE_LOG` overrides it.
    #[serde(default = "defaults::log_level")]
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::default(),
            level: defaults::log_level(),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[admin]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    /// SHA-256 (hex) of each accepted bearer token.
    #[serde(default)]
    token_hashes: Vec<Spanned<String>>,
}

/// `[admin]`: who may use the admin API. With no token (none here and none in
/// `FLOWGATE_ADMIN_TOKENS`) the admin API is disabled and answers 404 to everything.
#[derive(Clone, Default)]
pub struct AdminSettings {
    /// SHA-256 digests of the accepted bearer tokens; the tokens themselves are never kept.
    pub token_hashes: Vec<[u8; 32]>,
}

impl std::fmt::Debug for AdminSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hashes are not secrets, but there is no reason to print them either.
        f.debug_struct("AdminSettings")
            .field("tokens", &self.token_hashes.len())
            .finish()
    }
}

impl AdminSettings {
    /// Whether the admin API is enabled (at least one token is configured).
    pub fn enabled(&self) -> bool {
        !self.token_hashes.is_empty()
    }

    /// Adds the comma-separated tokens of `value` (the `FLOWGATE_ADMIN_TOKENS` format), hashed.
    /// Blank entries are ignored.
    pub fn add_tokens(&mut self, value: &str) {
        for token in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            self.token_hashes.push(sha256(token));
        }
    }
}

/// SHA-256 of `text`.
pub fn sha256(text: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes()).into()
}

/// `[server]`: the listener and how requests are answered.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// How long to wait for an upstream's response headers before answering 504.
    #[serde(default = "defaults::upstream_timeout_ms")]
    pub upstream_timeout_ms: u64,
    /// Largest request body read to compute a cost from a JSON field.
    #[serde(default = "defaults::request_body_bytes_max")]
    pub request_body_bytes_max: usize,
    /// How a request that only more credits would admit is answered.
    #[serde(default)]
    pub credits_denial: CreditsDenial,
    /// How long in-flight requests may take to finish after a shutdown signal.
    #[serde(default = "defaults::shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Idle upstream connections are closed after this long.
    #[serde(default = "defaults::upstream_idle_timeout_ms")]
    pub upstream_idle_timeout_ms: u64,
    /// How long an `Idempotency-Key` is remembered in memory (the store remembers forever).
    #[serde(default = "defaults::idempotency_ttl_s")]
    pub idempotency_ttl_s: u64,
    /// How long a client may take to send a request's headers, counted from when the gateway
    /// starts waiting for them — so it is also how long an idle keep-alive connection stays
    /// open (hyper times both with one timer). Past it the connection is closed (nginx's
    /// `client_header_timeout`, 60 s).
    #[serde(default = "defaults::client_header_timeout_ms")]
    pub client_header_timeout_ms: u64,
    /// How long a client may take to send a body the gateway reads (a JSON cost rule, an
    /// idempotency key); past it, 408 (nginx's `client_body_timeout`, 60 s).
    #[serde(default = "defaults::client_body_timeout_ms")]
    pub client_body_timeout_ms: u64,
    /// Most client connections open at once; past it the gateway stops accepting until one
    /// closes (the kernel's backlog holds or refuses the rest).
    #[serde(default = "defaults::connections_max")]
    pub connections_max: usize,
    /// Most concurrent HTTP/2 streams per connection.
    #[serde(default = "defaults::http2_max_concurrent_streams")]
    pub http2_max_concurrent_streams: u32,
    /// Threads serving connections, each with its own event loop and upstream connection
    /// pool (nginx's `worker_processes`); a connection and its upstream requests stay on one
    /// thread. Default: one per CPU.
    #[serde(default = "defaults::server_threads")]
    pub threads: usize,
}

/// The answer when credits are short and waiting will not help.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CreditsDenial {
    /// 402 Payment Required, error type `insufficient_credits`.
    #[default]
    PaymentRequired,
    /// 429 with error type `insufficient_quota`, as OpenAI answers (for clients on its SDKs).
    InsufficientQuota,
}

/// `[store]`: where the ledger lives and how it is written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    /// `sqlite://path/to/file.db` (created if missing) or `postgres://user@host/db` (several
    /// replicas). Overridden by `FLOWGATE_STORE_URL`, so that a password need not be in the file.
    pub url: String,
    /// Whether `serve` applies migrations on start-up.
    #[serde(default = "defaults::yes")]
    pub migrate_on_start: bool,
    /// Most ledger entries committed in one transaction.
    #[serde(default = "defaults::ledger_batch_size_max")]
    pub ledger_batch_size_max: usize,
    /// Longest an entry waits for its batch to fill before it is committed anyway.
    #[serde(default = "defaults::ledger_flush_interval_ms")]
    pub ledger_flush_interval_ms: u64,
    /// Most entries waiting to be committed; past it, new requests are refused with 503 until
    /// the writer catches up (queued usage itself is never dropped).
    #[serde(default = "defaults::ledger_queue_max")]
    pub ledger_queue_max: usize,
    /// How often grants past their expiry are written off (balance updates, reason `expired`).
    /// An expired grant is never drawn from, whether or not this has run yet.
    #[serde(default = "defaults::expiry_interval_ms")]
    pub expiry_interval_ms: u64,
    /// `batched` (default): a response completes when the upstream's does, and its usage is
    /// committed within the flush interval after. `strict`: the last bytes of a charged
    /// response wait until its usage event is committed, so a `kill -9` loses no usage a client
    /// saw completed (at the price of the commit's latency on every charged response).
    #[serde(default)]
    pub durability: Durability,
    /// Strict plans: how long a replica's lease of a slice lives in the store without renewal
    /// (a replica that dies strands its slices this long). Renewed every third of it.
    #[serde(default = "defaults::strict_lease_ttl_ms")]
    pub strict_lease_ttl_ms: u64,
    /// Strict plans: a slice not drawn from for this long is given back, so that other
    /// replicas can lease it.
    #[serde(default = "defaults::strict_lease_idle_ms")]
    pub strict_lease_idle_ms: u64,
}

/// When a charged response may complete, relative to its usage event's commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Completes with the upstream; committed within `ledger_flush_interval_ms` after.
    #[default]
    Batched,
    /// Completes only once committed.
    Strict,
}

/// `[identity]`: who is calling.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySettings {
    /// `api_key`: a key in `header` (optionally `Bearer `-prefixed) maps to an account;
    /// `trusted_header`: an upstream auth layer has put the account id in `header`.
    pub mode: IdentityMode,
    /// The header to read.
    #[serde(default = "defaults::identity_header")]
    pub header: String,
}

/// How callers are identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityMode {
    /// An API key mapped to an account.
    ApiKey,
    /// A header set by a trusted layer in front (sidecar mode).
    TrustedHeader,
}

mod defaults {
    pub fn upstream_timeout_ms() -> u64 {
        30_000
    }
    pub fn request_body_bytes_max() -> usize {
        1 << 20
    }
    pub fn shutdown_grace_ms() -> u64 {
        10_000
    }
    pub fn upstream_idle_timeout_ms() -> u64 {
        60_000
    }
    pub fn idempotency_ttl_s() -> u64 {
        24 * 3600
    }
    pub fn client_header_timeout_ms() -> u64 {
        60_000
    }
    pub fn client_body_timeout_ms() -> u64 {
        60_000
    }
    pub fn connections_max() -> usize {
        10_000
    }
    pub fn server_threads() -> usize {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    }
    pub fn http2_max_concurrent_streams() -> u32 {
        128
    }
    pub fn yes() -> bool {
        true
    }
    pub fn expiry_interval_ms() -> u64 {
        60_000
    }
    pub fn one() -> u64 {
        1
    }
    pub fn strict_lease_ttl_ms() -> u64 {
        10_000
    }
    pub fn strict_lease_idle_ms() -> u64 {
        2_000
    }
    pub fn log_level() -> String {
        "info".to_owned()
    }
    /// Large: a batch this size forms only from a backlog, and the larger the batch, the
    /// fewer index pages each event writes (docs/BENCHMARKS.md, stop 27: SQLite 27–31k events/s
    /// at 512, 45–49k at 4 096).
    pub fn ledger_batch_size_max() -> usize {
        4096
    }
    pub fn ledger_flush_interval_ms() -> u64 {
        5
    }
    pub fn ledger_queue_max() -> usize {
        10_000
    }
    pub fn identity_header() -> String {
        "authorization".into()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    /// One address, `http://host:port`.
    url: Option<Spanned<String>>,
    /// Several addresses of the same service, balanced (instead of `url`).
    #[serde(default)]
    urls: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    method: Spanned<String>,
    path: Spanned<String>,
    feature: Spanned<String>,
    upstream: Spanned<String>,
    cost: Spanned<CostRule>,
    cost_default: Option<Spanned<u64>>,
    settle: Option<Spanned<SettleRule>>,
    /// A JSON pointer to the request's model, for plans that price the feature per model.
    model: Option<Spanned<String>>,
    /// The cost rule's number is a quantity of this dimension (e.g. `output_tokens` for
    /// `max_tokens`), priced by the plan's rates into the estimate held.
    cost_dimension: Option<Spanned<String>>,
    #[serde(default)]
    idempotency: IdempotencyMode,
    /// Shadow mode: decided and recorded, never blocked, never charged.
    #[serde(default)]
    shadow: bool,
    /// Watches an event stream while it flows (see [`WatchRule`]).
    watch: Option<Spanned<RawWatch>>,
}

/// `watch = { sse = "/usage/units" | bytes_per_unit = N | time_per_unit = "1s", on_exhausted }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWatch {
    sse: Option<String>,
    bytes_per_unit: Option<u64>,
    time_per_unit: Option<String>,
    #[serde(default)]
    on_exhausted: OnExhausted,
}

/// A route whose event streams are watched while they flow: the hold grows with the stream's
/// progress, so the account pays as it goes and other requests see it at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchRule {
    /// How the stream's progress, in the feature's units, is read.
    pub progress: Progress,
    /// What happens when the account cannot pay for the progress.
    pub on_exhausted: OnExhausted,
}

/// How a watched stream's progress (units used so far) is measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The integer at this JSON pointer of the latest event's `data` that has it: the units
    /// used so far, as the upstream reports them (e.g. seconds rendered).
    Sse(String),
    /// One unit per this many bytes of events delivered (a proxy for tokens).
    Bytes(u64),
    /// One unit per this many milliseconds since the response began, read as events arrive.
    Time(u64),
}

/// What a watched stream does when the account can no longer pay for its progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExhausted {
    /// Lets it finish; what nobody could pay is forgiven and recorded as such.
    #[default]
    Finish,
    /// Ends it cleanly: a last event in the error shape, then the end of the stream; the
    /// account is charged what was delivered.
    Stop,
}

/// What a route does with a client's `Idempotency-Key`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdempotencyMode {
    /// Stripe's model: the key's request runs and is charged once; a repeat gets the first
    /// answer back (or 409 when it was too large to keep) and the upstream does no work again.
    #[default]
    Replay,
    /// For a product that wants every request run: the key is only forwarded to the upstream
    /// (which may deduplicate by it), and every request is metered and charged as if it had
    /// none.
    Forward,
}

/// Where a route's true cost is read from the upstream's response, when its request cost is an
/// estimate: the hold is adjusted to it when the response completes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SettleRule {
    /// The integer value of this response header.
    Header(String),
    /// The integer at this JSON pointer of the (JSON) response body.
    Json(String),
    /// The integer at this JSON pointer of the last server-sent event's `data` that has it
    /// (e.g. `/usage/total_tokens` of an OpenAI-style stream's final chunk).
    Sse(String),
    /// Whichever the response is: the last server-sent event carrying the pointer when it is
    /// an event stream (`text/event-stream`), the JSON body otherwise. For a route that answers
    /// both, as an OpenAI-style chat completion does with and without `"stream": true`.
    Body(String),
    /// Several dimensions, each read like `body` (the last event carrying any of them, or the
    /// JSON body), e.g. `{ input_tokens = "/usage/prompt_tokens", output_tokens =
    /// "/usage/completion_tokens" }`; the plan's rates for the feature price each one. A
    /// dimension absent from a usage object that has the others counts 0.
    Dimensions(BTreeMap<String, DimensionPointer>),
}

/// Where one dimension's quantity is in a response's usage.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum DimensionPointer {
    /// The integer at this JSON pointer.
    At(String),
    /// The integer at `at` less the one at `minus` (`prompt_tokens` less their cached part).
    Difference {
        /// The whole.
        at: String,
        /// The part counted by another dimension.
        minus: String,
    },
}

impl DimensionPointer {
    /// The pointers it reads.
    pub fn pointers(&self) -> impl Iterator<Item = &str> {
        let (a, b) = match self {
            DimensionPointer::At(p) => (p.as_str(), None),
            DimensionPointer::Difference { at, minus } => (at.as_str(), Some(minus.as_str())),
        };
        std::iter::once(a).chain(b)
    }
}

/// How a route's cost in units is found.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum CostRule {
    /// Every request costs this many units.
    Fixed(u64),
    /// The units are the integer value of this request header.
    Header(String),
    /// The units are the integer at this JSON pointer (RFC 6901, e.g. `/seconds`) of the body.
    Json(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    price_version: String,
    /// Another plan whose layers (when this one has none) and prices (those this one does not
    /// set) it takes: an enterprise customer's own rates on a standard plan.
    extends: Option<Spanned<String>>,
    /// Strict mode: replicas lease slices of the account's pools and never overspend.
    #[serde(default)]
    strict: bool,
    /// Shadow mode: its accounts' requests are decided and recorded, never blocked or charged.
    #[serde(default)]
    shadow: bool,
    #[serde(default)]
    prices: BTreeMap<String, Spanned<RawPrice>>,
    /// Later price versions, each in force from its `effective_from`.
    #[serde(default)]
    price_changes: Vec<RawPriceChange>,
    #[serde(default)]
    layers: Vec<RawLayer>,
}

/// A feature's price: credits per unit, or rates per model and dimension.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawPrice {
    Flat(u64),
    Rated(RawRates),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRates {
    /// Rates are credits per this many of each dimension.
    #[serde(default = "defaults::one")]
    per: u64,
    /// By model (`"*"`: any other model), credits per `per` of each dimension.
    models: BTreeMap<String, BTreeMap<String, u64>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPriceChange {
    price_version: String,
    effective_from: Spanned<String>,
    /// The prices that change; the others stay as the version before had them.
    #[serde(default)]
    prices: BTreeMap<String, Spanned<RawPrice>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLayer {
    kind: Spanned<String>,
    name: Option<String>,
    features: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    windows: Vec<RawWindow>,
    units: Option<u64>,
    period: Option<Spanned<String>>,
    /// A free tier's IANA time zone (default UTC).
    time_zone: Option<Spanned<String>>,
    #[serde(default)]
    postpaid: bool,
    /// A concurrency layer's requests at once.
    limit: Option<u32>,
    /// A workspace layer's credits per member per `period`.
    member_cap: Option<Spanned<u64>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    name: Spanned<String>,
    /// A rolling window's length ("5h").
    duration: Option<Spanned<String>>,
    /// A calendar window's reset: "daily", "weekly" or "monthly".
    reset: Option<Spanned<String>>,
    /// A calendar window's IANA time zone (default UTC).
    time_zone: Option<Spanned<String>>,
    limit: Spanned<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    id: Spanned<String>,
    plan: Spanned<String>,
    #[serde(default)]
    suspended: bool,
    /// Shadow mode for this account's requests.
    #[serde(default)]
    shadow: bool,
    /// The account whose pool this member draws from in `workspace` layers.
    workspace: Option<Spanned<String>>,
    #[serde(default)]
    api_keys: Vec<String>,
    #[serde(default)]
    grants: Vec<RawGrant>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    id: String,
    kind: Spanned<String>,
    amount: Spanned<u64>,
    expires_at: Option<Spanned<String>>,
    #[serde(default)]
    priority: i32,
    features: Option<Spanned<Vec<String>>>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `[server]`.
    pub server: ServerSettings,
    /// `[store]`, with the environment override applied.
    pub store: StoreSettings,
    /// `[identity]`.
    pub identity: IdentitySettings,
    /// `[log]`.
    pub log: LogSettings,
    /// `[admin]`, with the tokens of `FLOWGATE_ADMIN_TOKENS` added.
    pub admin: AdminSettings,
    /// `[usage_page]`, with its session secret read.
    pub usage_page: UsagePageSettings,
    /// Feature names, indexed by [`FeatureId`].
    pub features: Vec<Arc<str>>,
    /// Upstreams, indexed by [`Route::upstream`].
    pub upstreams: Vec<Upstream>,
    /// Proxied routes.
    pub routes: Vec<Route>,
    /// Plans by name.
    pub plans: HashMap<String, Arc<Plan>>,
    /// The plans in shadow mode (`shadow = true`), by name: their accounts' requests are
    /// decided and recorded but never blocked or charged (`crate::gateway::meter`).
    pub shadow_plans: HashSet<String>,
    /// Accounts to create (and grants to give) on start-up if the store lacks them.
    pub accounts: Vec<AccountSeed>,
    /// `[[export]]`: the billing systems charges and refunds are sent to.
    pub export: Vec<export::ExportSink>,
    /// `[alerts]`: threshold alerts and their webhook (`None`: no alerts).
    pub alerts: Option<alerts::AlertSettings>,
}

/// An upstream server.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Its name in the config.
    pub name: String,
    /// Its addresses (`host:port`), balanced round-robin over the ones accepting connections.
    pub addresses: Vec<http::uri::Authority>,
}

/// A proxied route.
#[derive(Debug, Clone)]
pub struct Route {
    /// The HTTP method it matches.
    pub method: http::Method,
    /// The path pattern (axum syntax: `/v1/tasks/{id}`).
    pub path: String,
    /// The feature its units count as.
    pub feature: FeatureId,
    /// Index into [`Settings::upstreams`].
    pub upstream: usize,
    /// How its cost is found (an estimate when `settle` is set).
    pub cost: CostRule,
    /// The units held when the request does not state its cost (the header or JSON field is
    /// absent); without one such a request is refused (400).
    pub cost_default: Option<u64>,
    /// Where its true cost is read from the response, if anywhere.
    pub settle: Option<SettleRule>,
    /// Where the request names its model (a JSON pointer into the body), if anywhere.
    pub model: Option<String>,
    /// The dimension whose quantity the cost rule reads, for a dimension-priced feature.
    pub cost_dimension: Option<Arc<str>>,
    /// What it does with a client's `Idempotency-Key`.
    pub idempotency: IdempotencyMode,
    /// Watches its event streams while they flow, if set.
    pub watch: Option<WatchRule>,
    /// Shadow mode: its requests are decided and recorded but never blocked or charged.
    pub shadow: bool,
}

/// An account declared in the config.
#[derive(Debug, Clone)]
pub struct AccountSeed {
    /// The account id.
    pub id: String,
    /// Its plan's name (checked to exist).
    pub plan: String,
    /// Whether its requests are refused.
    pub suspended: bool,
    /// Whether its requests run in shadow mode.
    pub shadow: bool,
    /// The configured account whose pool its `workspace` layers draw from (checked to exist
    /// and to have no workspace itself).
    pub workspace: Option<String>,
    /// Its API keys, as stored (the keys themselves are not kept).
    pub keys: Vec<KeySeed>,
    /// Grants to give it once.
    pub grants: Vec<GrantSeed>,
}

/// A grant declared in the config, given once (keyed by account and `external_id`).
#[derive(Debug, Clone)]
pub struct GrantSeed {
    /// The grant's id in the config, unique per account.
    pub external_id: String,
    /// What it is.
    pub kind: GrantKind,
    /// Credits granted (> 0).
    pub amount: u64,
    /// When it expires.
    pub expires_at: Option<i64>,
    /// Spend priority (lower first).
    pub priority: i32,
    /// Feature names it may pay for (`None`: all).
    pub features: Option<Vec<String>>,
}

/// An API key as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySeed {
    /// SHA-256 of the key, hex: what a request's key is looked up by.
    pub hash: String,
    /// The key's first characters ([`key_prefix`]): what an operator lists and revokes it by.
    pub prefix: String,
}

impl KeySeed {
    /// The stored form of `key`.
    pub fn of(key: &str) -> KeySeed {
        KeySeed {
            hash: hash_api_key(key),
            prefix: key_prefix(key),
        }
    }
}

/// Longest key prefix shown: `fg_` and 8 of a generated key's 64 random hex digits.
const KEY_PREFIX_CHARS_MAX: usize = 11;

/// The non-secret start of an API key, shown in listings so that an operator can tell keys
/// apart and revoke a leaked one: 11 characters of a generated key (32 of its 256 random bits),
/// and never more than a quarter of a shorter, hand-made key.
pub fn key_prefix(key: &str) -> String {
    let chars = key.chars().count();
    key.chars()
        .take(KEY_PREFIX_CHARS_MAX.min(chars / 4))
        .collect()
}

/// Hashes an API key for storage and lookup; keys are never stored or logged in clear.
pub fn hash_api_key(key: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

struct Ctx<'a> {
    text: &'a str,
}

impl Ctx<'_> {
    fn err<T>(
        &self,
        key: impl Into<String>,
        span: Option<std::ops::Range<usize>>,
        message: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError {
            key: key.into(),
            line: span.map(|s| {
                self.text[..s.start.min(self.text.len())]
                    .lines()
                    .count()
                    .max(1)
            }),
            message: message.into(),
        })
    }
}

impl Settings {
    /// Reads and validates the file at `path`, applying environment overrides.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            key: path.display().to_string(),
            line: None,
            message: format!("cannot read config file: {e}"),
        })?;
        let mut settings = Settings::parse(&text)?;
        if let Ok(url) = std::env::var(STORE_URL_ENV) {
            settings.store.url = url;
            settings.lease_only_when_shared();
        }
        if let Ok(tokens) = std::env::var(ADMIN_TOKENS_ENV) {
            settings.admin.add_tokens(&tokens);
        }
        settings
            .usage_page
            .read_secret(std::env::var(SESSION_SECRET_ENV).ok())?;
        Ok(settings)
    }

    /// Strict plans lease their pools only from a store replicas share: one SQLite process
    /// decides every request itself, so its view is exact already and there is nothing to
    /// lease.
    pub(crate) fn lease_only_when_shared(&mut self) {
        if self.store.url.starts_with("postgres") {
            return;
        }
        for plan in self.plans.values_mut() {
            if plan.strict {
                Arc::make_mut(plan).strict = false;
            }
        }
    }

    /// Parses and validates config text (no environment overrides).
    pub fn parse(text: &str) -> Result<Settings, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            ConfigError {
                key: "(parse)".into(),
                line,
                message: e.message().to_string(),
            }
        })?;
        compile::compile(raw, &Ctx { text })
    }

    /// What differs from `new` among the settings bound at start-up (the listening socket and
    /// front door, the upstream connection pool, the idempotency registry, the store, the
    /// logs): a reload keeps them as they are.
    pub fn fixed_until_restart(&self, new: &Settings) -> Vec<&'static str> {
        let (a, b) = (&self.server, &new.server);
        [
            ("server.listen", a.listen != b.listen),
            (
                "server.client_header_timeout_ms",
                a.client_header_timeout_ms != b.client_header_timeout_ms,
            ),
            (
                "server.connections_max",
                a.connections_max != b.connections_max,
            ),
            ("server.threads", a.threads != b.threads),
            (
                "server.http2_max_concurrent_streams",
                a.http2_max_concurrent_streams != b.http2_max_concurrent_streams,
            ),
            (
                "server.shutdown_grace_ms",
                a.shutdown_grace_ms != b.shutdown_grace_ms,
            ),
            (
                "server.upstream_idle_timeout_ms",
                a.upstream_idle_timeout_ms != b.upstream_idle_timeout_ms,
            ),
            (
                "server.idempotency_ttl_s",
                a.idempotency_ttl_s != b.idempotency_ttl_s,
            ),
            ("store", self.store != new.store),
            ("log", self.log != new.log),
            ("export", self.export != new.export),
            ("alerts", self.alerts != new.alerts),
        ]
        .into_iter()
        .filter_map(|(field, changed)| changed.then_some(field))
        .collect()
    }

    /// The id of a feature name, if the config declares it.
    pub fn feature_id(&self, name: &str) -> Option<FeatureId> {
        self.features
            .iter()
            .position(|f| &**f == name)
            .map(|p| FeatureId(p as u16))
    }

    /// The set of the named features; unknown names are ignored (the config checked them).
    pub fn feature_set(&self, names: Option<&[String]>) -> FeatureSet {
        match names {
            None => FeatureSet::ALL,
            Some(names) => names
                .iter()
                .filter_map(|n| self.feature_id(n))
                .fold(FeatureSet::EMPTY, FeatureSet::with),
        }
    }
}

/// The usage page's paths (`[usage_page]`), reserved like [`RESERVED_PATHS`] while it is
/// enabled.
pub const USAGE_PAGE_PATHS: &[&str] = &["/usage", "/usage/"];

/// The reserved path (or prefix) that `path` would take from the gateway, if any.
fn reserved_path(path: &str, usage_page: bool) -> Option<&'static str> {
    let path = path.trim_end_matches('/');
    let page = USAGE_PAGE_PATHS.iter().filter(|_| usage_page);
    RESERVED_PATHS.iter().chain(page).copied().find(|reserved| {
        if let Some(prefix) = reserved.strip_suffix('/') {
            path == prefix || path.starts_with(reserved)
        } else {
            path == *reserved
        }
    })
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Parses an RFC 3339 instant into epoch milliseconds.
pub fn parse_instant(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

#[cfg(test)]
mod tests;
