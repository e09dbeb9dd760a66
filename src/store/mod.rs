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

/// Calls the same method on whichever dialect the store is: `dialect!(self, s => s.f(x))`.
macro_rules! dialect {
    ($store:expr, $s:ident => $call:expr) => {
        match $store {
            Store::Sqlite($s) => $call,
            Store::Postgres($s) => $call,
        }
    };
}

pub mod alerts;
mod api;
mod debit;
pub mod export;
pub mod lease;
mod postgres;
pub mod reconcile;
mod replay;
mod shared;
mod sqlite;

use std::collections::HashMap;

use serde::Serialize;

use crate::config::AccountSeed;
use crate::usage::LedgerEntry;
use crate::waterfall::{Draw, GrantKind, Millis};

pub use api::{
    AccountRow, ApiKeyRow, BalanceUpdateRecord, Granted, LedgerEvent, MonetizationRecord, Page,
    Revoked, UsageEventRecord,
};
pub use postgres::PostgresStore;
pub use replay::{GrantHistory, ReplayCharge, ReplayEvent};
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
    #[error("unsupported store url (expected sqlite://... or postgres://...): {0}")]
    UnsupportedUrl(String),
    /// A command that only reads the ledger was pointed at a SQLite file that does not exist.
    #[error("no ledger at {0}: the file does not exist (check [store] url)")]
    NoLedger(String),
    /// A stored value could not be read back (a bug or a tampered row).
    #[error("corrupt ledger row: {0}")]
    Corrupt(String),
    /// A backup or restore cannot be made as asked (the reason says why).
    #[error("backup: {0}")]
    Backup(String),
    /// A price version is in the ledger with other prices than the config gives it.
    #[error(
        "plans.{plan}: price version {version:?} is already in the ledger with other prices or another effective_from; give changed prices a new price_version"
    )]
    PriceVersionChanged {
        /// The plan.
        plan: String,
        /// The version.
        version: String,
    },
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

/// What a commit did.
#[derive(Debug, Default)]
pub struct CommitReport {
    /// What happened to each entry, in batch order.
    pub results: Vec<Committed>,
    /// The balance, after the commit, of every grant the batch debited. It includes what other
    /// writers (replicas) took: the gateway's view learns from it.
    pub balances: Vec<GrantBalance>,
    /// Credits the batch owed that no grant could pay, forgiven.
    pub forgiven: u64,
    /// Where each grant is in `balances`: a batch of thousands of accounts notes a balance per
    /// charge, and a search of the list per note grew with the square of the batch.
    at: HashMap<i64, usize>,
}

impl CommitReport {
    /// Notes a grant's balance after the commit (the last one noted wins).
    fn set_balance(&mut self, account: &str, grant_id: i64, balance: i64) {
        let balance = u64::try_from(balance).unwrap_or(0);
        match self.at.get(&grant_id) {
            Some(&i) => self.balances[i].balance = balance,
            None => {
                self.at.insert(grant_id, self.balances.len());
                self.balances.push(GrantBalance {
                    account: account.to_owned(),
                    grant_id,
                    balance,
                    version: None,
                });
            }
        }
    }

    /// What the commit left in grant `grant_id`, its balance and version, if it debited it.
    pub fn committed(&self, grant_id: i64) -> Option<(u64, u64)> {
        let b = &self.balances[*self.at.get(&grant_id)?];
        Some((b.balance, b.version?))
    }

    /// Notes the versions the commit's balance updates gave the grants (`(grant id, version)`,
    /// as the store's `UPDATE … RETURNING` said).
    fn set_versions(&mut self, versions: &[(i64, i64)]) {
        for &(grant_id, version) in versions {
            if let Some(&i) = self.at.get(&grant_id) {
                self.balances[i].version = u64::try_from(version).ok();
            }
        }
    }
}

