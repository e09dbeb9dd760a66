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

use tokio::sync::mpsc;

use crate::accounts::Accounts;
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::store::{Committed, Store};
use crate::strict::Strict;
use crate::usage::{LedgerEntry, Outcome};

/// How long strict mode's usage counters are kept: a free tier's month and more (a strict
/// plan's windows are at most 31 days long, `config`).
const COUNTERS_KEPT_MS: i64 = 40 * 24 * 3_600_000;

/// Told after each commit which accounts it charged (the billing export wakes its senders, the
/// alerts evaluate those accounts). Called on the writer's task: it must not block.
pub type CommitHook = Arc<dyn Fn(&[String]) + Send + Sync>;

/// Bounds and pacing of the writer.
#[derive(Debug, Clone, Copy)]
pub struct WriterSettings {
    /// Most entries per transaction.
    pub batch_size_max: usize,
    /// Longest wait for a batch to fill.
    pub flush_interval: Duration,
    /// Entries waiting past which the gateway refuses new work.
    pub queue_max: usize,
    /// How often grants past their expiry are written off (`expired` balance updates).
    pub expiry_interval: Duration,
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
    metrics: Arc<Metrics>,
    settings: WriterSettings,
    clock: Clock,
    /// Strict mode's leases, renewed and returned between commits (`None`: no strict plans to
    /// serve, as in benchmarks).
    strict: Option<Arc<Strict>>,
    /// Told after each commit (see [`CommitHook`]).
    hooks: Vec<CommitHook>,
}

/// Creates the queue and its writer; run the writer with [`LedgerWriter::run`].
pub fn channel(
    store: Store,
    accounts: Accounts,
    metrics: Arc<Metrics>,
    settings: WriterSettings,
    clock: Clock,
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
            metrics,
            settings,
            clock,
            strict: None,
            hooks: Vec::new(),
        },
    )
}

impl LedgerWriter {
    /// Renews and returns strict mode's leases between commits, so that this replica's lease
    /// statements never wait on its own commits.
    pub fn with_strict(mut self, strict: Arc<Strict>) -> LedgerWriter {
        self.strict = Some(strict);
        self
    }

    /// Calls `hook` after each commit with the accounts it charged.
    pub fn with_commit_hook(mut self, hook: CommitHook) -> LedgerWriter {
        self.hooks.push(hook);
        self
    }

