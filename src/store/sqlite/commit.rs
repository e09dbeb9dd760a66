//! The SQLite commit of a ledger batch: a fixed handful of statements per batch, whatever its
//! size.
//!
//! sqlx runs SQLite on a worker thread, so every statement is a round trip to it; one statement
//! per row capped the writer at a few thousand events a second. The batch is instead classified
//! in memory and written with multi-row inserts. That is sound because `BEGIN IMMEDIATE` holds
//! the database's write lock for the whole transaction: what its first reads see (which
//! decisions and charge keys exist, the grants' balances, the highest ids) stays true until it
//! commits, so ids can be assigned here and each entry's result is known before anything is
//! written. The unique keys stay in the schema and would fail the batch (which is then retried)
//! if this reasoning were ever wrong; they never let a charge through twice.

use std::collections::{HashMap, HashSet};

use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool, Transaction};

use super::{GRANT_COLUMNS, locked_from_row};
use crate::store::debit::{self, LockedGrant};
use crate::store::{CommitReport, Committed, StoreError};
use crate::usage::LedgerEntry;
use crate::waterfall::{Millis, Pool};

/// Rows per multi-row statement: at most 17 parameters a row keeps it far below SQLite's limit
/// of 32,766 parameters per statement.
const ROWS_PER_STATEMENT: usize = 256;

/// A statement of fewer rows has a multiple of this many, or fewer than this many (see
/// [`statement_chunks`]).
const ROWS_STEP: usize = 16;

/// The writer connection's cache of prepared statements (sqlx's default is 100): the batch's
/// statements in each of their row counts ([`statement_chunks`]: 31 per statement) fit.
pub(crate) const STATEMENT_CACHE: usize = 512;

/// `rows` in the chunks a multi-row statement takes: full ones of [`ROWS_PER_STATEMENT`], then
/// what is left as a multiple of [`ROWS_STEP`] and a remainder below it.
///
/// A multi-row statement's SQL text names its row count, and sqlx prepares each text once per
/// connection and keeps it in a cache. With every count from 1 to 256 for each table, the cache
/// thrashed: the SQLite thread spent a fifth of its time parsing SQL (`sqlite3RunParser`,
/// `perf` of `benches/proxy.sh`). These chunks give 31 texts per statement, all kept.
fn statement_chunks<T>(rows: &[T]) -> impl Iterator<Item = &[T]> {
    let full = rows.len() / ROWS_PER_STATEMENT * ROWS_PER_STATEMENT;
    let stepped = full + (rows.len() - full) / ROWS_STEP * ROWS_STEP;
    let (whole, rest) = rows.split_at(full);
    let (stepped, under) = rest.split_at(stepped - full);
    whole
        .chunks(ROWS_PER_STATEMENT)
        .chain([stepped, under].into_iter().filter(|c| !c.is_empty()))
}

/// A usage event to insert.
struct UsageRow<'a> {
    id: i64,
    entry: &'a LedgerEntry,
    decision_id: String,
    /// The `idempotency_key` column.
    idempotency_key: String,
    outcome: &'static str,
    /// The charge key (unique within the account) when this event is the charge for it.
    charge_key: Option<&'a str>,
}

/// A monetization event to insert.
struct MonetizationRow<'a> {
    id: i64,
    usage_event_id: i64,
    entry: &'a LedgerEntry,
    units: u64,
    credits: u64,
    postpaid: u64,
    draws: String,
}

/// A balance update to insert.
struct UpdateRow<'a> {
    account: &'a str,
    grant_id: i64,
    reason: &'static str,
    delta: i64,
    balance_after: i64,
    forgiven: i64,
    monetization_event_id: i64,
}

