//! What the APIs send: response bodies (with their OpenAPI schemas) and how they are built from
//! the view and the store. Instants are RFC 3339 strings (UTC); money and units are integers.

use serde::Serialize;
use utoipa::ToSchema;

use crate::accounts::Account;
use crate::clock::rfc3339;
use crate::config::Settings;
use crate::store::{
    AccountRow, BalanceUpdateRecord, LedgerEvent, MonetizationRecord, StoredGrant, UsageEventRecord,
};
use crate::waterfall::{FeatureSet, GrantKind, LayerKind, LayerState, Millis, Window, WindowKind};

/// An account.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountBody {
    /// Its id.
    pub id: String,
    /// Its plan.
    pub plan: String,
    /// Whether its requests are refused (403).
    pub suspended: bool,
    /// Whether its requests run in shadow mode (decided and recorded, never blocked or
    /// charged).
    pub shadow: bool,
    /// When it was created.
    pub created_at: String,
    /// How many API keys it has.
    pub api_keys: i64,
    /// Whether the config file declares it (then the config sets its plan and suspension).
    pub in_config: bool,
    /// Its grants, with their committed balances.
    pub grants: Vec<GrantBody>,
}

impl AccountBody {
    /// Builds it from the store's rows.
    pub fn new(row: AccountRow, grants: Vec<StoredGrant>, settings: &Settings) -> AccountBody {
        AccountBody {
            in_config: settings.accounts.iter().any(|a| a.id == row.id),
            id: row.id,
            plan: row.plan,
            suspended: row.suspended,
            shadow: row.shadow,
            created_at: rfc3339(row.created_at),
            api_keys: row.api_keys,
            grants: grants.into_iter().map(GrantBody::from).collect(),
        }
    }
}

/// A grant of credits, a promotion or an enterprise pool.
#[derive(Debug, Serialize, ToSchema)]
pub struct GrantBody {
    /// The store's id (draws and balance updates name it).
    pub id: i64,
    /// The granter's id: the `Idempotency-Key` it was given with.
    pub external_id: String,
    /// `credits`, `promotion` or `enterprise`.
    pub kind: String,
    /// Credits granted.
    pub amount: u64,
    /// Credits left, as committed to the ledger.
    pub balance: u64,
    /// When it expires (never drawn from after).
    pub expires_at: Option<String>,
    /// Spend priority: lower first, then earliest expiry.
    pub priority: i32,
    /// Features it may pay for; absent: all.
    pub features: Option<Vec<String>>,
}

impl From<StoredGrant> for GrantBody {
    fn from(g: StoredGrant) -> GrantBody {
        GrantBody {
            id: g.id,
            external_id: g.external_id,
            kind: g.kind.as_str().to_owned(),
            amount: g.amount,
            balance: g.balance,
            expires_at: g.expires_at.map(rfc3339),
            priority: g.priority,
            features: g.features,
        }
    }
}

/// A new API key. The key is shown here once; the gateway keeps only its SHA-256.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyBody {
    /// The account it identifies.
    pub account: String,
    /// The key: send it as `Authorization: Bearer <key>`.
    pub api_key: String,
    /// Its first characters: what it is listed and revoked by.
    pub prefix: String,
}

/// An API key as listed: never the key itself.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyInfo {
    /// The key's first characters (11 of a generated key, at most a quarter of another).
    pub prefix: String,
    /// When it was created (absent for keys stored before keys had dates).
    pub created_at: Option<String>,
    /// When it was revoked; absent while it works.
    pub revoked_at: Option<String>,
}

impl From<crate::store::ApiKeyRow> for ApiKeyInfo {
    fn from(k: crate::store::ApiKeyRow) -> Self {
        ApiKeyInfo {
            prefix: k.prefix,
            created_at: (k.created_at > 0).then(|| rfc3339(k.created_at)),
            revoked_at: k.revoked_at.map(rfc3339),
        }
    }
}

/// An account's API keys, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyListBody {
    /// The account.
    pub account: String,
    /// Its keys, revoked ones included.
    pub api_keys: Vec<ApiKeyInfo>,
}

