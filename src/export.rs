//! Billing export: charges and refunds sent from the store's outbox to external billing
//! systems (OpenMeter's CloudEvents ingest, Stripe's meter events), in order per account.
//!
//! # Delivery
//!
//! The ledger commit writes one outbox row per charge and per active sink in its own
//! transaction, and a refund writes one per refund (`store::export`): a charge is exported
//! if and only if it is committed. Here one task per sink sends the rows, oldest first:
//!
//! - **One sender per sink**, across replicas: a task sends only while it holds the sink's
//!   lease in the store (`LEASE_TTL_MS`, renewed before every batch). The rows of one account
//!   therefore leave in id order, which is commit order (the PostgreSQL commit draws the ids
//!   under a per-account lock; SQLite has one writer).
//! - **Marked sent only after a 2xx.** A failure keeps the batch and retries it, with
//!   exponential backoff (`BACKOFF_MIN` doubling to `BACKOFF_MAX`); nothing behind it is sent
//!   before it, so an account's events are never reordered.
//! - **"Exactly once" is at-least-once plus an idempotency id.** Over HTTP a request whose
//!   answer was lost (a timeout, a crash between the 2xx and the mark, a lease that lapsed
//!   during a slow request) is sent again. Every event carries an id that never changes — the
//!   charge's decision id (CloudEvents `id`, Stripe `identifier` and `Idempotency-Key`) — so
//!   the receiver drops the repeat: OpenMeter deduplicates on (`source`, `id`), Stripe on
//!   `identifier` (for at least 24 hours) and answers a repeated `Idempotency-Key` with its
//!   first answer.
//! - **A rejection that resending cannot fix** (a 4xx other than 401, 403, 408, 409 and 429,
//!   e.g. a cancellation Stripe no longer accepts 24 h after the event) is recorded on the row
//!   (`outcome = 'rejected'`), logged with the receiver's answer and counted; the sink moves on.
//!   An authentication failure (401, 403) is retried: fixing the token fixes it.
//!
//! Metrics: `flowgate_export_backlog` and `flowgate_export_lag_seconds` (age of the oldest
//! unsent row) per sink, read from the store by the lease holder; sent and failed counters.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::{self, Clock};
use crate::config::export::{ExportFormat, ExportSink, TokenSource};
use crate::metrics::Metrics;
use crate::store::export::{OutboxEvent, OutboxKind};
use crate::store::{Store, StoreError};

/// How long a sender's lease on its sink lasts without renewal: another replica takes over a
/// dead sender's sink after at most this long.
pub const LEASE_TTL_MS: i64 = 30_000;
/// How often a sender with nothing to send looks again (a commit on this replica wakes it at
/// once; another replica's commit or a refund is seen within this).
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// The first retry's delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest delay between retries.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Bytes of a receiver's error answer kept for the log.
const ERROR_BODY_MAX: usize = 512;

/// Why the export could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A sink's token could not be read (the reason names the variable or file, never the
    /// token).
    #[error("export[{sink}]: {reason}")]
    Token {
        /// The sink.
        sink: String,
        /// What is wrong.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("export[{sink}]: http client: {reason}")]
    Client {
        /// The sink.
        sink: String,
        /// What is wrong.
        reason: String,
    },
    /// The store refused to register the sinks.
    #[error("export: {0}")]
    Store(#[from] StoreError),
}

/// Why one send failed.
#[derive(Debug, thiserror::Error)]
enum SendError {
    /// The receiver answered with a status that may succeed later.
    #[error("receiver answered {status}: {body}")]
    Status { status: u16, body: String },
    /// The receiver refused the events for good.
    #[error("receiver rejected the events ({status}): {body}")]
    Rejected { status: u16, body: String },
    /// No answer (refused connection, timeout, broken connection).
    #[error("no answer: {0}")]
    Connect(String),
}

impl SendError {
    fn reason(&self) -> &'static str {
        match self {
            SendError::Status { .. } => "status",
            SendError::Rejected { .. } => "rejected",
            SendError::Connect(_) => "connect",
        }
    }
}

