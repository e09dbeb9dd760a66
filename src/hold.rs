//! The hold: an admitted request's reservation, which always ends.
//!
//! A [`Hold`] is created when the waterfall admits a request and its draws have been taken
//! from the account's in-memory view. It ends exactly once, in one of two ways: settled
//! (the upstream completed with success: the draws become a charge) or released (anything
//! else: the draws go back to the pools that gave them). Either way its [`LedgerEntry`] is
//! queued. Ending it is tied to `Drop`, so a client that disconnects mid-stream, a handler
//! that panics or a future that is cancelled on timeout all release it: a hold never leaks.
//!
//! A shadow-mode hold (its entry's `shadow` is set) holds only the decision's window and
//! free-tier draws (`usage::shadow_part`): counters, which a completed request keeps, as
//! `shadow_draws`, until the writer commits them. Its credit draws were never taken from any
//! balance, so there is nothing of them to settle or release. On a strict plan the counted
//! draws go back when the hold ends: the store's leases and counters never see shadow usage.

use std::sync::Arc;

use crate::accounts::Account;
use crate::clock::Clock;
use crate::idempotency::{ClaimedKey, RESPONSE_BYTES_MAX, StoredResponse};
use crate::ledger::LedgerQueue;
use crate::settle::{Measured, SettleError};
use crate::usage::{LedgerEntry, Outcome};
use crate::waterfall;

/// An admitted request's reservation. See the module docs.
#[derive(Debug)]
pub struct Hold {
    /// The account whose view holds the draws.
    account: Arc<Account>,
    /// What will be recorded; `None` once the hold has ended. Boxed: a hold travels from the
    /// meter into the response body, and an entry is a kilobyte to copy at each move.
    entry: Option<Box<LedgerEntry>>,
    /// The request's idempotency key, marked charged or freed when the hold ends.
    key: Option<ClaimedKey>,
    queue: LedgerQueue,
    clock: Clock,
    /// How the hold ends if it is dropped before [`Hold::end`]: the request's current phase
    /// decides (a drop while streaming means the client left; before, a handler failure).
    on_drop: Outcome,
    /// The cost the response reported, for routes that settle from it.
    settled: Option<Result<Measured, SettleError>>,
    /// The response being kept to answer repeats of the key (only with a claimed key, and
    /// dropped once it outgrows `RESPONSE_BYTES_MAX`).
    capture: Option<StoredResponse>,
    /// The body bytes captured so far.
    captured: bytes::BytesMut,
    /// Strict durability: a charge's ending hands back a [`Commit`] to wait on.
    strict: bool,
    /// Units held beyond the decision's estimate, as a watched stream grew ([`Hold::grow`]).
    grown: waterfall::Units,
}

/// A charged entry's commit, to wait on before the response completes (strict durability).
#[derive(Debug)]
pub struct Commit(Arc<tokio::sync::Notify>);

impl Commit {
    /// Resolves once the ledger writer has committed the entry.
    pub async fn wait(self) {
        self.0.notified().await;
    }
}

impl Hold {
    /// A hold for `entry`, whose decision's draws have already been reserved.
    pub fn new(
        account: Arc<Account>,
        entry: LedgerEntry,
        key: Option<ClaimedKey>,
        queue: LedgerQueue,
        clock: Clock,
    ) -> Hold {
        Hold {
            account,
            entry: Some(Box::new(entry)),
            key,
            queue,
            clock,
            on_drop: Outcome::Internal,
            settled: None,
            capture: None,
            captured: bytes::BytesMut::new(),
            strict: false,
            grown: 0,
        }
    }

    /// Strict durability: ending as a charge returns a [`Commit`] to wait on.
    pub fn require_commit(&mut self) {
        self.strict = true;
    }

    /// Sets how the hold ends if it is dropped without being ended.
    pub fn on_drop(&mut self, outcome: Outcome) {
        self.on_drop = outcome;
    }

    /// Records the cost the response reported; applied if the hold ends `Completed`.
    pub fn settle(&mut self, measured: Result<Measured, SettleError>) {
        self.settled = Some(measured);
    }