/// An account's limits and balances right now, as the next request will be decided: every
/// hold of a request in flight is already taken.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageBody {
    /// The account.
    pub account: String,
    /// Its plan.
    pub plan: String,
    /// Whether its requests are refused.
    pub suspended: bool,
    /// The instant the numbers are for.
    pub as_of: String,
    /// Each layer of the plan's waterfall, in order, with what it has left.
    pub layers: Vec<LayerBody>,
    /// Credits left by pool (unexpired grants, holds taken).
    pub pools: PoolsBody,
    /// Each grant, in spend order.
    pub grants: Vec<GrantBalanceBody>,
}

/// One layer of the waterfall and what it has left.
#[derive(Debug, Serialize, ToSchema)]
pub struct LayerBody {
    /// The layer's name.
    pub name: String,
    /// `usage_limit`, `free_tier`, `credits`, `promotions`, `enterprise_pool` or
    /// `enterprise_postpaid`.
    pub kind: String,
    /// Features it pays for; absent: all.
    pub features: Option<Vec<String>>,
    /// Usage-limit windows (a unit is available only if every window has room).
    pub windows: Option<Vec<WindowBody>>,
    /// The free tier's allowance.
    pub free_tier: Option<FreeTierBody>,
    /// Credits the layer's grants hold (grant-backed layers).
    pub credits: Option<u64>,
}

/// A usage-limit window.
#[derive(Debug, Serialize, ToSchema)]
pub struct WindowBody {
    /// Its name (as in the `x-ratelimit-*-<name>` headers).
    pub name: String,
    /// How it resets: `rolling` (usage slides out minute by minute), or at the start of each
    /// calendar period in `time_zone`: `daily` (local midnight), `weekly` (Monday 00:00) or
    /// `monthly` (the 1st, 00:00).
    pub reset: String,
    /// A calendar window's IANA time zone (absent for a rolling window).
    pub time_zone: Option<String>,
    /// Its length in minutes: a rolling window's, or a calendar window's current period (a
    /// day of 23 or 25 hours when the clocks change).
    pub minutes: u32,
    /// Units allowed in the window.
    pub limit: u64,
    /// Units used in the current span or period.
    pub used: u64,
    /// Units still allowed.
    pub remaining: u64,
    /// When it resets: everything used now has slid out of a rolling window; a calendar
    /// window's next period starts.
    pub reset_at: String,
}

/// A free tier's allowance in its current period.
#[derive(Debug, Serialize, ToSchema)]
pub struct FreeTierBody {
    /// `day`, `week` (from Monday) or `month`.
    pub period: String,
    /// The IANA time zone whose midnight starts a period.
    pub time_zone: String,
    /// Units per period.
    pub units: u64,
    /// Units used this period.
    pub used: u64,
    /// Units left this period.
    pub remaining: u64,
    /// When the period ends and the allowance resets.
    pub reset_at: String,
}

/// Credits left by pool.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct PoolsBody {
    /// Purchased credits.
    pub credits: u64,
    /// Promotional credits.
    pub promotion: u64,
    /// An enterprise contract's pool.
    pub enterprise: u64,
}

/// A grant's balance in the view.
#[derive(Debug, Serialize, ToSchema)]
pub struct GrantBalanceBody {
    /// The store's id.
    pub id: i64,
    /// `credits`, `promotion` or `enterprise`.
    pub kind: String,
    /// Credits that can still be drawn (holds taken).
    pub balance: u64,
    /// Credits held by requests in flight or charged and not yet committed.
    pub held: u64,
    /// When it expires.
    pub expires_at: Option<String>,
    /// Whether it has expired (never drawn from again).
    pub expired: bool,
    /// Spend priority.
    pub priority: i32,
    /// Features it may pay for; absent: all.
    pub features: Option<Vec<String>>,
}

