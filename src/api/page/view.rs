//! What the usage page shows, made from the user API's own bodies ([`UsageBody`] of
//! `/v1/me/usage`, [`LedgerEventBody`] of `/v1/me/decisions`): every number is copied from
//! them, never computed again. What is added is for reading: countdowns, percentages, and a
//! sentence explaining each decision.

use serde::Deserialize;

use crate::api::model::{LayerBody, LedgerEventBody, UsageBody};
use crate::config::parse_instant;
use crate::waterfall::{Denial, Millis};

/// The live part of the page: limits, balances, recent decisions.
#[derive(Debug)]
pub struct PageView {
    /// The account.
    pub account: String,
    /// Its plan.
    pub plan: String,
    /// Whether its requests are refused.
    pub suspended: bool,
    /// The instant the numbers are for (RFC 3339).
    pub as_of: String,
    /// The waterfall's layers in order.
    pub layers: Vec<LayerView>,
    /// Credits left by pool.
    pub pools: Vec<PoolView>,
    /// Every grant, in spend order.
    pub grants: Vec<GrantView>,
    /// The newest decisions first.
    pub decisions: Vec<DecisionView>,
}

/// One layer of the waterfall.
#[derive(Debug)]
pub struct LayerView {
    /// Its name in the plan.
    pub name: String,
    /// What kind of layer it is, for a person.
    pub kind: &'static str,
    /// Whether the name says more than the kind ("limits" of "Usage limits" does not).
    pub named: bool,
    /// The features it pays for, when not all.
    pub features: Option<String>,
    /// A usage-limit layer's windows.
    pub windows: Vec<WindowView>,
    /// A free tier's allowance.
    pub free_tier: Option<AllowanceView>,
    /// A grant-backed layer's credits.
    pub credits: Option<u64>,
}

/// A usage-limit window.
#[derive(Debug)]
pub struct WindowView {
    /// Its name.
    pub name: String,
    /// How it resets, for a person ("rolling, 5 h", "daily, Europe/Paris").
    pub resets: String,
    /// Units allowed.
    pub limit: u64,
    /// Units used.
    pub used: u64,
    /// Units left.
    pub remaining: u64,
    /// Percent used, 0 to 100 (the bar).
    pub percent: u64,
    /// When it resets (RFC 3339).
    pub reset_at: String,
    /// How long until then, as of the numbers.
    pub resets_in: String,
}

/// A free tier's allowance this period.
#[derive(Debug)]
pub struct AllowanceView {
    /// `day`, `week` or `month`, and its time zone.
    pub period: String,
    /// Units per period.
    pub units: u64,
    /// Units used.
    pub used: u64,
    /// Units left.
    pub remaining: u64,
    /// Percent used.
    pub percent: u64,
    /// When it resets (RFC 3339).
    pub reset_at: String,
    /// How long until then.
    pub resets_in: String,
}

/// Credits left in one kind of pool.
#[derive(Debug)]
pub struct PoolView {
    /// `credits`, `promotion` or `enterprise`.
    pub kind: &'static str,
    /// Its name for a person.
    pub label: &'static str,
    /// Credits left.
    pub credits: u64,
}

/// One grant.
#[derive(Debug)]
pub struct GrantView {
    /// The store's id.
    pub id: i64,
    /// `credits`, `promotion` or `enterprise`.
    pub kind: String,
    /// Credits that can still be drawn.
    pub balance: u64,
    /// Credits held by requests in flight or not yet committed.
    pub held: u64,
    /// When it expires (RFC 3339).
    pub expires_at: Option<String>,
    /// How long until then.
    pub expires_in: Option<String>,
    /// Whether it has expired.
    pub expired: bool,
    /// The features it pays for, when not all.
    pub features: Option<String>,
}

