//! The PostgreSQL ledger: one database shared by every gateway replica.
//!
//! # Two writers, one ledger
//!
//! Several replicas commit batches to the same tables at once, at PostgreSQL's default
//! `READ COMMITTED` isolation. Nothing is double-applied and no balance update is lost because
//! of three mechanisms, none of which relies on the isolation level:
//!
//! - **The unique index on `usage_events.charge_key`, written with `ON CONFLICT DO NOTHING`.**
//!   A charge exists only if its usage event row exists. When two transactions insert the same
//!   key, the second waits on the first's uncommitted index entry; if the first commits, the
//!   second does nothing (and learns so from `RETURNING`, then records a `duplicate` usage event
//!   that charges nothing); if the first rolls back, the second inserts. The same holds for
//!   `decision_id`, which makes a retried batch whose commit did in fact succeed a no-op.
//! - **Row locks on the grants, taken with `SELECT … FOR UPDATE` in id order** before any
//!   debit. A second writer debiting the same grant waits until the first commits; then it
//!   reads the committed balance (a locked row is always re-read at its newest version).
//! - **Balances computed from the locked row**, never from a value read earlier or from the
//!   gateway's cache: the new balance and its balance-update row are written in the same
//!   transaction that holds the lock, so `balance == SUM(delta)` of its updates at every commit.
//!
//! No cycle of waits can form, so concurrent writers never deadlock: usage events are inserted
//! sorted by charge key (a writer waits on another's key only for keys smaller than all it
//! still has to insert), grants are locked sorted by id, and every key wait comes before any
//! grant lock in a transaction.
//!
//! # Round trips
//!
//! [`PostgresStore::commit`] costs the same handful of statements whatever the batch size: rows
//! travel as arrays (`UNNEST($1::text[], $2::bigint[], …)`), and debits are computed in Rust
//! from the locked balances, then written with one `UPDATE … FROM UNNEST` and one `INSERT`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, PgPool, Postgres, Row, Transaction};

use super::debit::{self, LockedGrant};
use super::shared::{to_bigint, to_unsigned};
use super::{
    CommitReport, Committed, GrantBalance, LedgerChange, LedgerSnapshot, Refund, StoreError,
    StoredGrant,
};
use crate::usage::LedgerEntry;
use crate::waterfall::{GrantKind, Millis, Pool};

/// Connections in the pool: one writer (the ledger task) plus readers (health checks, the
/// admin and user APIs). Each replica has its own pool: mind the server's `max_connections`.
const POOL_CONNECTIONS_MAX: u32 = 8;
/// How long a caller waits for a pooled connection (or a new one) before failing.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

mod api;
mod lease;
mod notify;

use notify::{announce_ledger, counts_usage};

/// A ledger in a PostgreSQL database.
#[derive(Clone, Debug)]
pub struct PostgresStore {
    /// The connection pool. Its `Debug` shows pool sizes only, never the URL or password.
    pool: PgPool,
    /// This process's id in balance notifications.
    replica: Arc<str>,
}

/// One usage event of a batch, with the id reserved for it.
struct UsageRow<'a> {
    /// Index of its entry in the batch.
    index: usize,
    /// Its row id, reserved from the table's sequence in batch order.
    id: i64,
    /// The entry it records.
    entry: &'a LedgerEntry,
    /// `entry.decision_id` as stored.
    decision_id: String,
    /// The entry's charge key (stored when charged; unique within the account).
    key: String,
    /// The `idempotency_key` column.
    idempotency_key: String,
    /// The decision as stored (JSON).
    decision: String,
}

/// The balance updates of one commit, as columns.
#[derive(Default)]
struct BalanceUpdates {
    account_id: Vec<String>,
    grant_id: Vec<i64>,
    reason: Vec<&'static str>,
    delta: Vec<i64>,
    balance_after: Vec<i64>,
    forgiven: Vec<i64>,
    monetization_event_id: Vec<i64>,
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://` or `postgresql://`). Errors never carry
    /// the URL: it may hold a password.
    pub async fn open(url: &str) -> Result<PostgresStore, StoreError> {
        let options = PgConnectOptions::from_str(url)?.application_name("flowgate");
        let pool = PgPoolOptions::new()
            .max_connections(POOL_CONNECTIONS_MAX)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        Ok(PostgresStore {
            pool,
            replica: uuid::Uuid::now_v7().simple().to_string().into(),
        })
    }