/// A window's length in minutes at `now`: a calendar window's current period.
fn window_minutes(window: &Window, now: Millis) -> u32 {
    match window.kind {
        WindowKind::Rolling { minutes } => minutes,
        WindowKind::Calendar { period, zone } => {
            let (start, end) = period.bounds(zone, now);
            u32::try_from((end - start) / crate::waterfall::MINUTE_MS).unwrap_or(u32::MAX)
        }
    }
}

impl UsageBody {
    /// Reads an account's numbers from the view at `now` (under its lock, briefly).
    pub fn of(account: &Account, settings: &Settings, now: Millis) -> UsageBody {
        let names = |set: FeatureSet| -> Option<Vec<String>> {
            (set != FeatureSet::ALL).then(|| {
                settings
                    .features
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| set.contains(crate::waterfall::FeatureId(*i as u16)))
                    .map(|(_, f)| f.to_string())
                    .collect()
            })
        };
        account.with_state(|plan, state| {
            let live = |g: &&crate::waterfall::Grant| now < g.expires_at;
            let pool = |kind: GrantKind| -> u64 {
                state
                    .grants()
                    .iter()
                    .filter(|g| g.kind == kind)
                    .filter(live)
                    .map(|g| g.balance)
                    .sum()
            };
            let layers = plan
                .layers
                .iter()
                .enumerate()
                .map(|(i, layer)| {
                    let mut body = LayerBody {
                        name: layer.name.to_string(),
                        kind: layer.kind.tag().to_owned(),
                        features: names(layer.features),
                        windows: None,
                        free_tier: None,
                        credits: None,
                    };
                    match &layer.kind {
                        LayerKind::UsageLimit { .. } => {
                            body.windows = Some(
                                state
                                    .windows(plan, i, now)
                                    .map(|w| WindowBody {
                                        name: w.window.name.to_string(),
                                        reset: w.window.reset_name().to_owned(),
                                        time_zone: w.window.zone().map(|z| z.name().to_owned()),
                                        minutes: window_minutes(w.window, now),
                                        limit: w.window.limit,
                                        used: w.used,
                                        remaining: w.remaining,
                                        reset_at: rfc3339(w.reset_at),
                                    })
                                    .collect(),
                            );
                        }
                        LayerKind::FreeTier {
                            units,
                            period,
                            zone,
                        } => {
                            let (start, end) = period.bounds(*zone, now);
                            let used = match state.layers.get(i) {
                                Some(LayerState::FreeTier {
                                    period_start, used, ..
                                }) if *period_start == start => *used,
                                _ => 0,
                            };
                            body.free_tier = Some(FreeTierBody {
                                period: period.as_str().to_owned(),
                                time_zone: zone.name().to_owned(),
                                units: *units,
                                used,
                                remaining: units.saturating_sub(used),
                                reset_at: rfc3339(end),
                            });
                        }
                        kind => body.credits = kind.grant_kind().map(pool),
                    }
                    body
                })
                .collect();
            UsageBody {
                account: account.id.to_string(),
                plan: plan.name.to_string(),
                suspended: account.suspended,
                as_of: rfc3339(now),
                layers,
                pools: PoolsBody {
                    credits: pool(GrantKind::Credits),
                    promotion: pool(GrantKind::Promotion),
                    enterprise: pool(GrantKind::Enterprise),
                },
                grants: state
                    .grants()
                    .iter()
                    .map(|g| GrantBalanceBody {
                        id: g.id,
                        kind: g.kind.as_str().to_owned(),
                        balance: g.balance,
                        held: g.unsettled,
                        expires_at: g.expiry().map(rfc3339),
                        expired: now >= g.expires_at,
                        priority: g.priority,
                        features: names(g.features),
                    })
                    .collect(),
            }
        })
    }
}

/// A page of the ledger: usage events with their charges and balance updates.
#[derive(Debug, Serialize, ToSchema)]
pub struct LedgerPageBody {
    /// The account.
    pub account: String,
    /// The events, oldest first (admin ledger) or newest first (recent decisions).
    pub events: Vec<LedgerEventBody>,
    /// The cursor of the next page (`after` for the ledger, `before` for recent decisions);
    /// absent when this page is the last.
    pub next: Option<i64>,
}

