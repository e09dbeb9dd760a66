//! The admin and user APIs' statements on PostgreSQL (see `store::api`). A grant's
//! idempotency rests on the unique (account_id, external_id): a second transaction inserting
//! the same key waits for the first, then inserts nothing and reads the first's grant.

use sqlx::Row;

use super::super::GrantBalance;
use super::super::api::{
    AccountRow, BalanceUpdateRecord, Granted, LedgerEvent, MonetizationRecord, Page,
    UsageEventRecord, columns, join, parse_draws,
};
use super::super::{StoreError, StoredGrant};
use super::{GRANT_COLUMNS, PostgresStore, grant_from_row, notify_balances, to_bigint};
use crate::config::GrantSeed;
use crate::waterfall::{Draw, Millis};

const ACCOUNT: &str = "SELECT id, plan, suspended, created_at,
        (SELECT COUNT(*) FROM api_keys k WHERE k.account_id = a.id) AS api_keys
     FROM accounts a WHERE id = $1";

impl PostgresStore {
    pub(in crate::store) async fn create_account(
        &self,
        id: &str,
        plan: &str,
        suspended: bool,
        now: Millis,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let created: Option<String> = sqlx::query_scalar(
            "INSERT INTO accounts (id, plan, suspended, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO NOTHING RETURNING id",
        )
        .bind(id)
        .bind(plan)
        .bind(suspended)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(created.is_some())
    }

    pub(in crate::store) async fn account(
        &self,
        id: &str,
    ) -> Result<Option<AccountRow>, StoreError> {
        Ok(sqlx::query_as(ACCOUNT)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub(in crate::store) async fn update_account(
        &self,
        id: &str,
        plan: Option<&str>,
        suspended: Option<bool>,
    ) -> Result<Option<AccountRow>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE accounts SET plan = COALESCE($1, plan), suspended = COALESCE($2, suspended)
             WHERE id = $3",
        )
        .bind(plan)
        .bind(suspended)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let row = if updated == 0 {
            None
        } else {
            sqlx::query_as(ACCOUNT)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
        };
        tx.commit().await?;
        Ok(row)
    }

    pub(in crate::store) async fn add_api_key(
        &self,
        account: &str,
        key_hash: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM accounts WHERE id = $1")
            .bind(account)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Ok(false);
        }
        sqlx::query("INSERT INTO api_keys (key_hash, account_id) VALUES ($1, $2)")
            .bind(key_hash)
            .bind(account)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    pub(in crate::store) async fn grant(
        &self,
        account: &str,
        g: &GrantSeed,
        now: Millis,
    ) -> Result<Option<Granted>, StoreError> {
        let amount = to_bigint(g.amount, "grants.amount")?;
        let features = g
            .features
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("grant features: {e}")))?;
        let mut tx = self.pool.begin().await?;
        let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM accounts WHERE id = $1")
            .bind(account)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Ok(None);
        }
        let inserted: Option<i64> = sqlx::query_scalar(
            "INSERT INTO grants (account_id, external_id, kind, amount, balance, expires_at, priority, features, created_at)
             VALUES ($1, $2, $3, $4, $4, $5, $6, $7, $8)
             ON CONFLICT (account_id, external_id) DO NOTHING RETURNING id",
        )
        .bind(account)
        .bind(&g.external_id)
        .bind(g.kind.as_str())
        .bind(amount)
        .bind(g.expires_at)
        .bind(i64::from(g.priority))
        .bind(features)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(grant_id) = inserted {
            // Other replicas learn of the grant from its balance, as they learn of debits.
            let balance = GrantBalance {
                account: account.to_owned(),
                grant_id,
                balance: g.amount,
            };
            notify_balances(&mut tx, &self.replica, &[balance]).await?;
            sqlx::query(
                "INSERT INTO balance_updates (account_id, grant_id, reason, delta, balance_after, created_at)
                 VALUES ($1, $2, 'grant', $3, $3, $4)",
            )
            .bind(account)
            .bind(grant_id)
            .bind(amount)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        let row = sqlx::query(&format!(
            "{GRANT_COLUMNS} WHERE account_id = $1 AND external_id = $2"
        ))
        .bind(account)
        .bind(&g.external_id)
        .fetch_one(&mut *tx)
        .await?;
        let grant: StoredGrant = grant_from_row(&row)?;
        tx.commit().await?;
        Ok(Some(if inserted.is_some() {
            Granted::Created(grant)
        } else {
            Granted::Existing(grant)
        }))
    }

    pub(in crate::store) async fn ledger_page(
        &self,
        account: &str,
        page: Page,
        limit: u32,
    ) -> Result<Vec<LedgerEvent>, StoreError> {
        let usage: Vec<UsageEventRecord> = match page {
            Page::After(after) => {
                sqlx::query_as(&format!(
                    "SELECT {} FROM usage_events WHERE account_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                    columns::USAGE
                ))
                .bind(account)
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
            }
            Page::Before(before) => {
                sqlx::query_as(&format!(
                    "SELECT {} FROM usage_events WHERE account_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
                    columns::USAGE
                ))
                .bind(account)
                .bind(before.unwrap_or(i64::MAX))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
            }
        };
        self.attach(usage).await
    }

    pub(in crate::store) async fn ledger_event(
        &self,
        decision_id: &str,
    ) -> Result<Option<LedgerEvent>, StoreError> {
        let usage: Vec<UsageEventRecord> = sqlx::query_as(&format!(
            "SELECT {} FROM usage_events WHERE decision_id = $1",
            columns::USAGE
        ))
        .bind(decision_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(self.attach(usage).await?.into_iter().next())
    }

    /// Reads the charges and balance updates of `usage` and joins them.
    async fn attach(&self, usage: Vec<UsageEventRecord>) -> Result<Vec<LedgerEvent>, StoreError> {
        if usage.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = usage.iter().map(|u| u.id).collect();
        let monetization: Vec<MonetizationRecord> = sqlx::query_as(&format!(
            "SELECT {} FROM monetization_events
             WHERE usage_event_id = ANY($1) ORDER BY id",
            columns::MONETIZATION
        ))
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let updates: Vec<BalanceUpdateRecord> = if monetization.is_empty() {
            Vec::new()
        } else {
            let ids: Vec<i64> = monetization.iter().map(|m| m.id).collect();
            sqlx::query_as(&format!(
                "SELECT {} FROM balance_updates
                 WHERE monetization_event_id = ANY($1) ORDER BY id",
                columns::BALANCE_UPDATES
            ))
            .bind(&ids)
            .fetch_all(&self.pool)
            .await?
        };
        Ok(join(usage, monetization, updates))
    }

    pub(in crate::store) async fn account_draws_since(
        &self,
        account: &str,
        since: Millis,
    ) -> Result<Vec<Draw>, StoreError> {
        let rows = sqlx::query(
            "SELECT draws FROM monetization_events
             WHERE account_id = $1 AND decided_at >= $2 AND refunded_at IS NULL ORDER BY id",
        )
        .bind(account)
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        let mut draws = Vec::new();
        for r in rows {
            draws.extend(parse_draws(r.get("draws"))?);
        }
        Ok(draws)
    }
}