    /// Connects for reading only: every transaction of these connections is read-only
    /// (`default_transaction_read_only`), so the server refuses any write.
    pub async fn open_read_only(url: &str) -> Result<PostgresStore, StoreError> {
        // Its readers stream whole tables on purpose: sqlx's warning for a statement over a
        // second would fire on every run of a large ledger.
        let options = PgConnectOptions::from_str(url)?
            .application_name("flowgate-read-only")
            .options([("default_transaction_read_only", "on")])
            .disable_statement_logging();
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        Ok(PostgresStore {
            pool,
            replica: uuid::Uuid::now_v7().simple().to_string().into(),
        })
    }

    pub(super) async fn migrate(&self) -> Result<(), StoreError> {
        // sqlx holds an advisory lock while migrating: replicas starting together take turns.
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Commits a batch in one transaction: usage events, then monetization events, then debits
    /// (see the module's documentation for why concurrent replicas cannot double-apply).
    pub(super) async fn commit(
        &self,
        batch: &[LedgerEntry],
        now: Millis,
    ) -> Result<CommitReport, StoreError> {
        // Every entry ends up with a result; a repeat of a decision within the batch keeps this
        // one (its first occurrence records it), as it would if committed one by one.
        let mut report = CommitReport {
            results: vec![Committed::AlreadyRecorded; batch.len()],
            ..CommitReport::default()
        };
        let mut decisions = HashSet::with_capacity(batch.len());
        let firsts: Vec<usize> = (0..batch.len())
            .filter(|&i| decisions.insert(batch[i].decision_id))
            .collect();
        if firsts.is_empty() {
            return Ok(report);
        }

        let mut tx = self.pool.begin().await?;
        // Ids in batch order, so that a listing by id shows the batch in the order it happened,
        // although rows are inserted in charge-key order (see the module documentation).
        // With them, whether any billing-export sink is active (one round trip fewer: without
        // a sink the outbox's statement is skipped). A sink registered by another replica
        // while this commit runs is seen by the next commit, as it would have been had it
        // committed a moment later.
        // The sequence is named once (a subquery run once), not per id: calling
        // `pg_get_serial_sequence` for every row cost 4 µs an id, a tenth of the commit.
        let reserved: Vec<(i64, bool)> = sqlx::query_as(
            "SELECT nextval((SELECT pg_get_serial_sequence('usage_events', 'id'))::regclass),
                    EXISTS (SELECT 1 FROM export_sinks WHERE active)
             FROM generate_series(1::bigint, $1::bigint)",
        )
        .bind(to_bigint(firsts.len() as u64, "batch size")?)
        .fetch_all(&mut *tx)
        .await?;
        let export_sinks = reserved.first().is_some_and(|&(_, sinks)| sinks);
        let mut ids: Vec<i64> = reserved.into_iter().map(|(id, _)| id).collect();
        ids.sort_unstable();
        if ids.len() != firsts.len() {
            return Err(StoreError::Corrupt(format!(
                "asked for {} usage event ids, got {}",
                firsts.len(),
                ids.len()
            )));
        }
        let rows: Vec<UsageRow<'_>> = firsts
            .iter()
            .zip(ids)
            .map(|(&index, id)| {
                let entry = &batch[index];
                UsageRow {
                    index,
                    id,
                    entry,
                    decision_id: entry.decision_id.to_string(),
                    key: entry.charge_key(),
                    idempotency_key: entry.idempotency_column(),
                    decision: entry.decision_json(),
                }
            })
            .collect();

        let all: Vec<&UsageRow<'_>> = rows.iter().collect();
        let inserted: HashSet<i64> = insert_usage(&mut tx, &all, false, now)
            .await?
            .into_iter()
            .collect();
        let missed: Vec<&UsageRow<'_>> =
            rows.iter().filter(|r| !inserted.contains(&r.id)).collect();
        if !missed.is_empty() {
            // Not inserted: either this very decision is there already (a retried batch), or
            // its charge key was charged by another decision (a replay, another replica).
            let recorded: HashSet<String> = sqlx::query_scalar(
                "SELECT decision_id FROM usage_events WHERE decision_id = ANY($1)",
            )
            .bind(
                missed
                    .iter()
                    .map(|r| r.decision_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
            let duplicates: Vec<&UsageRow<'_>> = missed
                .into_iter()
                .filter(|r| !recorded.contains(&r.decision_id))
                .collect();
            if !duplicates.is_empty() {
                // Record each attempt, charge nothing.
                insert_usage(&mut tx, &duplicates, true, now).await?;
                for r in &duplicates {
                    report.results[r.index] = Committed::Duplicate;
                }
            }
        }

        let mut charges = Vec::new();
        // Shadow decisions' counted draws: no charge, but the other replicas count them too.
        let mut shadow_used = Vec::new();
        for r in &rows {
            if inserted.contains(&r.id) {
                report.results[r.index] = Committed::Recorded;
                if r.entry.charged() {
                    charges.push(r);
                } else if let Some(draws) = r.entry.shadow_draws() {
                    let account = r.entry.account.to_string();
                    shadow_used.extend(draws.into_iter().map(|d| (account.clone(), d)));
                }
            }
        }
        if !charges.is_empty() {
            charge(&mut tx, &self.replica, &charges, &mut report, now).await?;
        }
        if export_sinks && !charges.is_empty() {
            let accounts: Vec<&str> = charges
                .iter()
                .map(|r| &*r.entry.account)
                .collect::<std::collections::BTreeSet<&str>>()
                .into_iter()
                .collect();
            let usage_ids: Vec<i64> = charges.iter().map(|r| r.id).collect();
            outbox(&mut tx, &accounts, OutboxRows::Charges(&usage_ids), now).await?;
        }
        let change = LedgerChange {
            balances: report.balances.clone(),
            used: charges
                .iter()
                .flat_map(|r| {
                    let account = r.entry.account.as_str();
                    r.entry
                        .decision
                        .draws
                        .iter()
                        .filter(|d| counts_usage(d))
                        .map(move |d| (account.to_owned(), *d))
                })
                .chain(shadow_used)
                .collect(),
            refunded: Vec::new(),
            sent_at: now,
            xid: 0, // the listener reads the transaction from the notification
        };
        announce_ledger(&mut tx, &self.replica, &change).await?;
        tx.commit().await?;
        Ok(report)
    }

    /// A strict-mode lease round for `account` (see [`super::lease`]).
    pub(super) async fn lease_round(
        &self,
        account: &str,
        asks: &[super::lease::LeaseAsk],
        ttl_ms: u64,
        now: Millis,
    ) -> Result<super::lease::LeaseRound, StoreError> {
        lease::round(&self.pool, &self.replica, account, asks, ttl_ms, now).await
    }

    /// Renews this replica's leases; returns those renewed.
    pub(super) async fn renew_leases(
        &self,
        ttl_ms: u64,
    ) -> Result<Vec<super::lease::HeldLease>, StoreError> {
        lease::renew(&self.pool, &self.replica, ttl_ms).await
    }

    /// Sets this replica's leases of `account` to `kept`.
    pub(super) async fn keep_leases(
        &self,
        account: &str,
        kept: &[(crate::waterfall::LeasePool, u64)],
    ) -> Result<(), StoreError> {
        lease::keep(&self.pool, &self.replica, account, kept).await
    }

    /// Gives back every lease of this replica.
    pub(super) async fn drop_leases(&self) -> Result<(), StoreError> {
        lease::drop_all(&self.pool, &self.replica).await
    }

    /// Forgets usage counters older than `before`.
    pub(super) async fn prune_counters(&self, before: Millis) -> Result<u64, StoreError> {
        lease::prune_counters(&self.pool, before).await
    }

    /// Follows the other replicas' changes (see [`notify`]).
    pub(super) fn watch(&self) -> tokio::sync::mpsc::Receiver<super::Change> {
        notify::watch(self.pool.clone(), self.replica.clone())
    }

    pub(super) async fn expire_grants(&self, now: Millis) -> Result<Vec<GrantBalance>, StoreError> {
        // One statement: lock the due grants (in id order, like every debit), zero them, and
        // write each one's balance update.
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "WITH due AS (
                 SELECT id, account_id, balance FROM grants
                 WHERE expires_at IS NOT NULL AND expires_at <= $1 AND balance > 0
                 ORDER BY id FOR UPDATE
             ), zeroed AS (
                 UPDATE grants g SET balance = 0, version = g.version + 1
                 FROM due WHERE g.id = due.id
                 RETURNING due.id, due.account_id, due.balance, g.version
             ), recorded AS (
                 INSERT INTO balance_updates (account_id, grant_id, reason, delta, balance_after, created_at)
                 SELECT account_id, id, 'expired', -balance, 0, $1 FROM zeroed
             )
             SELECT account_id, id, version FROM zeroed",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let expired: Vec<GrantBalance> = rows
            .into_iter()
            .map(|(account, grant_id, version)| GrantBalance {
                account,
                grant_id,
                balance: 0,
                version: u64::try_from(version).ok(),
            })
            .collect();
        let change = LedgerChange {
            balances: expired.clone(),
            sent_at: now,
            ..LedgerChange::default()
        };
        announce_ledger(&mut tx, &self.replica, &change).await?;
        tx.commit().await?;
        Ok(expired)
    }

    pub(super) async fn refund(
        &self,
        decision_id: &str,
        now: Millis,
    ) -> Result<Refund, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Marking first makes a second refund of the same charge wait here, then find it done.
        let charge: Option<(i64, String, String)> = sqlx::query_as(
            "UPDATE monetization_events m SET refunded_at = $2
             FROM usage_events u
             WHERE u.id = m.usage_event_id AND u.decision_id = $1 AND m.refunded_at IS NULL
             RETURNING m.id, m.account_id, m.draws",
        )
        .bind(decision_id)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((charge_id, account, draws)) = charge else {
            let charged: Option<i64> = sqlx::query_scalar(
                "SELECT m.id FROM monetization_events m
                 JOIN usage_events u ON u.id = m.usage_event_id WHERE u.decision_id = $1",
            )
            .bind(decision_id)
            .fetch_optional(&mut *tx)
            .await?;
            return Ok(if charged.is_some() {
                Refund::AlreadyRefunded
            } else {
                Refund::NotCharged
            });
        };
        // Credit back each debited grant (locked in id order, like every debit) with its
        // balance update, in one statement.
        // The owner of each grant: the charged account, or the workspace whose pool it drew.
        let rows: Vec<(i64, i64, i64, String, i64)> = sqlx::query_as(
            "WITH debits AS (
                 SELECT grant_id, -delta AS taken FROM balance_updates
                 WHERE monetization_event_id = $1 AND reason = 'debit'
             ), locked AS (
                 SELECT g.id FROM grants g JOIN debits d ON d.grant_id = g.id ORDER BY g.id FOR UPDATE
             ), credited AS (
                 UPDATE grants g SET balance = g.balance + d.taken, version = g.version + 1
                 FROM debits d WHERE g.id = d.grant_id AND g.id IN (SELECT id FROM locked)
                 RETURNING g.id, d.taken, g.balance, g.account_id, g.version
             ), recorded AS (
                 INSERT INTO balance_updates (account_id, grant_id, reason, delta, balance_after, monetization_event_id, created_at)
                 SELECT $2, id, 'refund', taken, balance, $1, $3 FROM credited
                 RETURNING grant_id
             )
             SELECT id, taken, balance, account_id, version FROM credited",
        )
        .bind(charge_id)
        .bind(&account)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let mut credits = 0;
        let mut balances = Vec::with_capacity(rows.len());
        for (grant_id, taken, after, owner, version) in rows {
            credits += to_unsigned(taken, "refund")?;
            balances.push(GrantBalance {
                account: owner,
                grant_id,
                balance: to_unsigned(after, "grants.balance")?,
                version: Some(to_unsigned(version, "grants.version")?),
            });
        }
        let draws: Vec<crate::waterfall::Draw> = serde_json::from_str(&draws)
            .map_err(|e| StoreError::Corrupt(format!("monetization_events.draws: {e}")))?;
        lease::refund_usage(&mut tx, &self.replica, &account, &draws).await?;
        outbox(
            &mut tx,
            &[account.as_str()],
            OutboxRows::Refund(charge_id),
            now,
        )
        .await?;
        let change = LedgerChange {
            balances: balances.clone(),
            used: Vec::new(),
            refunded: draws
                .iter()
                .filter(|d| counts_usage(d))
                .map(|d| (account.clone(), *d))
                .collect(),
            sent_at: now,
            xid: 0, // the listener reads the transaction from the notification
        };
        announce_ledger(&mut tx, &self.replica, &change).await?;
        tx.commit().await?;
        Ok(Refund::Refunded {
            draws,
            account,
            balances,
            credits,
        })
    }

