//! The SQLite ledger: one file, WAL mode, one writer at a time.
//!
//! sqlx leaves SQLite's journal mode and durability to us: the file runs in WAL mode with
//! `synchronous = NORMAL` (a committed transaction survives a crash of the process; a power
//! loss may take the last few), and write transactions open with `BEGIN IMMEDIATE` so that a
//! second writer waits for the lock (up to `busy_timeout`) instead of failing mid-transaction.
//! WAL checkpoints run on a timer from their own connection, not inside commits (see
//! [`checkpoint`]).

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Row, SqlitePool};

use super::debit::LockedGrant;
use super::{CommitReport, GrantBalance, LedgerSnapshot, Refund, StoreError, StoredGrant};
use crate::usage::LedgerEntry;
use crate::waterfall::{GrantKind, Millis};

/// Connections in the pool: one writer (the ledger task) plus readers.
const POOL_CONNECTIONS_MAX: u32 = 4;
/// How long a writer waits for another's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Each connection's page cache, in KiB (SQLite's `cache_size` takes it negated). A ledger
/// batch touches the right-hand leaf of every active account in each index; SQLite's default
/// of 2 MiB evicted those between batches and even spilled dirty pages to the WAL mid-batch.
const PAGE_CACHE_KIB: u32 = 64 * 1024;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

mod api;
pub(super) mod backup;
mod checkpoint;
mod commit;

/// A ledger in one SQLite file.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    /// Readers, and the admin and user APIs' writes.
    pool: SqlitePool,
    /// The ledger writer's one connection (commits, refunds, expiry), with a large page cache.
    /// Always the same connection: SQLite empties a connection's cache whenever another one
    /// wrote since its last transaction, so commits taking turns on a pool reread every index
    /// page they touch.
    writer: SqlitePool,
    /// Checkpoints the WAL while the store is open; `None` on a read-only store.
    _checkpointer: Option<std::sync::Arc<checkpoint::Checkpointer>>,
}

