//! `flowgate replay`: what the ledger's history would have been under another configuration.
//!
//! [`Replay`] is pure: it is given the store's accounts and grants, then every stored usage
//! event in decision order ([`Replay::push`], time taken from each event), and runs each one
//! through the same engine the gateway uses ([`waterfall::decide_in`], `reserve_in`, the
//! settlement's `trim`/`cover_up_to_in`, `release_in`) under the candidate configuration's
//! plans. [`Replay::finish`] gives the [`Report`]: per account and in total, requests,
//! denials by code, credits charged before (the ledger's monetization events) and after, by
//! pool kind, and the accounts most affected. Nothing is written anywhere.
//!
//! What is modelled, and how (the README's "What-if replay" says the same for operators):
//!
//! - Every event decided before `to` is replayed, those before `from` too, so that windows,
//!   free tiers and balances at `from` are the candidate's; only events decided in
//!   `[from, to)` of the selected accounts are counted in the report.
//! - A charged event is decided at `decided_at` for its estimate (`estimated_units`), held
//!   until `completed_at`, then settled to the units it used (re-priced at the candidate's
//!   rates when its feature is priced by dimensions), exactly as the gateway's hold does.
//! - A denied event is replayed for the units it asked for; admitted now, it is charged them
//!   at once (its upstream never ran, so nothing else is known of it).
//! - An admitted event that was not charged (an upstream error, a timeout, a client that left)
//!   holds its draws until `completed_at`, then releases them.
//! - `replay` and `duplicate` events (a repeated idempotency key) charged nothing and drew
//!   nothing: they are counted as skipped.
//! - Grants start whole at their `created_at` and expire at their `expires_at`; debits are the
//!   replay's own. A refunded charge is given back at its `refunded_at` (its credits and window
//!   units); refunded charges count on neither side of the credit totals.
//! - An account replays under its plan as the store has it now, unless the candidate's
//!   `[[accounts]]` names the account with another plan, or `--plan` overrides every account.
//!   Strict mode is off: one simulated gateway sees every charge at once.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::{Arc, LazyLock};

use serde::Serialize;

use crate::config::Settings;
use crate::store::{GrantHistory, ReplayEvent, StoredAccount};
use crate::waterfall::{
    self, AccountState, Credits, Denial, Draw, FeatureId, Grant, GrantKind, Millis, Plan, Pool,
    Units,
};

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Count events decided at or after this instant (ms; earlier ones are replayed, not
    /// counted).
    pub from: Millis,
    /// Replay events decided before this instant (ms).
    pub to: Millis,
    /// Count only these accounts (`None`: all).
    pub accounts: Option<BTreeSet<String>>,
    /// Replay every account under this plan of the candidate.
    pub plan: Option<String>,
    /// How many accounts the report's `top` lists.
    pub top: usize,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            from: Millis::MIN,
            to: Millis::MAX,
            accounts: None,
            plan: None,
            top: 10,
        }
    }
}

/// Why a replay cannot start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplayError {
    /// `--plan` names a plan the candidate does not have.
    #[error("--plan {0:?}: the candidate config has no such plan")]
    UnknownOverridePlan(String),
    /// An account to report on has a plan the candidate does not have.
    #[error(
        "account {account:?} has plan {plan:?}, which the candidate config does not define \
         (add the plan, give the account another in the candidate's [[accounts]], or pass --plan)"
    )]
    UnknownPlan {
        /// The account.
        account: String,
        /// Its plan.
        plan: String,
    },
    /// `--account` names an account the store does not have.
    #[error("--account {0:?}: the ledger has no such account")]
    UnknownAccount(String),
}

/// The kinds of pool a charge can draw from, as the report names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PoolKind {
    UsageLimit,
    FreeTier,
    Credits,
    Promotions,
    EnterprisePool,
    EnterprisePostpaid,
    Workspace,
    NoCharge,
}

const POOL_KINDS: usize = 8;

