//! The SQLite ledger: one file, WAL mode, one writer at a time.
//!
//! sqlx leaves SQLite's journal mode and durability to us: the file runs in WAL mode with
//! `synchronous = NORMAL` (a committed transaction survives a crash of the process; a power
//! loss may take the last few), and write transactions open with `BEGIN IMMEDIATE` so that a
//! second writer waits for the lock (up to `busy_timeout`) instead of failing mid-transaction.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use super::{Committed, LedgerCounts, StoreError, StoredAccount, StoredGrant, UsageEventRow};
use crate::config::AccountSeed;
use crate::ledger::LedgerEntry;
use crate::waterfall::{Draw, GrantKind, Millis, Pool};

/// Connections in the pool: one writer (the ledger task) plus readers.
const POOL_CONNECTIONS_MAX: u32 = 4;
/// How long a writer waits for another's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// A ledger in one SQLite file.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) the database file at `path`.
    pub async fn open(path: &str) -> Result<SqliteStore, StoreError> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_CONNECTIONS_MAX)
            .connect_with(options)
            .await?;
        Ok(SqliteStore { pool })
    }

    pub(super) async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub(super) async fn seed(&self, seeds: &[AccountSeed], now: Millis) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for seed in seeds {
            sqlx::query(
                "INSERT INTO accounts (id, plan, suspended, created_at) VALUES (?, ?, ?, ?)
                 ON CONFLICT (id) DO UPDATE SET plan = excluded.plan, suspended = excluded.suspended",
            )
            .bind(&seed.id)
            .bind(&seed.plan)
            .bind(seed.suspended)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            for hash in &seed.key_hashes {
                sqlx::query(
                    "INSERT INTO api_keys (key_hash, account_id) VALUES (?, ?)
                     ON CONFLICT (key_hash) DO UPDATE SET account_id = excluded.account_id",
                )
                .bind(hash)
                .bind(&seed.id)
                .execute(&mut *tx)
                .await?;
            }
            for g in &seed.grants {
                let features = g
                    .features
                    .as_ref()
                    .map(|f| serde_json::to_string(f).unwrap_or_default());
                let inserted: Option<i64> = sqlx::query_scalar(
                    "INSERT INTO grants (account_id, external_id, kind, amount, balance, expires_at, priority, features, created_at)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                     ON CONFLICT (account_id, external_id) DO NOTHING RETURNING id",
                )
                .bind(&seed.id)
                .bind(&g.external_id)
                .bind(g.kind.as_str())
                .bind(g.amount as i64)
                .bind(g.amount as i64)
                .bind(g.expires_at)
                .bind(g.priority)
                .bind(features)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(grant_id) = inserted {
                    sqlx::query(
                        "INSERT INTO balance_updates (account_id, grant_id, reason, delta, balance_after, created_at)
                         VALUES (?, ?, 'grant', ?, ?, ?)",
                    )
                    .bind(&seed.id)
                    .bind(grant_id)
                    .bind(g.amount as i64)
                    .bind(g.amount as i64)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn load_accounts(&self) -> Result<Vec<StoredAccount>, StoreError> {
        let mut accounts: Vec<StoredAccount> =
            sqlx::query("SELECT id, plan, suspended FROM accounts ORDER BY id")
                .fetch_all(&self.pool)
                .await?
                .into_iter()
                .map(|r| StoredAccount {
                    id: r.get("id"),
                    plan: r.get("plan"),
                    suspended: r.get("suspended"),
                    key_hashes: Vec::new(),
                    grants: Vec::new(),
                })
                .collect();
        let index: HashMap<String, usize> = accounts
            .iter()
            .enumerate()
            .map(|(i, a)| (a.id.clone(), i))
            .collect();
        for r in sqlx::query("SELECT key_hash, account_id FROM api_keys")
            .fetch_all(&self.pool)
            .await?
        {
            if let Some(&i) = index.get(r.get::<&str, _>("account_id")) {
                accounts[i].key_hashes.push(r.get("key_hash"));
            }
        }
        for r in sqlx::query(GRANT_COLUMNS).fetch_all(&self.pool).await? {
            let account: String = r.get("account_id");
            if let Some(&i) = index.get(&account) {
                accounts[i].grants.push(grant_from_row(&r)?);
            }
        }
        Ok(accounts)
    }

    pub(super) async fn load_draws_since(
        &self,
        since: Millis,
    ) -> Result<Vec<(String, Vec<Draw>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT account_id, draws FROM monetization_events WHERE decided_at >= ? ORDER BY id",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                let draws: Vec<Draw> = serde_json::from_str(r.get("draws"))
                    .map_err(|e| StoreError::Corrupt(format!("monetization_events.draws: {e}")))?;
                Ok((r.get("account_id"), draws))
            })
            .collect()
    }

    pub(super) async fn commit(
        &self,
        batch: &[LedgerEntry],
        now: Millis,
    ) -> Result<Vec<Committed>, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut results = Vec::with_capacity(batch.len());
        for entry in batch {
            let key = entry.idempotency_key();
            let charged = entry.charged();
            let decision = entry.decision_json().to_string();
            let decision_id = entry.decision_id.to_string();
            let insert_usage = |outcome: &'static str, charge_key: Option<&str>| {
                sqlx::query_scalar::<_, i64>(
                    "INSERT INTO usage_events (decision_id, account_id, feature, units, outcome, code, upstream_status,
                         idempotency_key, charge_key, decision, decided_at, completed_at, recorded_at)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                     ON CONFLICT DO NOTHING RETURNING id",
                )
                .bind(decision_id.clone())
                .bind(entry.account.to_string())
                .bind(entry.feature.to_string())
                .bind(entry.decision.units as i64)
                .bind(outcome)
                .bind(entry.code)
                .bind(entry.upstream_status.map(i64::from))
                .bind(key.clone())
                .bind(charge_key.map(str::to_owned))
                .bind(decision.clone())
                .bind(entry.decided_at)
                .bind(entry.completed_at)
                .bind(now)
            };
            let usage_id = insert_usage(entry.outcome.as_str(), charged.then_some(key.as_str()))
                .fetch_optional(&mut *tx)
                .await?;
            let Some(usage_id) = usage_id else {
                let seen: Option<i64> =
                    sqlx::query_scalar("SELECT id FROM usage_events WHERE decision_id = ?")
                        .bind(&decision_id)
                        .fetch_optional(&mut *tx)
                        .await?;
                if seen.is_some() {
                    results.push(Committed::AlreadyRecorded);
                } else {
                    // The key was charged before: record this attempt, charge nothing.
                    insert_usage("duplicate", None)
                        .fetch_optional(&mut *tx)
                        .await?;
                    results.push(Committed::Duplicate);
                }
                continue;
            };
            if charged {
                self.charge(&mut tx, entry, usage_id, now).await?;
            }
            results.push(Committed::Recorded);
        }
        tx.commit().await?;
        Ok(results)
    }

    /// Writes a charge's monetization event and debits each grant it drew from, each debit
    /// with its balance update. What a grant no longer holds is forgiven, and recorded.
    async fn charge(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        entry: &LedgerEntry,
        usage_id: i64,
        now: Millis,
    ) -> Result<(), StoreError> {
        let d = &entry.decision;
        let mut grant_credits: HashMap<i64, u64> = HashMap::new();
        let mut postpaid = 0u64;
        for draw in &d.draws {
            match draw.pool {
                Pool::Grant { grant_id } => {
                    *grant_credits.entry(grant_id).or_default() += draw.credits
                }
                Pool::Postpaid => postpaid += draw.credits,
                _ => {}
            }
        }
        let draws = serde_json::to_string(&d.draws).unwrap_or_else(|_| "[]".into());
        let units: u64 = d.draws.iter().map(|x| x.units).sum();
        let monetization_id: i64 = sqlx::query_scalar(
            "INSERT INTO monetization_events (usage_event_id, account_id, feature, units, credits, postpaid_credits,
                 credits_per_unit, plan, price_version, draws, decided_at, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(usage_id)
        .bind(&*entry.account)
        .bind(&*entry.feature)
        .bind(units as i64)
        .bind(grant_credits.values().sum::<u64>() as i64)
        .bind(postpaid as i64)
        .bind(d.credits_per_unit as i64)
        .bind(&*entry.plan.name)
        .bind(&*entry.plan.price_version)
        .bind(draws)
        .bind(entry.decided_at)
        .bind(now)
        .fetch_one(&mut **tx)
        .await?;

        let mut grants: Vec<_> = grant_credits.into_iter().collect();
        grants.sort_unstable();
        for (grant_id, credits) in grants {
            let balance: Option<i64> =
                sqlx::query_scalar("SELECT balance FROM grants WHERE id = ? AND account_id = ?")
                    .bind(grant_id)
                    .bind(&*entry.account)
                    .fetch_optional(&mut **tx)
                    .await?;
            let Some(balance) = balance else {
                return Err(StoreError::Corrupt(format!(
                    "grant {grant_id} of account {} is missing",
                    entry.account
                )));
            };
            let take = balance.min(credits as i64);
            let forgiven = credits as i64 - take;
            let after = balance - take;
            debug_assert!(after >= 0);
            sqlx::query("UPDATE grants SET balance = ? WHERE id = ?")
                .bind(after)
                .bind(grant_id)
                .execute(&mut **tx)
                .await?;
            let update = |reason: &'static str, delta: i64, forgiven: i64| {
                sqlx::query(
                    "INSERT INTO balance_updates (account_id, grant_id, reason, delta, balance_after, forgiven, monetization_event_id, created_at)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(entry.account.to_string())
                .bind(grant_id)
                .bind(reason)
                .bind(delta)
                .bind(after)
                .bind(forgiven)
                .bind(monetization_id)
                .bind(now)
            };
            if take > 0 {
                update("debit", -take, 0).execute(&mut **tx).await?;
            }
            if forgiven > 0 {
                tracing::warn!(account = %entry.account, grant_id, forgiven, "overdraft forgiven");
                update("overdraft_forgiven", 0, forgiven)
                    .execute(&mut **tx)
                    .await?;
            }
        }
        Ok(())
    }

    pub(super) async fn counts(&self) -> Result<LedgerCounts, StoreError> {
        let r = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM usage_events) AS u, (SELECT COUNT(*) FROM monetization_events) AS m,
                    (SELECT COUNT(*) FROM balance_updates) AS b",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(LedgerCounts {
            usage_events: r.get::<i64, _>("u") as u64,
            monetization_events: r.get::<i64, _>("m") as u64,
            balance_updates: r.get::<i64, _>("b") as u64,
        })
    }

    pub(super) async fn usage_events(
        &self,
        account: &str,
        limit: u32,
    ) -> Result<Vec<UsageEventRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT u.decision_id, u.feature, u.units, u.outcome, u.code, u.upstream_status, u.decided_at,
                    m.id IS NOT NULL AS charged, COALESCE(m.credits, 0) AS credits
             FROM usage_events u LEFT JOIN monetization_events m ON m.usage_event_id = u.id
             WHERE u.account_id = ? ORDER BY u.id DESC LIMIT ?",
        )
        .bind(account)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| UsageEventRow {
                decision_id: r.get("decision_id"),
                feature: r.get("feature"),
                units: r.get::<i64, _>("units") as u64,
                outcome: r.get("outcome"),
                code: r.get("code"),
                upstream_status: r.get::<Option<i64>, _>("upstream_status").map(|s| s as u16),
                charged: r.get("charged"),
                credits: r.get::<i64, _>("credits") as u64,
                decided_at: r.get("decided_at"),
            })
            .collect())
    }

    pub(super) async fn grants(&self, account: &str) -> Result<Vec<StoredGrant>, StoreError> {
        sqlx::query(&format!("{GRANT_COLUMNS} WHERE account_id = ? ORDER BY id"))
            .bind(account)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(grant_from_row)
            .collect()
    }
}

const GRANT_COLUMNS: &str = "SELECT id, account_id, external_id, kind, amount, balance, expires_at, priority, features FROM grants";

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
