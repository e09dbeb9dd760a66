//! WAL checkpoints off the commit path.
//!
//! SQLite's default runs a checkpoint inside whichever commit takes the WAL past 1 000 pages:
//! with the ledger's batches that was nearly every commit, and each one copied pages into the
//! database file and fsynced it while the batch (and every event queued behind it) waited.
//! The pool's connections instead never checkpoint (`wal_autocheckpoint = 0`); this task does,
//! on its own connection, every [`CHECKPOINT_INTERVAL`].
//!
//! Durability is unchanged: a commit is durable against a process crash once its frames are in
//! the WAL (`synchronous = NORMAL`), whenever the checkpoint runs; a checkpoint only moves
//! committed pages into the main file. A passive checkpoint never blocks the writer, but it
//! can only restart the WAL from its beginning when no commit lands while it runs, which under
//! sustained load may not happen: past [`WAL_FRAMES_MAX`] the task runs a `TRUNCATE`
//! checkpoint, which waits for the writer, copies what is left and empties the file.

use std::time::Duration;

use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

use crate::store::StoreError;

/// How often the WAL is copied into the database file. Longer means fewer copies of a page
/// rewritten by many commits, and a larger WAL.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(1_000);
/// The WAL's size in pages (4 KiB each: 256 MiB) past which a checkpoint may stall the writer
/// to empty it.
const WAL_FRAMES_MAX: i64 = 65_536;

/// The checkpoint task of one store; it stops when the last clone of the store is dropped.
#[derive(Debug)]
pub(super) struct Checkpointer {
    /// The task, aborted on drop (its connection closes with it).
    task: tokio::task::JoinHandle<()>,
}

impl Checkpointer {
    /// Opens the task's connection with `options` (the pool's) and starts it.
    pub(super) async fn start(options: SqliteConnectOptions) -> Result<Checkpointer, StoreError> {
        let mut conn = SqliteConnection::connect_with(&options).await?;
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECKPOINT_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = checkpoint(&mut conn).await {
                    tracing::warn!(error = %e, "WAL checkpoint failed; retrying at the next tick");
                }
            }
        });
        Ok(Checkpointer { task })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One passive checkpoint, then a truncating one if the WAL has grown past its bound.
async fn checkpoint(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    // (busy, frames in the WAL, frames copied)
    let (_, frames, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(&mut *conn)
        .await?;
    if frames > WAL_FRAMES_MAX {
        let (busy, _, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&mut *conn)
            .await?;
        if busy != 0 {
            tracing::warn!(
                frames,
                "the WAL could not be emptied (a reader or the writer held it)"
            );
        }
    }
    Ok(())
}
