//! The gateway: an axum router whose configured routes are proxied through the waterfall, and
//! its lifecycle (start-up from the store, graceful shutdown that flushes the ledger).
//!
//! Read [`router`] top to bottom for the whole request path: operational endpoints, the APIs,
//! then one axum route per configured route, each served by [`stack`] (the tower layers of
//! [`layers`] over [`forward::Forward`]), a JSON 404, and a panic guard around everything (a
//! panicking handler answers 500; its hold is released by `Drop` while the stack unwinds).

mod body;
mod coalesce;
pub mod forward;
pub mod layers;
mod meter;
pub mod pool;
mod spread;

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, get, on_service};
use http::StatusCode;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::json;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::accounts::Accounts;
use crate::app::App;
use crate::clock::Clock;
use crate::config::{ConfigError, Settings};
use crate::idempotency::Idempotency;
use crate::ledger::{self, WriterSettings};
use crate::metrics::Metrics;
use crate::quota;
use crate::rescue::GatewayError;
use crate::store::{Change, Store, StoreError, StoredPriceTable};
use crate::strict::Strict;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened, migrated or read.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The billing export could not start.
    #[error(transparent)]
    Export(#[from] crate::export::ExportError),
    /// The threshold alerts could not start.
    #[error(transparent)]
    Alerts(#[from] crate::alerts::AlertError),
}

/// A running gateway.
pub struct Gateway {
    addr: SocketAddr,
    /// The state new requests are served with; replaced by [`Gateway::reload`].
    apps: watch::Sender<Arc<App>>,
    /// The router new requests are served by, built from the current `App`.
    routers: watch::Sender<Router>,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    writer_stop: oneshot::Sender<()>,
    writer: JoinHandle<()>,
    watcher: Option<JoinHandle<()>>,
    /// The billing export's senders (none without `[[export]]` sinks).
    exporter: crate::export::Exporter,
    /// The threshold alerts' evaluator and sender (`None` without `[alerts]`).
    alerts: Option<crate::alerts::Alerts>,
}

impl Gateway {
    /// Opens the store, loads the account view from it, and starts serving on `listener`.
    pub async fn start(
        settings: Settings,
        listener: tokio::net::TcpListener,
        clock: Clock,
    ) -> Result<Gateway, StartError> {
        let settings = Arc::new(settings);
        let store = Store::open(&settings.store.url).await?;
        if settings.store.migrate_on_start {
            store.migrate().await?;
        }
        store.seed_prices(&price_tables(&settings)).await?;
        store.seed(&settings.accounts, clock.now_ms()).await?;
        let accounts = Accounts::load(&store, &settings, clock.now_ms()).await?;
        let metrics = Arc::new(Metrics::new());
        let strict = Arc::new(Strict::new(
            store.clone(),
            clock.clone(),
            metrics.clone(),
            settings.store.strict_lease_ttl_ms,
            settings.store.strict_lease_idle_ms,
        ));
        let (queue, writer) = ledger::channel(
            store.clone(),
            accounts.clone(),
            metrics.clone(),
            WriterSettings {
                batch_size_max: settings.store.ledger_batch_size_max,
                flush_interval: Duration::from_millis(settings.store.ledger_flush_interval_ms),
                queue_max: settings.store.ledger_queue_max,
                expiry_interval: Duration::from_millis(settings.store.expiry_interval_ms),
            },
            clock.clone(),
        );
        let exporter = crate::export::Exporter::start(
            store.clone(),
            &settings.export,
            metrics.clone(),
            clock.clone(),
        )
        .await?;
        let wake = exporter.waker();
        let mut writer = writer.with_commit_hook(Arc::new(move |_: &[String]| wake()));
        let alerts = crate::alerts::Alerts::start(
            store.clone(),
            accounts.clone(),
            settings.clone(),
            metrics.clone(),
            clock.clone(),
        )?;
        if let Some(alerts) = &alerts {
            writer = writer.with_commit_hook(Arc::new(alerts.hook()));
        }
        let (writer_stop, writer_stopped) = oneshot::channel();
        let writer = tokio::spawn(writer.with_strict(strict.clone()).run(async {
            let _ = writer_stopped.await;
        }));

        let clients = (0..settings.server.threads)
            .map(|_| {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                // The pool honours its idle timeout only with a timer (hyper-util).
                Client::builder(TokioExecutor::new())
                    .pool_timer(TokioTimer::new())
                    .pool_idle_timeout(Duration::from_millis(
                        settings.server.upstream_idle_timeout_ms,
                    ))
                    .build(connector)
            })
            .collect();
        let app = Arc::new(App {
            upstream_timeout: Duration::from_millis(settings.server.upstream_timeout_ms),
            idempotency: Idempotency::new(
                Duration::from_secs(settings.server.idempotency_ttl_s),
                crate::idempotency::REGISTRY_BYTES_MAX,
            ),
            rate_limit_headers: quota::HeaderNames::new(settings.plans.values().map(|p| &**p)),
            settings,
            accounts,
            store,
            ledger: queue,
            strict,
            clients,
            clock,
            metrics,
        });
        let router = router(app.clone())?;
        let (apps, _) = watch::channel(app.clone());
        let (routers, _) = watch::channel(router);
        // Other replicas' changes (PostgreSQL): the view follows them as they commit.
        let watcher = app
            .store
            .watch()
            .map(|changes| tokio::spawn(follow(changes, apps.subscribe())));
        let addr = listener
            .local_addr()
            .map_err(|e| StoreError::Corrupt(format!("listener: {e}")))?;
        let grace = Duration::from_millis(app.settings.server.shutdown_grace_ms);
        let (stop, stopped) = watch::channel(false);
        let server = &app.settings.server;
        let limits = FrontDoor {
            header_timeout: Duration::from_millis(server.client_header_timeout_ms),
            connections_max: server.connections_max,
            http2_streams: server.http2_max_concurrent_streams,
            threads: server.threads,
            connections_open: app.metrics.connections_open.clone(),
        };
        let listener = listener
            .into_std()
            .map_err(|e| StoreError::Corrupt(format!("listener: {e}")))?;
        let server = tokio::spawn(serve(listener, routers.subscribe(), stopped, grace, limits));
        tracing::info!(%addr, "flowgate listening");
        Ok(Gateway {
            addr,
            apps,
            routers,
            stop,
            server,
            writer_stop,
            writer,
            watcher,
            exporter,
            alerts,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shared state new requests are served with (for inspection by tests and the demo).
    pub fn app(&self) -> Arc<App> {
        self.apps.borrow().clone()
    }

    /// Applies a new configuration without a restart (`flowgate serve` does on SIGHUP): new
    /// requests are routed, decided and priced by it; requests in flight finish under the plan
    /// they were decided with (their ledger entries carry it). Accounts it declares are seeded,
    /// every account is moved to its plan's new version (keeping its windows and holds when the
    /// plan keeps its state the same way, else rebuilt from the ledger), grants' features are
    /// re-read. On an error nothing served changes: the previous configuration stays in force.
    /// What is bound at start-up — `[server] listen`, the front door's limits, `[store]`,
    /// `[log]` — keeps its old value until a restart; it is logged.
    pub async fn reload(&self, settings: Settings) -> Result<(), StartError> {
        let old = self.app();
        let app = Arc::new(old.reconfigured(settings));
        let router = router(app.clone())?;
        let now = old.clock.now_ms();
        old.store.seed_prices(&price_tables(&app.settings)).await?;
        old.store.seed(&app.settings.accounts, now).await?;
        old.accounts
            .reconfigure(&old.store, app.settings.clone(), now)
            .await?;
        for field in old.settings.fixed_until_restart(&app.settings) {
            tracing::warn!(%field, "changed in the configuration; applies at the next restart");
        }
        drop(self.routers.send_replace(router));
        self.apps.send_replace(app);
        tracing::info!("configuration reloaded");
        Ok(())
    }

    /// Stops accepting, lets in-flight requests finish (up to `shutdown_grace_ms`), then
    /// commits everything queued for the ledger.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.server.await;
        let _ = self.writer_stop.send(());
        let _ = self.writer.await;
        // After the last commit: what it wrote to the outbox is sent by the next start (or
        // another replica) if not now.
        self.exporter.shutdown().await;
        if let Some(alerts) = self.alerts {
            alerts.shutdown().await;
        }
        if let Some(watcher) = self.watcher {
            watcher.abort();
        }
        tracing::info!("flowgate stopped; ledger flushed");
    }
}

/// Every price version of every plan, as the ledger stores them (sorted, so that replicas
/// starting together write them in one order).
pub fn price_tables(settings: &Settings) -> Vec<StoredPriceTable> {
    let mut tables: Vec<StoredPriceTable> = settings
        .plans
        .iter()
        .flat_map(|(name, plan)| {
            plan.prices.iter().map(move |t| StoredPriceTable {
                plan: name.clone(),
                version: t.version.to_string(),
                effective_from: t.effective_from,
                prices: serde_json::to_string(&t.document(&settings.features)).unwrap_or_default(),
            })
        })
        .collect();
    tables.sort_by(|a, b| (&a.plan, &a.version).cmp(&(&b.plan, &b.version)));
    tables
}

/// Applies other replicas' changes to the view as the store reports them. An account that
/// cannot be re-read (the store went away again) is caught up by re-reading everything, retried
/// until it succeeds.
async fn follow(mut changes: tokio::sync::mpsc::Receiver<Change>, apps: watch::Receiver<Arc<App>>) {
    // A change taken from the channel while applying ledger notices, not one itself.
    let mut next: Option<Change> = None;
    loop {
        let change = match next.take() {
            Some(change) => change,
            None => match changes.recv().await {
                Some(change) => change,
                None => return,
            },
        };
        let app = apps.borrow().clone();
        let (accounts, store, clock) = (&app.accounts, &app.store, &app.clock);
        let refreshed = match change {
            Change::Resync => Err(None),
            Change::Account(id) => accounts
                .refresh(store, &id, clock.now_ms())
                .await
                .map_err(Some),
            Change::Ledger(change) => {
                // Every ledger notice already queued is applied in this one hold of the apply
                // lock, which only a re-read waits for: notices that arrive together cost one
                // wait, not one each.
                let mut unknown = Vec::new();
                {
                    let _sync = accounts.apply_lock().await;
                    let mut change = change;
                    loop {
                        if change.sent_at > 0 {
                            let lag_ms = (clock.now_ms() - change.sent_at).max(0);
                            app.metrics
                                .replica_lag_seconds
                                .observe(lag_ms as f64 / 1000.0);
                        }
                        for id in accounts.apply(&change, clock.now_ms()) {
                            if !unknown.contains(&id) {
                                unknown.push(id);
                            }
                        }
                        match changes.try_recv() {
                            Ok(Change::Ledger(more)) => change = more,
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                }
                let mut result = Ok(());
                for id in unknown {
                    result = result.and(
                        accounts
                            .refresh(store, &id, clock.now_ms())
                            .await
                            .map_err(Some),
                    );
                }
                result
            }
        };
        if let Err(failed) = refreshed {
            if let Some(e) = failed {
                tracing::warn!(error = %e, "could not re-read a changed account; re-reading all");
            }
            let mut backoff = Duration::from_millis(100);
            while let Err(e) = accounts.resync(store, clock.now_ms()).await {
                tracing::warn!(error = %e, "could not re-read the account view; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The front door: `threads` serving threads, each with its own single-threaded event loop,
/// accepting from the one listening socket. A connection goes to the thread with the fewest
/// open ([`spread`]); it, its requests, and the upstream connections they use then stay on
/// that thread, as in nginx's workers: no hand-off between threads on the request path (a
/// multi-threaded runtime woke its other worker and moved tasks between them several times
/// per request). Returns once every thread has stopped (see [`serve_thread`]).
async fn serve(
    listener: std::net::TcpListener,
    routers: watch::Receiver<Router>,
    stopped: watch::Receiver<bool>,
    grace: Duration,
    limits: FrontDoor,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.connections_max));
    let (spread, inboxes) = spread::Spread::new(limits.threads, &limits.connections_open);
    let mut done = Vec::with_capacity(limits.threads);
    for (index, inbox) in inboxes.into_iter().enumerate() {
        let listener = match listener.try_clone() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot share the listening socket; fewer serving threads");
                break;
            }
        };
        let (routers, stopped, permits) = (routers.clone(), stopped.clone(), permits.clone());
        let (limits, spread) = (limits.clone(), spread.clone());
        let threads = Threads {
            index,
            spread,
            inbox,
        };
        let (finished, finished_rx) = oneshot::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name(format!("flowgate-http-{index}"))
            .spawn(move || {
                crate::app::set_serving_thread(index);
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(serve_thread(
                        listener, routers, stopped, permits, grace, limits, threads,
                    )),
                    Err(e) => tracing::error!(error = %e, "cannot start a serving thread"),
                }
                drop(finished);
            });
        match spawned {
            Ok(_) => done.push(finished_rx),
            Err(e) => tracing::error!(error = %e, "cannot start a serving thread"),
        }
    }
    // The threads hold their own handles: when the last of them closes, the socket closes.
    drop(listener);
    for finished in done {
        let _ = finished.await; // an error is the thread's end too
    }
}

/// One serving thread: accepts connections (at most `connections_max` open at once, across
/// threads) and serves each with hyper — HTTP/1.1 with a header read timeout that also closes
/// idle keep-alive connections, or HTTP/2 with a stream limit — here, or on the thread with
/// fewer open, which gets it through its inbox. On `stopped` it stops accepting, lets its open
/// connections finish for up to `grace`, then abandons them. Each request is served by the
/// router current when it arrives (see [`Gateway::reload`]).
async fn serve_thread(
    listener: std::net::TcpListener,
    routers: watch::Receiver<Router>,
    mut stopped: watch::Receiver<bool>,
    permits: Arc<tokio::sync::Semaphore>,
    grace: Duration,
    limits: FrontDoor,
    mut threads: Threads,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen on a serving thread");
            return;
        }
    };
    let stop = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    tokio::pin!(stop);
    use hyper_util::server::conn::auto;
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    http.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_streams);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let me = threads.index;
    let serve_here = |tcp: tokio::net::TcpStream, permit: tokio::sync::OwnedSemaphorePermit| {
        let open = spread::Open::new(threads.spread.clone(), me);
        let routers = routers.clone();
        let service = hyper_util::service::TowerToHyperService::new(tower::service_fn(
            move |request: http::Request<hyper::body::Incoming>| {
                let router = routers.borrow().clone();
                tower::ServiceExt::oneshot(router, request)
            },
        ));
        let conn = http
            .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tcp), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // A client that goes away or times out ends its connection; nothing to report.
            let _ = conn.await;
            drop((permit, open));
        });
    };
    loop {
        let (tcp, permit) = tokio::select! {
            () = &mut stop => break,
            Some(handed) = threads.inbox.recv() => {
                match tokio::net::TcpStream::from_std(handed.tcp) {
                    Ok(tcp) => serve_here(tcp, handed.permit),
                    Err(e) => {
                        threads.spread.closed(me);
                        tracing::warn!(error = %e, "cannot take over a handed connection");
                    }
                }
                continue;
            }
            accepted = accept(&listener, &permits) => match accepted {
                Some(a) => a,
                None => break, // the permits closed: never, but then there is nothing to serve
            },
        };
        // Without TCP_NODELAY a stream's small event writes wait for the client's delayed ACK
        // (~40 ms each): an SSE response through the gateway crawled (benches/proxy.sh).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
        let to = threads.spread.pick(me);
        if to == me {
            serve_here(tcp, permit);
            continue;
        }
        let handed = match tcp.into_std() {
            Ok(tcp) => threads.spread.hand(to, spread::Handed { tcp, permit }),
            Err(e) => {
                threads.spread.closed(to);
                tracing::warn!(error = %e, "cannot hand a connection over");
                continue;
            }
        };
        // The other thread has stopped: serve it here after all.
        if let Err(spread::Handed { tcp, permit }) = handed {
            threads.spread.closed(to);
            threads.spread.opened(me);
            match tokio::net::TcpStream::from_std(tcp) {
                Ok(tcp) => serve_here(tcp, permit),
                Err(_) => threads.spread.closed(me),
            }
        }
    }
    drop(listener);
    // Connections handed over before the stop are served like the others. The inbox is
    // closed first: a thread handing one over from now on gets it back and serves it itself,
    // where before it was lost in an inbox nobody read any more.
    threads.inbox.close();
    while let Ok(handed) = threads.inbox.try_recv() {
        match tokio::net::TcpStream::from_std(handed.tcp) {
            Ok(tcp) => serve_here(tcp, handed.permit),
            Err(_) => threads.spread.closed(me),
        }
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!("shutdown grace elapsed; abandoning in-flight requests (released, not charged)");
        }
    }
}