pub(super) async fn commit(
    pool: &SqlitePool,
    batch: &[LedgerEntry],
    now: Millis,
) -> Result<CommitReport, StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let mut report = CommitReport {
        results: Vec::with_capacity(batch.len()),
        ..CommitReport::default()
    };

    // Which entries are recorded already, and which keys were charged already.
    let keys: Vec<String> = batch.iter().map(LedgerEntry::charge_key).collect();
    let decision_ids: Vec<String> = batch.iter().map(|e| e.decision_id.to_string()).collect();
    let mut recorded = existing(&mut tx, "decision_id", decision_ids.iter()).await?;
    // Only a client's key can have been charged by another decision: a gateway-assigned key
    // is the decision id, found above if recorded (migration 0012).
    let charged_keys = batch
        .iter()
        .zip(&keys)
        .filter(|(e, _)| e.charged() && e.idempotency_key.is_some())
        .map(|(e, k)| (e.account.as_str(), k.as_str()));
    let mut charged = existing_charges(&mut tx, charged_keys).await?;

    // Classify in batch order, as if the entries were committed one by one.
    let tops = tops(&mut tx).await?;
    let mut next_id = tops.usage_events + 1;
    let mut usage = Vec::with_capacity(batch.len());
    for ((entry, key), decision_id) in batch.iter().zip(&keys).zip(decision_ids) {
        if !recorded.insert(decision_id.clone()) {
            report.results.push(Committed::AlreadyRecorded);
            continue;
        }
        let row = |outcome, charge_key| UsageRow {
            id: next_id,
            entry,
            decision_id,
            idempotency_key: entry.idempotency_column(),
            outcome,
            charge_key,
        };
        if !entry.charged() {
            usage.push(row(entry.outcome.as_str(), None));
            report.results.push(Committed::Recorded);
        } else if charged.insert((entry.account.to_string(), key.clone())) {
            usage.push(row(entry.outcome.as_str(), Some(key.as_str())));
            report.results.push(Committed::Recorded);
        } else {
            // The key was charged before: record this attempt, charge nothing.
            usage.push(row("duplicate", None));
            report.results.push(Committed::Duplicate);
        }
        next_id += 1;
    }
    insert_usage(&mut tx, &usage, now).await?;

    // The charges: debits against the grants as committed, read once per account.
    let charges: Vec<&UsageRow<'_>> = usage.iter().filter(|r| r.charge_key.is_some()).collect();
    // The workspaces whose grants the charges drew are read too (their owners by grant id,
    // whatever a member's workspace is now).
    let owners = owners_of(
        &mut tx,
        &debit::pool_grant_ids(charges.iter().map(|r| r.entry)),
    )
    .await?;
    let mut grants = grants_of(
        &mut tx,
        charges
            .iter()
            .map(|r| &*r.entry.account)
            .chain(owners.iter().map(String::as_str)),
    )
    .await?;
    let mut monetization = Vec::with_capacity(charges.len());
    let mut updates = Vec::new();
    let mut balances: HashMap<i64, i64> = HashMap::new();
    for (next_id, row) in (tops.monetization_events + 1..).zip(charges) {
        let entry = row.entry;
        let d = &entry.decision;
        let (mut credits, mut postpaid) = (0, 0);
        for draw in &d.draws {
            match draw.pool {
                Pool::Grant { .. } | Pool::Workspace { .. } => credits += draw.credits,
                Pool::Postpaid => postpaid += draw.credits,
                _ => {}
            }
        }
        monetization.push(MonetizationRow {
            id: next_id,
            usage_event_id: row.id,
            entry,
            units: d.draws.iter().map(|x| x.units).sum(),
            credits,
            postpaid,
            draws: serde_json::to_string(&d.draws).unwrap_or_else(|_| "[]".into()),
        });
        // The entry's own grants, with those of the workspaces it drew: one slice to plan on.
        let mut account_grants = grants.remove(&*entry.account).unwrap_or_default();
        let drawn = debit::pool_grant_ids(std::iter::once(entry));
        let pools: Vec<String> = owners
            .iter()
            .filter(|o| **o != *entry.account)
            .filter(|o| {
                grants
                    .get(o.as_str())
                    .is_some_and(|g| g.iter().any(|g| drawn.contains(&g.id)))
            })
            .cloned()
            .collect();
        for owner in &pools {
            account_grants.extend(grants.remove(owner.as_str()).unwrap_or_default());
        }
        let planned = debit::plan(entry, &mut account_grants);
        let mut owner_of = HashMap::new();
        for g in &account_grants {
            owner_of.insert(g.id, g.account_id.clone());
        }
        for g in account_grants {
            grants.entry(g.account_id.clone()).or_default().push(g);
        }
        for debit in planned? {
            let owner = owner_of
                .get(&debit.grant_id)
                .map_or(&*entry.account, String::as_str)
                .to_owned();
            let update = |reason, delta, forgiven| UpdateRow {
                account: &entry.account,
                grant_id: debit.grant_id,
                reason,
                delta,
                balance_after: debit.balance_after,
                forgiven,
                monetization_event_id: next_id,
            };
            if debit.taken > 0 {
                updates.push(update("debit", -debit.taken, 0));
            }
            if debit.forgiven > 0 {
                tracing::warn!(account = %entry.account, grant_id = debit.grant_id, forgiven = debit.forgiven, "overdraft forgiven");
                updates.push(update("overdraft_forgiven", 0, debit.forgiven));
                report.forgiven += debit.forgiven as u64;
            }
            balances.insert(debit.grant_id, debit.balance_after);
            report.set_balance(&owner, debit.grant_id, debit.balance_after);
        }
    }
    insert_monetization(&mut tx, &monetization, now).await?;
    if let (true, Some(first), Some(last)) =
        (tops.export_sinks, monetization.first(), monetization.last())
    {
        // The billing export's outbox, in this transaction: one row per charge and active
        // sink, in id order (SQLite has one writer: ids are commit order).
        sqlx::query(
            "INSERT INTO export_outbox (sink, account_id, monetization_event_id, kind, created_at)
             SELECT s.name, m.account_id, m.id, 'charge', $1
             FROM monetization_events m JOIN export_sinks s ON s.active
             WHERE m.id BETWEEN $2 AND $3 ORDER BY m.id, s.name",
        )
        .bind(now)
        .bind(first.id)
        .bind(last.id)
        .execute(&mut *tx)
        .await?;
    }
    let versions = update_balances(&mut tx, &balances).await?;
    report.set_versions(&versions);
    insert_updates(&mut tx, &updates, now).await?;
    tx.commit().await?;
    Ok(report)
}