/// The running senders, one per sink.
pub struct Exporter {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    wake: watch::Sender<u64>,
}

impl Exporter {
    /// Registers `sinks` in the store (the commit writes outbox rows for them from now on) and
    /// starts a sender for each.
    pub async fn start(
        store: Store,
        sinks: &[ExportSink],
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Result<Exporter, ExportError> {
        let registered: Vec<(String, String)> = sinks
            .iter()
            .map(|s| (s.name.clone(), s.kind.to_owned()))
            .collect();
        let mut senders = Vec::with_capacity(sinks.len());
        for sink in sinks {
            let token = read_token(&sink.name, &sink.token)?;
            let http = reqwest::Client::builder()
                .timeout(Duration::from_millis(sink.timeout_ms))
                .build()
                .map_err(|e| ExportError::Client {
                    sink: sink.name.clone(),
                    reason: e.to_string(),
                })?;
            senders.push(Sender {
                sink: sink.clone(),
                token,
                http,
                store: store.clone(),
                metrics: metrics.clone(),
                clock: clock.clone(),
                owner: uuid::Uuid::now_v7().to_string(),
            });
        }
        store
            .register_export_sinks(&registered, clock.now_ms())
            .await?;
        let (stop, stopped) = watch::channel(false);
        let (wake, woken) = watch::channel(0u64);
        let tasks = senders
            .into_iter()
            .map(|s| tokio::spawn(s.run(stopped.clone(), woken.clone())))
            .collect();
        Ok(Exporter { stop, tasks, wake })
    }

    /// Wakes the senders (something was committed): called by the ledger writer.
    pub fn waker(&self) -> impl Fn() + Send + Sync + 'static {
        let wake = self.wake.clone();
        move || wake.send_modify(|n| *n = n.wrapping_add(1))
    }

    /// Stops the senders: a request in flight finishes (bounded by the sink's `timeout_ms`),
    /// and each lease is given back so another replica takes over at once. Unsent rows stay in
    /// the outbox for the next start.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

fn read_token(sink: &str, source: &TokenSource) -> Result<Option<String>, ExportError> {
    let err = |reason: String| ExportError::Token {
        sink: sink.to_owned(),
        reason,
    };
    let token = match source {
        TokenSource::None => return Ok(None),
        TokenSource::Env(var) => std::env::var(var)
            .map_err(|_| err(format!("token_env: the variable {var} is not set")))?,
        TokenSource::File(path) => std::fs::read_to_string(path)
            .map_err(|e| err(format!("token_file: cannot read {path}: {e}")))?,
    };
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(err("the token is empty".into()));
    }
    Ok(Some(token))
}

/// One sink's sender.
struct Sender {
    sink: ExportSink,
    /// The bearer token (never logged).
    token: Option<String>,
    http: reqwest::Client,
    store: Store,
    metrics: Arc<Metrics>,
    clock: Clock,
    /// This task's name in the sink's lease.
    owner: String,
}