    /// Starts keeping the response (status, `content_type`, then its body through
    /// [`Hold::observe`]) for repeats of the request's idempotency key, if it has one.
    pub fn capture(&mut self, status: http::StatusCode, content_type: Option<http::HeaderValue>) {
        if self.key.is_some() {
            self.capture = Some(StoredResponse {
                status,
                content_type,
                body: bytes::Bytes::new(),
            });
        }
    }

    /// A chunk of the response body as it passes.
    pub fn observe(&mut self, chunk: &[u8]) {
        if self.capture.is_none() {
            return;
        }
        if self.captured.len() + chunk.len() > RESPONSE_BYTES_MAX {
            // Too large to keep: a repeat is told the key has completed instead.
            self.capture = None;
            self.captured = bytes::BytesMut::new();
        } else {
            self.captured.extend_from_slice(chunk);
        }
    }

    /// Records the upstream's status for the ledger.
    pub fn set_upstream_status(&mut self, status: u16) {
        if let Some(entry) = &mut self.entry {
            entry.upstream_status = Some(status);
        }
    }

    /// The decision id of the held request.
    pub fn decision_id(&self) -> Option<uuid::Uuid> {
        self.entry.as_ref().map(|e| e.decision_id)
    }

    /// Ends the hold: `Completed` settles (charges) it, anything else releases it. With
    /// strict durability a charge returns the [`Commit`] its response must wait for.
    pub fn end(mut self, outcome: Outcome) -> Option<Commit> {
        self.finish(outcome)
    }

    fn finish(&mut self, outcome: Outcome) -> Option<Commit> {
        let mut entry = self.entry.take()?;
        entry.outcome = outcome;
        // However it ends, the request no longer runs: its concurrency slots are free. (A plan
        // without a concurrency layer takes no extra lock for it; a shadow request the
        // waterfall denied took no slot.)
        let feature = entry.decision.feature;
        let gated = entry.decision.admitted()
            && entry
                .plan
                .layers
                .iter()
                .any(|l| matches!(l.kind, waterfall::LayerKind::Concurrency { .. }));
        if gated {
            self.account
                .with_state(|plan, state| waterfall::finish_request(plan, state, feature));
        }
        tracing::debug!(decision_id = %entry.decision_id, outcome = outcome.as_str(), "hold ended");
        entry.completed_at = self.clock.now_ms();
        if entry.completed_admitted() {
            self.settle_cost(&mut entry);
        }
        // A completed request's key answers its repeats: charged work is never done again,
        // nor is shadow work (forwarded, whatever the waterfall said).
        let done = entry.outcome == Outcome::Completed
            && (entry.decision.admitted() || entry.shadow.is_some());
        match self.key.take() {
            Some(key) if done => {
                let response = self.capture.take().map(|mut r| {
                    r.body = std::mem::take(&mut self.captured).freeze();
                    r
                });
                key.charged(entry.decision_id, response);
            }
            _ => {}
        }
        if entry.charged() {
            if self.strict {
                let notify = Arc::new(tokio::sync::Notify::new());
                entry.committed = Some(notify.clone());
                self.queue.push(*entry);
                return Some(Commit(notify));
            }
        } else if entry.shadow.is_some() {
            // The view holds only a shadow decision's counted draws (`usage::shadow_part`);
            // they stay unsettled until the writer commits them as `shadow_draws`, or go back
            // now when they will not be (not completed, or a strict plan: see the module).
            if entry.shadow_draws().is_none() {
                let held = crate::usage::shadow_part(&entry.decision);
                let now = entry.completed_at;
                self.account.with_states(|plan, state, pool| {
                    waterfall::release_in(plan, state, pool, &held.draws, now)
                });
            }
        } else {
            let now = entry.completed_at;
            self.account.with_states(|plan, state, pool| {
                waterfall::release_in(plan, state, pool, &entry.decision.draws, now)
            });
        }
        self.queue.push(*entry);
        None
    }