/// What a refund did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refund {
    /// Refunded now.
    Refunded {
        /// Whose charge it was.
        account: String,
        /// The charge's draws (windows and free tier get their units back from these).
        draws: Vec<Draw>,
        /// The refunded grants' balances after the refund.
        balances: Vec<GrantBalance>,
        /// Credits given back.
        credits: u64,
    },
    /// It had been refunded before: nothing changed.
    AlreadyRefunded,
    /// The decision was not charged (or is unknown): nothing to refund.
    NotCharged,
}

/// A grant's committed balance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantBalance {
    /// Whose grant it is.
    pub account: String,
    /// The grant.
    pub grant_id: i64,
    /// Its balance.
    pub balance: u64,
    /// `grants.version` of that balance: one more at every change, in commit order per grant.
    /// A view keeps the balance of the highest version it has seen, so a balance heard late
    /// (another replica's notice delivered after this replica's newer commit) cannot replace a
    /// newer one. `None`: not known (a replica of an older version sent it): taken as it comes.
    pub version: Option<u64>,
}

/// What a ledger transaction did to the numbers other replicas decide on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerChange {
    /// Each changed grant's balance after the transaction.
    pub balances: Vec<GrantBalance>,
    /// Window and free-tier usage charged, by account.
    pub used: Vec<(String, Draw)>,
    /// Window and free-tier usage a refund gave back, by account.
    pub refunded: Vec<(String, Draw)>,
    /// When the sender made the change (its clock, ms; 0: not said), for the notification lag.
    pub sent_at: Millis,
    /// The transaction that made it (PostgreSQL's `xid8`; 0: not known), so that a view whose
    /// re-read already included it does not count it twice ([`ReadMark::includes`]).
    pub xid: u64,
}

/// Where a read of the store stands among the commits other replicas announce: PostgreSQL's
/// snapshot of the read's transaction. A listener hears every commit after it started
/// listening, and a re-read started after that also includes some of them; the mark tells
/// which, so that their announcements are not counted on top of what was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadMark {
    /// Every transaction below it had ended when the snapshot was taken.
    xmin: u64,
    /// No transaction from it on had ended.
    xmax: u64,
    /// Transactions between the two still running then (sorted).
    running: Vec<u64>,
}

impl ReadMark {
    /// Parses `pg_current_snapshot()::text`: `xmin:xmax:xip,…`.
    pub fn parse(text: &str) -> Option<ReadMark> {
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let mut running = parts
            .next()?
            .split(',')
            .filter(|x| !x.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<u64>, _>>()
            .ok()?;
        running.sort_unstable();
        (xmin <= xmax).then_some(ReadMark {
            xmin,
            xmax,
            running,
        })
    }

    /// Whether the read saw transaction `xid`'s commit (a transaction the read saw as running,
    /// or started after it, committed later). 0, an unknown transaction, is never included.
    pub fn includes(&self, xid: u64) -> bool {
        xid != 0
            && (xid < self.xmin || (xid < self.xmax && self.running.binary_search(&xid).is_err()))
    }
}

/// What a re-read of the whole view reads, in one snapshot.
#[derive(Debug)]
pub struct ViewRead {
    /// Every account, with its keys and grants.
    pub accounts: Vec<StoredAccount>,
    /// The draws of charges decided since the read's `since`, by account.
    pub draws: Vec<(String, Vec<Draw>)>,
    /// Which announced commits the read includes (`None`: nobody else announces).
    pub mark: Option<ReadMark>,
}

/// A change another writer (replica) committed, as [`Store::watch`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Changes may have been missed (the watch has just (re)connected): re-read the store.
    Resync,
    /// A ledger transaction's numbers.
    Ledger(LedgerChange),
    /// This account's row, API keys or grants changed: re-read it.
    Account(String),
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
    /// Whether its requests run in shadow mode.
    pub shadow: bool,
    /// The workspace whose pool it draws from, if it is a member of one.
    pub workspace: Option<String>,
    /// Hashes of its API keys.
    pub key_hashes: Vec<String>,
    /// Its grants, with their current balances.
    pub grants: Vec<StoredGrant>,
}

