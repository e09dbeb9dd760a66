//! Threshold alerts: `[alerts]` rules (a window's usage at N % of its limit, credits left below
//! N) evaluated on the store's committed truth, recorded once per (account, rule, period) in
//! the store, and delivered to a webhook, signed, with retries.
//!
//! # Once per period, across restarts and replicas
//!
//! - **Evaluated where the truth is committed.** The ledger writer's commit hook names the
//!   accounts a batch charged; the evaluator re-reads each one's committed usage (every
//!   replica's unrefunded charges) and balances from the store, so a replica's stale view can
//!   neither hide a crossing nor invent one. At start-up every account charged in the last 32
//!   days is evaluated once, so a crossing committed just before a crash is not skipped.
//! - **Recorded with a unique key.** A firing rule inserts `alerts (account, rule,
//!   period_start)` with `ON CONFLICT DO NOTHING`: however many gateways evaluate it, or how
//!   often one restarts, one row exists per period, and only the inserted row is sent.
//!   A window's period is its calendar period, or for a rolling window consecutive spans of
//!   its length from the Unix epoch (UTC); a balance rule's is its day, week or month (UTC).
//! - **Delivered from the store.** A sender claims due rows (pushing `next_attempt_at` past its
//!   attempt: no other sender takes them meanwhile, and a dead sender's rows come due again),
//!   POSTs each, and marks it sent after a 2xx; a failure makes it due again after a backoff
//!   (`RETRY_MIN` doubling to `RETRY_MAX`, kept in the row: it survives restarts). Delivery is
//!   at-least-once; the body's `id` is stable, so a receiver can drop a repeat.
//!
//! # The signature
//!
//! Like Stripe's: the header `Flowgate-Signature: t=<unix seconds>,v1=<hex>`, where `<hex>` is
//! the HMAC-SHA256, keyed with the secret, of `"<t>.<raw body>"`. A receiver recomputes it over
//! the body as received, compares in constant time, and rejects a `t` too far from its clock
//! (replays). Each attempt is signed anew.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::accounts::{Accounts, grant_of, history_start};
use crate::clock::{self, Clock};
use crate::config::Settings;
use crate::config::alerts::{AlertCondition, AlertRule, AlertSettings};
use crate::config::export::TokenSource;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use crate::waterfall::{AccountState, GrantKind, LayerKind, Tz, WindowKind};

/// The signature's header.
pub const SIGNATURE_HEADER: &str = "flowgate-signature";
/// The first retry's delay.
pub const RETRY_MIN_MS: i64 = 200;
/// The longest delay between retries.
pub const RETRY_MAX_MS: i64 = 300_000;
/// How long a claimed alert is this sender's (longer than a delivery's timeout).
const CLAIM_MS: i64 = 660_000;
/// How often the sender looks for due alerts when nothing woke it.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Alerts claimed at once.
const CLAIM_BATCH: u32 = 20;
/// How far back the start-up sweep looks for charged accounts: a month's balance period.
const SWEEP_MS: i64 = 32 * 24 * 3_600_000;

/// Why alerts could not start.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    /// The signing secret could not be read.
    #[error("alerts: {0}")]
    Secret(String),
    /// The HTTP client could not be built.
    #[error("alerts: http client: {0}")]
    Client(String),
}