/// One recent request and why it went the way it did.
#[derive(Debug)]
pub struct DecisionView {
    /// The decision id the response carried.
    pub id: String,
    /// When it was decided (RFC 3339).
    pub decided_at: String,
    /// The feature.
    pub feature: String,
    /// Units used (settled, for a charge).
    pub units: i64,
    /// How it ended, as the ledger names it.
    pub outcome: String,
    /// `ok` (charged), `denied`, or `neutral` (not charged).
    pub tone: &'static str,
    /// One line: what happened.
    pub headline: String,
    /// Which pools paid, one line each.
    pub paid_by: Vec<String>,
    /// Why, when it was denied or not charged.
    pub reason: Option<String>,
    /// What each layer had when the request was decided.
    pub checked: Vec<String>,
}

/// Builds the page's view from the user API's bodies.
pub fn page(usage: UsageBody, events: Vec<LedgerEventBody>) -> PageView {
    let now = parse_instant(&usage.as_of).unwrap_or_default();
    PageView {
        layers: usage.layers.iter().map(|l| layer(l, now)).collect(),
        // A pool the plan has no layer for is shown only when it holds something.
        pools: [
            ("credits", "Credits", usage.pools.credits, "credits"),
            (
                "promotion",
                "Promotions",
                usage.pools.promotion,
                "promotions",
            ),
            (
                "enterprise",
                "Enterprise",
                usage.pools.enterprise,
                "enterprise_pool",
            ),
        ]
        .into_iter()
        .filter(|(_, _, credits, layer)| {
            *credits > 0 || usage.layers.iter().any(|l| l.kind == *layer)
        })
        .map(|(kind, label, credits, _)| PoolView {
            kind,
            label,
            credits,
        })
        .collect(),
        grants: usage
            .grants
            .into_iter()
            .map(|g| GrantView {
                expires_in: g.expires_at.as_deref().map(|at| until(now, at)),
                id: g.id,
                kind: g.kind,
                balance: g.balance,
                held: g.held,
                expires_at: g.expires_at,
                expired: g.expired,
                features: g.features.map(|f| f.join(", ")),
            })
            .collect(),
        decisions: events.iter().map(|e| decision(e, now)).collect(),
        account: usage.account,
        plan: usage.plan,
        suspended: usage.suspended,
        as_of: usage.as_of,
    }
}

fn layer(body: &LayerBody, now: Millis) -> LayerView {
    LayerView {
        name: body.name.clone(),
        kind: kind_label(&body.kind),
        named: !kind_label(&body.kind)
            .to_lowercase()
            .contains(&body.name.to_lowercase().replace('_', " ")),
        features: body.features.as_ref().map(|f| f.join(", ")),
        windows: body
            .windows
            .iter()
            .flatten()
            .map(|w| WindowView {
                name: w.name.clone(),
                resets: match &w.time_zone {
                    None => format!("rolling, {}", span(u64::from(w.minutes) * 60)),
                    Some(zone) => format!("{}, {zone}", w.reset),
                },
                limit: w.limit,
                used: w.used,
                remaining: w.remaining,
                percent: percent(w.used, w.limit),
                reset_at: w.reset_at.clone(),
                resets_in: until(now, &w.reset_at),
            })
            .collect(),
        free_tier: body.free_tier.as_ref().map(|f| AllowanceView {
            period: format!("per {}, {}", f.period, f.time_zone),
            units: f.units,
            used: f.used,
            remaining: f.remaining,
            percent: percent(f.used, f.units),
            reset_at: f.reset_at.clone(),
            resets_in: until(now, &f.reset_at),
        }),
        credits: body.credits,
    }
}

fn kind_label(kind: &str) -> &'static str {
    match kind {
        "usage_limit" => "Usage limits",
        "free_tier" => "Free tier",
        "credits" => "Credits",
        "promotions" => "Promotions",
        "enterprise_pool" => "Enterprise pool",
        "enterprise_postpaid" => "Enterprise, billed afterwards",
        "workspace" => "Workspace pool",
        "concurrency" => "Requests at once",
        _ => "Layer",
    }
}

/// `used` of `limit` in percent, 0 to 100 (a window over its limit shows full).
fn percent(used: u64, limit: u64) -> u64 {
    if limit == 0 {
        return 100;
    }
    (u128::from(used) * 100 / u128::from(limit)).min(100) as u64
}