/// Puts API-key hashes and grants, read as flat `(account id, …)` lists, under their accounts;
/// rows of accounts not in `accounts` are ignored. Shared by the dialects' `load_accounts`.
fn attach_keys_and_grants(
    accounts: &mut [StoredAccount],
    keys: Vec<(String, String)>,
    grants: Vec<(String, StoredGrant)>,
) {
    let index: std::collections::HashMap<String, usize> = accounts
        .iter()
        .enumerate()
        .map(|(i, a)| (a.id.clone(), i))
        .collect();
    for (account, key_hash) in keys {
        if let Some(&i) = index.get(&account) {
            accounts[i].key_hashes.push(key_hash);
        }
    }
    for (account, grant) in grants {
        if let Some(&i) = index.get(&account) {
            accounts[i].grants.push(grant);
        }
    }
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
    /// The balance's version (see [`GrantBalance::version`]); not part of any API answer.
    #[serde(skip)]
    pub version: u64,
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
    /// A PostgreSQL database, shared by several replicas.
    Postgres(PostgresStore),
}

impl Store {
    /// Opens the store at `url` (`sqlite://path` or `postgres://…`).
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            return Ok(Store::Sqlite(SqliteStore::open(path).await?));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Store::Postgres(PostgresStore::open(url).await?));
        }
        // Never echo the URL: it may carry a password.
        let scheme = url.split(':').next().unwrap_or_default();
        Err(StoreError::UnsupportedUrl(format!("{scheme}://…")))
    }

    /// Opens the store at `url` for reading only: nothing is created or migrated, and no
    /// statement on it can write (SQLite: a read-only connection to an existing file;
    /// PostgreSQL: read-only transactions). For `flowgate replay` and `flowgate reconcile`: a
    /// mistyped SQLite path is an error, never a new empty ledger.
    pub async fn open_read_only(url: &str) -> Result<Store, StoreError> {
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            return Ok(Store::Sqlite(SqliteStore::open_read_only(path).await?));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Store::Postgres(PostgresStore::open_read_only(url).await?));
        }
        let scheme = url.split(':').next().unwrap_or_default();
        Err(StoreError::UnsupportedUrl(format!("{scheme}://…")))
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        dialect!(self, s => s.migrate().await)
    }

    /// Writes a consistent copy of the ledger to `to` while the gateway serves (SQLite's
    /// `VACUUM INTO`). PostgreSQL has its own tools for this, and they are the right ones.
    pub async fn backup(&self, to: &std::path::Path) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.backup(to).await,
            Store::Postgres(_) => Err(StoreError::Backup(
                "a PostgreSQL ledger is backed up with PostgreSQL's tools \
                 (pg_dump, or continuous archiving for point-in-time recovery)"
                    .into(),
            )),
        }
    }

    /// Puts the backup `from` in place as the SQLite ledger at `url` (the gateway stopped),
    /// after checking it; returns how many usage events it holds. Without `force` an existing
    /// ledger is never replaced.
    pub async fn restore(
        url: &str,
        from: &std::path::Path,
        force: bool,
    ) -> Result<u64, StoreError> {
        let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        else {
            return Err(StoreError::Backup(
                "restore is for SQLite ledgers; restore PostgreSQL with pg_restore".into(),
            ));
        };
        sqlite::backup::restore(from, std::path::Path::new(path), force).await
    }

    /// Whether the store answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        dialect!(self, s => s.ping().await)
    }

    /// Creates the configured accounts, keys and grants the store does not have yet. Idempotent:
    /// a grant is given once per (account, grant id), however often the gateway restarts.
    pub async fn seed(&self, seeds: &[AccountSeed], now: Millis) -> Result<(), StoreError> {
        dialect!(self, s => s.seed(seeds, now).await)
    }

    /// Every account, with its keys and grants.
    pub async fn load_accounts(&self) -> Result<Vec<StoredAccount>, StoreError> {
        dialect!(self, s => s.load_accounts().await)
    }

    /// Every account and the draws of every charge decided at or after `since` (by account:
    /// the usage that still counts against windows and free tiers), in one snapshot, with its
    /// [`ReadMark`]: what [`crate::accounts::Accounts`] re-reads after a lost listener.
    pub async fn read_view(&self, since: Millis) -> Result<ViewRead, StoreError> {
        dialect!(self, s => s.read_view(since).await)
    }

    /// Commits a batch in one transaction, in order; says what happened to each entry and to
    /// the balances it debited.
    pub async fn commit(
        &self,
        batch: &[LedgerEntry],
        now: Millis,
    ) -> Result<CommitReport, StoreError> {
        dialect!(self, s => s.commit(batch, now).await)
    }

    /// Expires every grant whose time has come (`expires_at <= now`) and still holds credits:
    /// its balance goes to zero with a balance update (reason `expired`), in one transaction.
    /// Returns the grants expired, with their new (zero) balances.
    pub async fn expire_grants(&self, now: Millis) -> Result<Vec<GrantBalance>, StoreError> {
        dialect!(self, s => s.expire_grants(now).await)
    }

    /// Refunds the charge of decision `decision_id`: each grant it debited gets its credits back
    /// (a `refund` balance update), and the charge is marked refunded, in one transaction.
    pub async fn refund(&self, decision_id: &str, now: Millis) -> Result<Refund, StoreError> {
        dialect!(self, s => s.refund(decision_id, now).await)
    }

    /// Other writers' changes as they commit, where the store can tell (PostgreSQL:
    /// LISTEN/NOTIFY); `None` for a store with one writer (SQLite).
    pub fn watch(&self) -> Option<tokio::sync::mpsc::Receiver<Change>> {
        match self {
            Store::Sqlite(_) => None,
            Store::Postgres(s) => Some(s.watch()),
        }
    }

    /// Strict mode: leases more of an account's pools to this replica, in one transaction
    /// (see [`lease`]). Only a shared store leases: SQLite has one process and no strict plans
    /// (`Settings::lease_only_when_shared`), and grants nothing.
    pub async fn lease_round(
        &self,
        account: &str,
        asks: &[lease::LeaseAsk],
        ttl_ms: u64,
        now: Millis,
    ) -> Result<lease::LeaseRound, StoreError> {
        match self {
            Store::Sqlite(_) => Ok(lease::LeaseRound::default()),
            Store::Postgres(s) => s.lease_round(account, asks, ttl_ms, now).await,
        }
    }

    /// Renews every lease of this replica for `ttl_ms`; returns those renewed.
    pub async fn renew_leases(&self, ttl_ms: u64) -> Result<Vec<lease::HeldLease>, StoreError> {
        match self {
            Store::Sqlite(_) => Ok(Vec::new()),
            Store::Postgres(s) => s.renew_leases(ttl_ms).await,
        }
    }

    /// Sets this replica's leases of `account` to `kept`, giving back the rest.
    pub async fn keep_leases(
        &self,
        account: &str,
        kept: &[(crate::waterfall::LeasePool, u64)],
    ) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(_) => Ok(()),
            Store::Postgres(s) => s.keep_leases(account, kept).await,
        }
    }

    /// Gives back every lease of this replica (after its last commit).
    pub async fn drop_leases(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(_) => Ok(()),
            Store::Postgres(s) => s.drop_leases().await,
        }
    }

    /// Forgets the usage counters strict mode reads that are older than `before`.
    pub async fn prune_counters(&self, before: Millis) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(_) => Ok(0),
            Store::Postgres(s) => s.prune_counters(before).await,
        }
    }

    /// Stores every plan's price versions (once each). A version stored before with other
    /// prices or another start is refused: its charges must stay explainable.
    pub async fn seed_prices(&self, tables: &[StoredPriceTable]) -> Result<(), StoreError> {
        dialect!(self, s => s.seed_prices(tables).await)
    }

    /// Reconciles the ledger (`flowgate reconcile`): every grant and balance update, and the
    /// usage and monetization events decided at or after `since`, checked against `settings`'
    /// price versions where the ledger has not stored its own. Rows are streamed through
    /// [`crate::reconcile::Checker`] in one read transaction: memory grows with grants and
    /// price versions, not with events.
    pub async fn reconcile(
        &self,
        since: Millis,
        settings: &crate::config::Settings,
    ) -> Result<crate::reconcile::Report, StoreError> {
        let mut checker = crate::reconcile::Checker::new(settings);
        dialect!(self, s => s.reconcile_rows(since, &mut |row| checker.feed(row)).await)?;
        Ok(checker.finish())
    }

    /// Reads every grant, balance update and price version, and the usage and monetization
    /// events decided at or after `since`, into memory: for tests and inspection of small
    /// ledgers (reconcile streams instead, [`Store::reconcile`]).
    pub async fn snapshot(&self, since: Millis) -> Result<LedgerSnapshot, StoreError> {
        dialect!(self, s => s.snapshot(since).await)
    }

    /// Calls `f` with every usage event decided before `to`, oldest first (decided_at, then
    /// id), with its charge, streaming: memory does not grow with the ledger. Returns how many
    /// were read.
    pub async fn replay_events(
        &self,
        to: Millis,
        f: &mut (dyn for<'r> FnMut(ReplayEvent<'r>) + Send),
    ) -> Result<u64, StoreError> {
        dialect!(self, s => s.replay_events(to, f).await)
    }

    /// Every grant as it was given, oldest first (for replay).
    pub async fn grant_history(&self) -> Result<Vec<GrantHistory>, StoreError> {
        dialect!(self, s => s.grant_history().await)
    }

    /// Row counts of the three datasets.
    pub async fn counts(&self) -> Result<LedgerCounts, StoreError> {
        dialect!(self, s => s.counts().await)
    }

    /// An account's most recent usage events, newest first.
    pub async fn usage_events(
        &self,
        account: &str,
        limit: u32,
    ) -> Result<Vec<UsageEventRow>, StoreError> {
        dialect!(self, s => s.usage_events(account, limit).await)
    }

    /// The grants of an account with their balances.
    pub async fn grants(&self, account: &str) -> Result<Vec<StoredGrant>, StoreError> {
        dialect!(self, s => s.grants(account).await)
    }
}