impl Sender {
    async fn run(self, mut stop: watch::Receiver<bool>, mut wake: watch::Receiver<u64>) {
        let name = self.sink.name.as_str();
        let mut backoff = BACKOFF_MIN;
        let mut failing = false;
        loop {
            if *stop.borrow() {
                break;
            }
            let pause = match self.round().await {
                Ok(Round::Sent) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!(sink = name, "billing export delivers again");
                    }
                    backoff = BACKOFF_MIN;
                    continue;
                }
                Ok(Round::Idle | Round::NotLeader) => POLL_INTERVAL,
                Err(e) => {
                    self.metrics
                        .export_failed
                        .with_label_values(&[name, e.reason()])
                        .inc();
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(sink = name, error = %e, "billing export failed; retrying with backoff");
                    }
                    let pause = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    pause
                }
            };
            wake.borrow_and_update();
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = wake.changed(), if !failing => {}
                _ = stop.changed() => {}
            }
        }
        if let Err(e) = self.store.export_release(name, &self.owner).await {
            tracing::warn!(sink = name, error = %e, "billing export lease not given back; it lapses");
        }
    }

    /// Takes the lease, sends the oldest batch, marks what was delivered.
    async fn round(&self) -> Result<Round, RoundError> {
        let name = self.sink.name.as_str();
        let now = self.clock.now_ms();
        if !self
            .store
            .export_lease(name, &self.owner, LEASE_TTL_MS, now)
            .await?
        {
            return Ok(Round::NotLeader);
        }
        let backlog = self.store.export_backlog(name).await?;
        self.metrics
            .export_backlog
            .with_label_values(&[name])
            .set(i64::try_from(backlog.rows).unwrap_or(i64::MAX));
        self.metrics
            .export_lag_seconds
            .with_label_values(&[name])
            .set(
                backlog
                    .oldest
                    .map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0),
            );
        let events = self
            .store
            .export_pending(name, self.sink.batch_size)
            .await?;
        if events.is_empty() {
            return Ok(Round::Idle);
        }
        let (delivered, failure) = self.send(&events).await;
        if !delivered.is_empty() {
            self.store
                .export_sent(name, &delivered, self.clock.now_ms())
                .await?;
            self.metrics
                .export_sent
                .with_label_values(&[name])
                .inc_by(delivered.len() as u64);
        }
        match failure {
            None => Ok(Round::Sent),
            Some((ids, SendError::Rejected { status, body })) => {
                tracing::error!(sink = name, status, body = %body, events = ids.len(), "billing export rejected by the receiver; recorded as rejected, moving on");
                self.metrics
                    .export_failed
                    .with_label_values(&[name, "rejected"])
                    .inc();
                self.store
                    .export_rejected(name, &ids, self.clock.now_ms())
                    .await?;
                Ok(Round::Sent)
            }
            Some((ids, e)) => {
                self.store.export_failed(name, &ids).await?;
                Err(RoundError::Send(e))
            }
        }
    }

    /// Sends `events` in order; returns the ids delivered, and the failure that stopped it
    /// with the ids it concerns.
    async fn send(&self, events: &[OutboxEvent]) -> (Vec<i64>, Option<(Vec<i64>, SendError)>) {
        match &self.sink.format {
            ExportFormat::CloudEvents { source } => {
                let body: Vec<serde_json::Value> =
                    events.iter().map(|e| cloudevent(e, source)).collect();
                let request = self
                    .http
                    .post(self.sink.url.to_string())
                    .header(
                        http::header::CONTENT_TYPE,
                        "application/cloudevents-batch+json",
                    )
                    .body(serde_json::Value::Array(body).to_string());
                let ids = events.iter().map(|e| e.id).collect::<Vec<_>>();
                match self.post(request).await {
                    Ok(()) => (ids, None),
                    Err(e) => (Vec::new(), Some((ids, e))),
                }
            }
            ExportFormat::Stripe {
                event_name,
                customer,
                customers,
                value_units,
            } => {
                // Stripe's v1 meter events take one event per request.
                let mut delivered = Vec::with_capacity(events.len());
                for e in events {
                    let customer = customers
                        .get(&e.account_id)
                        .cloned()
                        .unwrap_or_else(|| customer.replace("{account}", &e.account_id));
                    let value = if *value_units { e.units } else { e.credits };
                    let (path, form, key) = stripe_request(e, event_name, customer, value);
                    let url = format!("{}{path}", self.sink.url.to_string().trim_end_matches('/'));
                    let request = self
                        .http
                        .post(url)
                        .header("Idempotency-Key", key)
                        .header(
                            http::header::CONTENT_TYPE,
                            "application/x-www-form-urlencoded",
                        )
                        .body(serde_urlencoded::to_string(&form).unwrap_or_default());
                    if let Err(err) = self.post(request).await {
                        return (delivered, Some((vec![e.id], err)));
                    }
                    delivered.push(e.id);
                }
                (delivered, None)
            }
        }
    }

    async fn post(&self, request: reqwest::RequestBuilder) -> Result<(), SendError> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request
            .send()
            .await
            .map_err(|e| SendError::Connect(e.without_url().to_string()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let mut body = response.text().await.unwrap_or_default();
        if body.len() > ERROR_BODY_MAX {
            let mut end = ERROR_BODY_MAX;
            while !body.is_char_boundary(end) {
                end -= 1;
            }
            body.truncate(end);
        }
        let status = status.as_u16();
        let retryable = matches!(status, 401 | 403 | 408 | 409 | 429) || status >= 500;
        if retryable || status < 400 {
            Err(SendError::Status { status, body })
        } else {
            Err(SendError::Rejected { status, body })
        }
    }
}

