//! Strict mode on this replica: the lease rounds a request of a strict plan may wait for, and
//! the renewals and returns the ledger writer runs between its commits.
//!
//! A strict account draws only within the slices this replica leased
//! ([`crate::waterfall::Leases`]); the store keeps every pool's committed usage plus all
//! replicas' leases within its limit ([`crate::store::lease`]), so the replicas together never
//! overspend. The price: a request that needs more than its slices waits for one lease round
//! (a store transaction), and room another replica has leased is not free for this one until
//! that replica gives it back (idle for `strict_lease_idle_ms`) or its lease lapses
//! (`strict_lease_ttl_ms` after its last renewal, when the replica died).
//!
//! Renewals and returns run in the ledger writer's task, between commits, so that a replica's
//! own transactions never wait on each other. A round holds the account's gate (an async
//! mutex; never the account's state lock) across its store call, so that one account's
//! concurrent requests on this replica share one round instead of each making their own.

use std::collections::HashMap;
use std::sync::Arc;

use crate::accounts::{Account, Accounts};
use crate::clock::{Clock, Stopwatch};
use crate::ids::AccountId;
use crate::metrics::Metrics;
use crate::store::lease::{LeaseAsk, LeaseLimit};
use crate::store::{Store, StoreError};
use crate::waterfall::{self, FeatureId, LayerKind, LeasePool, Leases, Millis, Plan, Units};

/// Rounds one request may make before it is decided on the slices it has: one per pool the
/// waterfall can reach (a window, a free tier, two kinds of grant).
pub const ROUNDS_MAX: usize = 4;

/// How long a pool the store said was drained is not asked for again: meanwhile the waterfall
/// goes on to its next layer, as if the pool were used up.
const DRAINED_RETRY_MS: Millis = 1_000;

/// Strict mode's lease manager, one per gateway.
pub struct Strict {
    store: Store,
    clock: Clock,
    metrics: Arc<Metrics>,
    /// How long a lease lives in the store without renewal.
    ttl_ms: u64,
    /// A slice idle this long is given back.
    idle_ms: u64,
    /// Per account with leases: the gate of its rounds. An account is here while this replica
    /// may hold a lease of it, so the writer knows whose leases to renew and return.
    gates: parking_lot::Mutex<HashMap<AccountId, Arc<tokio::sync::Mutex<()>>>>,
}

impl Strict {
    /// The manager for a gateway on `store`.
    pub fn new(
        store: Store,
        clock: Clock,
        metrics: Arc<Metrics>,
        ttl_ms: u64,
        idle_ms: u64,
    ) -> Strict {
        Strict {
            store,
            clock,
            metrics,
            ttl_ms,
            idle_ms,
            gates: parking_lot::Mutex::default(),
        }
    }

