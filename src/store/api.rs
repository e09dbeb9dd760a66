//! What the admin and user APIs read and write: accounts, API keys, grants, and the ledger's
//! three datasets joined per usage event. Each write is one transaction; the caller then tells
//! the in-memory view (see `crate::api`).

use serde::Serialize;

use super::{Store, StoreError, StoredGrant};
use crate::config::{GrantSeed, KeySeed};
use crate::waterfall::{Draw, Millis};

/// An account as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AccountRow {
    /// Its id.
    pub id: String,
    /// Its plan's name.
    pub plan: String,
    /// Whether its requests are refused.
    pub suspended: bool,
    /// When it was created.
    pub created_at: Millis,
    /// How many API keys it has.
    pub api_keys: i64,
    /// The workspace whose pool it draws from, if it is a member of one.
    pub workspace: Option<String>,
    /// Whether its requests run in shadow mode.
    pub shadow: bool,
}

/// An API key as listed: never the key, only its prefix and dates.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ApiKeyRow {
    /// SHA-256 of the key (hex): what the view looks keys up by. Not shown by the API.
    pub key_hash: String,
    /// The key's first characters (`crate::config::key_prefix`).
    pub prefix: String,
    /// When it was created (0: before keys had dates).
    pub created_at: Millis,
    /// When it was revoked.
    pub revoked_at: Option<Millis>,
}

/// What a revocation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// Revoked now.
    Now(ApiKeyRow),
    /// It had been revoked before; nothing changed.
    Before(ApiKeyRow),
    /// The account has no key with this prefix (or no such account).
    NotFound,
    /// This many live keys share the prefix: nothing was revoked.
    Ambiguous(usize),
}

/// What a grant request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Granted {
    /// The grant was given now (with its `grant` balance update).
    Created(StoredGrant),
    /// A grant with this external id was given before: nothing was written. This is it, with
    /// its current balance.
    Existing(StoredGrant),
}

/// Where a page of usage events starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// Oldest first, usage events with an id greater than this one (0: from the start).
    After(i64),
    /// Newest first, usage events with an id smaller than this one (`None`: from the newest).
    Before(Option<i64>),
}

/// One request in the ledger: its usage event, and when it was charged its monetization event
/// and the balance updates of that charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEvent {
    /// The usage event.
    pub usage: UsageEventRecord,
    /// The charge, if any.
    pub monetization: Option<MonetizationRecord>,
    /// The balance updates of the charge, in id order.
    pub balance_updates: Vec<BalanceUpdateRecord>,
}

/// A usage event, every column.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UsageEventRecord {
    /// Row id (the ledger listing's cursor).
    pub id: i64,
    /// The decision id given to the client.
    pub decision_id: String,
    /// Whose request it was.
    pub account_id: String,
    /// The feature.
    pub feature: String,
    /// Units used.
    pub units: i64,
    /// How the request ended.
    pub outcome: String,
    /// The denial or error code.
    pub code: Option<String>,
    /// The upstream's status.
    pub upstream_status: Option<i64>,
    /// The idempotency key (the client's, scoped to the account, or the decision id).
    pub idempotency_key: String,
    /// The decision as recorded (JSON): every layer checked, what it had and gave.
    pub decision: String,
    /// When it was decided.
    pub decided_at: Millis,
    /// When the request ended.
    pub completed_at: Millis,
    /// When the ledger recorded it.
    pub recorded_at: Millis,
    /// In shadow mode, what enforcing would have done (`admit`, `deny`); `None`: enforced.
    pub shadow: Option<String>,
}

/// A monetization event, every column.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct MonetizationRecord {
    /// Row id.
    pub id: i64,
    /// Its usage event.
    pub usage_event_id: i64,
    /// Units charged.
    pub units: i64,
    /// Credits drawn from grants.
    pub credits: i64,
    /// Credits billed afterwards (postpaid).
    pub postpaid_credits: i64,
    /// The price applied.
    pub credits_per_unit: i64,
    /// The plan in force.
    pub plan: String,
    /// The price version in force.
    pub price_version: String,
    /// Every pool drawn from (JSON).
    pub draws: String,
    /// Units estimated up front (settled routes).
    pub estimated_units: i64,
    /// Used units nobody could pay, forgiven.
    pub forgiven_units: i64,
    /// When it was recorded.
    pub created_at: Millis,
    /// When it was refunded, if it was.
    pub refunded_at: Option<Millis>,
}

/// A balance update, every column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct BalanceUpdateRecord {
    /// Row id.
    pub id: i64,
    /// The grant whose balance changed.
    pub grant_id: i64,
    /// `grant`, `debit`, `refund`, `expired` or `overdraft_forgiven`.
    pub reason: String,
    /// The change.
    pub delta: i64,
    /// The balance after it.
    pub balance_after: i64,
    /// Credits forgiven.
    pub forgiven: i64,
    /// The charge it belongs to.
    pub monetization_event_id: Option<i64>,
    /// When it was written.
    pub created_at: Millis,
}