/// The running evaluator and sender.
pub struct Alerts {
    accounts_tx: mpsc::UnboundedSender<Vec<String>>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Alerts {
    /// Starts evaluating and sending, if the config has `[alerts]`.
    pub fn start(
        store: Store,
        accounts: Accounts,
        settings: Arc<Settings>,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Result<Option<Alerts>, AlertError> {
        let Some(config) = settings.alerts.clone() else {
            return Ok(None);
        };
        let secret = read_secret(&config.secret)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .build()
            .map_err(|e| AlertError::Client(e.to_string()))?;
        let (accounts_tx, accounts_rx) = mpsc::unbounded_channel();
        let (stop, stopped) = watch::channel(false);
        let (wake, woken) = watch::channel(0u64);
        let evaluator = Evaluator {
            store: store.clone(),
            accounts,
            settings,
            rules: config.rules.clone(),
            metrics: metrics.clone(),
            clock: clock.clone(),
            wake,
        };
        let sender = Sender {
            store,
            config,
            secret,
            http,
            metrics,
            clock,
        };
        let tasks = vec![
            tokio::spawn(evaluator.run(accounts_rx, stopped.clone())),
            tokio::spawn(sender.run(stopped, woken)),
        ];
        Ok(Some(Alerts {
            accounts_tx,
            stop,
            tasks,
        }))
    }

    /// The ledger writer's commit hook: the accounts a commit charged are evaluated.
    pub fn hook(&self) -> impl Fn(&[String]) + Send + Sync + 'static {
        let tx = self.accounts_tx.clone();
        move |accounts: &[String]| {
            let _ = tx.send(accounts.to_vec());
        }
    }

    /// Stops both tasks (an evaluation or delivery in flight finishes first). What is
    /// recorded and unsent is sent by the next start or another replica.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

fn read_secret(source: &TokenSource) -> Result<Vec<u8>, AlertError> {
    let secret = match source {
        TokenSource::None => {
            return Err(AlertError::Secret("a signing secret is required".into()));
        }
        TokenSource::Env(var) => std::env::var(var).map_err(|_| {
            AlertError::Secret(format!("secret_env: the variable {var} is not set"))
        })?,
        TokenSource::File(path) => std::fs::read_to_string(path)
            .map_err(|e| AlertError::Secret(format!("secret_file: cannot read {path}: {e}")))?,
    };
    let secret = secret.trim();
    if secret.len() < 16 {
        return Err(AlertError::Secret(
            "the signing secret must be at least 16 characters".into(),
        ));
    }
    Ok(secret.as_bytes().to_vec())
}

/// The `Flowgate-Signature` value for `body` signed at `t` (Unix seconds) with `secret`.
pub fn signature(secret: &[u8], t: i64, body: &[u8]) -> String {
    // HMAC takes a key of any length: `new_from_slice` does not fail for it.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Whether `header` is a valid signature of `body` with `secret`, made within `tolerance_s` of
/// `now_s` (what a receiver checks; the comparison is constant-time).
pub fn verify(secret: &[u8], header: &str, body: &[u8], now_s: i64, tolerance_s: i64) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = hex::decode(v).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    if (now_s - t).abs() > tolerance_s {
        return false;
    }
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&v1).is_ok()
}

/// Evaluates the rules for the accounts commits charged.
struct Evaluator {
    store: Store,
    accounts: Accounts,
    settings: Arc<Settings>,
    rules: Vec<AlertRule>,
    metrics: Arc<Metrics>,
    clock: Clock,
    /// Tells the sender a new alert is recorded.
    wake: watch::Sender<u64>,
}

impl Evaluator {
    async fn run(
        self,
        mut rx: mpsc::UnboundedReceiver<Vec<String>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut pending: BTreeSet<String> = BTreeSet::new();
        // Start-up: a crossing committed just before a crash is evaluated now.
        match self
            .store
            .accounts_charged_since(self.clock.now_ms() - SWEEP_MS)
            .await
        {
            Ok(charged) => pending.extend(charged),
            Err(e) => {
                tracing::warn!(error = %e, "alerts: start-up sweep failed; evaluating new commits only")
            }
        }
        loop {
            while let Ok(batch) = rx.try_recv() {
                pending.extend(batch);
            }
            if pending.is_empty() {
                tokio::select! {
                    got = rx.recv() => match got {
                        Some(batch) => pending.extend(batch),
                        None => return,
                    },
                    _ = stop.changed() => return,
                }
                continue;
            }
            if *stop.borrow() {
                return;
            }
            let Some(account) = pending.pop_first() else {
                continue;
            };
            if let Err(e) = self.evaluate(&account).await {
                tracing::warn!(account = %account, error = %e, "alerts: evaluation failed; retrying");
                self.metrics.store_errors.inc();
                pending.insert(account);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }

    /// Reads `id`'s committed usage and balances and records every rule that fires.
    async fn evaluate(&self, id: &str) -> Result<(), StoreError> {
        let Some(account) = self.accounts.get(id) else {
            return Ok(());
        };
        let plan = account.plan.clone();
        let now = self.clock.now_ms();
        let grants = self.store.grants(id).await?;
        let mut state = AccountState::new(
            &plan,
            grants.iter().map(|g| grant_of(&self.settings, g)).collect(),
            now,
        );
        for draw in self
            .store
            .account_draws_since(id, history_start(&plan, now))
            .await?
        {
            state.observe(&plan, &draw, now);
        }
        for rule in &self.rules {
            let fired = match &rule.condition {
                AlertCondition::WindowPercent {
                    layer,
                    window,
                    percent,
                } => {
                    let Some(index) = plan.layers.iter().position(|l| {
                        l.name == *layer && matches!(l.kind, LayerKind::UsageLimit { .. })
                    }) else {
                        continue;
                    };
                    state
                        .windows(&plan, index, now)
                        .find(|w| w.window.name == *window)
                        .filter(|w| {
                            w.window.limit > 0
                                && u128::from(w.used) * 100
                                    >= u128::from(*percent) * u128::from(w.window.limit)
                        })
                        .map(|w| {
                            let period_start = match w.window.kind {
                                WindowKind::Rolling { minutes } => {
                                    let len = i64::from(minutes) * 60_000;
                                    now.div_euclid(len) * len
                                }
                                WindowKind::Calendar { .. } => w.window.span(now).0,
                            };
                            (
                                period_start,
                                json!({
                                    "layer": &**layer,
                                    "window": &**window,
                                    "percent": percent,
                                    "used": w.used,
                                    "limit": w.window.limit,
                                    "reset_at": clock::rfc3339(w.reset_at),
                                }),
                            )
                        })
                }
                AlertCondition::BalanceBelow { credits, period } => {
                    let mut held = false;
                    let mut balance = 0u64;
                    for g in state.grants() {
                        if matches!(g.kind, GrantKind::Credits | GrantKind::Promotion)
                            && g.expires_at > now
                        {
                            held = true;
                            balance += g.balance;
                        }
                    }
                    // An account without credit grants has no balance to run low.
                    (held && balance < *credits).then(|| {
                        (
                            period.bounds(Tz::UTC, now).0,
                            json!({ "credits": balance, "below": credits }),
                        )
                    })
                }
            };
            let Some((period_start, detail)) = fired else {
                continue;
            };
            let kind = match rule.condition {
                AlertCondition::WindowPercent { .. } => "window_percent",
                AlertCondition::BalanceBelow { .. } => "balance_below",
            };
            let mut body = json!({
                "id": uuid::Uuid::now_v7().to_string(),
                "type": format!("flowgate.alert.{kind}"),
                "rule": rule.name,
                "account": id,
                "period_start": clock::rfc3339(period_start),
                "created_at": clock::rfc3339(now),
            });
            body[kind] = detail;
            let body = body.to_string();
            if self
                .store
                .insert_alert(id, &rule.name, period_start, &body, now)
                .await?
            {
                tracing::info!(account = id, rule = %rule.name, "alert recorded");
                self.metrics
                    .alerts_fired
                    .with_label_values(&[&rule.name])
                    .inc();
                self.wake.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
        Ok(())
    }
}

/// Delivers recorded alerts to the webhook.
struct Sender {
    store: Store,
    config: AlertSettings,
    /// The signing secret (never logged).
    secret: Vec<u8>,
    http: reqwest::Client,
    metrics: Arc<Metrics>,
    clock: Clock,
}

impl Sender {
    async fn run(self, mut stop: watch::Receiver<bool>, mut wake: watch::Receiver<u64>) {
        loop {
            if *stop.borrow() {
                return;
            }
            wake.borrow_and_update();
            let claimed = match self
                .store
                .claim_alerts(CLAIM_BATCH, CLAIM_MS, self.clock.now_ms())
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "alerts: claiming failed; retrying");
                    Vec::new()
                }
            };
            let busy = claimed.len() == CLAIM_BATCH as usize;
            for alert in claimed {
                let result = self.deliver(&alert.payload).await;
                let now = self.clock.now_ms();
                let marked = match result {
                    Ok(()) => {
                        self.metrics.alerts_sent.inc();
                        self.store.alert_sent(alert.id, now).await
                    }
                    Err(reason) => {
                        self.metrics.alerts_failed.inc();
                        let delay = RETRY_MIN_MS
                            .saturating_mul(1i64 << alert.attempts.min(20))
                            .min(RETRY_MAX_MS);
                        tracing::warn!(alert = alert.id, attempts = alert.attempts + 1, %reason, retry_in_ms = delay, "alert delivery failed");
                        self.store.alert_failed(alert.id, now + delay).await
                    }
                };
                if let Err(e) = marked {
                    // The claim lapses and the alert is sent again: at-least-once.
                    tracing::warn!(alert = alert.id, error = %e, "alerts: marking failed");
                }
            }
            if busy {
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
                _ = wake.changed() => {}
                _ = stop.changed() => {}
            }
        }
    }

    async fn deliver(&self, body: &str) -> Result<(), String> {
        let t = self.clock.now_ms().div_euclid(1000);
        let response = self
            .http
            .post(self.config.webhook.to_string())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(
                SIGNATURE_HEADER,
                signature(&self.secret, t, body.as_bytes()),
            )
            .body(body.to_owned())
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("webhook answered {}", response.status().as_u16()))
        }
    }
}
