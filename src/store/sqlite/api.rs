//! The admin and user APIs' statements on SQLite: the shim [`super::super::shared`] needs,
//! then the statements themselves, expanded from there.

use sqlx::Row;
use sqlx::sqlite::Sqlite as DB;

use super::super::api::{
    AccountRow, ApiKeyRow, BalanceUpdateRecord, Granted, LedgerEvent, MonetizationRecord, Page,
    Revoked, UsageEventRecord, columns, join, parse_draws,
};
use super::super::{GrantBalance, ReadMark, StoreError, StoredGrant};
use super::{GRANT_COLUMNS, SqliteStore, grant_from_row};
use crate::config::{AccountSeed, GrantSeed, KeySeed};
use crate::waterfall::{Draw, Millis};

/// An id list: the ids as a JSON array, read back by `json_each`.
const IDS_IN: &str = "IN (SELECT value FROM json_each($1))";

/// A page of an account's usage events after, then before, a cursor (`$1` the account, `$2` the
/// cursor, `$3` the limit). The page's ids are found first, from `usage_events_by_account` alone
/// (an index holds each row's id), and only those rows are read: asked for whole rows at once,
/// SQLite read every row of the account to sort them by id, about a second a page for an account
/// of 500 000 events (docs/BENCHMARKS.md, "The ledger's pages").
const ACCOUNT_PAGE: [&str; 2] = [
    "WHERE id IN (SELECT id FROM usage_events WHERE account_id = $1 AND id > $2 \
     ORDER BY id LIMIT $3) ORDER BY id",
    "WHERE id IN (SELECT id FROM usage_events WHERE account_id = $1 AND id < $2 \
     ORDER BY id DESC LIMIT $3) ORDER BY id DESC",
];

fn ids_arg(ids: impl Iterator<Item = i64>) -> Result<String, StoreError> {
    serde_json::to_string(&ids.collect::<Vec<_>>())
        .map_err(|e| StoreError::Corrupt(format!("ids: {e}")))
}

impl SqliteStore {
    /// A write transaction holding SQLite's write lock from its start: a second writer waits
    /// (up to the busy timeout) instead of failing when it would upgrade.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, DB>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// A deferred transaction: in WAL mode its first read fixes the snapshot the rest see.
    async fn begin_view_read(&self) -> Result<sqlx::Transaction<'static, DB>, StoreError> {
        Ok(self.pool.begin().await?)
    }

    /// One process per SQLite file: no other writer announces commits.
    #[allow(clippy::unused_self, clippy::unused_async)] // the same signature as PostgreSQL's
    async fn read_mark(
        &self,
        _tx: &mut sqlx::Transaction<'_, DB>,
    ) -> Result<Option<ReadMark>, StoreError> {
        Ok(None)
    }

    /// One process per SQLite file: nobody else to tell.
    async fn announce_grant(
        &self,
        _tx: &mut sqlx::Transaction<'_, DB>,
        _balance: GrantBalance,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    /// One process per SQLite file: its API applies its own changes.
    async fn announce_account(
        &self,
        _tx: &mut sqlx::Transaction<'_, DB>,
        _account: &str,
    ) -> Result<(), StoreError> {
        Ok(())
    }
}

super::super::shared::api_statements!(SqliteStore);
super::super::export::export_statements!(SqliteStore);
super::super::alerts::alert_statements!(SqliteStore);
super::super::shared::replay_statements!(SqliteStore, "NOT INDEXED");
super::super::reconcile::reconcile_statements!(SqliteStore, "BEGIN");