/// The ledger's rows in memory ([`Store::snapshot`]): every grant and balance update, and the
/// usage and monetization events decided since a point in time.
#[derive(Debug, Default)]
pub struct LedgerSnapshot {
    /// Every grant.
    pub grants: Vec<GrantRow>,
    /// Every balance update, in id order.
    pub balance_updates: Vec<BalanceUpdateRow>,
    /// Usage events decided since the snapshot's start that were charged or say they were.
    pub charged_usage: Vec<ChargedUsageRow>,
    /// Monetization events decided since the snapshot's start.
    pub monetization: Vec<MonetizationRow>,
    /// Every price version the ledger has stored.
    pub price_tables: Vec<StoredPriceTable>,
}

/// One price version of a plan, as the ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredPriceTable {
    /// The plan.
    pub plan: String,
    /// The version.
    pub version: String,
    /// From when it is in force (ms; `i64::MIN`: from the start).
    pub effective_from: i64,
    /// Its prices ([`crate::waterfall::PricesDoc`] as JSON).
    pub prices: String,
}

/// A grant row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct GrantRow {
    /// Id.
    pub id: i64,
    /// Owner.
    pub account_id: String,
    /// External id.
    pub external_id: String,
    /// Credits granted.
    pub amount: i64,
    /// Stored balance.
    pub balance: i64,
}