/// `SELECT column FROM usage_events WHERE column IN (values)`: which of the values are there.
fn push_recorded_lookup<'q>(
    q: &mut QueryBuilder<'q, Sqlite>,
    column: &str,
    values: impl Iterator<Item = &'q str>,
) {
    q.push(format_args!(
        "SELECT {column} FROM usage_events WHERE {column} IN ("
    ));
    let mut list = q.separated(", ");
    for v in values {
        list.push_bind(v);
    }
    q.push(")");
}

/// Which of the (account, client charge key) pairs are in `usage_events`.
///
/// `charge_key LIKE 'k:%'` is the partial unique index's own condition, which SQLite needs to
/// see in the query before it uses that index. The pairs are a subquery, `IN (SELECT column1,
/// column2 FROM (VALUES ...))`, not a bare `IN (VALUES ...)`: for the bare list SQLite 3.40's
/// planner scans the whole index, testing each entry against the list (30 ms a commit at
/// 200 000 events, growing with the ledger). The bundled 3.46 searches either form; both
/// search the subquery, and a test holds the plan to a search.
fn push_charges_lookup<'q>(q: &mut QueryBuilder<'q, Sqlite>, pairs: &[(&'q str, &'q str)]) {
    q.push(
        "SELECT account_id, charge_key FROM usage_events \
         WHERE charge_key LIKE 'k:%' \
           AND (account_id, charge_key) IN (SELECT column1, column2 FROM (VALUES ",
    );
    let mut list = q.separated(", ");
    for (account, key) in pairs {
        list.push("(")
            .push_bind_unseparated(*account)
            .push_unseparated(", ")
            .push_bind_unseparated(*key)
            .push_unseparated(")");
    }
    q.push("))");
}

