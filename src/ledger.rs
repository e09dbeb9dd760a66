//! The cold path: usage queued by the gateway, committed to the store in batches.
//!
//! The gateway never waits for the store. When a request ends (completed, failed, denied,
//! abandoned) its [`LedgerEntry`] goes onto an unbounded channel; the [`LedgerWriter`] task
//! drains it in batches of at most `ledger_batch_size_max`, and commits each batch in one store
//! transaction. A batch that fails to commit is kept and retried with backoff: queued usage is
//! never dropped. The bound on memory is enforced at the door instead: when more than
//! `ledger_queue_max` entries wait, the gateway refuses new requests (503) until the writer has
//! caught up, so the queue cannot grow without limit while the store is down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::accounts::{AccountId, Accounts};
use crate::store::{Committed, Store};
use crate::waterfall::{Decision, Millis, Plan};

/// How a request ended, as recorded in its usage event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The upstream answered with success and the response was delivered: charged.
    Completed,
    /// The waterfall denied the request (the code says why).
    Denied,
    /// The upstream answered with a non-success status: not charged.
    UpstreamError,
    /// The upstream did not answer in time (504): not charged.
    UpstreamTimeout,
    /// The upstream could not be reached (502): not charged.
    UpstreamUnavailable,
    /// The upstream's response broke off mid-body: not charged.
    UpstreamAborted,
    /// The client went away before the response completed: not charged.
    ClientAborted,
    /// The request handler failed internally: not charged.
    Internal,
    /// A repeat of an `Idempotency-Key` that was already charged: forwarded, not charged again.
    Replay,
    /// Found by the store to repeat an already-charged key (e.g. after a restart): not charged.
    Duplicate,
}

impl Outcome {
    /// The name stored in the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Denied => "denied",
            Outcome::UpstreamError => "upstream_error",
            Outcome::UpstreamTimeout => "upstream_timeout",
            Outcome::UpstreamUnavailable => "upstream_unavailable",
            Outcome::UpstreamAborted => "upstream_aborted",
            Outcome::ClientAborted => "client_aborted",
            Outcome::Internal => "internal_error",
            Outcome::Replay => "replay",
            Outcome::Duplicate => "duplicate",
        }
    }
}

/// Everything the ledger needs to record one request: its usage event, and when charged its
/// monetization event and balance updates.
#[derive(Debug, Clone)]
pub struct LedgerEntry {
    /// The decision id given to the client (`x-flowgate-decision-id`).
    pub decision_id: uuid::Uuid,
    /// Who made the request.
    pub account: AccountId,
    /// The account's plan at decision time (names layers, gives the price version).
    pub plan: Arc<Plan>,
    /// The feature's name.
    pub feature: Arc<str>,
    /// The decision; its draws are what is charged when `outcome` is `Completed`.
    pub decision: Decision,
    /// How the request ended.
    pub outcome: Outcome,
    /// The denial or error code, when there is one.
    pub code: Option<&'static str>,
    /// The upstream's status, when it answered.
    pub upstream_status: Option<u16>,
    /// The client's `Idempotency-Key`, if it sent one.
    pub idempotency_key: Option<Box<str>>,
    /// When the decision was made.
    pub decided_at: Millis,
    /// When the request ended.
    pub completed_at: Millis,
}

impl LedgerEntry {
    /// Whether this entry charges the account.
    pub fn charged(&self) -> bool {
        self.outcome == Outcome::Completed && self.decision.admitted()
    }

    /// The key that makes a charge unique: the client's key scoped to the account, or the
    /// decision id when the client sent none.
    pub fn idempotency_key(&self) -> String {
        match &self.idempotency_key {
            Some(k) => format!("{}:{k}", self.account),
            None => self.decision_id.to_string(),
        }
    }

    /// The decision as stored: every layer checked, what it had and gave.
    pub fn decision_json(&self) -> serde_json::Value {
        decision_json(&self.plan, &self.decision)
    }
}

/// Describes a decision layer by layer, with the names the plan gives them.
pub fn decision_json(plan: &Plan, decision: &Decision) -> serde_json::Value {
    let layers: Vec<_> = decision
        .layers
        .iter()
        .filter_map(|r| {
            let layer = plan.layers.get(r.layer as usize)?;
            Some(serde_json::json!({
                "layer": &*layer.name,
                "kind": layer.kind.tag(),
                "eligible": r.eligible,
                "available_units": r.available_units,
                "available_credits": r.available_credits,
                "gave_units": r.gave_units,
                "gave_credits": r.gave_credits,
                "reset_at": r.reset_at.map(crate::clock::rfc3339),
            }))
        })
        .collect();
    serde_json::json!({
        "plan": &*plan.name,
        "price_version": &*plan.price_version,
        "units": decision.units,
        "credits_per_unit": decision.credits_per_unit,
        "admitted": decision.admitted(),
        "denial": decision.denial,
        "layers": layers,
        "draws": decision.draws,
    })
}

