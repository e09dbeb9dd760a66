//! What `flowgate reconcile` reads: every balance update, grant and price version, then every
//! charge with its usage event and balance updates, as a stream of borrowed rows (nothing is
//! collected), all in one read transaction.
//!
//! The joins are the database's: a charge's usage event and balance updates arrive in the
//! rows of its monetization event, so the reader ([`crate::reconcile::Checker`]) keeps no
//! table of events, only one state per grant. The statements are written once for both
//! dialects ([`reconcile_statements!`]); the row shapes they yield are the checker's ([`crate::reconcile::rows`]).

/// Expands `flowgate reconcile`'s reads as a method of `$store`, inside one read transaction
/// opened with `$begin` (so that every read sees one state of the ledger while writers go on).
/// Nothing here writes. Every statement is a scan in id order with index lookups
/// (`monetization_events.usage_event_id`'s unique index, `balance_updates`' unique key that
/// leads with `monetization_event_id`): no
/// sort, no temporary table, on either dialect.
macro_rules! reconcile_statements {
    ($store:ty, $begin:literal) => {
        impl $store {
            /// Calls `f` with every row reconcile reads, in [`crate::reconcile::Row`]'s
            /// order; usage and monetization events decided before `since` are left out.
            pub(in crate::store) async fn reconcile_rows(
                &self,
                since: crate::waterfall::Millis,
                f: &mut (dyn for<'r> FnMut(crate::reconcile::Row<'r>) + Send),
            ) -> Result<(), crate::store::StoreError> {
                use crate::reconcile::rows as rc;
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