impl LedgerPageBody {
    /// A page of `events` asked for with `limit`: a full page may have a next one.
    pub fn new(account: String, events: Vec<LedgerEvent>, limit: u32) -> LedgerPageBody {
        let full = events.len() == limit as usize;
        let next = events.last().filter(|_| full).map(|e| e.usage.id);
        LedgerPageBody {
            account,
            events: events.into_iter().map(Into::into).collect(),
            next,
        }
    }
}

/// One request in the ledger.
#[derive(Debug, Serialize, ToSchema)]
pub struct LedgerEventBody {
    /// The usage event.
    pub usage_event: UsageEventBody,
    /// Its charge, if it was charged.
    pub monetization_event: Option<MonetizationBody>,
    /// How each balance changed because of the charge.
    pub balance_updates: Vec<BalanceUpdateBody>,
}

impl From<LedgerEvent> for LedgerEventBody {
    fn from(e: LedgerEvent) -> LedgerEventBody {
        LedgerEventBody {
            usage_event: e.usage.into(),
            monetization_event: e.monetization.map(Into::into),
            balance_updates: e.balance_updates.into_iter().map(Into::into).collect(),
        }
    }
}

/// A usage event: what the user did.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageEventBody {
    /// Its id (the ledger's paging cursor).
    pub id: i64,
    /// The decision id the client got (`x-flowgate-decision-id`).
    pub decision_id: String,
    /// Whose request it was.
    pub account: String,
    /// The feature.
    pub feature: String,
    /// Units used.
    pub units: i64,
    /// How the request ended: `completed`, `denied`, `upstream_error`, `replay`, …
    pub outcome: String,
    /// The denial or error code.
    pub code: Option<String>,
    /// The upstream's status, when it answered.
    pub upstream_status: Option<i64>,
    /// The key that makes its charge unique.
    pub idempotency_key: String,
    /// The decision: plan, price version, every layer checked with what it had and gave,
    /// the draws, and the denial if any.
    #[schema(value_type = Object)]
    pub decision: serde_json::Value,
    /// When it was decided.
    pub decided_at: String,
    /// When the request ended.
    pub completed_at: String,
    /// When the ledger recorded it.
    pub recorded_at: String,
    /// Set when the request ran in shadow mode (forwarded, never charged): what enforcing
    /// would have done, `admit` or `deny` (then `code` says why).
    pub shadow: Option<String>,
}

impl From<UsageEventRecord> for UsageEventBody {
    fn from(u: UsageEventRecord) -> UsageEventBody {
        UsageEventBody {
            id: u.id,
            decision: serde_json::from_str(&u.decision).unwrap_or(serde_json::Value::Null),
            decision_id: u.decision_id,
            account: u.account_id,
            feature: u.feature,
            units: u.units,
            outcome: u.outcome,
            code: u.code,
            upstream_status: u.upstream_status,
            idempotency_key: u.idempotency_key,
            decided_at: rfc3339(u.decided_at),
            completed_at: rfc3339(u.completed_at),
            recorded_at: rfc3339(u.recorded_at),
            shadow: u.shadow,
        }
    }
}

/// A monetization event: what was charged and why.
#[derive(Debug, Serialize, ToSchema)]
pub struct MonetizationBody {
    /// Its id.
    pub id: i64,
    /// Units charged.
    pub units: i64,
    /// Credits drawn from grants.
    pub credits: i64,
    /// Credits billed afterwards (postpaid).
    pub postpaid_credits: i64,
    /// The price applied, in credits per unit.
    pub credits_per_unit: i64,
    /// The plan in force.
    pub plan: String,
    /// The price version in force.
    pub price_version: String,
    /// Every pool drawn from, with units and credits.
    #[schema(value_type = Vec<Object>)]
    pub draws: serde_json::Value,
    /// Units estimated up front (routes settled from the response).
    pub estimated_units: i64,
    /// Used units nobody could pay, forgiven.
    pub forgiven_units: i64,
    /// When it was recorded.
    pub created_at: String,
    /// When it was refunded (its credits went back: `refund` balance updates), if it was.
    pub refunded_at: Option<String>,
}