/// A balance-update row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BalanceUpdateRow {
    /// Id.
    pub id: i64,
    /// Account.
    pub account_id: String,
    /// Grant changed.
    pub grant_id: i64,
    /// `grant`, `debit`, `refund`, `expired` or `overdraft_forgiven`.
    pub reason: String,
    /// Change of the balance.
    pub delta: i64,
    /// Balance after the change.
    pub balance_after: i64,
    /// Credits forgiven.
    pub forgiven: i64,
    /// The charge it belongs to.
    pub monetization_event_id: Option<i64>,
}

/// A usage event that carries a charge key (it was charged).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ChargedUsageRow {
    /// Id.
    pub id: i64,
    /// Decision id.
    pub decision_id: String,
    /// Account.
    pub account_id: String,
    /// Feature.
    pub feature: String,
    /// Units used.
    pub units: i64,
    /// How it ended.
    pub outcome: String,
}

/// A monetization-event row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MonetizationRow {
    /// Id.
    pub id: i64,
    /// Its usage event.
    pub usage_event_id: i64,
    /// Account.
    pub account_id: String,
    /// Feature.
    pub feature: String,
    /// Units covered.
    pub units: i64,
    /// Credits from grants.
    pub credits: i64,
    /// Credits billed afterwards.
    pub postpaid_credits: i64,
    /// Price applied.
    pub credits_per_unit: i64,
    /// Plan name.
    pub plan: String,
    /// Price version.
    pub price_version: String,
    /// Draws (JSON).
    pub draws: String,
    /// Units estimated up front.
    pub estimated_units: i64,
    /// Units nobody could pay.
    pub forgiven_units: i64,
    /// When it was refunded, if it was.
    pub refunded_at: Option<i64>,
    /// The request's model, for a dimension-priced feature.
    pub model: Option<String>,
    /// What each dimension measured (JSON object), for a dimension-priced feature.
    pub dimensions: Option<String>,
}