impl PoolKind {
    const ALL: [PoolKind; POOL_KINDS] = [
        PoolKind::UsageLimit,
        PoolKind::FreeTier,
        PoolKind::Credits,
        PoolKind::Promotions,
        PoolKind::EnterprisePool,
        PoolKind::EnterprisePostpaid,
        PoolKind::Workspace,
        PoolKind::NoCharge,
    ];

    fn name(self) -> &'static str {
        match self {
            PoolKind::UsageLimit => "usage_limit",
            PoolKind::FreeTier => "free_tier",
            PoolKind::Credits => "credits",
            PoolKind::Promotions => "promotions",
            PoolKind::EnterprisePool => "enterprise_pool",
            PoolKind::EnterprisePostpaid => "enterprise_postpaid",
            PoolKind::Workspace => "workspace",
            PoolKind::NoCharge => "no_charge",
        }
    }

    fn of_grant(kind: GrantKind) -> PoolKind {
        match kind {
            GrantKind::Credits => PoolKind::Credits,
            GrantKind::Promotion => PoolKind::Promotions,
            GrantKind::Enterprise => PoolKind::EnterprisePool,
        }
    }
}

/// Units and credits a pool kind paid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PoolUse {
    /// Units it covered.
    pub units: u64,
    /// Credits it gave (0 for windows and free tiers).
    pub credits: u64,
}

/// One side (the ledger's, or the replay's) of a set of requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Side {
    /// Requests admitted.
    pub admitted: u64,
    /// Requests denied.
    pub denied: u64,
    /// Denials by code (`usage_limit_reached`, `insufficient_credits`, `not_entitled`,
    /// `concurrency_limit_reached`, `feature_not_configured`).
    pub denials: BTreeMap<String, u64>,
    /// Charges (refunded ones excluded).
    pub charges: u64,
    /// Credits drawn from grants.
    pub credits: u64,
    /// Credits billed afterwards (postpaid enterprise usage).
    pub postpaid_credits: u64,
    /// Units charged.
    pub units: u64,
    /// What each kind of pool paid (kinds that paid nothing are left out).
    pub pools: BTreeMap<&'static str, PoolUse>,
}

/// Before and after, for one account or all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Requests counted (replayed, in range).
    pub requests: u64,
    /// As the ledger has it.
    pub before: Side,
    /// As the candidate would have had it.
    pub after: Side,
    /// Requests admitted before and denied after.
    pub newly_denied: u64,
    /// Requests denied before and admitted after.
    pub newly_admitted: u64,
    /// Credits (from grants and postpaid) after minus before.
    pub credits_delta: i64,
    /// Charges that were refunded (in neither side's credits).
    pub refunded: u64,
}

/// One account's part of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccountReport {
    /// The account.
    pub account: String,
    /// The candidate plan it was replayed under.
    pub plan: String,
    /// Its numbers.
    #[serde(flatten)]
    pub summary: Summary,
}

/// One of the accounts most affected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Affected {
    /// The account.
    pub account: String,
    /// Credits after minus before.
    pub credits_delta: i64,
    /// Requests admitted before and denied after.
    pub newly_denied: u64,
    /// Requests denied before and admitted after.
    pub newly_admitted: u64,
}

/// How many events the replay saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EventCounts {
    /// Read from the ledger (decided before `to`).
    pub read: u64,
    /// Run through the engine (before `from` too).
    pub replayed: u64,
    /// Counted in the report.
    pub counted: u64,
    /// Not replayed: idempotent repeats and duplicates (they drew nothing), and events of
    /// accounts whose plan the candidate lacks (not reported on).
    pub skipped: u64,
}

/// What a replay found. Its JSON (`flowgate replay --json`) is this shape; see the README.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The first instant counted (RFC 3339), if bounded.
    pub from: Option<String>,
    /// The end of the replay (RFC 3339, exclusive), if bounded.
    pub to: Option<String>,
    /// Events seen.
    pub events: EventCounts,
    /// Every counted account together.
    pub totals: Summary,
    /// Each account with counted requests, by id.
    pub accounts: Vec<AccountReport>,
    /// The accounts most affected: largest credit change (either way), then most new
    /// denials.
    pub top: Vec<Affected>,
}