    /// Applies the cost the response reported (if the route settles) to a completed entry.
    fn settle_cost(&mut self, entry: &mut LedgerEntry) {
        match self.settled.take() {
            Some(Ok(Measured::Units(used))) => self.adjust(entry, used),
            Some(Ok(Measured::Quantities(quantities))) => match priced(entry, &quantities) {
                Some(used) => {
                    entry.quantities = Some(quantities);
                    self.adjust(entry, used);
                }
                None => {
                    // The model has no rates in the decision's price version (or the
                    // price exceeds the units a request may cost): the estimate stands.
                    tracing::warn!(decision_id = %entry.decision_id, ?quantities, "reported usage not priced; charging the estimate");
                    entry.code = Some("settle_unpriced");
                }
            },
            Some(Err(e)) => {
                // The response did not say: the estimate stands, and the record says why.
                tracing::warn!(decision_id = %entry.decision_id, error = %e, "cost not settled; charging the estimate");
                entry.code = Some("settle_missing");
            }
            None => {}
        }
    }
}

/// The units `quantities` cost at the rates of the entry's decision (its price version, its
/// model).
fn priced(entry: &LedgerEntry, quantities: &waterfall::Quantities) -> Option<waterfall::Units> {
    entry
        .plan
        .prices
        .get(entry.decision.price_table as usize)?
        .rates(entry.decision.feature)?
        .units(
            entry.model.as_deref(),
            quantities.iter().map(|(d, n)| (&**d, *n)),
        )
}

impl Hold {
    /// Adjusts a completed entry's draws to the `used` units its response reported: the excess
    /// of an estimate goes back to exactly the pools that held it (last drawn first); a
    /// shortfall is covered by the waterfall now, and what nobody can pay is forgiven.
    fn adjust(&self, entry: &mut LedgerEntry, used: waterfall::Units) {
        let estimate = entry.decision.units + self.grown; // what the draws hold
        let now = entry.completed_at;
        entry.used_units = used;
        if used == estimate {
            return;
        }
        let ongoing = entry.decision.ongoing();
        let price = entry.decision.credits_per_unit;
        // A shadow decision's view holds only its counted draws, so only those move.
        let shadow = entry.shadow.is_some();
        let draws = &mut entry.decision.draws;
        let forgiven = self.account.with_states(|plan, state, pool| {
            if used < estimate {
                let mut released = waterfall::trim(draws, estimate - used, price);
                if shadow {
                    released.retain(|d| crate::usage::shadow_counts(d));
                }
                waterfall::release_in(plan, state, pool, &released, now);
                0
            } else {
                let (extra, uncovered) = waterfall::cover_up_to_in(
                    plan,
                    state,
                    pool.as_deref(),
                    ongoing,
                    used - estimate,
                    now,
                );
                if let Some(extra) = extra {
                    if shadow {
                        let held = crate::usage::shadow_part(&extra);
                        waterfall::reserve_in(plan, state, pool, &held, now);
                    } else {
                        waterfall::reserve_in(plan, state, pool, &extra, now);
                    }
                    draws.extend(extra.draws);
                }
                uncovered
            }
        });
        if forgiven > 0 {
            tracing::warn!(decision_id = %entry.decision_id, units = forgiven, "settled above what the account could pay; forgiven");
        }
        entry.forgiven_units = forgiven;
    }
}

/// How a hold grew when its request asked for more (a watched stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Growth {
    /// All of it is held now.
    Held,
    /// The account could pay only part: that part is held, this many units are not (the
    /// `finish` policy: they are forgiven when the stream settles, if still unpaid).
    Partly(waterfall::Units),
    /// The account cannot pay for all of it: nothing more is held (the `stop` policy).
    Refused(waterfall::Denial),
}

impl Hold {
    /// Holds `more` units for the running request, at once, in the account's view: other
    /// requests of the account see them from now on. `whole`: all or nothing; otherwise as
    /// much as the account can pay.
    pub fn grow(&mut self, more: waterfall::Units, whole: bool) -> Growth {
        let Some(entry) = self.entry.as_mut() else {
            return Growth::Held; // already ended: nothing left to hold
        };
        if more == 0 {
            return Growth::Held;
        }
        let now = self.clock.now_ms();
        let ongoing = entry.decision.ongoing();
        // A shadow stream is never stopped, and its view holds only counted draws.
        let shadow = entry.shadow.is_some();
        let (extra, growth) = self.account.with_states(|plan, state, pool| {
            let (extra, growth) = if whole && !shadow {
                let d = waterfall::extend_in(plan, state, pool.as_deref(), ongoing, more, now);
                match d.denial {
                    None => (Some(d), Growth::Held),
                    Some(denial) => (None, Growth::Refused(denial)),
                }
            } else {
                match waterfall::cover_up_to_in(plan, state, pool.as_deref(), ongoing, more, now) {
                    (extra, 0) => (extra, Growth::Held),
                    (extra, _) if shadow => (extra, Growth::Held),
                    (extra, uncovered) => (extra, Growth::Partly(uncovered)),
                }
            };
            match &extra {
                Some(extra) if shadow => {
                    let held = crate::usage::shadow_part(extra);
                    waterfall::reserve_in(plan, state, pool, &held, now);
                }
                Some(extra) => waterfall::reserve_in(plan, state, pool, extra, now),
                None => {}
            }
            (extra, growth)
        });
        if let Some(extra) = extra {
            // The decision keeps its estimate (the ledger's `estimated_units`); the draws
            // hold the estimate and the growth.
            self.grown += extra.units;
            entry.used_units = entry.decision.units + self.grown;
            entry.decision.draws.extend(extra.draws);
        }
        growth
    }

