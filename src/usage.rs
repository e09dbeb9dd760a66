//! What one request did: the record the ledger commits for it.
//!
//! A [`LedgerEntry`] is made by the gateway when a request ends and read by the store when it
//! commits; it sits below both so that neither imports the other.

use std::sync::Arc;

use serde::Serialize;

use crate::ids::{AccountId, IdempotencyKey};
use crate::waterfall::{Decision, Draw, Millis, Plan, Pool, Quantities};

/// What enforcing would have done with a shadow-mode decision (the request was forwarded
/// either way, and charged nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Shadow {
    /// The waterfall admitted it: its draws are what enforcing would have charged.
    Admit,
    /// The waterfall denied it (the entry's code says why).
    Deny,
}

impl Shadow {
    /// The name stored in the ledger's `shadow` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Shadow::Admit => "admit",
            Shadow::Deny => "deny",
        }
    }
}

/// Whether a shadow decision's draw counts: windows and free tiers are counters, so a shadowed
/// stricter limit fills as enforcing would fill it; every other pool is money (grants, a
/// workspace's pool and its member cap, postpaid billing) and a shadow draw never reaches it.
pub fn shadow_counts(draw: &Draw) -> bool {
    matches!(draw.pool, Pool::Window { .. } | Pool::FreeTier { .. })
}

/// The part of a shadow decision the view holds: its counted draws only
/// ([`shadow_counts`]), so that no shadow draw ever touches a balance, even in memory.
pub fn shadow_part(decision: &Decision) -> Decision {
    let mut part = decision.clone();
    part.draws.retain(|d| shadow_counts(d));
    part
}

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
    /// The decision; its draws are what is charged when `outcome` is `Completed` (adjusted to
    /// the settled cost when the route settles from the response).
    pub decision: Decision,
    /// Units the request used: the decision's (estimated) units, or what the response reported.
    pub used_units: u64,
    /// The request's model, for a feature priced per model.
    pub model: Option<Arc<str>>,
    /// What the response reported of each dimension, for a dimension-priced feature (the used
    /// units are their price at the decision's rates).
    pub quantities: Option<Quantities>,
    /// Used units nobody could pay when the response settled above the estimate: forgiven.
    pub forgiven_units: u64,
    /// How the request ended.
    pub outcome: Outcome,
    /// The denial or error code, when there is one.
    pub code: Option<&'static str>,
    /// The upstream's status, when it answered.
    pub upstream_status: Option<u16>,
    /// The client's `Idempotency-Key`, if it sent one.
    pub idempotency_key: Option<IdempotencyKey>,
    /// When the decision was made.
    pub decided_at: Millis,
    /// When the request ended.
    pub completed_at: Millis,
    /// Woken once the entry is committed (strict durability: the response's end waits on it).
    pub committed: Option<Arc<tokio::sync::Notify>>,
    /// Set when the request ran in shadow mode: what enforcing would have done. A shadow entry
    /// is never charged.
    pub shadow: Option<Shadow>,
}

impl LedgerEntry {
    /// Whether this entry charges the account.
    pub fn charged(&self) -> bool {
        self.shadow.is_none() && self.completed_admitted()
    }

    /// Whether the request completed on an admitting decision: charged when enforced, counted
    /// in windows and free tiers in shadow mode.
    pub fn completed_admitted(&self) -> bool {
        self.outcome == Outcome::Completed && self.decision.admitted()
    }

    /// A shadow entry's `shadow_draws` column: the window and free-tier draws it counted (kept
    /// in memory until committed, rebuilt from here on a restart). `None` when it counted
    /// nothing: enforced, not completed, or a strict plan (its leases are not drawn for
    /// shadow usage: see `crate::hold`).
    pub fn shadow_draws(&self) -> Option<Vec<Draw>> {
        if self.shadow.is_none() || !self.completed_admitted() || self.plan.strict {
            return None;
        }
        let draws: Vec<Draw> = self
            .decision
            .draws
            .iter()
            .filter(|d| shadow_counts(d))
            .copied()
            .collect();
        (!draws.is_empty()).then_some(draws)
    }

    /// [`LedgerEntry::shadow_draws`] as stored (JSON).
    pub fn shadow_draws_json(&self) -> Option<String> {
        self.shadow_draws()
            .and_then(|d| serde_json::to_string(&d).ok())
    }

    /// The `charge_key` column: unique together with `account_id` (two columns under one
    /// unique index, never one joined string). A client's key and a gateway-assigned one live
    /// apart: `k:<client key>`, `d:<decision id>`.
    pub fn charge_key(&self) -> String {
        match &self.idempotency_key {
            Some(k) => format!("k:{}", k.as_str()),
            None => format!("d:{}", self.decision_id),
        }
    }

    /// The `idempotency_key` column: the client's key as sent, or the decision id without one.
    pub fn idempotency_column(&self) -> String {
        match &self.idempotency_key {
            Some(k) => k.as_str().to_owned(),
            None => self.decision_id.to_string(),
        }
    }

    /// The decision as stored: every layer checked, what it had and gave; a shadow decision
    /// says so (`"shadow": "admit"` or `"deny"`: what enforcing would have done).
    pub fn decision_json(&self) -> serde_json::Value {
        let mut json = decision_json(&self.plan, &self.decision);
        if let Some(shadow) = self.shadow {
            json["shadow"] = serde_json::json!(shadow);
        }
        json
    }

    /// The price version the decision used.
    pub fn price_version(&self) -> &str {
        self.plan.price_version(&self.decision)
    }

    /// The `dimensions` column: what each dimension measured, as a JSON object.
    pub fn quantities_json(&self) -> Option<String> {
        self.quantities.as_ref().map(|q| {
            let map: serde_json::Map<String, serde_json::Value> = q
                .iter()
                .map(|(d, n)| (d.to_string(), serde_json::Value::from(*n)))
                .collect();
            serde_json::Value::Object(map).to_string()
        })
    }
}

/// Describes a decision layer by layer, with the names the plan gives them.
pub fn decision_json(plan: &Plan, decision: &Decision) -> serde_json::Value {
    let layers: Vec<_> = decision
        .layers
        .iter()
        .filter_map(|r| {
            let layer = plan.layers.get(r.layer as usize)?;
            let mut v = serde_json::json!({
                "layer": &*layer.name,
                "kind": layer.kind.tag(),
                "eligible": r.eligible,
                "available_units": r.available_units,
                "available_credits": r.available_credits,
                "gave_units": r.gave_units,
                "gave_credits": r.gave_credits,
                "reset_at": r.reset_at.map(crate::clock::rfc3339),
            });
            if let crate::waterfall::LayerKind::Workspace { member_cap } = &layer.kind {
                v["pool_credits"] = serde_json::json!(r.pool_credits);
                v["cap_left"] = serde_json::json!(r.cap_left);
                v["member_cap"] = serde_json::json!(member_cap.map(|c| c.credits));
            }
            Some(v)
        })
        .collect();
    serde_json::json!({
        "plan": &*plan.name,
        "price_version": plan.price_version(decision),
        "units": decision.units,
        "credits_per_unit": decision.credits_per_unit,
        "admitted": decision.admitted(),
        "denial": decision.denial,
        "layers": layers,
        "draws": decision.draws,
    })
}