    /// How often the writer should call [`Strict::maintain`].
    pub fn maintain_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.ttl_ms / 3)
    }

    /// Until when slices leased (or renewed) at `at` may be drawn: the store's expiry less a
    /// margin for the round trip and for clocks that drift.
    fn valid_until(&self, at: Millis) -> Millis {
        let ttl = i64::try_from(self.ttl_ms).unwrap_or(i64::MAX);
        at.saturating_add(ttl - (ttl / 5).max(1_000))
    }

    fn gate(&self, id: &AccountId) -> Arc<tokio::sync::Mutex<()>> {
        self.gates.lock().entry(id.clone()).or_default().clone()
    }

    /// One lease round for a request of `units` of `feature`: asks the store for what the
    /// account's slices lack (if anything still lacks once this account's other rounds on this
    /// replica are done), and adds what it gives.
    pub async fn round(
        &self,
        account: &Account,
        feature: FeatureId,
        units: Units,
    ) -> Result<(), StoreError> {
        let gate = self.gate(&account.id);
        let _gate = gate.lock().await;
        let now = self.clock.now_ms();
        let asks = account.with_state(|plan, state| {
            let wants = waterfall::lease_wants(plan, state, feature, units, now);
            asks(plan, &wants, now)
        });
        if asks.is_empty() {
            return Ok(());
        }
        let started = Stopwatch::start();
        let round = self
            .store
            .lease_round(&account.id, &asks, self.ttl_ms, now)
            .await;
        self.metrics.lease_round_seconds.observe(started.seconds());
        let round = match round {
            Ok(round) => round,
            Err(e) => {
                self.metrics
                    .lease_rounds
                    .with_label_values(&["failed"])
                    .inc();
                self.metrics.store_errors.inc();
                return Err(e);
            }
        };
        let drained = round.grants.iter().any(|g| g.drained);
        self.metrics
            .lease_rounds
            .with_label_values(&[if drained { "drained" } else { "granted" }])
            .inc();
        let valid_until = self.valid_until(now);
        account.with_state(|_, state| {
            let Some(leases) = state.leases.as_mut() else {
                return; // no longer strict (a reload): the writer gives the leases back
            };
            leases.valid_until = valid_until;
            for g in &round.grants {
                leases.granted(
                    g.pool,
                    g.granted,
                    g.drained.then_some(now + DRAINED_RETRY_MS),
                );
            }
            sync(leases, &round.held);
        });
        Ok(())
    }

    /// Renews this replica's leases and gives back idle slices. The ledger writer calls it
    /// every [`Strict::maintain_interval`], between commits (so no commit of this replica
    /// moves its leases meanwhile).
    pub async fn maintain(&self, accounts: &Accounts) {
        let now = self.clock.now_ms();
        let ids: Vec<(AccountId, Arc<tokio::sync::Mutex<()>>)> = self
            .gates
            .lock()
            .iter()
            .map(|(id, gate)| (id.clone(), gate.clone()))
            .collect();
        if ids.is_empty() {
            return;
        }
        let renewed = match self.store.renew_leases(self.ttl_ms).await {
            Ok(renewed) => renewed,
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::warn!(error = %e, "renewing strict-mode leases failed; they lapse unless the next renewal succeeds");
                return;
            }
        };
        let mut stored: HashMap<&str, Vec<(LeasePool, u64)>> = HashMap::new();
        for l in &renewed {
            stored
                .entry(l.account.as_str())
                .or_default()
                .push((l.pool, l.amount));
        }
        let valid_until = self.valid_until(now);
        let idle_since = now - i64::try_from(self.idle_ms).unwrap_or(i64::MAX);
        for (id, gate) in ids {
            // An account whose round is running is left to the next tick.
            let Ok(_gate) = gate.try_lock() else { continue };
            let held = stored.get(id.as_str()).map_or(&[][..], Vec::as_slice);
            let kept: Vec<(LeasePool, u64)> = match accounts.get(&id) {
                Some(account) => account.with_state(|_, state| match state.leases.as_mut() {
                    Some(leases) => {
                        // A slice the renewal skipped (its row was busy) or did not find (it
                        // lapsed) is not extended: it lapses here too, and a round heals it.
                        let all_renewed = leases.slices().iter().all(|s| {
                            s.remaining + s.outstanding == 0
                                || held.iter().any(|(p, _)| *p == s.pool)
                        });
                        if all_renewed {
                            sync(leases, held);
                            leases.valid_until = leases.valid_until.max(valid_until);
                        }
                        leases.give_back_idle(idle_since).into_vec()
                    }
                    None => Vec::new(), // no longer strict: give everything back
                }),
                None => Vec::new(),
            };
            // The store's leases become exactly what this replica still needs: what it has
            // not given back, and what it drew and has not committed.
            let mut want: Vec<(LeasePool, u64)> =
                kept.iter().copied().filter(|(_, a)| *a > 0).collect();
            // (A lease its commits used up stays a row of 0 until this gives it back.)
            let mut have: Vec<(LeasePool, u64)> = held.to_vec();
            want.sort_unstable();
            have.sort_unstable();
            if want == have {
                if want.is_empty() {
                    self.gates.lock().remove(&id);
                }
                continue;
            }
            match self.store.keep_leases(&id, &kept).await {
                Ok(()) if want.is_empty() => {
                    self.gates.lock().remove(&id);
                }
                Ok(()) => {}
                Err(e) => {
                    self.metrics.store_errors.inc();
                    tracing::warn!(error = %e, account = %id, "giving back idle leases failed; they lapse instead");
                }
            }
        }
    }

    /// Gives back every lease (a clean shutdown, after the last commit).
    pub async fn release_all(&self) {
        if let Err(e) = self.store.drop_leases().await {
            tracing::warn!(error = %e, "giving back strict-mode leases failed; they lapse instead");
        }
    }
}

/// Takes this replica's leases as the store has them: a slice never offers more than its
/// lease less what is outstanding (a pool absent lapsed: its lease is 0).
fn sync(leases: &mut Leases, held: &[(LeasePool, u64)]) {
    let pools: Vec<LeasePool> = leases.slices().iter().map(|s| s.pool).collect();
    for pool in pools {
        let amount = held.iter().find(|(p, _)| *p == pool).map_or(0, |(_, a)| *a);
        leases.sync(pool, amount);
    }
}

/// The store's question for each pool a request wants more of.
fn asks(plan: &Plan, wants: &waterfall::Wants, now: Millis) -> Vec<LeaseAsk> {
    wants
        .iter()
        .filter_map(|&(pool, want)| {
            let limit = match pool {
                LeasePool::Grant(_) => LeaseLimit::Grant,
                LeasePool::Layer(i) => match &plan.layers.get(usize::from(i))?.kind {
                    // Each window's first counted instant at `now`: a rolling window's first
                    // minute, a calendar window's period start in its zone.
                    LayerKind::UsageLimit { windows } => LeaseLimit::Windows(
                        windows.iter().map(|w| (w.span(now).0, w.limit)).collect(),
                    ),
                    LayerKind::FreeTier {
                        units,
                        period,
                        zone,
                    } => LeaseLimit::FreeTier {
                        allowance: *units,
                        period_start: period.bounds(*zone, now).0,
                    },
                    _ => return None,
                },
            };
            Some(LeaseAsk { pool, want, limit })
        })
        .collect()
}