/// The values among `values` that `column` of usage_events already holds.
async fn existing<'a>(
    tx: &mut Transaction<'_, Sqlite>,
    column: &str,
    values: impl Iterator<Item = &'a String>,
) -> Result<HashSet<String>, StoreError> {
    let values: Vec<&String> = values.collect();
    let mut found = HashSet::new();
    for chunk in statement_chunks(&values) {
        let mut q = QueryBuilder::<Sqlite>::new("");
        push_recorded_lookup(&mut q, column, chunk.iter().map(|v| v.as_str()));
        for r in q.build().fetch_all(&mut **tx).await? {
            found.insert(r.try_get::<String, _>(0)?);
        }
    }
    Ok(found)
}

/// Which of the (account, charge key) pairs were charged already.
async fn existing_charges<'a>(
    tx: &mut Transaction<'_, Sqlite>,
    pairs: impl Iterator<Item = (&'a str, &'a str)>,
) -> Result<HashSet<(String, String)>, StoreError> {
    let pairs: Vec<(&str, &str)> = pairs.collect();
    let mut found = HashSet::new();
    for chunk in statement_chunks(&pairs) {
        let mut q = QueryBuilder::<Sqlite>::new("");
        push_charges_lookup(&mut q, chunk);
        for r in q.build().fetch_all(&mut **tx).await? {
            found.insert((r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?));
        }
    }
    Ok(found)
}

/// What the transaction's writes start from, read in one statement (each statement is a round
/// trip to SQLite's worker thread).
struct Tops {
    /// The highest usage event id (0 when none).
    usage_events: i64,
    /// The highest monetization event id (0 when none).
    monetization_events: i64,
    /// Whether any billing-export sink is active: without one the outbox statement is skipped.
    export_sinks: bool,
}

async fn tops(tx: &mut Transaction<'_, Sqlite>) -> Result<Tops, StoreError> {
    let (usage_events, monetization_events, export_sinks): (Option<i64>, Option<i64>, bool) =
        sqlx::query_as(
            "SELECT (SELECT MAX(id) FROM usage_events), (SELECT MAX(id) FROM monetization_events),
                    EXISTS (SELECT 1 FROM export_sinks WHERE active)",
        )
        .fetch_one(&mut **tx)
        .await?;
    Ok(Tops {
        usage_events: usage_events.unwrap_or(0),
        monetization_events: monetization_events.unwrap_or(0),
        export_sinks,
    })
}

/// The accounts owning the given grants.
async fn owners_of(
    tx: &mut Transaction<'_, Sqlite>,
    grant_ids: &[i64],
) -> Result<Vec<String>, StoreError> {
    let mut owners: Vec<String> = Vec::new();
    for chunk in statement_chunks(grant_ids) {
        let mut q =
            QueryBuilder::<Sqlite>::new("SELECT DISTINCT account_id FROM grants WHERE id IN (");
        let mut list = q.separated(", ");
        for id in chunk {
            list.push_bind(*id);
        }
        q.push(")");
        for r in q.build().fetch_all(&mut **tx).await? {
            let owner: String = r.try_get(0)?;
            if !owners.contains(&owner) {
                owners.push(owner);
            }
        }
    }
    Ok(owners)
}