/// A Stripe request for `e`: the path, the form fields and the `Idempotency-Key`. A charge is a
/// meter event (`identifier`: the decision id); a refund cancels it (a meter event adjustment,
/// which Stripe accepts within 24 hours of the event).
pub fn stripe_request(
    e: &OutboxEvent,
    event_name: &str,
    customer: String,
    value: u64,
) -> (&'static str, Vec<(String, String)>, String) {
    let event_name = event_name.replace("{feature}", &e.feature);
    match e.kind {
        OutboxKind::Charge => (
            "/v1/billing/meter_events",
            vec![
                ("event_name".into(), event_name),
                ("identifier".into(), e.decision_id.clone()),
                ("timestamp".into(), (e.decided_at / 1000).to_string()),
                ("payload[stripe_customer_id]".into(), customer),
                ("payload[value]".into(), value.to_string()),
            ],
            format!("flowgate-charge-{}", e.decision_id),
        ),
        OutboxKind::Refund => (
            "/v1/billing/meter_event_adjustments",
            vec![
                ("event_name".into(), event_name),
                ("type".into(), "cancel".into()),
                ("cancel[identifier]".into(), e.decision_id.clone()),
            ],
            format!("flowgate-refund-{}", e.decision_id),
        ),
    }
}

/// What one round did.
enum Round {
    /// Sent (or recorded as rejected) a batch: go on at once.
    Sent,
    /// Nothing to send.
    Idle,
    /// Another gateway holds the sink's lease.
    NotLeader,
}

#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error(transparent)]
    Send(#[from] SendError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl RoundError {
    fn reason(&self) -> &'static str {
        match self {
            RoundError::Send(e) => e.reason(),
            RoundError::Store(_) => "store",
        }
    }
}

/// The CloudEvents 1.0 (structured mode) form of `e`, as OpenMeter's ingest takes it. A
/// refund is its own event type (`flowgate.refund`) naming the charge it takes back: OpenMeter
/// has no cancellation, so a meter on it subtracts.
pub fn cloudevent(e: &OutboxEvent, source: &str) -> serde_json::Value {
    let dimensions: serde_json::Value = e
        .dimensions
        .as_deref()
        .and_then(|d| serde_json::from_str(d).ok())
        .unwrap_or(serde_json::Value::Null);
    let (id, kind, time) = match e.kind {
        OutboxKind::Charge => (e.decision_id.clone(), "flowgate.charge", e.decided_at),
        OutboxKind::Refund => (
            format!("{}-refund", e.decision_id),
            "flowgate.refund",
            e.created_at,
        ),
    };
    let mut data = json!({
        "decision_id": e.decision_id,
        "feature": e.feature,
        "units": e.units,
        "credits": e.credits,
        "plan": e.plan,
        "price_version": e.price_version,
    });
    if let Some(model) = &e.model {
        data["model"] = json!(model);
    }
    if !dimensions.is_null() {
        data["dimensions"] = dimensions;
    }
    json!({
        "specversion": "1.0",
        "id": id,
        "source": source,
        "type": kind,
        "subject": e.account_id,
        "time": clock::rfc3339(time),
        "datacontenttype": "application/json",
        "data": data,
    })
}
