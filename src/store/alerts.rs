//! Threshold alerts in the store: each alert that fired, once per (account, rule, period), and
//! its delivery state (`crate::alerts` evaluates and sends). The statements are written once
//! for both dialects, like [`super::shared`]'s.

use super::{Store, StoreError};
use crate::waterfall::Millis;

/// An alert to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAlert {
    /// Its row.
    pub id: i64,
    /// The webhook's body.
    pub payload: String,
    /// Failed attempts so far.
    pub attempts: u32,
}

/// Expands the alert statements as methods of `$store` (inside the dialect's module).
macro_rules! alert_statements {
    ($store:ty) => {
        impl $store {
            pub(in crate::store) async fn insert_alert(
                &self,
                account: &str,
                rule: &str,
                period_start: Millis,
                payload: &str,
                now: Millis,
            ) -> Result<bool, StoreError> {
                let id: Option<i64> = sqlx::query_scalar(
                    "INSERT INTO alerts (account_id, rule, period_start, payload, created_at, next_attempt_at)
                     VALUES ($1, $2, $3, $4, $5, $5)
                     ON CONFLICT (account_id, rule, period_start) DO NOTHING RETURNING id",
                )
                .bind(account)
                .bind(rule)
                .bind(period_start)
                .bind(payload)
                .bind(now)
                .fetch_optional(&self.pool)
                .await?;
                Ok(id.is_some())
            }

            pub(in crate::store) async fn claim_alerts(
                &self,
                limit: u32,
                lease_ms: i64,
                now: Millis,
            ) -> Result<Vec<crate::store::alerts::PendingAlert>, StoreError> {
                // The outer condition is checked again on the row a concurrent claim left
                // (PostgreSQL re-reads a row it waited for): two claims never take one alert.
                let rows: Vec<(i64, String, i64)> = sqlx::query_as(
                    "UPDATE alerts SET next_attempt_at = $2
                     WHERE sent_at IS NULL AND next_attempt_at <= $1 AND id IN (
                         SELECT id FROM alerts WHERE sent_at IS NULL AND next_attempt_at <= $1
                         ORDER BY id LIMIT $3)
                     RETURNING id, payload, attempts",
                )
                .bind(now)
                .bind(now.saturating_add(lease_ms))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                let mut alerts: Vec<crate::store::alerts::PendingAlert> = rows
                    .into_iter()
                    .map(|(id, payload, attempts)| crate::store::alerts::PendingAlert {
                        id,
                        payload,
                        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                    })
                    .collect();
                alerts.sort_by_key(|a| a.id);
                Ok(alerts)
            }

            pub(in crate::store) async fn alert_done(
                &self,
                id: i64,
                sent_at: Option<Millis>,
                retry_at: Millis,
            ) -> Result<(), StoreError> {
                match sent_at {
                    Some(at) => {
                        sqlx::query("UPDATE alerts SET sent_at = $1 WHERE id = $2 AND sent_at IS NULL")
                            .bind(at)
                            .bind(id)
                            .execute(&self.pool)
                            .await?
                    }
                    None => {
                        sqlx::query(
                            "UPDATE alerts SET attempts = attempts + 1, next_attempt_at = $1
                             WHERE id = $2 AND sent_at IS NULL",
                        )
                        .bind(retry_at)
                        .bind(id)
                        .execute(&self.pool)
                        .await?
                    }
                };
                Ok(())
            }

            pub(in crate::store) async fn accounts_charged_since(
                &self,
                since: Millis,
            ) -> Result<Vec<String>, StoreError> {
                Ok(sqlx::query_scalar(
                    "SELECT DISTINCT account_id FROM monetization_events WHERE decided_at >= $1 ORDER BY account_id",
                )
                .bind(since)
                .fetch_all(&self.pool)
                .await?)
            }
        }
    };
}
pub(super) use alert_statements;

impl Store {
    /// Records that `rule` fired for `account` in the period starting at `period_start`, with
    /// the webhook body to send; `false` if it had fired in that period already (here, before a
    /// restart, or on another replica): the unique key decides.
    pub async fn insert_alert(
        &self,
        account: &str,
        rule: &str,
        period_start: Millis,
        payload: &str,
        now: Millis,
    ) -> Result<bool, StoreError> {
        dialect!(self, s => s.insert_alert(account, rule, period_start, payload, now).await)
    }

    /// Takes up to `limit` alerts due for sending, for `lease_ms` (no other sender takes them
    /// meanwhile; after it they are due again, should this sender die).
    pub async fn claim_alerts(
        &self,
        limit: u32,
        lease_ms: i64,
        now: Millis,
    ) -> Result<Vec<PendingAlert>, StoreError> {
        dialect!(self, s => s.claim_alerts(limit, lease_ms, now).await)
    }

    /// Marks an alert delivered.
    pub async fn alert_sent(&self, id: i64, now: Millis) -> Result<(), StoreError> {
        dialect!(self, s => s.alert_done(id, Some(now), now).await)
    }

    /// Counts a failed delivery and makes the alert due again at `retry_at`.
    pub async fn alert_failed(&self, id: i64, retry_at: Millis) -> Result<(), StoreError> {
        dialect!(self, s => s.alert_done(id, None, retry_at).await)
    }

    /// The accounts charged at or after `since`.
    pub async fn accounts_charged_since(&self, since: Millis) -> Result<Vec<String>, StoreError> {
        dialect!(self, s => s.accounts_charged_since(since).await)
    }
}