/// Every grant of the given accounts, by account.
async fn grants_of<'a>(
    tx: &mut Transaction<'_, Sqlite>,
    accounts: impl Iterator<Item = &'a str>,
) -> Result<HashMap<String, Vec<LockedGrant>>, StoreError> {
    let accounts: Vec<&str> = accounts
        .collect::<HashSet<_>>()
        .into_iter()
        .collect::<Vec<_>>();
    let mut grants: HashMap<String, Vec<LockedGrant>> = HashMap::new();
    for chunk in statement_chunks(&accounts) {
        let mut q = QueryBuilder::<Sqlite>::new(GRANT_COLUMNS);
        q.push(" WHERE account_id IN (");
        let mut list = q.separated(", ");
        for a in chunk {
            list.push_bind(*a);
        }
        q.push(") ORDER BY id");
        for r in q.build().fetch_all(&mut **tx).await? {
            let grant = locked_from_row(&r)?;
            grants
                .entry(grant.account_id.clone())
                .or_default()
                .push(grant);
        }
    }
    Ok(grants)
}

async fn insert_usage(
    tx: &mut Transaction<'_, Sqlite>,
    rows: &[UsageRow<'_>],
    now: Millis,
) -> Result<(), StoreError> {
    for chunk in statement_chunks(rows) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO usage_events (id, decision_id, account_id, feature, units, outcome, code,
                 upstream_status, idempotency_key, charge_key, decision, decided_at, completed_at, recorded_at,
                 shadow, shadow_draws) ",
        );
        q.push_values(chunk, |mut b, r| {
            let e = r.entry;
            b.push_bind(r.id)
                .push_bind(r.decision_id.as_str())
                .push_bind(&*e.account)
                .push_bind(&*e.feature)
                .push_bind(e.used_units as i64)
                .push_bind(r.outcome)
                .push_bind(e.code)
                .push_bind(e.upstream_status.map(i64::from))
                .push_bind(r.idempotency_key.as_str())
                .push_bind(r.charge_key)
                .push_bind(e.decision_json())
                .push_bind(e.decided_at)
                .push_bind(e.completed_at)
                .push_bind(now)
                .push_bind(e.shadow.map(crate::usage::Shadow::as_str))
                .push_bind(e.shadow_draws_json());
        });
        q.build().execute(&mut **tx).await?;
    }
    Ok(())
}