    /// Commits batches until `stop` resolves (or every [`LedgerQueue`] handle is dropped), then
    /// commits whatever is still queued and returns.
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        // Room for a batch at a steady rate; `recv_many` grows it when a backlog forms.
        let mut batch = Vec::with_capacity(self.settings.batch_size_max.min(512));
        let mut stop = std::pin::pin!(stop);
        let mut stopping = false;
        // The writer is the one task that writes balances, so expiry runs here too: its first
        // tick is at once (start-up), then every `expiry_interval`.
        let mut expiry = tokio::time::interval(self.settings.expiry_interval);
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let strict = self.strict.clone();
        let mut leases = tokio::time::interval(
            strict
                .as_ref()
                .map_or(std::time::Duration::from_secs(3600), |s| {
                    s.maintain_interval()
                }),
        );
        leases.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let received = if stopping {
                self.rx
                    .recv_many(&mut batch, self.settings.batch_size_max)
                    .await
            } else {
                tokio::select! {
                    n = self.rx.recv_many(&mut batch, self.settings.batch_size_max) => n,
                    _ = expiry.tick() => {
                        self.expire().await;
                        continue;
                    }
                    _ = leases.tick() => {
                        if let Some(strict) = &strict {
                            strict.maintain(&self.accounts).await;
                        }
                        continue;
                    }
                    () = &mut stop => {
                        // No new entries from here on; drain what is queued.
                        stopping = true;
                        self.rx.close();
                        continue;
                    }
                }
            };
            if received == 0 {
                // Closed and drained: nothing more will draw on this replica's leases.
                if let Some(strict) = &strict {
                    strict.release_all().await;
                }
                return;
            }
            // Give a small batch a moment to fill: fewer, larger transactions. The moment
            // counts from when its oldest entry was queued: entries that queued while the last
            // commit ran have waited already, and under load that commit took the moment or
            // most of it (waiting it again from here put 4–12 % of the ledger bench's events
            // at 10 000/s over 20 ms of lag). Not when a response waits on its entry (strict
            // durability): it would wait that moment too, and entries arriving during this
            // commit form the next batch anyway. The writer sleeps through that moment rather
            // than waiting on the channel: a receiver waiting on it is woken by every entry
            // sent, a wake-up (often a thread's) per request under load.
            let awaited = batch.iter().any(|e| e.committed.is_some());
            let waited = batch
                .first()
                .map_or(0, |e| self.clock.now_ms() - e.completed_at);
            let moment = self
                .settings
                .flush_interval
                .saturating_sub(Duration::from_millis(waited.max(0).unsigned_abs()));
            if batch.len() < self.settings.batch_size_max
                && !moment.is_zero()
                && !awaited
                && !stopping
            {
                tokio::time::sleep(moment).await;
                let room = self.settings.batch_size_max - batch.len();
                if !self.rx.is_empty() {
                    self.rx.recv_many(&mut batch, room).await;
                }
            }
            self.commit(&batch).await;
            self.shared.depth.fetch_sub(batch.len(), Ordering::Relaxed);
            batch.clear();
        }
    }

    /// Writes off expired grants and tells the view. A failure is counted and retried at the
    /// next tick; meanwhile the engine already refuses to draw from an expired grant.
    async fn expire(&self) {
        // Strict mode's usage counters older than any window or free-tier period can reach.
        let keep_since = self.clock.now_ms() - COUNTERS_KEPT_MS;
        if let Err(e) = self.store.prune_counters(keep_since).await {
            self.metrics.store_errors.inc();
            tracing::warn!(error = %e, "pruning usage counters failed; retrying at the next tick");
        }
        match self.store.expire_grants(self.clock.now_ms()).await {
            Ok(expired) => {
                if !expired.is_empty() {
                    tracing::info!(grants = expired.len(), "expired grants written off");
                    let _ = self.accounts.sync_balances(&expired);
                }
            }
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::warn!(error = %e, "expiring grants failed; retrying at the next tick");
            }
        }
    }

    /// A shadow entry's counted draws are committed (`shadow_draws`): no longer unsettled.
    fn shadow_settled(&self, entry: &LedgerEntry) {
        if let Some(draws) = entry.shadow_draws() {
            self.accounts.settled(&entry.account, &draws, |_| None);
        }
    }

    /// Commits one batch, retrying with backoff until the store takes it.
    async fn commit(&self, batch: &[LedgerEntry]) {
        let mut backoff = Duration::from_millis(50);
        // Held from the commit to the view's update, so that a resync never reads the store
        // between the two (it would miss usage that is neither committed nor unsettled).
        let (report, _sync) = loop {
            let sync = self.accounts.apply_lock().await;
            let started = crate::clock::Stopwatch::start();
            match self.store.commit(batch, self.clock.now_ms()).await {
                Ok(report) => {
                    self.metrics
                        .ledger_commit_seconds
                        .observe(started.seconds());
                    break (report, sync);
                }
                Err(e) => {
                    drop(sync);
                    self.metrics.store_errors.inc();
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
        let now = self.clock.now_ms();
        let m = &self.metrics;
        m.ledger_batch_size.observe(batch.len() as f64);
        for (entry, result) in batch.iter().zip(report.results.iter().copied()) {
            m.ledger_lag_seconds
                .observe((now - entry.completed_at).max(0) as f64 / 1000.0);
            match result {
                Committed::Duplicate => {
                    m.requests
                        .with_label_values(&[Outcome::Duplicate.as_str()])
                        .inc();
                    // The store already charged this key (another replica, or before a restart):
                    // give back what the in-memory view took for it.
                    self.accounts
                        .release(&entry.account, &entry.decision.draws, now);
                }
                Committed::Recorded => {
                    m.requests
                        .with_label_values(&[entry.outcome.as_str()])
                        .inc();
                    if entry.charged() {
                        self.accounts
                            .settled(&entry.account, &entry.decision.draws, |grant| {
                                report.committed(grant)
                            });
                        // Settled above what the account could pay: forgiven at its price.
                        m.overdraft_forgiven.inc_by(
                            entry
                                .forgiven_units
                                .saturating_mul(entry.decision.credits_per_unit),
                        );
                        for draw in &entry.decision.draws {
                            let pool = entry
                                .plan
                                .layers
                                .get(draw.layer as usize)
                                .map_or("unknown", |l| l.kind.tag());
                            m.units_consumed
                                .with_label_values(&[&entry.feature, pool])
                                .inc_by(draw.units);
                            m.credits_consumed
                                .with_label_values(&[pool])
                                .inc_by(draw.credits);
                        }
                    }
                    self.shadow_settled(entry);
                }
                Committed::AlreadyRecorded => {
                    // A retried batch that had in fact committed: the debits are in the store.
                    if entry.charged() {
                        self.accounts
                            .settled(&entry.account, &entry.decision.draws, |grant| {
                                report.committed(grant)
                            });
                    }
                    self.shadow_settled(entry);
                }
            }
        }
        m.overdraft_forgiven.inc_by(report.forgiven);
        // Strict durability: the responses waiting on these entries may complete now.
        for entry in batch {
            if let Some(committed) = &entry.committed {
                committed.notify_one();
            }
        }
        // Every grant a batch debits is already in the view.
        let _ = self.accounts.sync_balances(&report.balances);
        if !self.hooks.is_empty() {
            let mut charged: Vec<String> = batch
                .iter()
                .zip(&report.results)
                .filter(|(e, r)| **r == Committed::Recorded && e.charged())
                .map(|(e, _)| e.account.to_string())
                .collect();
            charged.sort_unstable();
            charged.dedup();
            if !charged.is_empty() {
                for hook in &self.hooks {
                    hook(&charged);
                }
            }
        }
    }
}