/// A replay in progress. See the module documentation.
pub struct Replay {
    options: ReplayOptions,
    /// Account ids → index into `sims`.
    index: HashMap<Box<str>, usize>,
    sims: Vec<Sim>,
    /// Grants not given yet, in (created_at, id) order, and the next one.
    grants: Vec<GrantHistory>,
    next_grant: usize,
    /// The kind of every grant, for naming the pools a stored charge drew.
    grant_kinds: HashMap<i64, GrantKind>,
    /// The candidate's feature names, by [`FeatureId`].
    features: Vec<Arc<str>>,
    /// Grants' feature sets are resolved against the candidate's features.
    candidate: Arc<Settings>,
    /// Holds that end later: settlements, releases, refunds, by time.
    pending: BinaryHeap<Reverse<Pending>>,
    seq: u64,
    events: EventCounts,
}

/// One account being replayed.
struct Sim {
    id: Box<str>,
    /// The candidate plan (strict mode off); `None`: not replayable (its plan is missing).
    plan: Option<Arc<Plan>>,
    state: AccountState,
    /// Index of the workspace account whose pool its workspace layers draw.
    workspace: Option<usize>,
    /// Whether its events are counted.
    selected: bool,
    tally: Tally,
}

/// A hold that ends at `at`.
struct Pending {
    at: Millis,
    seq: u64,
    account: usize,
    action: Action,
}

enum Action {
    /// Settle `decision` at `used` units (a charge), counted or not; refunded later if
    /// `refunded_at`.
    Settle {
        /// The admitted decision's draws (the hold).
        draws: Draws,
        /// What the decision was for, at its price version.
        ongoing: waterfall::Ongoing,
        /// Units held (the estimate).
        estimate: Units,
        /// The decision's price.
        price: Credits,
        used: Units,
        counted: bool,
        refunded_at: Option<Millis>,
    },
    /// Give the draws back (not charged, or refunded).
    Release { feature: FeatureId, draws: Draws },
    /// Give a settled charge's draws back (refunded).
    Refund { draws: Draws },
}

type Draws = smallvec::SmallVec<[Draw; 4]>;

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Counters of one side, kept cheaply (fixed arrays) while replaying.
#[derive(Debug, Clone, Default)]
struct SideTally {
    admitted: u64,
    denied: u64,
    denials: Vec<(Box<str>, u64)>,
    charges: u64,
    credits: u64,
    postpaid: u64,
    units: u64,
    pools: [PoolUse; POOL_KINDS],
}

#[derive(Debug, Clone, Default)]
struct Tally {
    requests: u64,
    before: SideTally,
    after: SideTally,
    newly_denied: u64,
    newly_admitted: u64,
    refunded: u64,
}

