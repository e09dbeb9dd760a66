//! The ledger store: one interface, one implementation per SQL dialect.
//!
//! Nothing outside this module sees SQL. The gateway and the engine speak in [`LedgerEntry`]s,
//! [`StoredAccount`]s and [`Draw`]s; each backend turns those into its own statements. The
//! guarantees every backend gives:
//!
//! - a usage event's `charge_key` is unique: a key is charged once, ever, whoever retries it;
//! - a grant's balance changes only together with its balance-update row, in one transaction,
//!   and never below zero (a `CHECK`); what a debit cannot take is recorded as forgiven;
//! - a batch commits whole or not at all, in queue order.

mod sqlite;

use serde::Serialize;

use crate::config::AccountSeed;
use crate::ledger::LedgerEntry;
use crate::waterfall::{Draw, GrantKind, Millis};

pub use sqlite::SqliteStore;

/// A failure of the store; the ledger writer keeps its batch and retries.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations could not be applied.
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The store's URL names no backend flowgate has.
    #[error("unsupported store url (expected sqlite://...): {0}")]
    UnsupportedUrl(String),
    /// A stored value could not be read back (a bug or a tampered row).
    #[error("corrupt ledger row: {0}")]
    Corrupt(String),
}

/// What happened to one ledger entry in a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Recorded, and charged if it was a charge.
    Recorded,
    /// Its charge key had already been charged: recorded as a duplicate, charged nothing.
    Duplicate,
    /// This very entry was already recorded (a retried batch): nothing written.
    AlreadyRecorded,
}

/// An account as the store has it.
#[derive(Debug, Clone)]
pub struct StoredAccount {
    /// Its id.
    pub id: String,
    /// Its plan's name.
    pub plan: String,
    /// Whether it is suspended.
    pub suspended: bool,
    /// Hashes of its API keys.
    pub key_hashes: Vec<String>,
    /// Its grants, with their current balances.
    pub grants: Vec<StoredGrant>,
}

/// A grant as the store has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredGrant {
    /// The store's id.
    pub id: i64,
    /// The grant's id given by whoever granted it (config, admin API).
    pub external_id: String,
    /// What it is.
    pub kind: GrantKind,
    /// Credits granted.
    pub amount: u64,
    /// Credits left.
    pub balance: u64,
    /// When it expires.
    pub expires_at: Option<Millis>,
    /// Spend priority.
    pub priority: i32,
    /// Features it may pay for (`None`: all).
    pub features: Option<Vec<String>>,
}

/// Row counts of the three datasets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LedgerCounts {
    /// Usage events (every request).
    pub usage_events: u64,
    /// Monetization events (every charge).
    pub monetization_events: u64,
    /// Balance updates (every balance change).
    pub balance_updates: u64,
}

/// A usage event as stored (for listings and explanations).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageEventRow {
    /// The decision id.
    pub decision_id: String,
    /// The feature.
    pub feature: String,
    /// Units asked for.
    pub units: u64,
    /// How the request ended.
    pub outcome: String,
    /// The denial or error code.
    pub code: Option<String>,
    /// The upstream's status.
    pub upstream_status: Option<u16>,
    /// Whether it was charged (has a monetization event).
    pub charged: bool,
    /// Credits drawn from grants, when charged.
    pub credits: u64,
    /// When it was decided.
    pub decided_at: Millis,
}

/// The ledger store.
#[derive(Clone, Debug)]
pub enum Store {
    /// The embedded default: one SQLite file.
    Sqlite(SqliteStore),
}

impl Store {
    /// Opens the store at `url` (`sqlite://path`).
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            return Ok(Store::Sqlite(SqliteStore::open(path).await?));
        }
        // Never echo the URL: it may carry a password.
        let scheme = url.split(':').next().unwrap_or_default();
        Err(StoreError::UnsupportedUrl(format!("{scheme}://…")))
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.migrate().await,
        }
    }

    /// Whether the store answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.ping().await,
        }
    }

    /// Creates the configured accounts, keys and grants the store does not have yet. Idempotent:
    /// a grant is given once per (account, grant id), however often the gateway restarts.
    pub async fn seed(&self, seeds: &[AccountSeed], now: Millis) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.seed(seeds, now).await,
        }
    }

    /// Every account, with its keys and grants.
    pub async fn load_accounts(&self) -> Result<Vec<StoredAccount>, StoreError> {
        match self {
            Store::Sqlite(s) => s.load_accounts().await,
        }
    }

    /// The draws of every charge decided at or after `since`, by account, oldest first: the
    /// usage that still counts against windows and free tiers.
    pub async fn load_draws_since(
        &self,
        since: Millis,
    ) -> Result<Vec<(String, Vec<Draw>)>, StoreError> {
        match self {
            Store::Sqlite(s) => s.load_draws_since(since).await,
        }
    }

    /// Commits a batch in one transaction, in order; returns what happened to each entry.
    pub async fn commit(
        &self,
        batch: &[LedgerEntry],
        now: Millis,
    ) -> Result<Vec<Committed>, StoreError> {
        match self {
            Store::Sqlite(s) => s.commit(batch, now).await,
        }
    }

    /// Row counts of the three datasets.
    pub async fn counts(&self) -> Result<LedgerCounts, StoreError> {
        match self {
            Store::Sqlite(s) => s.counts().await,
        }
    }

    /// An account's most recent usage events, newest first.
    pub async fn usage_events(
        &self,
        account: &str,
        limit: u32,
    ) -> Result<Vec<UsageEventRow>, StoreError> {
        match self {
            Store::Sqlite(s) => s.usage_events(account, limit).await,
        }
    }

    /// The grants of an account with their balances.
    pub async fn grants(&self, account: &str) -> Result<Vec<StoredGrant>, StoreError> {
        match self {
            Store::Sqlite(s) => s.grants(account).await,
        }
    }
}