    pub(super) async fn snapshot(&self, since: Millis) -> Result<LedgerSnapshot, StoreError> {
        use super::snapshot_sql as q;
        // One snapshot: the four reads see one state of the ledger while replicas write.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
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

/// What [`outbox`] writes rows for.
enum OutboxRows<'a> {
    /// The charges of these usage events.
    Charges(&'a [i64]),
    /// The refund of this monetization event.
    Refund(i64),
}

/// Writes the billing export's outbox rows (one per active sink) in the transaction of the
/// charges or refund they export. First it locks each account's `export_streams` row, in
/// account order and after every other lock of the transaction (grants, strict accounts): the
/// rows' ids are drawn under that lock, so another replica's rows for the same account get
/// larger ids exactly when they commit later, and id order is each account's order. With no
/// active sink nothing is locked or written.
async fn outbox(
    tx: &mut Transaction<'_, Postgres>,
    accounts: &[&str],
    rows: OutboxRows<'_>,
    now: Millis,
) -> Result<(), StoreError> {
    let locked: Vec<String> = sqlx::query_scalar(
        "INSERT INTO export_streams (account_id)
         SELECT a FROM UNNEST($1::text[]) AS a
         WHERE EXISTS (SELECT 1 FROM export_sinks WHERE active)
         ORDER BY a
         ON CONFLICT (account_id) DO UPDATE SET account_id = excluded.account_id
         RETURNING account_id",
    )
    .bind(accounts)
    .fetch_all(&mut **tx)
    .await?;
    if locked.is_empty() {
        return Ok(());
    }
    match rows {
        OutboxRows::Charges(usage_ids) => {
            sqlx::query(
                "INSERT INTO export_outbox (sink, account_id, monetization_event_id, kind, created_at)
                 SELECT s.name, m.account_id, m.id, 'charge', $2
                 FROM monetization_events m JOIN export_sinks s ON s.active
                 WHERE m.usage_event_id = ANY($1) ORDER BY m.id, s.name",
            )
            .bind(usage_ids)
            .bind(now)
            .execute(&mut **tx)
            .await?;
        }
        OutboxRows::Refund(charge_id) => {
            sqlx::query(
                "INSERT INTO export_outbox (sink, account_id, monetization_event_id, kind, created_at)
                 SELECT name, $1, $2, 'refund', $3 FROM export_sinks WHERE active ORDER BY name",
            )
            .bind(accounts.first().copied().unwrap_or_default())
            .bind(charge_id)
            .bind(now)
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(())
}

/// Inserts usage events in one statement, sorted by charge key (so that two writers wait on
/// each other's keys in one order only), and returns the ids of the rows actually inserted: a
/// row whose decision id or charge key exists already is skipped. As `duplicate`, each row is
/// recorded with outcome `duplicate` and no charge key.
async fn insert_usage(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[&UsageRow<'_>],
    duplicate: bool,
    now: Millis,
) -> Result<Vec<i64>, StoreError> {
    let n = rows.len();
    let mut id = Vec::with_capacity(n);
    let mut decision_id = Vec::with_capacity(n);
    let mut account_id = Vec::with_capacity(n);
    let mut feature = Vec::with_capacity(n);
    let mut units = Vec::with_capacity(n);
    let mut outcome = Vec::with_capacity(n);
    let mut code = Vec::with_capacity(n);
    let mut upstream_status = Vec::with_capacity(n);
    let mut idempotency_key = Vec::with_capacity(n);
    let mut charge_key = Vec::with_capacity(n);
    let mut decision = Vec::with_capacity(n);
    let mut decided_at = Vec::with_capacity(n);
    let mut completed_at = Vec::with_capacity(n);
    let mut shadow = Vec::with_capacity(n);
    let mut shadow_draws = Vec::with_capacity(n);
    for r in rows {
        let e = r.entry;
        id.push(r.id);
        decision_id.push(r.decision_id.as_str());
        account_id.push(&*e.account);
        feature.push(&*e.feature);
        units.push(to_bigint(e.used_units, "usage_events.units")?);
        outcome.push(if duplicate {
            "duplicate"
        } else {
            e.outcome.as_str()
        });
        code.push(e.code);
        upstream_status.push(e.upstream_status.map(i64::from));
        idempotency_key.push(r.idempotency_key.as_str());
        charge_key.push((!duplicate && e.charged()).then_some(r.key.as_str()));
        decision.push(r.decision.as_str());
        decided_at.push(e.decided_at);
        completed_at.push(e.completed_at);
        shadow.push(e.shadow.map(crate::usage::Shadow::as_str));
        shadow_draws.push(e.shadow_draws_json());
    }
    let inserted = sqlx::query_scalar(
        "INSERT INTO usage_events (id, decision_id, account_id, feature, units, outcome, code, upstream_status,
             idempotency_key, charge_key, decision, decided_at, completed_at, recorded_at,
             shadow, shadow_draws)
         SELECT id, decision_id, account_id, feature, units, outcome, code, upstream_status,
             idempotency_key, charge_key, decision, decided_at, completed_at, $14, shadow, shadow_draws
         FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[],
                     $8::bigint[], $9::text[], $10::text[], $11::text[], $12::bigint[], $13::bigint[],
                     $15::text[], $16::text[])
              AS u(id, decision_id, account_id, feature, units, outcome, code, upstream_status,
                   idempotency_key, charge_key, decision, decided_at, completed_at, shadow, shadow_draws)
         ORDER BY account_id, charge_key, id
         ON CONFLICT DO NOTHING
         RETURNING id",
    )
    .bind(id)
    .bind(decision_id)
    .bind(account_id)
    .bind(feature)
    .bind(units)
    .bind(outcome)
    .bind(code)
    .bind(upstream_status)
    .bind(idempotency_key)
    .bind(charge_key)
    .bind(decision)
    .bind(decided_at)
    .bind(completed_at)
    .bind(now)
    .bind(shadow)
    .bind(shadow_draws)
    .fetch_all(&mut **tx)
    .await?;
    Ok(inserted)
}

/// Writes the monetization events of newly recorded charges, then debits each grant they drew
/// from, each debit with its balance update. What a grant no longer holds is forgiven, and
/// recorded (a row with delta 0).
async fn charge(
    tx: &mut Transaction<'_, Postgres>,
    replica: &str,
    charges: &[&UsageRow<'_>],
    report: &mut CommitReport,
    now: Millis,
) -> Result<(), StoreError> {
    let n = charges.len();
    let mut usage_event_id = Vec::with_capacity(n);
    let mut account_id = Vec::with_capacity(n);
    let mut feature = Vec::with_capacity(n);
    let mut units = Vec::with_capacity(n);
    let mut credits = Vec::with_capacity(n);
    let mut postpaid_credits = Vec::with_capacity(n);
    let mut credits_per_unit = Vec::with_capacity(n);
    let mut plan = Vec::with_capacity(n);
    let mut price_version = Vec::with_capacity(n);
    let mut draws = Vec::with_capacity(n);
    let mut decided_at = Vec::with_capacity(n);
    let mut estimated_units = Vec::with_capacity(n);
    let mut forgiven_units = Vec::with_capacity(n);
    let mut model = Vec::with_capacity(n);
    let mut dimensions = Vec::with_capacity(n);
    for r in charges {
        let e = r.entry;
        let d = &e.decision;
        let mut grant_credits = 0u64;
        let mut postpaid = 0u64;
        for draw in &d.draws {
            match draw.pool {
                Pool::Grant { .. } | Pool::Workspace { .. } => grant_credits += draw.credits,
                Pool::Postpaid => postpaid += draw.credits,
                _ => {}
            }
        }
        usage_event_id.push(r.id);
        account_id.push(&*e.account);
        feature.push(&*e.feature);
        units.push(to_bigint(
            d.draws.iter().map(|x| x.units).sum(),
            "monetization_events.units",
        )?);
        credits.push(to_bigint(grant_credits, "monetization_events.credits")?);
        postpaid_credits.push(to_bigint(postpaid, "monetization_events.postpaid_credits")?);
        credits_per_unit.push(to_bigint(
            d.credits_per_unit,
            "monetization_events.credits_per_unit",
        )?);
        plan.push(&*e.plan.name);
        price_version.push(e.price_version());
        draws.push(serde_json::to_string(&d.draws).unwrap_or_else(|_| "[]".into()));
        decided_at.push(e.decided_at);
        estimated_units.push(to_bigint(d.units, "monetization_events.estimated_units")?);
        forgiven_units.push(to_bigint(
            e.forgiven_units,
            "monetization_events.forgiven_units",
        )?);
        model.push(e.model.as_deref());
        dimensions.push(e.quantities_json());
    }
    let monetization: HashMap<i64, i64> = sqlx::query_as::<_, (i64, i64)>(
        "INSERT INTO monetization_events (usage_event_id, account_id, feature, units, credits, postpaid_credits,
             credits_per_unit, plan, price_version, draws, decided_at, created_at,
             estimated_units, forgiven_units, model, dimensions)
         SELECT usage_event_id, account_id, feature, units, credits, postpaid_credits,
             credits_per_unit, plan, price_version, draws, decided_at, $12,
             estimated_units, forgiven_units, model, dimensions
         FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[],
                     $7::bigint[], $8::text[], $9::text[], $10::text[], $11::bigint[],
                     $13::bigint[], $14::bigint[], $15::text[], $16::text[])
              WITH ORDINALITY
              AS m(usage_event_id, account_id, feature, units, credits, postpaid_credits,
                   credits_per_unit, plan, price_version, draws, decided_at,
                   estimated_units, forgiven_units, model, dimensions, ord)
         ORDER BY ord
         RETURNING usage_event_id, id",
    )
    .bind(&usage_event_id)
    .bind(account_id)
    .bind(feature)
    .bind(units)
    .bind(credits)
    .bind(postpaid_credits)
    .bind(credits_per_unit)
    .bind(plan)
    .bind(price_version)
    .bind(draws)
    .bind(decided_at)
    .bind(now)
    .bind(estimated_units)
    .bind(forgiven_units)
    .bind(model)
    .bind(dimensions)
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .collect();

    // Every grant of every account the batch debits, locked at once and in id order (two
    // writers that lock the same grants lock them in the same order). Each balance below is
    // the committed one; a shortfall may move to the account's other grants (`debit::plan`).
    // An account whose charges here drew no grant (its windows or free tier paid) is not
    // locked: replicas charging one busy account's window do not queue on its grant rows.
    let accounts: Vec<&str> = charges
        .iter()
        .filter(|r| {
            r.entry
                .decision
                .draws
                .iter()
                .any(|d| matches!(d.pool, Pool::Grant { .. }))
        })
        .map(|r| &*r.entry.account)
        .collect::<std::collections::BTreeSet<&str>>()
        .into_iter()
        .collect();
    // With them, every grant of each workspace whose grants a member drew (the owner found by
    // the drawn grant's id: a draw is debited where the engine took it). The accounts are a
    // set joined in, not `account_id = ANY($1) OR …`: under the prepared statement's generic
    // plan that was a scan of every grant comparing each with every account of the batch
    // (15 ms a batch of 500 accounts over 1 000 grants).
    let pool_grants = debit::pool_grant_ids(charges.iter().map(|r| r.entry));
    let mut locked: Vec<LockedGrant> = if accounts.is_empty() && pool_grants.is_empty() {
        Vec::new()
    } else {
        sqlx::query(&format!(
            "{GRANT_COLUMNS} WHERE account_id IN (
                 SELECT unnest($1::text[]) UNION SELECT account_id FROM grants WHERE id = ANY($2)
             )
             ORDER BY id FOR UPDATE"
        ))
        .bind(&accounts)
        .bind(&pool_grants)
        .fetch_all(&mut **tx)
        .await?
        .iter()
        .map(|r| {
            let g = grant_from_row(r)?;
            Ok(LockedGrant {
                id: g.id,
                account_id: r.get("account_id"),
                kind: g.kind,
                balance: to_bigint(g.balance, "grants.balance")?,
                expires_at: g.expires_at,
                priority: g.priority,
                features: g.features,
            })
        })
        .collect::<Result<_, StoreError>>()?
    };
    let entries: Vec<&LedgerEntry> = charges.iter().map(|r| r.entry).collect();
    lease::commit_usage(tx, replica, &entries).await?;

    // The debits, in batch order, each from the balance the previous one left.
    let mut updates = BalanceUpdates::default();
    let mut changed: BTreeMap<i64, i64> = BTreeMap::new();
    for r in charges {
        let account = &*r.entry.account;
        let monetization_id = *monetization.get(&r.id).ok_or_else(|| {
            StoreError::Corrupt(format!("no monetization event for usage event {}", r.id))
        })?;
        for debit in debit::plan(r.entry, &mut locked)? {
            let owner = debit::owner_of(&locked, debit.grant_id)
                .unwrap_or(account)
                .to_owned();
            let mut push = |reason: &'static str, delta: i64, forgiven: i64| {
                updates.account_id.push(account.to_owned());
                updates.grant_id.push(debit.grant_id);
                updates.reason.push(reason);
                updates.delta.push(delta);
                updates.balance_after.push(debit.balance_after);
                updates.forgiven.push(forgiven);
                updates.monetization_event_id.push(monetization_id);
            };
            if debit.taken > 0 {
                push("debit", -debit.taken, 0);
            }
            if debit.forgiven > 0 {
                tracing::warn!(account = %account, grant_id = debit.grant_id, forgiven = debit.forgiven, "overdraft forgiven");
                push("overdraft_forgiven", 0, debit.forgiven);
                report.forgiven += to_unsigned(debit.forgiven, "forgiven")?;
            }
            changed.insert(debit.grant_id, debit.balance_after);
            report.set_balance(&owner, debit.grant_id, debit.balance_after);
        }
    }
    if updates.grant_id.is_empty() {
        return Ok(());
    }