impl From<MonetizationRecord> for MonetizationBody {
    fn from(m: MonetizationRecord) -> MonetizationBody {
        MonetizationBody {
            id: m.id,
            units: m.units,
            credits: m.credits,
            postpaid_credits: m.postpaid_credits,
            credits_per_unit: m.credits_per_unit,
            plan: m.plan,
            price_version: m.price_version,
            draws: serde_json::from_str(&m.draws).unwrap_or(serde_json::Value::Null),
            estimated_units: m.estimated_units,
            forgiven_units: m.forgiven_units,
            created_at: rfc3339(m.created_at),
            refunded_at: m.refunded_at.map(rfc3339),
        }
    }
}

/// A balance update: how one grant's balance changed and why.
#[derive(Debug, Serialize, ToSchema)]
pub struct BalanceUpdateBody {
    /// Its id.
    pub id: i64,
    /// The grant.
    pub grant_id: i64,
    /// `grant`, `debit`, `refund`, `expired` or `overdraft_forgiven`.
    pub reason: String,
    /// The change of the balance.
    pub delta: i64,
    /// The balance after it.
    pub balance_after: i64,
    /// Credits owed that nobody could pay, forgiven.
    pub forgiven: i64,
    /// The monetization event that caused it.
    pub monetization_event_id: Option<i64>,
    /// When it was written.
    pub created_at: String,
}

impl From<BalanceUpdateRecord> for BalanceUpdateBody {
    fn from(b: BalanceUpdateRecord) -> BalanceUpdateBody {
        BalanceUpdateBody {
            id: b.id,
            grant_id: b.grant_id,
            reason: b.reason,
            delta: b.delta,
            balance_after: b.balance_after,
            forgiven: b.forgiven,
            monetization_event_id: b.monetization_event_id,
            created_at: rfc3339(b.created_at),
        }
    }
}

/// Why a request was allowed or denied, and what the ledger recorded for it.
#[derive(Debug, Serialize, ToSchema)]
pub struct DecisionBody {
    /// The decision id.
    pub decision_id: String,
    /// Whose request it was.
    pub account: String,
    /// Whether it was admitted.
    pub admitted: bool,
    /// Set when it ran in shadow mode (forwarded whatever `admitted` says, never charged):
    /// `admit` or `deny`, what enforcing would have done.
    pub shadow: Option<String>,
    /// The plan it was decided under.
    pub plan: String,
    /// The price version in force.
    pub price_version: String,
    /// Every layer checked, in order: eligible or not, what it had (units, credits), what it
    /// gave, and when it resets.
    #[schema(value_type = Vec<Object>)]
    pub layers: serde_json::Value,
    /// Why it was denied (`usage_limit_reached`, `insufficient_credits`, `not_entitled`).
    #[schema(value_type = Option<Object>)]
    pub denial: serde_json::Value,
    /// The usage event.
    pub usage_event: UsageEventBody,
    /// The monetization event, if it was charged.
    pub monetization_event: Option<MonetizationBody>,
    /// The balance updates of the charge.
    pub balance_updates: Vec<BalanceUpdateBody>,
}

impl From<LedgerEvent> for DecisionBody {
    fn from(e: LedgerEvent) -> DecisionBody {
        let event = LedgerEventBody::from(e);
        let d = &event.usage_event.decision;
        let text = |key: &str| d[key].as_str().unwrap_or_default().to_owned();
        DecisionBody {
            decision_id: event.usage_event.decision_id.clone(),
            account: event.usage_event.account.clone(),
            admitted: d["admitted"].as_bool().unwrap_or(false),
            shadow: event.usage_event.shadow.clone(),
            plan: text("plan"),
            price_version: text("price_version"),
            layers: d["layers"].clone(),
            denial: d["denial"].clone(),
            usage_event: event.usage_event,
            monetization_event: event.monetization_event,
            balance_updates: event.balance_updates,
        }
    }
}