    /// The units held for the request now (its estimate and what it grew by).
    pub fn units(&self) -> waterfall::Units {
        self.entry
            .as_ref()
            .map_or(0, |e| e.decision.units + self.grown)
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        // Nobody is left to wait for a commit: the response is gone.
        let _ = self.finish(self.on_drop);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{self, WriterSettings};
    use crate::waterfall::{
        AccountState, FeatureId, FeatureSet, Grant, GrantKind, Layer, LayerKind, Plan, PriceTable,
        decide, reserve,
    };
    use std::time::Duration;

    fn plan() -> Arc<Plan> {
        Arc::new(Plan {
            name: "p".into(),
            layers: vec![Layer {
                name: "credits".into(),
                features: FeatureSet::ALL,
                kind: LayerKind::Credits,
            }],
            prices: vec![PriceTable::flat("v1", vec![Some(5)])],
            strict: false,
        })
    }

    /// A hold alive in a task that panics is released by the unwinding, and recorded.
    #[tokio::test]
    async fn a_panicking_handler_releases_its_hold() {
        let plan = plan();
        let grant = Grant {
            id: 1,
            kind: GrantKind::Credits,
            balance: 50,
            unsettled: 0,
            version: 0,
            expires_at: crate::waterfall::NEVER,
            priority: 0,
            features: FeatureSet::ALL,
        };
        let state = AccountState::new(&plan, vec![grant], 0);
        let account = Arc::new(Account::new("a".into(), plan.clone(), false, state));
        let dir = tempfile::tempdir().unwrap();
        let store =
            crate::store::Store::open(&format!("sqlite://{}", dir.path().join("l.db").display()))
                .await
                .unwrap();
        let (queue, _writer) = ledger::channel(
            store,
            crate::accounts::Accounts::new(),
            Arc::new(crate::metrics::Metrics::new()),
            WriterSettings {
                batch_size_max: 1,
                flush_interval: Duration::ZERO,
                queue_max: 10,
                expiry_interval: Duration::from_secs(60),
            },
            Clock::System,
        );
        let decision = account.with_state(|p, s| {
            let d = decide(p, s, FeatureId(0), 4, 0);
            reserve(p, s, &d, 0);
            d
        });
        assert_eq!(account.with_state(|_, s| s.grants()[0].balance), 30);
        let entry = LedgerEntry {
            decision_id: uuid::Uuid::now_v7(),
            account: account.id.clone(),
            plan: plan.clone(),
            feature: "f".into(),
            used_units: 4,
            model: None,
            quantities: None,
            forgiven_units: 0,
            decision,
            outcome: Outcome::Internal,
            code: None,
            upstream_status: None,
            idempotency_key: None,
            decided_at: 0,
            completed_at: 0,
            committed: None,
            shadow: None,
        };
        let hold = Hold::new(
            account.clone(),
            entry,
            None,
            queue.clone(),
            Clock::manual(0),
        );
        let task = tokio::spawn(async move {
            let _hold = hold;
            panic!("handler bug");
        });
        assert!(task.await.unwrap_err().is_panic());
        assert_eq!(
            account.with_state(|_, s| s.grants()[0].balance),
            50,
            "hold released"
        );
        assert_eq!(queue.depth(), 1, "the failed request is still recorded");
    }
}
