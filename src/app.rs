//! The state every handler shares, proxy and APIs alike.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::accounts::Accounts;
use crate::clock::Clock;
use crate::config::Settings;
use crate::idempotency::Idempotency;
use crate::ledger::LedgerQueue;
use crate::metrics::Metrics;
use crate::quota;
use crate::store::Store;
use crate::strict::Strict;

thread_local! {
    /// Which serving thread this is (0 off them): picks its upstream client ([`App::client`]).
    static SERVING_THREAD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The index of the serving thread this runs on (0 on any other thread).
pub fn serving_thread() -> usize {
    SERVING_THREAD.with(std::cell::Cell::get)
}

/// Marks this thread as serving thread `index` (the gateway's front door does, at its start).
pub fn set_serving_thread(index: usize) {
    SERVING_THREAD.with(|t| t.set(index));
}

/// What every request handler shares.
pub struct App {
    /// The validated configuration.
    pub settings: Arc<Settings>,
    /// The cached view of accounts (the hot path's only source of numbers).
    pub accounts: Accounts,
    /// The ledger store (operational endpoints only; never on the hot path).
    pub store: Store,
    /// Where finished requests are queued for the ledger.
    pub ledger: LedgerQueue,
    /// Strict mode's leases (used by strict plans only).
    pub strict: Arc<Strict>,
    /// Recent idempotency keys.
    pub idempotency: Idempotency,
    /// Pooled HTTP clients to the upstreams, one per serving thread (`[server] threads`), so
    /// that a request's upstream connection is driven by the thread serving the request.
    pub clients: Arc<[Client<HttpConnector, axum::body::Body>]>,
    /// The source of "now".
    pub clock: Clock,
    /// How long to wait for an upstream's response headers.
    pub upstream_timeout: Duration,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// The `x-ratelimit-*` header names of every configured window.
    pub rate_limit_headers: quota::HeaderNames,
}

impl App {
    /// The upstream client of the thread this runs on (the first, off the serving threads).
    pub fn client(&self) -> &Client<HttpConnector, axum::body::Body> {
        &self.clients[serving_thread() % self.clients.len()]
    }

    /// The same gateway under new settings: what is derived from them is rebuilt, what holds
    /// state (the account view, the store, the ledger queue, the idempotency registry, the
    /// upstream connection pool, the metrics) is shared.
    pub fn reconfigured(&self, settings: Settings) -> App {
        App {
            upstream_timeout: Duration::from_millis(settings.server.upstream_timeout_ms),
            rate_limit_headers: quota::HeaderNames::new(settings.plans.values().map(|p| &**p)),
            settings: Arc::new(settings),
            accounts: self.accounts.clone(),
            store: self.store.clone(),
            ledger: self.ledger.clone(),
            strict: self.strict.clone(),
            idempotency: self.idempotency.clone(),
            clients: self.clients.clone(),
            clock: self.clock.clone(),
            metrics: self.metrics.clone(),
        }
    }
}