/// A stored draw, read for its pool only (what the report needs of the ledger's draws).
#[derive(serde::Deserialize)]
struct StoredDraw {
    pool: StoredPool,
    #[serde(default)]
    grant_id: Option<i64>,
    units: u64,
    credits: u64,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum StoredPool {
    Window,
    FreeTier,
    Grant,
    Workspace,
    Postpaid,
    NoCharge,
}

/// The plan a state with no plan is kept under (its grants only: a workspace's pool).
static NO_PLAN: LazyLock<Plan> = LazyLock::new(|| Plan {
    name: "".into(),
    layers: Vec::new(),
    prices: Vec::new(),
    strict: false,
});

impl Replay {
    /// A replay of the store's `accounts` and `grants` under `candidate`'s plans.
    pub fn new(
        candidate: Arc<Settings>,
        accounts: &[StoredAccount],
        mut grants: Vec<GrantHistory>,
        options: ReplayOptions,
    ) -> Result<Replay, ReplayError> {
        let override_plan = match &options.plan {
            Some(name) => Some(
                candidate
                    .plans
                    .get(name)
                    .ok_or_else(|| ReplayError::UnknownOverridePlan(name.clone()))?,
            ),
            None => None,
        };
        if let Some(wanted) = &options.accounts
            && let Some(missing) = wanted
                .iter()
                .find(|w| !accounts.iter().any(|a| &a.id == *w))
        {
            return Err(ReplayError::UnknownAccount(missing.clone()));
        }
        let index: HashMap<Box<str>, usize> = accounts
            .iter()
            .enumerate()
            .map(|(i, a)| (Box::from(a.id.as_str()), i))
            .collect();
        let mut plans_made: HashMap<String, Arc<Plan>> = HashMap::new();
        let mut sims = Vec::with_capacity(accounts.len());
        for a in accounts {
            let selected = options.accounts.as_ref().is_none_or(|s| s.contains(&a.id));
            let name = candidate
                .accounts
                .iter()
                .find(|s| s.id == a.id)
                .map_or(a.plan.as_str(), |s| s.plan.as_str());
            let plan = match override_plan.or_else(|| candidate.plans.get(name)) {
                Some(p) => Some(
                    plans_made
                        .entry(p.name.to_string())
                        .or_insert_with(|| {
                            let mut p = Plan::clone(p);
                            p.strict = false;
                            Arc::new(p)
                        })
                        .clone(),
                ),
                None if selected => {
                    return Err(ReplayError::UnknownPlan {
                        account: a.id.clone(),
                        plan: name.to_owned(),
                    });
                }
                None => None,
            };
            let state = AccountState::new(plan.as_deref().unwrap_or(&NO_PLAN), Vec::new(), 0);
            sims.push(Sim {
                id: a.id.as_str().into(),
                plan,
                state,
                workspace: a.workspace.as_deref().and_then(|w| index.get(w).copied()),
                selected,
                tally: Tally::default(),
            });
        }
        grants.sort_by_key(|g| (g.created_at, g.id));
        let grant_kinds = grants.iter().map(|g| (g.id, g.kind)).collect();
        Ok(Replay {
            options,
            index,
            sims,
            grants,
            next_grant: 0,
            grant_kinds,
            features: candidate.features.clone(),
            candidate,
            pending: BinaryHeap::new(),
            seq: 0,
            events: EventCounts::default(),
        })
    }

    /// Replays one stored event (events must come in decision order).
    pub fn push(&mut self, e: ReplayEvent<'_>) {
        self.events.read += 1;
        let now = e.decided_at;
        if now >= self.options.to {
            return;
        }
        self.advance(now);
        let Some(&i) = self.index.get(e.account) else {
            self.events.skipped += 1;
            return;
        };
        if matches!(e.outcome, "replay" | "duplicate") || self.sims[i].plan.is_none() {
            self.events.skipped += 1;
            return;
        }
        self.events.replayed += 1;
        let counted = now >= self.options.from && self.sims[i].selected;
        let was_denied = e.outcome == "denied";
        if counted {
            self.events.counted += 1;
            self.count_before(i, &e, was_denied);
        }
        let feature = self
            .features
            .iter()
            .position(|f| **f == *e.feature)
            .map(|p| FeatureId(p as u16));
        let Some(feature) = feature else {
            if counted {
                self.count_denial(i, "feature_not_configured", was_denied);
            }
            return;
        };
        let (asked, used) = match &e.charge {
            Some(c) => (c.estimated_units, self.used_units(i, feature, &e)),
            None => (e.units, e.units),
        };
        let decision = with_states(&mut self.sims, i, |plan, state, pool| {
            waterfall::decide_in(plan, state, pool.as_deref(), feature, asked, now)
        });
        if let Some(denial) = &decision.denial {
            if counted {
                self.count_denial(i, denial_code(denial), was_denied);
            }
            return;
        }
        if counted {
            let t = &mut self.sims[i].tally;
            t.after.admitted += 1;
            if was_denied {
                t.newly_admitted += 1;
            }
        }
        with_states(&mut self.sims, i, |plan, state, pool| {
            waterfall::reserve_in(plan, state, pool, &decision, now);
            waterfall::start_request(plan, state, feature);
        });
        let charged = e.charge.is_some() || was_denied || e.outcome == "completed";
        let action = if charged {
            Action::Settle {
                ongoing: decision.ongoing(),
                estimate: decision.units,
                price: decision.credits_per_unit,
                draws: decision.draws,
                used: if was_denied { asked } else { used },
                counted,
                refunded_at: e.charge.and_then(|c| c.refunded_at),
            }
        } else {
            Action::Release {
                feature,
                draws: decision.draws,
            }
        };
        let at = e.completed_at.max(now);
        self.schedule(at, i, action);
    }

