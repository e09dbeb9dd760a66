//! The admin and user APIs' statements on PostgreSQL: the shim [`super::super::shared`]
//! needs, then the statements themselves, expanded from there.

use sqlx::Row;
use sqlx::postgres::Postgres as DB;

use super::super::LedgerChange;
use super::super::api::{
    AccountRow, ApiKeyRow, BalanceUpdateRecord, Granted, LedgerEvent, MonetizationRecord, Page,
    Revoked, UsageEventRecord, columns, join, parse_draws,
};
use super::super::{GrantBalance, ReadMark, StoreError, StoredGrant};
use super::notify::{announce_account, announce_ledger};
use super::{GRANT_COLUMNS, PostgresStore, grant_from_row};
use crate::config::{AccountSeed, GrantSeed, KeySeed};
use crate::waterfall::{Draw, Millis};

/// An id list: a `bigint[]` parameter.
const IDS_IN: &str = "= ANY($1)";

/// A page of an account's usage events after, then before, a cursor (`$1` the account, `$2` the
/// cursor, `$3` the limit). Asked directly: PostgreSQL's planner walks the primary key from the
/// cursor or the account's index, as its statistics say (SQLite needs the ids found first).
const ACCOUNT_PAGE: [&str; 2] = [
    "WHERE account_id = $1 AND id > $2 ORDER BY id LIMIT $3",
    "WHERE account_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
];

#[allow(clippy::unnecessary_wraps)] // the same signature as SQLite's, which can fail
fn ids_arg(ids: impl Iterator<Item = i64>) -> Result<Vec<i64>, StoreError> {
    Ok(ids.collect())
}

impl PostgresStore {
    /// At READ COMMITTED a writer waits on the rows and unique-index entries it needs.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, DB>, StoreError> {
        Ok(self.pool.begin().await?)
    }

    /// One snapshot for every read of a view's re-read.
    async fn begin_view_read(&self) -> Result<sqlx::Transaction<'static, DB>, StoreError> {
        Ok(self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?)
    }

    /// The transaction's snapshot: which commits its reads include. Read first, so that it is
    /// the snapshot every later read of the transaction uses.
    #[allow(clippy::unused_self)] // the same signature as SQLite's
    async fn read_mark(
        &self,
        tx: &mut sqlx::Transaction<'_, DB>,
    ) -> Result<Option<ReadMark>, StoreError> {
        let text: String = sqlx::query_scalar("SELECT pg_current_snapshot()::text")
            .fetch_one(&mut **tx)
            .await?;
        ReadMark::parse(&text)
            .map(Some)
            .ok_or_else(|| StoreError::Corrupt(format!("pg_current_snapshot(): {text:?}")))
    }

    /// Other replicas learn of a grant from its balance, as they learn of debits.
    async fn announce_grant(
        &self,
        tx: &mut sqlx::Transaction<'_, DB>,
        balance: GrantBalance,
    ) -> Result<(), StoreError> {
        let change = LedgerChange {
            balances: vec![balance],
            ..LedgerChange::default()
        };
        announce_ledger(tx, &self.replica, &change).await
    }

    /// Every replica re-reads the account once this commits.
    #[allow(clippy::unused_self)] // the same signature as SQLite's
    async fn announce_account(
        &self,
        tx: &mut sqlx::Transaction<'_, DB>,
        account: &str,
    ) -> Result<(), StoreError> {
        announce_account(tx, account).await
    }
}

super::super::shared::api_statements!(PostgresStore);
super::super::export::export_statements!(PostgresStore);
super::super::alerts::alert_statements!(PostgresStore);
super::super::shared::replay_statements!(PostgresStore, "");
super::super::reconcile::reconcile_statements!(
    PostgresStore,
    "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
);
