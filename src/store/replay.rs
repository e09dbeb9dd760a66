//! What `flowgate replay` reads: usage events with their charges, in decision order, as a
//! stream of borrowed rows (nothing is collected), and every grant with when it was given.
//!
//! The statements are written once for both dialects in [`super::shared`]
//! (`replay_statements!`); this module holds the row shapes they yield.

use serde::Serialize;

use crate::waterfall::{GrantKind, Millis};

/// One usage event as replay reads it, borrowed from the database row (valid only during the
/// callback that receives it): the columns replay needs, never the decision JSON.
#[derive(Debug, Clone, Copy)]
pub struct ReplayEvent<'a> {
    /// The account.
    pub account: &'a str,
    /// The feature's name.
    pub feature: &'a str,
    /// `usage_events.units`: what the request used when it was charged (settled), else what it
    /// asked for.
    pub units: u64,
    /// How it ended (`completed`, `denied`, `upstream_error`, …).
    pub outcome: &'a str,
    /// The denial or error code.
    pub code: Option<&'a str>,
    /// When it was decided (ms).
    pub decided_at: Millis,
    /// When it ended (ms).
    pub completed_at: Millis,
    /// Its charge, when it was charged.
    pub charge: Option<ReplayCharge<'a>>,
}

/// The monetization event of a charged usage event, as replay reads it.
#[derive(Debug, Clone, Copy)]
pub struct ReplayCharge<'a> {
    /// Credits drawn from grants.
    pub credits: u64,
    /// Credits billed afterwards (postpaid).
    pub postpaid_credits: u64,
    /// Units held up front (the estimate; the decision's units).
    pub estimated_units: u64,
    /// The draws (JSON), for which pools paid.
    pub draws: &'a str,
    /// The request's model, for a dimension-priced feature.
    pub model: Option<&'a str>,
    /// What each dimension measured (JSON object), for a dimension-priced feature.
    pub dimensions: Option<&'a str>,
    /// When an operator refunded it, if one did.
    pub refunded_at: Option<Millis>,
}

/// A grant as it was given: replay starts it whole at `created_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GrantHistory {
    /// The store's id.
    pub id: i64,
    /// Its owner.
    pub account: String,
    /// What it is.
    pub kind: GrantKind,
    /// Credits granted.
    pub amount: u64,
    /// When it expires.
    pub expires_at: Option<Millis>,
    /// Spend priority.
    pub priority: i32,
    /// Features it may pay for (`None`: all).
    pub features: Option<Vec<String>>,
    /// When it was given (ms).
    pub created_at: Millis,
}