    /// Ends every hold still open and gives the report.
    pub fn finish(mut self) -> Report {
        self.advance(Millis::MAX);
        let mut accounts = Vec::new();
        let mut totals = Tally::default();
        for sim in &self.sims {
            if !sim.selected || sim.tally.requests == 0 {
                continue;
            }
            totals.add(&sim.tally);
            accounts.push(AccountReport {
                account: sim.id.to_string(),
                plan: sim
                    .plan
                    .as_ref()
                    .map_or(String::new(), |p| p.name.to_string()),
                summary: sim.tally.summary(),
            });
        }
        accounts.sort_by(|a, b| a.account.cmp(&b.account));
        let mut top: Vec<Affected> = accounts
            .iter()
            .filter(|a| {
                a.summary.credits_delta != 0
                    || a.summary.newly_denied > 0
                    || a.summary.newly_admitted > 0
            })
            .map(|a| Affected {
                account: a.account.clone(),
                credits_delta: a.summary.credits_delta,
                newly_denied: a.summary.newly_denied,
                newly_admitted: a.summary.newly_admitted,
            })
            .collect();
        top.sort_by(|a, b| {
            b.credits_delta
                .unsigned_abs()
                .cmp(&a.credits_delta.unsigned_abs())
                .then(b.newly_denied.cmp(&a.newly_denied))
                .then(a.account.cmp(&b.account))
        });
        top.truncate(self.options.top);
        let bound =
            |t: Millis, unbounded: Millis| (t != unbounded).then(|| crate::clock::rfc3339(t));
        Report {
            from: bound(self.options.from, Millis::MIN),
            to: bound(self.options.to, Millis::MAX),
            events: self.events,
            totals: totals.summary(),
            accounts,
            top,
        }
    }

    /// The units a charged event used under the candidate: its stored units, re-priced at the
    /// candidate's rates when its feature is priced by dimensions and they price its model.
    fn used_units(&self, i: usize, feature: FeatureId, e: &ReplayEvent<'_>) -> Units {
        let Some(c) = &e.charge else {
            return e.units;
        };
        let (Some(dimensions), Some(plan)) = (c.dimensions, &self.sims[i].plan) else {
            return e.units;
        };
        let Some(rates) = plan.prices_at(e.decided_at).1.rates(feature) else {
            return e.units;
        };
        let Ok(quantities) = serde_json::from_str::<BTreeMap<&str, u64>>(dimensions) else {
            return e.units;
        };
        rates
            .units(c.model, quantities.iter().map(|(d, n)| (*d, *n)))
            .unwrap_or(e.units)
    }

    fn schedule(&mut self, at: Millis, account: usize, action: Action) {
        self.seq += 1;
        self.pending.push(Reverse(Pending {
            at,
            seq: self.seq,
            account,
            action,
        }));
    }

