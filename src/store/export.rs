//! The billing-export outbox: what the commit writes for each charge and refund, and what the
//! sender (`crate::export`) reads, leases and marks.
//!
//! The commit and the refund write the rows (per dialect, in their own transactions:
//! `sqlite/commit.rs`, `postgres.rs`); the statements here are the sender's, written once for
//! both dialects like [`super::shared`]'s.

use serde::Serialize;

use super::{Store, StoreError};
use crate::waterfall::Millis;

/// What an outbox row exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxKind {
    /// A charge (a monetization event).
    Charge,
    /// The refund of a charge.
    Refund,
}

impl OutboxKind {
    pub(super) fn parse(s: &str) -> Result<OutboxKind, StoreError> {
        match s {
            "charge" => Ok(OutboxKind::Charge),
            "refund" => Ok(OutboxKind::Refund),
            other => Err(StoreError::Corrupt(format!("export_outbox.kind {other:?}"))),
        }
    }
}

/// One unsent outbox row with the charge it refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// The row's id: the order it is sent in.
    pub id: i64,
    /// Whose charge it is.
    pub account_id: String,
    /// A charge or its refund.
    pub kind: OutboxKind,
    /// The charged request's decision id (stable: the receiver's idempotency id is made of it).
    pub decision_id: String,
    /// The feature.
    pub feature: String,
    /// Units charged.
    pub units: u64,
    /// Credits charged: drawn from grants plus billed afterwards (postpaid).
    pub credits: u64,
    /// The request's model, for a dimension-priced feature.
    pub model: Option<String>,
    /// What each dimension measured (a JSON object), for a dimension-priced feature.
    pub dimensions: Option<String>,
    /// The plan and its price version the charge was decided under.
    pub plan: String,
    /// The price version.
    pub price_version: String,
    /// When the request was decided (ms).
    pub decided_at: Millis,
    /// When the row was written: the charge's or the refund's commit (ms).
    pub created_at: Millis,
}

/// A sink's unsent rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// How many.
    pub rows: u64,
    /// When the oldest was written (ms), if any.
    pub oldest: Option<Millis>,
}

/// The columns [`OutboxEvent`] is read from, joined from the row's charge.
pub(super) const PENDING: &str =
    "SELECT o.id, o.account_id, o.kind, o.created_at, u.decision_id, m.feature, m.units,
        m.credits + m.postpaid_credits AS credits, m.model, m.dimensions, m.plan, m.price_version,
        m.decided_at
     FROM export_outbox o
     JOIN monetization_events m ON m.id = o.monetization_event_id
     JOIN usage_events u ON u.id = m.usage_event_id
     WHERE o.sink = $1 AND o.sent_at IS NULL
     ORDER BY o.id LIMIT $2";