/// How long from `now` until the RFC 3339 instant `at`, for a person ("4h 59m").
fn until(now: Millis, at: &str) -> String {
    match parse_instant(at) {
        Some(at) if at > now => format!("in {}", span(((at - now) / 1000) as u64)),
        Some(_) => "now".to_owned(),
        None => String::new(),
    }
}

/// A duration for a person, to the precision that matters at its size (the page's script
/// writes countdowns the same way).
pub fn span(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds % 86_400 / 3600,
        seconds % 3600 / 60,
        seconds % 60,
    );
    match (d, h, m, s) {
        (0, 0, 0, _) => format!("{s}s"),
        (0, 0, _, 0) => format!("{m}m"),
        (0, 0, _, _) => format!("{m}m {s}s"),
        (0, _, 0, _) => format!("{h}h"),
        (0, _, _, _) => format!("{h}h {m}m"),
        (_, 0, _, _) => format!("{d}d"),
        _ => format!("{d}d {h}h"),
    }
}

/// A layer as the stored decision reports it (`usage::decision_json`).
#[derive(Debug, Deserialize)]
struct CheckedLayer {
    #[serde(default)]
    layer: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    eligible: bool,
    #[serde(default)]
    available_units: u64,
    available_credits: Option<u64>,
    #[serde(default)]
    gave_units: u64,
    #[serde(default)]
    gave_credits: u64,
}

/// A draw as the monetization event stores it (`waterfall::Draw`).
#[derive(Debug, Deserialize)]
struct StoredDraw {
    #[serde(default)]
    layer: usize,
    #[serde(default)]
    pool: String,
    grant_id: Option<i64>,
    #[serde(default)]
    units: u64,
    #[serde(default)]
    credits: u64,
}

/// ", 5 credits", or nothing for none.
fn and_credits(n: u64) -> String {
    if n > 0 {
        format!(", {n} credits")
    } else {
        String::new()
    }
}

fn units(n: u64) -> String {
    if n == 1 {
        "1 unit".to_owned()
    } else {
        format!("{n} units")
    }
}