/// Bounds and pacing of the writer.
#[derive(Debug, Clone, Copy)]
pub struct WriterSettings {
    /// Most entries per transaction.
    pub batch_size_max: usize,
    /// Longest wait for a batch to fill.
    pub flush_interval: Duration,
    /// Entries waiting past which the gateway refuses new work.
    pub queue_max: usize,
}

/// The gateway's handle on the ledger queue.
#[derive(Clone, Debug)]
pub struct LedgerQueue {
    tx: mpsc::UnboundedSender<LedgerEntry>,
    shared: Arc<QueueState>,
}

/// State shared by the queue's producers, the writer and the health checks.
#[derive(Debug)]
struct QueueState {
    /// Entries sent but not yet committed.
    depth: AtomicUsize,
    /// Admission stops at this depth.
    queue_max: usize,
    /// Whether the last commit attempt failed (the store is unreachable or refusing).
    store_failing: AtomicBool,
}

impl LedgerQueue {
    /// Queues an entry. Never blocks and never drops: the bound is applied by [`Self::full`].
    pub fn push(&self, entry: LedgerEntry) {
        self.shared.depth.fetch_add(1, Ordering::Relaxed);
        if let Err(mpsc::error::SendError(entry)) = self.tx.send(entry) {
            // Only after the writer has stopped (shutdown): say so loudly rather than silently.
            self.shared.depth.fetch_sub(1, Ordering::Relaxed);
            tracing::error!(decision_id = %entry.decision_id, "ledger writer stopped; usage event not recorded");
        }
    }

    /// Entries waiting to be committed.
    pub fn depth(&self) -> usize {
        self.shared.depth.load(Ordering::Relaxed)
    }

    /// Whether new requests must be refused until the writer catches up.
    pub fn full(&self) -> bool {
        self.depth() >= self.shared.queue_max
    }

    /// Whether the writer's last commit failed.
    pub fn store_failing(&self) -> bool {
        self.shared.store_failing.load(Ordering::Relaxed)
    }
}

/// The background task that commits queued entries.
pub struct LedgerWriter {
    rx: mpsc::UnboundedReceiver<LedgerEntry>,
    shared: Arc<QueueState>,
    store: Store,
    accounts: Accounts,
    settings: WriterSettings,
}

/// Creates the queue and its writer; run the writer with [`LedgerWriter::run`].
pub fn channel(
    store: Store,
    accounts: Accounts,
    settings: WriterSettings,
) -> (LedgerQueue, LedgerWriter) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(QueueState {
        depth: AtomicUsize::new(0),
        queue_max: settings.queue_max,
        store_failing: AtomicBool::new(false),
    });
    (
        LedgerQueue {
            tx,
            shared: shared.clone(),
        },
        LedgerWriter {
            rx,
            shared,
            store,
            accounts,
            settings,
        },
    )
}

impl LedgerWriter {
    /// Commits batches until `stop` resolves (or every [`LedgerQueue`] handle is dropped), then
    /// commits whatever is still queued and returns.
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        let mut batch = Vec::with_capacity(self.settings.batch_size_max);
        let mut stop = std::pin::pin!(stop);
        let mut stopping = false;
        loop {
            let received = if stopping {
                self.rx
                    .recv_many(&mut batch, self.settings.batch_size_max)
                    .await
            } else {
                tokio::select! {
                    n = self.rx.recv_many(&mut batch, self.settings.batch_size_max) => n,
                    () = &mut stop => {
                        // No new entries from here on; drain what is queued.
                        stopping = true;
                        self.rx.close();
                        continue;
                    }
                }
            };
            if received == 0 {
                return; // closed and drained
            }
            // Give a small batch a moment to fill: fewer, larger transactions.
            if batch.len() < self.settings.batch_size_max && !self.settings.flush_interval.is_zero()
            {
                let deadline = tokio::time::Instant::now() + self.settings.flush_interval;
                while batch.len() < self.settings.batch_size_max {
                    let room = self.settings.batch_size_max - batch.len();
                    match tokio::time::timeout_at(deadline, self.rx.recv_many(&mut batch, room))
                        .await
                    {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            }
            self.commit(&batch).await;
            self.shared.depth.fetch_sub(batch.len(), Ordering::Relaxed);
            batch.clear();
        }
    }

    /// Commits one batch, retrying with backoff until the store takes it.
    async fn commit(&self, batch: &[LedgerEntry]) {
        let mut backoff = Duration::from_millis(50);
        let results = loop {
            match self.store.commit(batch, crate::clock::now_ms()).await {
                Ok(results) => break results,
                Err(e) => {
                    if !self.shared.store_failing.swap(true, Ordering::Relaxed) {
                        tracing::error!(error = %e, pending = self.shared.depth.load(Ordering::Relaxed), "ledger commit failed; keeping the batch and retrying");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        if self.shared.store_failing.swap(false, Ordering::Relaxed) {
            tracing::info!("ledger commits succeed again");
        }
        for (entry, result) in batch.iter().zip(results) {
            if result == Committed::Duplicate {
                // The store already charged this key (another replica, or before a restart):
                // give back what the in-memory view took for it.
                self.accounts.release(&entry.account, &entry.decision.draws);
            }
        }
    }
}