    // Every grant the batch recorded an update of moves one version up, its balance changed
    // or not (a forgiven shortfall leaves it at 0): one rule, and the version is what the
    // view orders balances by.
    let (ids, balances): (Vec<i64>, Vec<i64>) = changed.into_iter().unzip();
    let versions: Vec<(i64, i64)> = sqlx::query_as(
        "UPDATE grants AS g SET balance = n.balance, version = g.version + 1
         FROM UNNEST($1::bigint[], $2::bigint[]) AS n(id, balance)
         WHERE g.id = n.id
         RETURNING g.id, g.version",
    )
    .bind(ids)
    .bind(balances)
    .fetch_all(&mut **tx)
    .await?;
    report.set_versions(&versions);
    sqlx::query(
        "INSERT INTO balance_updates (account_id, grant_id, reason, delta, balance_after, forgiven,
             monetization_event_id, created_at)
         SELECT account_id, grant_id, reason, delta, balance_after, forgiven, monetization_event_id, $8
         FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[],
                     $7::bigint[])
              WITH ORDINALITY
              AS b(account_id, grant_id, reason, delta, balance_after, forgiven, monetization_event_id, ord)
         ORDER BY ord",
    )
    .bind(updates.account_id)
    .bind(updates.grant_id)
    .bind(updates.reason)
    .bind(updates.delta)
    .bind(updates.balance_after)
    .bind(updates.forgiven)
    .bind(updates.monetization_event_id)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

const GRANT_COLUMNS: &str = "SELECT id, account_id, external_id, kind, amount, balance, version, expires_at, priority, features FROM grants";

fn grant_from_row(r: &PgRow) -> Result<StoredGrant, StoreError> {
    let kind: String = r.get("kind");
    let features: Option<String> = r.get("features");
    let priority: i64 = r.get("priority");
    Ok(StoredGrant {
        id: r.get("id"),
        external_id: r.get("external_id"),
        kind: GrantKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("grants.kind = {kind:?}")))?,
        amount: to_unsigned(r.get("amount"), "grants.amount")?,
        balance: to_unsigned(r.get("balance"), "grants.balance")?,
        version: to_unsigned(r.get("version"), "grants.version")?,
        expires_at: r.get("expires_at"),
        priority: i32::try_from(priority)
            .map_err(|_| StoreError::Corrupt(format!("grants.priority = {priority}")))?,
        features: features
            .map(|f| {
                serde_json::from_str(&f)
                    .map_err(|e| StoreError::Corrupt(format!("grants.features: {e}")))
            })
            .transpose()?,
    })
}