impl SqliteStore {
    /// Opens (creating if missing) the database file at `path`.
    pub async fn open(path: &str) -> Result<SqliteStore, StoreError> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            .pragma("wal_autocheckpoint", "0")
            // Statement journals (a multi-row insert's undo, should it fail halfway) stay in
            // memory rather than in a temporary file.
            .pragma("temp_store", "memory");
        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_CONNECTIONS_MAX)
            .connect_with(options.clone())
            .await?;
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(
                options
                    .clone()
                    .pragma("cache_size", format!("-{PAGE_CACHE_KIB}"))
                    .statement_cache_capacity(commit::STATEMENT_CACHE),
            )
            .await?;
        let checkpointer = checkpoint::Checkpointer::start(options).await?;
        Ok(SqliteStore {
            pool,
            writer,
            _checkpointer: Some(std::sync::Arc::new(checkpointer)),
        })
    }

    /// Opens the existing database file at `path` read-only: SQLite refuses every write on
    /// these connections, and a missing file is an error, not a new ledger.
    pub async fn open_read_only(path: &str) -> Result<SqliteStore, StoreError> {
        let file = path.split('?').next().unwrap_or(path);
        if !std::path::Path::new(file).exists() {
            return Err(StoreError::NoLedger(file.to_owned()));
        }
        // Its readers stream whole tables on purpose: sqlx's warning for a statement over a
        // second would fire on every run of a large ledger.
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))?
            .read_only(true)
            .busy_timeout(BUSY_TIMEOUT)
            .disable_statement_logging();
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        Ok(SqliteStore {
            writer: pool.clone(),
            pool,
            _checkpointer: None,
        })
    }

    /// Applies the migrations on one connection with foreign keys off, as SQLite's table
    /// rebuild requires (a migration cannot turn them off inside its own transaction), then
    /// checks every reference before turning them back on.
    pub(super) async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        sqlx::query("PRAGMA foreign_keys = OFF")
            .execute(&mut *conn)
            .await?;
        let migrated = MIGRATOR.run(&mut *conn).await;
        let broken: Vec<(String,)> = sqlx::query_as("PRAGMA foreign_key_check")
            .fetch_all(&mut *conn)
            .await?;
        sqlx::query("PRAGMA foreign_keys = ON")
            .execute(&mut *conn)
            .await?;
        migrated?;
        if !broken.is_empty() {
            return Err(StoreError::Corrupt(format!(
                "after migrating, rows of {:?} refer to rows that do not exist",
                broken
            )));
        }
        Ok(())
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub(super) async fn commit(
        &self,
        batch: &[LedgerEntry],
        now: Millis,
    ) -> Result<CommitReport, StoreError> {
        commit::commit(&self.writer, batch, now).await
    }

    pub(super) async fn expire_grants(&self, now: Millis) -> Result<Vec<GrantBalance>, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let due: Vec<(i64, String, i64)> = sqlx::query_as(
            "SELECT id, account_id, balance FROM grants
             WHERE expires_at IS NOT NULL AND expires_at <= ? AND balance > 0 ORDER BY id",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let mut expired = Vec::with_capacity(due.len());
        for (id, account, balance) in &due {
            let version: i64 = sqlx::query_scalar(
                "UPDATE grants SET balance = 0, version = version + 1 WHERE id = ? RETURNING version",
            )
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
            expired.push(GrantBalance {
                account: account.clone(),
                grant_id: *id,
                balance: 0,
                version: u64::try_from(version).ok(),
            });
            sqlx::query(
                "INSERT INTO balance_updates (account_id, grant_id, reason, delta, balance_after, created_at)
                 VALUES (?, ?, 'expired', ?, 0, ?)",
            )
            .bind(account)
            .bind(id)
            .bind(-balance)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(expired)
    }

    pub(super) async fn refund(
        &self,
        decision_id: &str,
        now: Millis,
    ) -> Result<Refund, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let charge: Option<(i64, String, String)> = sqlx::query_as(
            "SELECT m.id, m.account_id, m.draws FROM monetization_events m
             JOIN usage_events u ON u.id = m.usage_event_id WHERE u.decision_id = ?",
        )
        .bind(decision_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((charge_id, account, draws)) = charge else {
            return Ok(Refund::NotCharged);
        };
        let marked = sqlx::query(
            "UPDATE monetization_events SET refunded_at = ? WHERE id = ? AND refunded_at IS NULL",
        )
        .bind(now)
        .bind(charge_id)
        .execute(&mut *tx)
        .await?;
        if marked.rows_affected() == 0 {
            return Ok(Refund::AlreadyRefunded);
        }
        let debits: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT grant_id, -delta FROM balance_updates
             WHERE monetization_event_id = ? AND reason = 'debit' ORDER BY grant_id",
        )
        .bind(charge_id)
        .fetch_all(&mut *tx)
        .await?;
        let mut balances = Vec::with_capacity(debits.len());
        let mut credits = 0;
        for (grant_id, taken) in debits {
            // The grant's owner: the charged account, or the workspace whose pool it drew.
            let (after, owner, version): (i64, String, i64) = sqlx::query_as(
                "UPDATE grants SET balance = balance + ?, version = version + 1 WHERE id = ?
                 RETURNING balance, account_id, version",
            )
            .bind(taken)
            .bind(grant_id)
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO balance_updates (account_id, grant_id, reason, delta, balance_after, monetization_event_id, created_at)
                 VALUES (?, ?, 'refund', ?, ?, ?, ?)",
            )
            .bind(&account)
            .bind(grant_id)
            .bind(taken)
            .bind(after)
            .bind(charge_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            credits += taken as u64;
            balances.push(GrantBalance {
                account: owner,
                grant_id,
                balance: after as u64,
                version: u64::try_from(version).ok(),
            });
        }
        // The billing export's outbox: the refund, for every active sink.
        sqlx::query(
            "INSERT INTO export_outbox (sink, account_id, monetization_event_id, kind, created_at)
             SELECT name, $1, $2, 'refund', $3 FROM export_sinks WHERE active ORDER BY name",
        )
        .bind(&account)
        .bind(charge_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Refund::Refunded {
            draws: serde_json::from_str(&draws)
                .map_err(|e| StoreError::Corrupt(format!("monetization_events.draws: {e}")))?,
            account,
            balances,
            credits,
        })
    }

    pub(super) async fn snapshot(&self, since: Millis) -> Result<LedgerSnapshot, StoreError> {
        use super::snapshot_sql as q;
        // One read transaction: the four reads see one state of the ledger.
        let mut tx = self.pool.begin().await?;
        let snapshot = LedgerSnapshot {
            grants: sqlx::query_as(q::GRANTS).fetch_all(&mut *tx).await?,
            balance_updates: sqlx::query_as(q::BALANCE_UPDATES)
                .fetch_all(&mut *tx)
                .await?,
            charged_usage: sqlx::query_as(q::CHARGED_USAGE)
                .bind(since)
                .fetch_all(&mut *tx)
                .await?,
            monetization: sqlx::query_as(q::MONETIZATION)
                .bind(since)
                .fetch_all(&mut *tx)
                .await?,
            price_tables: sqlx::query_as(q::PRICE_TABLES).fetch_all(&mut *tx).await?,
        };
        tx.commit().await?;
        Ok(snapshot)
    }
}