/// Expands the sender's statements as methods of `$store` (inside the dialect's module, with
/// its `IDS_IN`, `ids_arg` and `begin_write` shims; see [`super::shared`]).
macro_rules! export_statements {
    ($store:ty) => {
        impl $store {
            pub(in crate::store) async fn register_export_sinks(
                &self,
                sinks: &[(String, String)],
                now: Millis,
            ) -> Result<(), StoreError> {
                let mut tx = self.begin_write().await?;
                // Sinks no longer configured stop collecting rows (their unsent ones are kept).
                sqlx::query("UPDATE export_sinks SET active = FALSE")
                    .execute(&mut *tx)
                    .await?;
                for (name, kind) in sinks {
                    sqlx::query(
                        "INSERT INTO export_sinks (name, kind, active, created_at) VALUES ($1, $2, TRUE, $3)
                         ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, active = TRUE",
                    )
                    .bind(name)
                    .bind(kind)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            pub(in crate::store) async fn export_lease(
                &self,
                sink: &str,
                owner: &str,
                ttl_ms: i64,
                now: Millis,
            ) -> Result<bool, StoreError> {
                let taken: Option<String> = sqlx::query_scalar(
                    "UPDATE export_sinks SET lease_owner = $2, lease_until = $3
                     WHERE name = $1 AND (lease_owner = $2 OR lease_owner IS NULL OR lease_until < $4)
                     RETURNING name",
                )
                .bind(sink)
                .bind(owner)
                .bind(now.saturating_add(ttl_ms))
                .bind(now)
                .fetch_optional(&self.pool)
                .await?;
                Ok(taken.is_some())
            }

            pub(in crate::store) async fn export_release(
                &self,
                sink: &str,
                owner: &str,
            ) -> Result<(), StoreError> {
                sqlx::query(
                    "UPDATE export_sinks SET lease_owner = NULL, lease_until = 0
                     WHERE name = $1 AND lease_owner = $2",
                )
                .bind(sink)
                .bind(owner)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            pub(in crate::store) async fn export_pending(
                &self,
                sink: &str,
                limit: u32,
            ) -> Result<Vec<crate::store::export::OutboxEvent>, StoreError> {
                use sqlx::Row;
                let rows = sqlx::query(crate::store::export::PENDING)
                    .bind(sink)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter()
                    .map(|r| {
                        let kind: String = r.try_get("kind")?;
                        Ok(crate::store::export::OutboxEvent {
                            id: r.try_get("id")?,
                            account_id: r.try_get("account_id")?,
                            kind: crate::store::export::OutboxKind::parse(&kind)?,
                            decision_id: r.try_get("decision_id")?,
                            feature: r.try_get("feature")?,
                            units: crate::store::shared::to_unsigned(r.try_get("units")?, "monetization_events.units")?,
                            credits: crate::store::shared::to_unsigned(r.try_get("credits")?, "monetization_events.credits")?,
                            model: r.try_get("model")?,
                            dimensions: r.try_get("dimensions")?,
                            plan: r.try_get("plan")?,
                            price_version: r.try_get("price_version")?,
                            decided_at: r.try_get("decided_at")?,
                            created_at: r.try_get("created_at")?,
                        })
                    })
                    .collect()
            }

            pub(in crate::store) async fn export_mark(
                &self,
                sink: &str,
                ids: &[i64],
                done: Option<(&str, Millis)>,
            ) -> Result<(), StoreError> {
                // Done (sent or rejected): set once (a row sent twice keeps its first time).
                // Failed: the attempt is counted.
                let sql = match done {
                    Some(_) => format!(
                        "UPDATE export_outbox SET outcome = $2, sent_at = $3
                         WHERE id {IDS_IN} AND sink = $4 AND sent_at IS NULL"
                    ),
                    None => format!(
                        "UPDATE export_outbox SET attempts = attempts + 1
                         WHERE id {IDS_IN} AND sink = $2 AND sent_at IS NULL"
                    ),
                };
                let mut query = sqlx::query(&sql).bind(ids_arg(ids.iter().copied())?);
                if let Some((outcome, at)) = done {
                    query = query.bind(outcome).bind(at);
                }
                query.bind(sink).execute(&self.pool).await?;
                Ok(())
            }

            pub(in crate::store) async fn export_backlog(
                &self,
                sink: &str,
            ) -> Result<crate::store::export::Backlog, StoreError> {
                let (rows, oldest): (i64, Option<i64>) = sqlx::query_as(
                    "SELECT COUNT(*), MIN(created_at) FROM export_outbox WHERE sink = $1 AND sent_at IS NULL",
                )
                .bind(sink)
                .fetch_one(&self.pool)
                .await?;
                Ok(crate::store::export::Backlog {
                    rows: crate::store::shared::to_unsigned(rows, "backlog")?,
                    oldest,
                })
            }
        }
    };
}
pub(super) use export_statements;

impl Store {
    /// Registers the configured export sinks (`(name, kind)`): the commit writes outbox rows
    /// for these from now on, and for no other sink.
    pub async fn register_export_sinks(
        &self,
        sinks: &[(String, String)],
        now: Millis,
    ) -> Result<(), StoreError> {
        dialect!(self, s => s.register_export_sinks(sinks, now).await)
    }

    /// Takes or renews the lease on sending `sink`'s rows for `ttl_ms`; whether `owner` holds
    /// it. One holder at a time keeps each account's events in order across replicas.
    pub async fn export_lease(
        &self,
        sink: &str,
        owner: &str,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<bool, StoreError> {
        dialect!(self, s => s.export_lease(sink, owner, ttl_ms, now).await)
    }

    /// Gives the lease on `sink` back (a clean shutdown), so that another gateway takes over
    /// at once.
    pub async fn export_release(&self, sink: &str, owner: &str) -> Result<(), StoreError> {
        dialect!(self, s => s.export_release(sink, owner).await)
    }

    /// The oldest `limit` unsent rows of `sink`, in id order.
    pub async fn export_pending(
        &self,
        sink: &str,
        limit: u32,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        dialect!(self, s => s.export_pending(sink, limit).await)
    }

    /// Marks rows of `sink` sent (the receiver answered 2xx).
    pub async fn export_sent(
        &self,
        sink: &str,
        ids: &[i64],
        now: Millis,
    ) -> Result<(), StoreError> {
        dialect!(self, s => s.export_mark(sink, ids, Some(("sent", now))).await)
    }

    /// Marks rows of `sink` rejected: the receiver refused them in a way resending the same
    /// request cannot change (a 4xx other than 401, 403, 408, 409, 429). They stay in the
    /// outbox, with `outcome = 'rejected'`, for an operator to look at.
    pub async fn export_rejected(
        &self,
        sink: &str,
        ids: &[i64],
        now: Millis,
    ) -> Result<(), StoreError> {
        dialect!(self, s => s.export_mark(sink, ids, Some(("rejected", now))).await)
    }

    /// Counts a failed attempt to send rows of `sink`.
    pub async fn export_failed(&self, sink: &str, ids: &[i64]) -> Result<(), StoreError> {
        dialect!(self, s => s.export_mark(sink, ids, None).await)
    }

    /// `sink`'s unsent rows: how many, and the oldest's time.
    pub async fn export_backlog(&self, sink: &str) -> Result<Backlog, StoreError> {
        dialect!(self, s => s.export_backlog(sink).await)
    }
}