    /// Gives every grant created and ends every hold due at or before `now`, in time order.
    fn advance(&mut self, now: Millis) {
        loop {
            let grant_at = self
                .grants
                .get(self.next_grant)
                .map_or(Millis::MAX, |g| g.created_at);
            let pending_at = self.pending.peek().map_or(Millis::MAX, |p| p.0.at);
            if grant_at.min(pending_at) > now
                || (grant_at == Millis::MAX && pending_at == Millis::MAX)
            {
                return;
            }
            if grant_at <= pending_at {
                let g = &self.grants[self.next_grant];
                self.next_grant += 1;
                if let Some(&i) = self.index.get(g.account.as_str()) {
                    let grant = Grant {
                        id: g.id,
                        kind: g.kind,
                        balance: g.amount,
                        unsettled: 0,
                        version: 0,
                        expires_at: g.expires_at.unwrap_or(crate::waterfall::NEVER),
                        priority: g.priority,
                        features: self.candidate.feature_set(g.features.as_deref()),
                    };
                    self.sims[i].state.add_grant(grant);
                }
            } else if let Some(Reverse(p)) = self.pending.pop() {
                self.end(p);
            }
        }
    }

    fn end(&mut self, p: Pending) {
        let (i, at) = (p.account, p.at);
        match p.action {
            Action::Release { feature, draws } => {
                with_states(&mut self.sims, i, |plan, state, pool| {
                    waterfall::release_in(plan, state, pool, &draws, at);
                    waterfall::finish_request(plan, state, feature);
                });
            }
            Action::Refund { draws } => {
                with_states(&mut self.sims, i, |plan, state, pool| {
                    waterfall::release_in(plan, state, pool, &draws, at);
                });
            }
            Action::Settle {
                mut draws,
                ongoing,
                estimate,
                price,
                used,
                counted,
                refunded_at,
            } => {
                with_states(&mut self.sims, i, |plan, state, mut pool| {
                    // As the gateway's hold settles (`Hold::adjust`): the excess goes back to
                    // the pools that held it; a shortfall is covered now or forgiven.
                    if used < estimate {
                        let released = waterfall::trim(&mut draws, estimate - used, price);
                        waterfall::release_in(plan, state, pool.as_deref_mut(), &released, at);
                    } else if used > estimate {
                        let (extra, _forgiven) = waterfall::cover_up_to_in(
                            plan,
                            state,
                            pool.as_deref(),
                            ongoing,
                            used - estimate,
                            at,
                        );
                        if let Some(extra) = extra {
                            waterfall::reserve_in(plan, state, pool, &extra, at);
                            draws.extend(extra.draws);
                        }
                    }
                    waterfall::finish_request(plan, state, ongoing.feature);
                });
                if counted {
                    let t = &mut self.sims[i].tally;
                    if refunded_at.is_some() {
                        t.refunded += 1;
                    } else {
                        let kinds = &self.grant_kinds;
                        t.after.charges += 1;
                        for d in &draws {
                            let kind = match d.pool {
                                Pool::Window { .. } => PoolKind::UsageLimit,
                                Pool::FreeTier { .. } => PoolKind::FreeTier,
                                Pool::Grant { grant_id } => kinds
                                    .get(&grant_id)
                                    .map_or(PoolKind::Credits, |k| PoolKind::of_grant(*k)),
                                Pool::Workspace { .. } => PoolKind::Workspace,
                                Pool::Postpaid => PoolKind::EnterprisePostpaid,
                                Pool::NoCharge => PoolKind::NoCharge,
                            };
                            t.after.add_draw(kind, d.units, d.credits);
                        }
                    }
                }
                if let Some(r) = refunded_at {
                    self.schedule(r.max(at), i, Action::Refund { draws });
                }
            }
        }
    }

