//! Online backup and restore of a SQLite ledger.
//!
//! `VACUUM INTO` writes a consistent copy of the database as of one read transaction, while the
//! gateway goes on committing (WAL: the copy reads a snapshot, writers are not blocked). A
//! restore checks the copy (`PRAGMA integrity_check`, and that it is a flowgate ledger) before
//! putting it in place by rename, so a bad or half-written file never becomes the ledger.

use std::path::Path;
use std::str::FromStr;

use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

use super::SqliteStore;
use crate::store::StoreError;

impl SqliteStore {
    /// Writes a consistent copy of the ledger to `to`, which must not exist yet.
    pub(in crate::store) async fn backup(&self, to: &Path) -> Result<(), StoreError> {
        if to.exists() {
            return Err(StoreError::Backup(format!(
                "{} exists already; a backup never overwrites",
                to.display()
            )));
        }
        let target = to
            .to_str()
            .ok_or_else(|| StoreError::Backup(format!("{} is not UTF-8", to.display())))?;
        sqlx::query("VACUUM INTO $1")
            .bind(target)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// Checks that `file` is a sound flowgate ledger: SQLite's integrity check passes and the
/// ledger's tables and migrations are there. Returns how many usage events it holds.
pub(in crate::store) async fn check_ledger_file(file: &Path) -> Result<u64, StoreError> {
    let options =
        SqliteConnectOptions::from_str(&format!("sqlite://{}", file.display()))?.read_only(true);
    let mut conn = SqliteConnection::connect_with(&options).await?;
    let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut conn)
        .await?;
    if integrity != "ok" {
        return Err(StoreError::Backup(format!(
            "{} fails SQLite's integrity check: {integrity}",
            file.display()
        )));
    }
    let migrations: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(&mut conn)
            .await
            .map_err(|_| {
                StoreError::Backup(format!("{} is not a flowgate ledger", file.display()))
            })?;
    if migrations.is_none() {
        return Err(StoreError::Backup(format!(
            "{} has no applied migrations",
            file.display()
        )));
    }
    let events: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_events")
        .fetch_one(&mut conn)
        .await?;
    conn.close().await?;
    Ok(u64::try_from(events).unwrap_or(0))
}

/// Puts the checked copy `from` in place as the ledger file `to` (the gateway stopped):
/// copied beside it, then renamed over it, and the old file's WAL and shared-memory files
/// removed so that SQLite does not replay them onto the restored ledger. Without `force` an
/// existing ledger is never replaced.
pub(in crate::store) async fn restore(
    from: &Path,
    to: &Path,
    force: bool,
) -> Result<u64, StoreError> {
    let events = check_ledger_file(from).await?;
    if to.exists() && !force {
        return Err(StoreError::Backup(format!(
            "{} exists; stop the gateway and pass --force to replace it",
            to.display()
        )));
    }
    let staging = to.with_extension("restoring");
    let io = |what: &str, e: std::io::Error| StoreError::Backup(format!("{what}: {e}"));
    tokio::fs::copy(from, &staging)
        .await
        .map_err(|e| io("copy", e))?;
    for suffix in ["-wal", "-shm"] {
        let side = format!("{}{suffix}", to.display());
        match tokio::fs::remove_file(&side).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&side, e)),
        }
    }
    tokio::fs::rename(&staging, to)
        .await
        .map_err(|e| io("rename", e))?;
    Ok(events)
}