/// The next connection, once one of `permits` is free. Waits and goes on when accepting fails
/// (out of descriptors, a connection reset before accept); `None` only if `permits` closed.
async fn accept(
    listener: &tokio::net::TcpListener,
    permits: &Arc<tokio::sync::Semaphore>,
) -> Option<(tokio::net::TcpStream, tokio::sync::OwnedSemaphorePermit)> {
    // Past the limit, wait for a connection to close before accepting another.
    let permit = permits.clone().acquire_owned().await.ok()?;
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => return Some((tcp, permit)),
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A serving thread's place among the others: its index, the spread of connections over
/// them, and its inbox of connections handed over by the others.
struct Threads {
    index: usize,
    spread: Arc<spread::Spread>,
    inbox: tokio::sync::mpsc::UnboundedReceiver<spread::Handed>,
}

/// The front door's limits, from `[server]`, and its gauge of open connections.
#[derive(Debug, Clone)]
struct FrontDoor {
    header_timeout: Duration,
    connections_max: usize,
    http2_streams: u32,
    threads: usize,
    connections_open: prometheus::IntGaugeVec,
}

/// One configured route's request path: access log → identify → meter → forward.
pub fn stack(
    app: Arc<App>,
    route: Arc<crate::config::Route>,
    pools: Arc<pool::Pools>,
) -> impl tower::Service<
    axum::extract::Request,
    Response = Response,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone
+ Send
+ Sync
+ 'static {
    tower::ServiceBuilder::new()
        .layer(layers::AccessLog::layer(app.clone(), route.feature))
        .layer(layers::Identify::layer(app.clone()))
        .layer(layers::Meter::layer(app.clone(), route.clone()))
        .service(forward::Forward::new(app, route, pools))
}