fn decision(event: &LedgerEventBody, now: Millis) -> DecisionView {
    let usage = &event.usage_event;
    let d = &usage.decision;
    let layers: Vec<CheckedLayer> = serde_json::from_value(d["layers"].clone()).unwrap_or_default();
    let denial: Option<Denial> = serde_json::from_value(d["denial"].clone()).ok();
    let checked = layers
        .iter()
        .map(|l| {
            let had = if !l.eligible {
                "does not pay for this feature".to_owned()
            } else if let Some(credits) = l.available_credits {
                format!("had {credits} credits")
            } else {
                format!("had {} left", units(l.available_units))
            };
            format!("{} ({}): {had}", l.layer, kind_label(&l.kind))
        })
        .collect();
    // What paid: the charge's draws once settled; the decision's own until then.
    let paid_by: Vec<String> = match &event.monetization_event {
        Some(m) => {
            let draws: Vec<StoredDraw> =
                serde_json::from_value(m.draws.clone()).unwrap_or_default();
            draws.iter().map(|draw| paid(draw, &layers)).collect()
        }
        None if usage.outcome == "completed" => layers
            .iter()
            .filter(|l| l.gave_units > 0)
            .map(|l| {
                let credits = and_credits(l.gave_credits);
                format!("{}: {}{credits}", l.layer, units(l.gave_units))
            })
            .collect(),
        None => Vec::new(),
    };
    let feature = &usage.feature;
    let status = usage
        .upstream_status
        .map(|s| format!(" {s}"))
        .unwrap_or_default();
    let plan = d["plan"].as_str().unwrap_or_default();
    let (tone, headline, reason) = match usage.outcome.as_str() {
        "completed" => {
            let mut headline = format!("Allowed: {}", units(usage.units.max(0) as u64));
            if let Some(m) = &event.monetization_event {
                if m.credits > 0 {
                    headline.push_str(&format!(", {} credits", m.credits));
                }
                if m.postpaid_credits > 0 {
                    headline.push_str(&format!(", {} credits billed later", m.postpaid_credits));
                }
            }
            let reason = match &event.monetization_event {
                Some(m) if m.refunded_at.is_some() => Some("Refunded.".to_owned()),
                Some(m) if m.forgiven_units > 0 => Some(format!(
                    "{} nobody could pay for were forgiven.",
                    units(m.forgiven_units as u64)
                )),
                _ => None,
            };
            ("ok", headline, reason)
        }
        "denied" => {
            let why = match denial {
                Some(Denial::UsageLimitReached { retry_at }) => {
                    let at = crate::clock::rfc3339(retry_at);
                    format!(
                        "Usage limit reached: your limits are used up and no pool after them could pay. More is allowed {} ({at}).",
                        until(now, &at)
                    )
                }
                Some(Denial::InsufficientCredits {
                    needed_credits,
                    available_credits,
                }) => {
                    let price = d["credits_per_unit"].as_u64().unwrap_or(0);
                    let short = needed_credits.checked_div(price).unwrap_or(0);
                    format!(
                        "Not enough credits: {} of the {} asked for are covered neither by your limits nor by the {available_credits} credits you have; they would need {needed_credits} more credits ({price} per unit). Waiting will not help; adding credits will.",
                        units(short),
                        units(usage.units.max(0) as u64),
                    )
                }
                Some(Denial::NotEntitled) => {
                    format!("Your plan ({plan}) does not include {feature}.")
                }
                Some(Denial::ConcurrencyLimit { limit, running }) => format!(
                    "{running} of the {limit} {feature} requests allowed at once were running; one ending lets the next in."
                ),
                None => format!(
                    "Refused ({}).",
                    usage.code.as_deref().unwrap_or("no reason recorded")
                ),
            };
            (
                "denied",
                format!("Denied: {}", units(usage.units.max(0) as u64)),
                Some(why),
            )
        }
        outcome => {
            let why = match outcome {
                "replay" => "A repeat of an Idempotency-Key already charged: answered with the first response, not charged again.".to_owned(),
                "duplicate" => "The ledger had already charged this key: not charged again.".to_owned(),
                "upstream_error" => format!("The product answered{status}: not charged."),
                "upstream_timeout" => "The product did not answer in time: not charged.".to_owned(),
                "upstream_unavailable" => "The product could not be reached: not charged.".to_owned(),
                "upstream_aborted" => "The product's response broke off: not charged.".to_owned(),
                "client_aborted" => "The client left before the response completed: not charged.".to_owned(),
                "internal_error" => "The gateway failed: not charged.".to_owned(),
                other => format!("Ended as {other}: not charged."),
            };
            ("neutral", "Not charged".to_owned(), Some(why))
        }
    };
    // Shadow mode: forwarded whatever the waterfall said, never charged; say what enforcing
    // would have done, and name no pool as having paid.
    let (tone, headline, reason, paid_by) = match usage.shadow.as_deref() {
        None => (tone, headline, reason, paid_by),
        Some(would) => {
            let enforcing = if would == "deny" {
                format!(
                    "denied it ({})",
                    usage.code.as_deref().unwrap_or("no reason recorded")
                )
            } else {
                "allowed it".to_owned()
            };
            (
                "neutral",
                format!("Shadow mode: {}", units(usage.units.max(0) as u64)),
                Some(format!(
                    "Not charged: this request ran in shadow mode ({}). Enforcing would have {enforcing}.",
                    usage.outcome.replace('_', " ")
                )),
                Vec::new(),
            )
        }
    };
    DecisionView {
        id: usage.decision_id.clone(),
        decided_at: usage.decided_at.clone(),
        feature: feature.clone(),
        units: usage.units,
        outcome: usage.outcome.clone(),
        tone,
        headline,
        paid_by,
        reason,
        checked,
    }
}