    /// Counts the ledger's side of a counted event.
    fn count_before(&mut self, i: usize, e: &ReplayEvent<'_>, was_denied: bool) {
        let kinds = &self.grant_kinds;
        let t = &mut self.sims[i].tally;
        t.requests += 1;
        if was_denied {
            t.before.deny(e.code.unwrap_or("denied"));
            return;
        }
        t.before.admitted += 1;
        let Some(c) = &e.charge else {
            return;
        };
        if c.refunded_at.is_some() {
            return;
        }
        t.before.charges += 1;
        // Inline: a charge has a handful of draws, and this runs for every charge of the ledger.
        let draws: smallvec::SmallVec<[StoredDraw; 4]> =
            serde_json::from_str(c.draws).unwrap_or_default();
        for d in &draws {
            let kind = match d.pool {
                StoredPool::Window => PoolKind::UsageLimit,
                StoredPool::FreeTier => PoolKind::FreeTier,
                StoredPool::Grant => d
                    .grant_id
                    .and_then(|g| kinds.get(&g))
                    .map_or(PoolKind::Credits, |k| PoolKind::of_grant(*k)),
                StoredPool::Workspace => PoolKind::Workspace,
                StoredPool::Postpaid => PoolKind::EnterprisePostpaid,
                StoredPool::NoCharge => PoolKind::NoCharge,
            };
            t.before.units += d.units;
            t.before.pools[kind as usize].units += d.units;
            t.before.pools[kind as usize].credits += d.credits;
        }
        // The monetization event's columns are the charge; the draws only say who paid (a
        // ledger where they disagree is `flowgate reconcile`'s to report, not replay's).
        t.before.credits += c.credits;
        t.before.postpaid += c.postpaid_credits;
    }

    fn count_denial(&mut self, i: usize, code: &str, was_denied: bool) {
        let t = &mut self.sims[i].tally;
        t.after.deny(code);
        if !was_denied {
            t.newly_denied += 1;
        }
    }
}

/// Runs `f` on account `i`'s plan and state, and its workspace's state (the pool) if it has
/// one: two disjoint borrows of `sims`.
fn with_states<R>(
    sims: &mut [Sim],
    i: usize,
    f: impl FnOnce(&Plan, &mut AccountState, Option<&mut AccountState>) -> R,
) -> R {
    let w = sims[i].workspace.filter(|w| *w != i);
    let (sim, pool) = match w {
        Some(w) if w < i => {
            let (low, high) = sims.split_at_mut(i);
            (&mut high[0], Some(&mut low[w].state))
        }
        Some(w) => {
            let (low, high) = sims.split_at_mut(w);
            (&mut low[i], Some(&mut high[0].state))
        }
        None => (&mut sims[i], None),
    };
    let plan = sim.plan.as_deref().unwrap_or(&NO_PLAN);
    f(plan, &mut sim.state, pool)
}

/// The code a denial is recorded under (the gateway's `denial_code`).
fn denial_code(denial: &Denial) -> &'static str {
    match denial {
        Denial::UsageLimitReached { .. } => "usage_limit_reached",
        Denial::InsufficientCredits { .. } => "insufficient_credits",
        Denial::NotEntitled => "not_entitled",
        Denial::ConcurrencyLimit { .. } => "concurrency_limit_reached",
    }
}

impl SideTally {
    fn deny(&mut self, code: &str) {
        self.denied += 1;
        match self.denials.iter_mut().find(|(c, _)| **c == *code) {
            Some((_, n)) => *n += 1,
            None => self.denials.push((code.into(), 1)),
        }
    }

    fn add_draw(&mut self, kind: PoolKind, units: Units, credits: Credits) {
        self.units += units;
        self.pools[kind as usize].units += units;
        self.pools[kind as usize].credits += credits;
        match kind {
            PoolKind::EnterprisePostpaid => self.postpaid += credits,
            _ => self.credits += credits,
        }
    }

    fn add(&mut self, o: &SideTally) {
        self.admitted += o.admitted;
        self.denied += o.denied;
        for (code, n) in &o.denials {
            match self.denials.iter_mut().find(|(c, _)| c == code) {
                Some((_, m)) => *m += n,
                None => self.denials.push((code.clone(), *n)),
            }
        }
        self.charges += o.charges;
        self.credits += o.credits;
        self.postpaid += o.postpaid;
        self.units += o.units;
        for (a, b) in self.pools.iter_mut().zip(&o.pools) {
            a.units += b.units;
            a.credits += b.credits;
        }
    }