/// An account's draws since `$2`: its charges not refunded, and its shadow decisions' window
/// and free-tier draws (counters, not money). Same text for both dialects.
///
/// The charges are found through the account's usage events (`usage_events_by_account`, then
/// each one's charge by `usage_event_id`): `monetization_events` has no index led by the
/// account, and asked directly it was read by time, every account's charges since `$2`, for
/// each account evaluated (an alert evaluation read 1 M rows to find one account's 1 000).
/// A charge's `decided_at` is its usage event's, so the rows are the same.
pub(crate) const ACCOUNT_DRAWS_SQL: &str = "SELECT draws FROM (
         SELECT m.id, m.draws FROM usage_events u
         JOIN monetization_events m ON m.usage_event_id = u.id
         WHERE u.account_id = $1 AND u.decided_at >= $2 AND m.refunded_at IS NULL
         UNION ALL
         SELECT id, shadow_draws AS draws FROM usage_events
         WHERE account_id = $1 AND decided_at >= $2 AND shadow_draws IS NOT NULL
     ) AS d ORDER BY id";

/// The snapshot's queries, the same text for both dialects (`$1` is understood by both).
pub(crate) mod snapshot_sql {
    pub const GRANTS: &str =
        "SELECT id, account_id, external_id, amount, balance FROM grants ORDER BY id";
    pub const BALANCE_UPDATES: &str = "SELECT id, account_id, grant_id, reason, delta, balance_after, forgiven, monetization_event_id FROM balance_updates ORDER BY id";
    pub const CHARGED_USAGE: &str = "SELECT id, decision_id, account_id, feature, units, outcome FROM usage_events WHERE charge_key IS NOT NULL AND decided_at >= $1 ORDER BY id";
    pub const MONETIZATION: &str = "SELECT id, usage_event_id, account_id, feature, units, credits, postpaid_credits, credits_per_unit, plan, price_version, draws, estimated_units, forgiven_units, refunded_at, model, dimensions FROM monetization_events WHERE decided_at >= $1 ORDER BY id";
    pub const PRICE_TABLES: &str = "SELECT plan, version, effective_from, prices FROM price_tables ORDER BY plan, effective_from";
}