/// One draw of a charge, named by its layer: "limits: 2 units", "credits: 1 unit, 5 credits
/// (grant 3)".
fn paid(draw: &StoredDraw, layers: &[CheckedLayer]) -> String {
    let name = layers
        .get(draw.layer)
        .map_or_else(|| format!("layer {}", draw.layer), |l| l.layer.clone());
    let credits = and_credits(draw.credits);
    let from = match (draw.pool.as_str(), draw.grant_id) {
        ("postpaid", _) => " (billed afterwards)".to_owned(),
        (_, Some(id)) => format!(" (grant {id})"),
        _ => String::new(),
    };
    format!("{name}: {}{credits}{from}", units(draw.units))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_at_their_size() {
        assert_eq!(span(0), "0s");
        assert_eq!(span(59), "59s");
        assert_eq!(span(61), "1m 1s");
        assert_eq!(span(120), "2m");
        assert_eq!(span(5 * 3600), "5h");
        assert_eq!(span(5 * 3600 + 59), "5h", "seconds do not matter at hours");
        assert_eq!(span(4 * 3600 + 59 * 60 + 30), "4h 59m");
        assert_eq!(span(7 * 86_400), "7d");
        assert_eq!(span(7 * 86_400 + 3600), "7d 1h");
    }

    #[test]
    fn percent_is_bounded() {
        assert_eq!(percent(0, 3), 0);
        assert_eq!(percent(2, 3), 66);
        assert_eq!(percent(4, 3), 100, "over the limit (replicas) shows full");
        assert_eq!(percent(0, 0), 100);
        assert_eq!(percent(u64::MAX, u64::MAX), 100);
    }

    #[test]
    fn a_shadow_decision_says_what_enforcing_would_have_done() {
        let mut e = event(
            "completed",
            serde_json::json!({"layers": [], "plan": "pro"}),
        );
        e.usage_event.shadow = Some("deny".into());
        e.usage_event.code = Some("usage_limit_reached".into());
        let v = decision(&e, 0);
        assert_eq!(v.tone, "neutral");
        assert!(v.headline.starts_with("Shadow mode"), "{}", v.headline);
        let reason = v.reason.expect("a reason");
        assert!(
            reason.contains("denied it (usage_limit_reached)"),
            "{reason}"
        );
        assert!(v.paid_by.is_empty());
    }

    fn event(outcome: &str, decision: serde_json::Value) -> LedgerEventBody {
        use crate::api::model::UsageEventBody;
        LedgerEventBody {
            usage_event: UsageEventBody {
                id: 1,
                decision_id: "d-1".into(),
                account: "alice".into(),
                feature: "task".into(),
                units: 3,
                outcome: outcome.into(),
                code: None,
                upstream_status: Some(503),
                idempotency_key: "k".into(),
                decision,
                decided_at: "2026-01-01T00:00:00Z".into(),
                completed_at: "2026-01-01T00:00:00Z".into(),
                recorded_at: "2026-01-01T00:00:00Z".into(),
                shadow: None,
            },
            monetization_event: None,
            balance_updates: Vec::new(),
        }
    }

    #[test]
    fn every_outcome_is_explained() {
        let now = parse_instant("2026-01-01T00:00:00Z").unwrap();
        let layers = serde_json::json!([
            { "layer": "limits", "kind": "usage_limit", "eligible": true, "available_units": 2,
              "available_credits": null, "gave_units": 2, "gave_credits": 0 },
            { "layer": "credits", "kind": "credits", "eligible": true, "available_units": 4,
              "available_credits": 20, "gave_units": 1, "gave_credits": 5 },
            { "layer": "promo", "kind": "promotions", "eligible": false, "available_units": 0,
              "available_credits": 0, "gave_units": 0, "gave_credits": 0 },
        ]);
        let allowed = decision(
            &event(
                "completed",
                serde_json::json!({ "plan": "pro", "layers": layers }),
            ),
            now,
        );
        assert_eq!(allowed.tone, "ok");
        assert_eq!(
            allowed.paid_by,
            ["limits: 2 units", "credits: 1 unit, 5 credits"]
        );
        assert_eq!(
            allowed.checked,
            [
                "limits (Usage limits): had 2 units left",
                "credits (Credits): had 20 credits",
                "promo (Promotions): does not pay for this feature",
            ]
        );
        let failed = decision(&event("upstream_error", serde_json::json!({})), now);
        assert_eq!((failed.tone, failed.paid_by.len()), ("neutral", 0));
        assert_eq!(
            failed.reason.as_deref(),
            Some("The product answered 503: not charged.")
        );
        let limit = decision(
            &event(
                "denied",
                serde_json::json!({ "denial": { "reason": "usage_limit_reached", "retry_at": now + 90_000 } }),
            ),
            now,
        );
        assert_eq!(limit.tone, "denied");
        assert!(
            limit
                .reason
                .as_deref()
                .unwrap()
                .contains("More is allowed in 1m 30s (2026-01-01T00:01:30Z)"),
            "{limit:?}"
        );
        let plan = decision(
            &event(
                "denied",
                serde_json::json!({ "plan": "lite", "denial": { "reason": "not_entitled" } }),
            ),
            now,
        );
        assert_eq!(
            plan.reason.as_deref(),
            Some("Your plan (lite) does not include task.")
        );
        let busy = decision(
            &event(
                "denied",
                serde_json::json!({ "denial": { "reason": "concurrency_limit", "limit": 2, "running": 2 } }),
            ),
            now,
        );
        assert!(
            busy.reason
                .as_deref()
                .unwrap()
                .starts_with("2 of the 2 task requests")
        );
        let unknown = decision(&event("something_new", serde_json::json!(null)), now);
        assert_eq!(
            unknown.reason.as_deref(),
            Some("Ended as something_new: not charged.")
        );
    }

    #[test]
    fn a_free_tier_and_the_pools_of_the_plan_are_shown_as_the_api_has_them() {
        use crate::api::model::{FreeTierBody, PoolsBody};
        let layer = |kind: &str, free_tier| LayerBody {
            name: kind.into(),
            kind: kind.into(),
            features: None,
            windows: None,
            free_tier,
            credits: None,
        };
        let usage = UsageBody {
            account: "alice".into(),
            plan: "pro".into(),
            suspended: false,
            as_of: "2026-01-10T12:00:00Z".into(),
            layers: vec![
                layer(
                    "free_tier",
                    Some(FreeTierBody {
                        period: "month".into(),
                        time_zone: "Europe/Paris".into(),
                        units: 40,
                        used: 10,
                        remaining: 30,
                        reset_at: "2026-01-31T23:00:00Z".into(),
                    }),
                ),
                layer("credits", None),
            ],
            pools: PoolsBody {
                credits: 0,
                promotion: 7,
                enterprise: 0,
            },
            grants: Vec::new(),
        };
        let view = page(usage, Vec::new());
        let free = view.layers[0].free_tier.as_ref().expect("the free tier");
        assert_eq!(
            (free.used, free.remaining, free.units, free.percent),
            (10, 30, 40, 25)
        );
        assert_eq!(free.period, "per month, Europe/Paris");
        assert_eq!(free.resets_in, "in 21d 11h");
        assert!(
            !view.layers[0].named,
            "free_tier says no more than Free tier"
        );
        let pools: Vec<(&str, u64)> = view.pools.iter().map(|p| (p.kind, p.credits)).collect();
        // Credits: the plan's layer, even empty; promotions: not in the plan, but held.
        assert_eq!(pools, [("credits", 0), ("promotion", 7)]);
    }

    #[test]
    fn countdowns_count_to_the_instant() {
        let now = parse_instant("2026-01-01T00:00:00Z").unwrap();
        assert_eq!(until(now, "2026-01-01T05:00:00Z"), "in 5h");
        assert_eq!(until(now, "2026-01-01T00:01:30Z"), "in 1m 30s");
        assert_eq!(until(now, "2025-12-31T23:00:00Z"), "now");
        assert_eq!(until(now, "not a time"), "");
    }
}