/// The whole request path: operational endpoints, the configured proxied routes, a JSON 404,
/// and a guard that turns a panic into a 500.
pub fn router(app: Arc<App>) -> Result<Router, ConfigError> {
    let mut router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(crate::api::router(&app).0);
    if app.settings.usage_page.enabled {
        router = router.merge(crate::api::page::router());
    }
    let pools = Arc::new(pool::Pools::new(&app.settings.upstreams));
    for (i, route) in app.settings.routes.iter().enumerate() {
        let route = Arc::new(route.clone());
        let bad_path = |message: String| ConfigError {
            key: format!("routes[{i}].path"),
            line: None,
            message,
        };
        let filter =
            MethodFilter::try_from(route.method.clone()).map_err(|e| bad_path(e.to_string()))?;
        let service = stack(app.clone(), route.clone(), pools.clone());
        // axum panics on a path it cannot route (bad syntax, a conflict): report it as config.
        router = std::panic::catch_unwind(AssertUnwindSafe(move || {
            router.route(&route.path, on_service(filter, service))
        }))
        .map_err(|p| {
            let reason = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            bad_path(format!("axum cannot route this path: {reason}"))
        })?;
    }
    Ok(router
        .fallback(|| async { GatewayError::RouteNotFound })
        .with_state(app)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_panic| {
            tracing::error!("request handler panicked");
            GatewayError::Internal.into_response()
        })))
}

async fn healthz() -> &'static str {
    "ok"
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    app.metrics
        .ledger_queue_depth
        .set(app.ledger.depth() as i64);
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

/// Longest `/readyz` waits for the store to answer.
const READINESS_PING_TIMEOUT: Duration = Duration::from_secs(2);

async fn readyz(State(app): State<Arc<App>>) -> Response {
    // A store that hangs must not hang the probe: a slow answer is a failed one.
    let store = match tokio::time::timeout(READINESS_PING_TIMEOUT, app.store.ping()).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err("store ping timed out".to_owned()),
    };
    let writing = !app.ledger.store_failing();
    let ready = store.is_ok() && writing;
    let body = json!({
        "ready": ready,
        "store_reachable": store.is_ok(),
        "ledger_committing": writing,
        "ledger_queue_depth": app.ledger.depth(),
        "accounts_cached": app.accounts.len(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}
