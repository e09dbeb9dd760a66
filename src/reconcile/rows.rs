//! The rows `flowgate reconcile` checks, as the store streams them (`Store::reconcile`):
//! borrowed from the database's rows, valid only during the callback that receives them. The
//! checker's own vocabulary, so that it depends on no store; the store produces them.

/// One row of what reconcile reads, borrowed from the database row (valid only during the
/// callback that receives it). Rows come in this order: every [`Row::BalanceUpdate`] (by id),
/// every [`Row::Grant`], every [`Row::PriceTable`], then every [`Row::Charge`].
#[derive(Debug, Clone, Copy)]
pub enum Row<'a> {
    /// A balance update.
    BalanceUpdate(BalanceUpdate<'a>),
    /// A grant, after every balance update.
    Grant(Grant<'a>),
    /// A price version the ledger stored, after every grant.
    PriceTable(PriceTable<'a>),
    /// A charge row, last.
    Charge(Charge<'a>),
}

/// A balance-update row.
#[derive(Debug, Clone, Copy)]
pub struct BalanceUpdate<'a> {
    /// Id.
    pub id: i64,
    /// Account.
    pub account_id: &'a str,
    /// Grant changed.
    pub grant_id: i64,
    /// `grant`, `debit`, `refund`, `expired` or `overdraft_forgiven`.
    pub reason: &'a str,
    /// Change of the balance.
    pub delta: i64,
    /// Balance after the change.
    pub balance_after: i64,
    /// Credits forgiven.
    pub forgiven: i64,
    /// The charge it belongs to.
    pub monetization_event_id: Option<i64>,
}

/// A grant row.
#[derive(Debug, Clone, Copy)]
pub struct Grant<'a> {
    /// Id.
    pub id: i64,
    /// Owner.
    pub account_id: &'a str,
    /// External id.
    pub external_id: &'a str,
    /// Stored balance.
    pub balance: i64,
}

/// A price version as the ledger keeps it.
#[derive(Debug, Clone, Copy)]
pub struct PriceTable<'a> {
    /// The plan.
    pub plan: &'a str,
    /// The version.
    pub version: &'a str,
    /// Its prices ([`crate::waterfall::PricesDoc`] as JSON).
    pub prices: &'a str,
}

/// One charge row: a charged usage event decided since the reconciliation's start, its
/// monetization event (decided since then too) and one balance update naming that event.
///
/// Rows come ordered by usage event, then monetization event: a usage event with no
/// monetization event has one row (`monetization: None`), a monetization event with no
/// balance update one row (`update: None`), otherwise one row per update. After every charged
/// usage event come the monetization events that have none (`usage: None`), by id.
#[derive(Debug, Clone, Copy)]
pub struct Charge<'a> {
    /// The charged usage event.
    pub usage: Option<ChargedUsage<'a>>,
    /// Its monetization event.
    pub monetization: Option<Monetization<'a>>,
    /// One of the monetization event's balance updates.
    pub update: Option<ChargeUpdate<'a>>,
}

/// A usage event that carries a charge key (it was charged).
#[derive(Debug, Clone, Copy)]
pub struct ChargedUsage<'a> {
    /// Id.
    pub id: i64,
    /// Decision id.
    pub decision_id: &'a str,
    /// Account.
    pub account_id: &'a str,
    /// Feature.
    pub feature: &'a str,
    /// Units used.
    pub units: i64,
}

/// A monetization event, with what reconcile checks of it.
#[derive(Debug, Clone, Copy)]
pub struct Monetization<'a> {
    /// Id.
    pub id: i64,
    /// Its usage event.
    pub usage_event_id: i64,
    /// Account.
    pub account_id: &'a str,
    /// Feature.
    pub feature: &'a str,
    /// Units covered.
    pub units: i64,
    /// Units nobody could pay.
    pub forgiven_units: i64,
    /// Credits from grants.
    pub credits: i64,
    /// Credits billed afterwards.
    pub postpaid_credits: i64,
    /// Price applied.
    pub credits_per_unit: i64,
    /// Plan name.
    pub plan: &'a str,
    /// Price version.
    pub price_version: &'a str,
    /// Draws (JSON).
    pub draws: &'a str,
    /// When it was refunded, if it was.
    pub refunded_at: Option<i64>,
    /// The request's model, for a dimension-priced feature.
    pub model: Option<&'a str>,
    /// What each dimension measured (JSON object), for a dimension-priced feature.
    pub dimensions: Option<&'a str>,
}

/// A balance update as seen from the charge it names.
#[derive(Debug, Clone, Copy)]
pub struct ChargeUpdate<'a> {
    /// Id.
    pub id: i64,
    /// `debit`, `refund`, `overdraft_forgiven` (or any other reason that names a charge).
    pub reason: &'a str,
    /// Change of the balance.
    pub delta: i64,
    /// Credits forgiven.
    pub forgiven: i64,
}