async fn insert_monetization(
    tx: &mut Transaction<'_, Sqlite>,
    rows: &[MonetizationRow<'_>],
    now: Millis,
) -> Result<(), StoreError> {
    for chunk in statement_chunks(rows) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO monetization_events (id, usage_event_id, account_id, feature, units, credits,
                 postpaid_credits, credits_per_unit, plan, price_version, draws, decided_at, created_at,
                 estimated_units, forgiven_units, model, dimensions) ",
        );
        q.push_values(chunk, |mut b, r| {
            let e = r.entry;
            b.push_bind(r.id)
                .push_bind(r.usage_event_id)
                .push_bind(&*e.account)
                .push_bind(&*e.feature)
                .push_bind(r.units as i64)
                .push_bind(r.credits as i64)
                .push_bind(r.postpaid as i64)
                .push_bind(e.decision.credits_per_unit as i64)
                .push_bind(&*e.plan.name)
                .push_bind(e.price_version())
                .push_bind(r.draws.as_str())
                .push_bind(e.decided_at)
                .push_bind(now)
                .push_bind(e.decision.units as i64)
                .push_bind(e.forgiven_units as i64)
                .push_bind(e.model.as_deref())
                .push_bind(e.quantities_json());
        });
        q.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Sets each grant's balance to its value after the batch, one version up; returns each
/// grant's new version.
async fn update_balances(
    tx: &mut Transaction<'_, Sqlite>,
    balances: &HashMap<i64, i64>,
) -> Result<Vec<(i64, i64)>, StoreError> {
    let balances: Vec<(&i64, &i64)> = balances.iter().collect();
    let mut versions = Vec::with_capacity(balances.len());
    for chunk in statement_chunks(&balances) {
        let mut q = QueryBuilder::<Sqlite>::new("WITH v(id, balance) AS (");
        q.push_values(chunk, |mut b, (id, balance)| {
            b.push_bind(**id).push_bind(**balance);
        });
        q.push(
            ") UPDATE grants SET balance = v.balance, version = version + 1 FROM v
             WHERE grants.id = v.id RETURNING id, version",
        );
        versions.extend(
            q.build_query_as::<(i64, i64)>()
                .fetch_all(&mut **tx)
                .await?,
        );
    }
    Ok(versions)
}

async fn insert_updates(
    tx: &mut Transaction<'_, Sqlite>,
    rows: &[UpdateRow<'_>],
    now: Millis,
) -> Result<(), StoreError> {
    for chunk in statement_chunks(rows) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO balance_updates (account_id, grant_id, reason, delta, balance_after, forgiven,
                 monetization_event_id, created_at) ",
        );
        q.push_values(chunk, |mut b, r| {
            b.push_bind(r.account)
                .push_bind(r.grant_id)
                .push_bind(r.reason)
                .push_bind(r.delta)
                .push_bind(r.balance_after)
                .push_bind(r.forgiven)
                .push_bind(r.monetization_event_id)
                .push_bind(now);
        });
        q.build().execute(&mut **tx).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{
        ROWS_PER_STATEMENT, STATEMENT_CACHE, push_charges_lookup, push_recorded_lookup,
        statement_chunks,
    };
    use crate::store::sqlite::test_support::{migrated, plan};
    use sqlx::QueryBuilder;

    /// Every commit asks which of its decisions and charge keys are recorded already. Asked
    /// against the whole ledger, not by index, that question costs a commit time in
    /// proportion to every event ever recorded.
    #[tokio::test]
    async fn the_writers_look_ups_search_the_ledgers_indexes_never_scan_them() {
        let (_dir, store) = migrated().await;

        let pairs = [("acct-1", "k:a"), ("acct-2", "k:b"), ("acct-1", "k:c")];
        let mut q = QueryBuilder::new("EXPLAIN QUERY PLAN ");
        push_charges_lookup(&mut q, &pairs);
        let charges = plan(&store, q.build()).await;
        let mut q = QueryBuilder::new("EXPLAIN QUERY PLAN ");
        push_recorded_lookup(&mut q, "decision_id", ["a", "b"].into_iter());
        let recorded = plan(&store, q.build()).await;

        for (what, index, plan) in [
            ("charges", "usage_events_client_charge", &charges),
            ("decisions", "sqlite_autoindex_usage_events_1", &recorded),
        ] {
            let search = format!("SEARCH usage_events USING COVERING INDEX {index} ");
            assert!(
                plan.iter().any(|step| step.starts_with(&search)),
                "{what}: {plan:?}"
            );
            assert!(
                !plan
                    .iter()
                    .any(|step| step.starts_with("SCAN usage_events")),
                "{what} scans the ledger: {plan:?}"
            );
        }
    }

    #[test]
    fn chunks_cover_every_row_in_few_row_counts() {
        let mut counts = std::collections::BTreeSet::new();
        for n in 0..=3 * ROWS_PER_STATEMENT + 37 {
            let rows: Vec<usize> = (0..n).collect();
            let chunks: Vec<&[usize]> = statement_chunks(&rows).collect();
            assert_eq!(chunks.concat(), rows, "{n} rows");
            assert!(
                chunks.iter().all(|c| !c.is_empty()),
                "{n} rows: an empty statement"
            );
            let short = chunks
                .iter()
                .filter(|c| c.len() < ROWS_PER_STATEMENT)
                .count();
            assert!(short <= 2, "{n} rows: {short} short statements");
            counts.extend(chunks.iter().map(|c| c.len()));
        }
        assert_eq!(counts.len(), 31, "{counts:?}");
        // Every statement of the batch in every count, and room to spare.
        assert!(8 * counts.len() < STATEMENT_CACHE);
    }
}