impl Store {
    /// Creates an account; `false` if one with this id exists (nothing written).
    pub async fn create_account(
        &self,
        id: &str,
        plan: &str,
        (suspended, shadow): (bool, bool),
        now: Millis,
    ) -> Result<bool, StoreError> {
        dialect!(self, s => s.create_account(id, plan, suspended, shadow, now).await)
    }

    /// The account with this id.
    pub async fn account(&self, id: &str) -> Result<Option<AccountRow>, StoreError> {
        dialect!(self, s => s.account(id).await)
    }

    /// Changes an account's plan, suspension and/or shadow mode (`None`: unchanged); the
    /// account after, or `None` if there is no such account.
    pub async fn update_account(
        &self,
        id: &str,
        plan: Option<&str>,
        (suspended, shadow): (Option<bool>, Option<bool>),
    ) -> Result<Option<AccountRow>, StoreError> {
        dialect!(self, s => s.update_account(id, plan, suspended, shadow).await)
    }

    /// Stores an API key (its hash and prefix) for an account; `None` if there is no such
    /// account.
    pub async fn add_api_key(
        &self,
        account: &str,
        key: &KeySeed,
        now: Millis,
    ) -> Result<Option<ApiKeyRow>, StoreError> {
        dialect!(self, s => s.add_api_key(account, key, now).await)
    }

    /// Every API key of an account, revoked ones included, oldest first.
    pub async fn api_keys(&self, account: &str) -> Result<Vec<ApiKeyRow>, StoreError> {
        dialect!(self, s => s.api_keys(account).await)
    }

    /// Revokes an account's API key by its prefix (see [`Revoked`]).
    pub async fn revoke_api_key(
        &self,
        account: &str,
        prefix: &str,
        now: Millis,
    ) -> Result<Revoked, StoreError> {
        dialect!(self, s => s.revoke_api_key(account, prefix, now).await)
    }

    /// Gives a grant once per (account, external id): the grant and its `grant` balance update
    /// in one transaction. A repeat writes nothing and returns the grant given before. `None`
    /// if there is no such account.
    pub async fn grant(
        &self,
        account: &str,
        grant: &GrantSeed,
        now: Millis,
    ) -> Result<Option<Granted>, StoreError> {
        dialect!(self, s => s.grant(account, grant, now).await)
    }

    /// A page of an account's usage events, each with its charge and balance updates.
    pub async fn ledger_page(
        &self,
        account: &str,
        page: Page,
        limit: u32,
    ) -> Result<Vec<LedgerEvent>, StoreError> {
        dialect!(self, s => s.ledger_page(account, page, limit).await)
    }

    /// The usage event of a decision, with its charge and balance updates.
    pub async fn ledger_event(&self, decision_id: &str) -> Result<Option<LedgerEvent>, StoreError> {
        dialect!(self, s => s.ledger_event(decision_id).await)
    }

    /// The draws of an account's charges decided at or after `since`, oldest first (what a
    /// restart would replay into its windows and free tier).
    pub async fn account_draws_since(
        &self,
        account: &str,
        since: Millis,
    ) -> Result<Vec<Draw>, StoreError> {
        dialect!(self, s => s.account_draws_since(account, since).await)
    }

    /// As [`Store::account_draws_since`], with the read's [`super::ReadMark`].
    pub async fn account_history(
        &self,
        account: &str,
        since: Millis,
    ) -> Result<(Vec<Draw>, Option<super::ReadMark>), StoreError> {
        dialect!(self, s => s.account_history(account, since).await)
    }
}

/// Joins usage events with their monetization events and balance updates (fetched by the
/// dialect), keeping the usage events' order.
pub(super) fn join(
    usage: Vec<UsageEventRecord>,
    monetization: Vec<MonetizationRecord>,
    updates: Vec<BalanceUpdateRecord>,
) -> Vec<LedgerEvent> {
    usage
        .into_iter()
        .map(|u| {
            let monetization = monetization
                .iter()
                .find(|m| m.usage_event_id == u.id)
                .cloned();
            let balance_updates = match &monetization {
                Some(m) => updates
                    .iter()
                    .filter(|b| b.monetization_event_id == Some(m.id))
                    .cloned()
                    .collect(),
                None => Vec::new(),
            };
            LedgerEvent {
                usage: u,
                monetization,
                balance_updates,
            }
        })
        .collect()
}

/// Parses stored draws (JSON).
pub(super) fn parse_draws(json: &str) -> Result<Vec<Draw>, StoreError> {
    serde_json::from_str(json)
        .map_err(|e| StoreError::Corrupt(format!("monetization_events.draws: {e}")))
}

/// Columns of the listings, the same for both dialects.
pub(super) mod columns {
    pub const USAGE: &str = "id, decision_id, account_id, feature, units, outcome, code, upstream_status, idempotency_key, decision, decided_at, completed_at, recorded_at, shadow";
    pub const MONETIZATION: &str = "id, usage_event_id, units, credits, postpaid_credits, credits_per_unit, plan, price_version, draws, estimated_units, forgiven_units, created_at, refunded_at";
    pub const BALANCE_UPDATES: &str =
        "id, grant_id, reason, delta, balance_after, forgiven, monetization_event_id, created_at";
}
