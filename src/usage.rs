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

    /// The decision as stored (JSON): every layer checked, what it had and gave; a shadow
    /// decision says so (`"shadow": "admit"` or `"deny"`: what enforcing would have done).
    pub fn decision_json(&self) -> String {
        decision_json(&self.plan, &self.decision, self.shadow)
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

/// Describes a decision layer by layer, with the names the plan gives them, as JSON.
///
/// Serialized straight from borrowed records, once per usage event on the ledger writer: a
/// `serde_json::Value` built first cost a map per object (≈ 3 % of the gateway's CPU in stop
/// 24's profile). Fields are in alphabetical order, the order the `Value` form stored them in.
pub fn decision_json(plan: &Plan, decision: &Decision, shadow: Option<Shadow>) -> String {
    let record = DecisionRecord {
        admitted: decision.admitted(),
        credits_per_unit: decision.credits_per_unit,
        denial: decision.denial,
        draws: &decision.draws,
        layers: LayerRecords { plan, decision },
        plan: &plan.name,
        price_version: plan.price_version(decision),
        shadow,
        units: decision.units,
    };
    // Serializing plain integers, strings and derived records cannot fail.
    serde_json::to_string(&record).unwrap_or_default()
}

#[derive(Serialize)]
struct DecisionRecord<'a> {
    admitted: bool,
    credits_per_unit: crate::waterfall::Credits,
    denial: Option<crate::waterfall::Denial>,
    draws: &'a [Draw],
    layers: LayerRecords<'a>,
    plan: &'a str,
    price_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    shadow: Option<Shadow>,
    units: crate::waterfall::Units,
}

/// The decision's layer reports, written as a sequence without collecting them first.
struct LayerRecords<'a> {
    plan: &'a Plan,
    decision: &'a Decision,
}

impl Serialize for LayerRecords<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.decision.layers.iter().filter_map(|r| {
            let layer = self.plan.layers.get(r.layer as usize)?;
            // A workspace layer also says what its pool and the member's cap held (null
            // when unknown); other layers leave the three out.
            let workspace = match &layer.kind {
                crate::waterfall::LayerKind::Workspace { member_cap } => {
                    Some((r.pool_credits, r.cap_left, member_cap.map(|c| c.credits)))
                }
                _ => None,
            };
            Some(LayerRecord {
                available_credits: r.available_credits,
                available_units: r.available_units,
                cap_left: workspace.map(|w| w.1),
                eligible: r.eligible,
                gave_credits: r.gave_credits,
                gave_units: r.gave_units,
                kind: layer.kind.tag(),
                layer: &layer.name,
                member_cap: workspace.map(|w| w.2),
                pool_credits: workspace.map(|w| w.0),
                reset_at: r.reset_at.map(crate::clock::rfc3339),
            })
        }))
    }
}

#[derive(Serialize)]
struct LayerRecord<'a> {
    available_credits: Option<crate::waterfall::Credits>,
    available_units: crate::waterfall::Units,
    #[serde(skip_serializing_if = "Option::is_none")]
    cap_left: Option<Option<crate::waterfall::Credits>>,
    eligible: bool,
    gave_credits: crate::waterfall::Credits,
    gave_units: crate::waterfall::Units,
    kind: &'static str,
    layer: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    member_cap: Option<Option<crate::waterfall::Credits>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pool_credits: Option<Option<crate::waterfall::Credits>>,
    reset_at: Option<String>,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::{Value, json};

    use super::{Shadow, decision_json};
    use crate::waterfall::{
        AccountState, FeatureId, FeatureSet, Grant, GrantKind, Layer, LayerKind, MemberCap, Period,
        Plan, PriceTable, Tz, Window, decide, decide_in, reserve,
    };

    const NOW: i64 = 1_795_428_000_000;

    fn layer(name: &str, kind: LayerKind) -> Layer {
        Layer {
            name: name.into(),
            features: FeatureSet::ALL,
            kind,
        }
    }

    fn credits(id: i64, balance: u64) -> Grant {
        Grant {
            id,
            kind: GrantKind::Credits,
            balance,
            unsettled: 0,
            version: 0,
            expires_at: crate::waterfall::NEVER,
            priority: 0,
            features: FeatureSet::ALL,
        }
    }

    /// Every layer reported by name and kind, with what it had and gave; a workspace layer adds
    /// its pool, the member's cap left and the cap; draws and denial as the engine's types
    /// serialize; `shadow` only for a shadow decision.
    #[test]
    fn a_decision_is_stored_layer_by_layer() {
        let plan = Arc::new(Plan {
            name: "team".into(),
            layers: vec![
                layer(
                    "limits",
                    LayerKind::UsageLimit {
                        windows: vec![Window::rolling("5h", 300, 2)],
                    },
                ),
                layer(
                    "pool",
                    LayerKind::Workspace {
                        member_cap: Some(MemberCap {
                            credits: 40,
                            period: Period::Month,
                            zone: Tz::UTC,
                        }),
                    },
                ),
            ],
            prices: vec![PriceTable::flat("v7", vec![Some(5)])],
            strict: false,
        });
        let mut member = AccountState::new(&plan, vec![], NOW);
        // One unit of the window used ten minutes ago: it frees up 5 h after that minute.
        let earlier = NOW - 10 * 60_000;
        let first = decide(&plan, &member, FeatureId(0), 1, earlier);
        reserve(&plan, &mut member, &first, earlier);
        let pool = AccountState::new(&plan, vec![credits(9, 100)], NOW);
        let d = decide_in(&plan, &member, Some(&pool), FeatureId(0), 4, NOW);
        assert!(d.admitted());
        let stored: Value = serde_json::from_str(&decision_json(&plan, &d, None)).unwrap();
        assert_eq!(stored["plan"], "team");
        assert_eq!(stored["price_version"], "v7");
        assert_eq!(stored["units"], 4);
        assert_eq!(stored["credits_per_unit"], 5);
        assert_eq!(stored["admitted"], true);
        assert_eq!(stored["denial"], Value::Null);
        assert!(stored.get("shadow").is_none());
        assert_eq!(stored["draws"], serde_json::to_value(&d.draws).unwrap());
        let layers = stored["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 2);
        let limits = &layers[0];
        assert_eq!(limits["layer"], "limits");
        assert_eq!(limits["kind"], "usage_limit");
        assert_eq!(limits["available_units"], 1);
        assert_eq!(limits["gave_units"], 1);
        assert_eq!(
            limits["reset_at"],
            crate::clock::rfc3339(earlier + 300 * 60_000)
        );
        for absent in ["pool_credits", "cap_left", "member_cap"] {
            assert!(limits.get(absent).is_none(), "{absent}");
        }
        let pool_layer = &layers[1];
        assert_eq!(pool_layer["kind"], "workspace");
        assert_eq!(pool_layer["gave_units"], 3);
        assert_eq!(pool_layer["gave_credits"], 15);
        assert_eq!(pool_layer["pool_credits"], 100);
        assert_eq!(pool_layer["cap_left"], 40);
        assert_eq!(pool_layer["member_cap"], 40);

        let denied = decide(&plan, &member, FeatureId(0), 1_000, NOW);
        let stored: Value =
            serde_json::from_str(&decision_json(&plan, &denied, Some(Shadow::Deny))).unwrap();
        assert_eq!(stored["admitted"], false);
        assert_eq!(
            stored["denial"],
            serde_json::to_value(denied.denial).unwrap()
        );
        assert_eq!(stored["shadow"], "deny");
        assert_eq!(stored["draws"], json!([]));
    }
}