    fn side(&self) -> Side {
        Side {
            admitted: self.admitted,
            denied: self.denied,
            denials: self
                .denials
                .iter()
                .map(|(c, n)| (c.to_string(), *n))
                .collect(),
            charges: self.charges,
            credits: self.credits,
            postpaid_credits: self.postpaid,
            units: self.units,
            pools: PoolKind::ALL
                .iter()
                .zip(&self.pools)
                .filter(|(_, u)| u.units > 0 || u.credits > 0)
                .map(|(k, u)| (k.name(), *u))
                .collect(),
        }
    }
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.requests += o.requests;
        self.before.add(&o.before);
        self.after.add(&o.after);
        self.newly_denied += o.newly_denied;
        self.newly_admitted += o.newly_admitted;
        self.refunded += o.refunded;
    }

    fn summary(&self) -> Summary {
        let total = |s: &SideTally| i128::from(s.credits) + i128::from(s.postpaid);
        let delta = total(&self.after) - total(&self.before);
        Summary {
            requests: self.requests,
            before: self.before.side(),
            after: self.after.side(),
            newly_denied: self.newly_denied,
            newly_admitted: self.newly_admitted,
            credits_delta: i64::try_from(delta).unwrap_or(if delta < 0 {
                i64::MIN
            } else {
                i64::MAX
            }),
            refunded: self.refunded,
        }
    }
}

impl Report {
    /// The report as a table for people.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let denials = |s: &Side| {
            if s.denials.is_empty() {
                return "-".to_owned();
            }
            s.denials
                .iter()
                .map(|(c, n)| format!("{c}={n}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let _ = writeln!(
            out,
            "{:<24} {:<12} {:>9} {:>9} {:>9} {:>12} {:>12} {:>12}  denials after",
            "account", "plan", "requests", "denied", "denied'", "credits", "credits'", "delta"
        );
        let row = |out: &mut String, account: &str, plan: &str, s: &Summary| {
            let _ = writeln!(
                out,
                "{:<24} {:<12} {:>9} {:>9} {:>9} {:>12} {:>12} {:>+12}  {}",
                account,
                plan,
                s.requests,
                s.before.denied,
                s.after.denied,
                s.before.credits + s.before.postpaid_credits,
                s.after.credits + s.after.postpaid_credits,
                s.credits_delta,
                denials(&s.after)
            );
        };
        for a in &self.accounts {
            row(&mut out, &a.account, &a.plan, &a.summary);
        }
        row(&mut out, "TOTAL", "", &self.totals);
        let _ = writeln!(out, "\npools (units / credits)    before -> after");
        let kinds: BTreeSet<&str> = self
            .totals
            .before
            .pools
            .keys()
            .chain(self.totals.after.pools.keys())
            .copied()
            .collect();
        for kind in kinds {
            let get = |s: &Side| s.pools.get(kind).copied().unwrap_or_default();
            let (b, a) = (get(&self.totals.before), get(&self.totals.after));
            let _ = writeln!(
                out,
                "  {kind:<24} {} / {} -> {} / {}",
                b.units, b.credits, a.units, a.credits
            );
        }
        if !self.top.is_empty() {
            let _ = writeln!(out, "\nmost affected");
            for t in &self.top {
                let _ = writeln!(
                    out,
                    "  {:<24} credits {:+}, newly denied {}, newly admitted {}",
                    t.account, t.credits_delta, t.newly_denied, t.newly_admitted
                );
            }
        }
        let _ = writeln!(
            out,
            "\n{} events read, {} replayed, {} counted, {} skipped; denied' and credits' are the candidate's; nothing was written",
            self.events.read, self.events.replayed, self.events.counted, self.events.skipped
        );
        out
    }
}

#[cfg(test)]
mod tests;