fn locked_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<LockedGrant, StoreError> {
    let g = grant_from_row(r)?;
    Ok(LockedGrant {
        id: g.id,
        account_id: r.get("account_id"),
        kind: g.kind,
        balance: g.balance as i64,
        expires_at: g.expires_at,
        priority: g.priority,
        features: g.features,
    })
}

const GRANT_COLUMNS: &str = "SELECT id, account_id, external_id, kind, amount, balance, version, expires_at, priority, features FROM grants";

fn grant_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<StoredGrant, StoreError> {
    let kind: String = r.get("kind");
    let features: Option<String> = r.get("features");
    Ok(StoredGrant {
        id: r.get("id"),
        external_id: r.get("external_id"),
        kind: GrantKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("grants.kind = {kind:?}")))?,
        amount: r.get::<i64, _>("amount") as u64,
        balance: r.get::<i64, _>("balance") as u64,
        version: r.get::<i64, _>("version") as u64,
        expires_at: r.get("expires_at"),
        priority: r.get("priority"),
        features: features
            .map(|f| {
                serde_json::from_str(&f)
                    .map_err(|e| StoreError::Corrupt(format!("grants.features: {e}")))
            })
            .transpose()?,
    })
}

/// What the plan tests of this store share: a fresh, migrated ledger, and SQLite's plan for a
/// statement.
#[cfg(test)]
pub(super) mod test_support {
    use super::SqliteStore;
    use sqlx::Row;
    use sqlx::sqlite::{Sqlite, SqliteArguments};

    /// A migrated ledger in a temporary directory (kept while the directory lives).
    pub(in crate::store) async fn migrated() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ledger.db");
        let store = SqliteStore::open(path.to_str().expect("path"))
            .await
            .expect("open");
        store.migrate().await.expect("migrate");
        (dir, store)
    }

    /// The plan SQLite makes for `query` (an `EXPLAIN QUERY PLAN …`), one line per step.
    pub(in crate::store) async fn plan<'q>(
        store: &SqliteStore,
        query: sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>,
    ) -> Vec<String> {
        let rows = query.fetch_all(&store.pool).await.expect("explain");
        rows.iter()
            .map(|r| r.try_get::<String, _>(3).expect("detail"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{migrated, plan};

    /// Alerts and a refreshed account read one account's draws since its longest window:
    /// through that account's own events, not through every account's charges since then.
    #[tokio::test]
    async fn an_accounts_draws_are_read_through_its_own_events() {
        let (_dir, store) = migrated().await;
        let sql = format!("EXPLAIN QUERY PLAN {}", crate::store::ACCOUNT_DRAWS_SQL);
        let plan = plan(&store, sqlx::query(&sql).bind("acct").bind(0_i64)).await;
        for step in [
            "SEARCH u USING COVERING INDEX usage_events_by_account (account_id=? AND decided_at>?)",
            "SEARCH m USING INDEX sqlite_autoindex_monetization_events_1 (usage_event_id=?)",
        ] {
            assert!(plan.iter().any(|s| s == step), "no {step:?} in {plan:?}");
        }
        assert!(
            !plan
                .iter()
                .any(|s| s.contains("monetization_events_by_time")),
            "every account's charges read: {plan:?}"
        );
    }

    /// The build's SQLite options (`.cargo/config.toml`) are the ones compiled in: without
    /// them SQLite takes a global mutex on every allocation to count it.
    #[tokio::test]
    async fn the_bundled_sqlite_keeps_no_memory_statistics() {
        let (_dir, store) = migrated().await;
        let options: Vec<String> = sqlx::query_scalar("PRAGMA compile_options")
            .fetch_all(&store.pool)
            .await
            .expect("compile options");
        assert!(
            options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"),
            "built without .cargo/config.toml's LIBSQLITE3_FLAGS: {options:?}"
        );
    }
}
