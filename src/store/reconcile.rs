//! What `flowgate reconcile` reads: every balance update, grant and price version, then every
//! charge with its usage event and balance updates, as a stream of borrowed rows (nothing is
//! collected), all in one read transaction.
//!
//! The joins are the database's: a charge's usage event and balance updates arrive in the
//! rows of its monetization event, so the reader ([`crate::reconcile::Checker`]) keeps no
//! table of events, only one state per grant. The statements are written once for both
//! dialects ([`reconcile_statements!`]); this module holds the row shapes they yield.

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

/// Expands `flowgate reconcile`'s reads as a method of `$store`, inside one read transaction
/// opened with `$begin` (so that every read sees one state of the ledger while writers go on).
/// Nothing here writes. Every statement is a scan in id order with index lookups
/// (`monetization_events.usage_event_id`'s unique index, `balance_updates`' unique key that
/// leads with `monetization_event_id`): no
/// sort, no temporary table, on either dialect.
macro_rules! reconcile_statements {
    ($store:ty, $begin:literal) => {
        impl $store {
            /// Calls `f` with every row reconcile reads, in [`crate::store::reconcile::Row`]'s
            /// order; usage and monetization events decided before `since` are left out.
            pub(in crate::store) async fn reconcile_rows(
                &self,
                since: crate::waterfall::Millis,
                f: &mut (dyn for<'r> FnMut(crate::store::reconcile::Row<'r>) + Send),
            ) -> Result<(), crate::store::StoreError> {
                use crate::store::reconcile as rc;
                use futures_util::TryStreamExt;
                let mut tx = self.pool.begin_with($begin).await?;
                {
                    let mut rows = sqlx::query(
                        "SELECT id, account_id, grant_id, reason, delta, balance_after, forgiven,
                                monetization_event_id
                         FROM balance_updates ORDER BY id",
                    )
                    .fetch(&mut *tx);
                    while let Some(r) = rows.try_next().await? {
                        f(rc::Row::BalanceUpdate(rc::BalanceUpdate {
                            id: r.try_get(0)?,
                            account_id: r.try_get(1)?,
                            grant_id: r.try_get(2)?,
                            reason: r.try_get(3)?,
                            delta: r.try_get(4)?,
                            balance_after: r.try_get(5)?,
                            forgiven: r.try_get(6)?,
                            monetization_event_id: r.try_get(7)?,
                        }));
                    }
                }
                {
                    let mut rows = sqlx::query(
                        "SELECT id, account_id, external_id, balance FROM grants ORDER BY id",
                    )
                    .fetch(&mut *tx);
                    while let Some(r) = rows.try_next().await? {
                        f(rc::Row::Grant(rc::Grant {
                            id: r.try_get(0)?,
                            account_id: r.try_get(1)?,
                            external_id: r.try_get(2)?,
                            balance: r.try_get(3)?,
                        }));
                    }
                }
                {
                    let mut rows = sqlx::query(
                        "SELECT plan, version, prices FROM price_tables ORDER BY plan, effective_from",
                    )
                    .fetch(&mut *tx);
                    while let Some(r) = rows.try_next().await? {
                        f(rc::Row::PriceTable(rc::PriceTable {
                            plan: r.try_get(0)?,
                            version: r.try_get(1)?,
                            prices: r.try_get(2)?,
                        }));
                    }
                }
                // The charged usage events, each with its monetization event and that event's
                // balance updates; then the monetization events no charged usage event has.
                for (usage, sql) in [
                    (
                        true,
                        "SELECT u.id, u.decision_id, u.account_id, u.feature, u.units,
                                m.id, m.usage_event_id, m.account_id, m.feature, m.units,
                                m.forgiven_units, m.credits, m.postpaid_credits, m.credits_per_unit,
                                m.plan, m.price_version, m.draws, m.refunded_at, m.model, m.dimensions,
                                b.id, b.reason, b.delta, b.forgiven
                         FROM usage_events u
                         LEFT JOIN monetization_events m
                           ON m.usage_event_id = u.id AND m.decided_at >= $1
                         LEFT JOIN balance_updates b ON b.monetization_event_id = m.id
                         WHERE u.charge_key IS NOT NULL AND u.decided_at >= $1
                         ORDER BY u.id, m.id",
                    ),
                    (
                        false,
                        "SELECT m.id, m.usage_event_id, m.account_id, m.feature, m.units,
                                m.forgiven_units, m.credits, m.postpaid_credits, m.credits_per_unit,
                                m.plan, m.price_version, m.draws, m.refunded_at, m.model, m.dimensions,
                                b.id, b.reason, b.delta, b.forgiven
                         FROM monetization_events m
                         LEFT JOIN balance_updates b ON b.monetization_event_id = m.id
                         WHERE m.decided_at >= $1 AND NOT EXISTS (
                             SELECT 1 FROM usage_events u
                             WHERE u.id = m.usage_event_id AND u.charge_key IS NOT NULL
                               AND u.decided_at >= $1)
                         ORDER BY m.id",
                    ),
                ] {
                    let mut rows = sqlx::query(sql).bind(since).fetch(&mut *tx);
                    // Where the monetization event's columns start.
                    let m = if usage { 5 } else { 0 };
                    while let Some(r) = rows.try_next().await? {
                        let usage = match usage {
                            true => Some(rc::ChargedUsage {
                                id: r.try_get(0)?,
                                decision_id: r.try_get(1)?,
                                account_id: r.try_get(2)?,
                                feature: r.try_get(3)?,
                                units: r.try_get(4)?,
                            }),
                            false => None,
                        };
                        let monetization = match r.try_get::<Option<i64>, _>(m)? {
                            None => None,
                            Some(id) => Some(rc::Monetization {
                                id,
                                usage_event_id: r.try_get(m + 1)?,
                                account_id: r.try_get(m + 2)?,
                                feature: r.try_get(m + 3)?,
                                units: r.try_get(m + 4)?,
                                forgiven_units: r.try_get(m + 5)?,
                                credits: r.try_get(m + 6)?,
                                postpaid_credits: r.try_get(m + 7)?,
                                credits_per_unit: r.try_get(m + 8)?,
                                plan: r.try_get(m + 9)?,
                                price_version: r.try_get(m + 10)?,
                                draws: r.try_get(m + 11)?,
                                refunded_at: r.try_get(m + 12)?,
                                model: r.try_get(m + 13)?,
                                dimensions: r.try_get(m + 14)?,
                            }),
                        };
                        let b = m + 15;
                        let update = match r.try_get::<Option<i64>, _>(b)? {
                            None => None,
                            Some(id) => Some(rc::ChargeUpdate {
                                id,
                                reason: r.try_get(b + 1)?,
                                delta: r.try_get(b + 2)?,
                                forgiven: r.try_get(b + 3)?,
                            }),
                        };
                        f(rc::Row::Charge(rc::Charge {
                            usage,
                            monetization,
                            update,
                        }));
                    }
                }
                tx.commit().await?;
                Ok(())
            }
        }
    };
}

pub(super) use reconcile_statements;
