//! Strict mode's leases on PostgreSQL (the rule is [`crate::store::lease`]).
//!
//! Locks: a lease round locks the account row (`FOR UPDATE`) and only then reads committed
//! usage and every replica's leases; a commit of a strict account's charges takes the same
//! lock (after its grant locks) before it adds to `usage_counters` and takes from its leases.
//! So a round never sees a charge half turned from lease into usage. Renewals take no lock they
//! would wait for (`SKIP LOCKED`), so they close no cycle with rounds that delete lapsed leases.

use std::collections::HashMap;

use sqlx::{PgPool, Postgres, Transaction};

use super::super::StoreError;
use super::super::lease::{
    self, HeldLease, LeaseAsk, LeaseGrant, LeaseLimit, LeaseRound, parse_pool_key, pool_key,
};
use super::super::shared::{to_bigint, to_unsigned};
use crate::usage::LedgerEntry;
use crate::waterfall::{LeasePool, MINUTE_MS, Millis, Pool};

/// A lease round for `account` (see [`lease`]).
pub(super) async fn round(
    pool: &PgPool,
    replica: &str,
    account: &str,
    asks: &[LeaseAsk],
    ttl_ms: u64,
    now: Millis,
) -> Result<LeaseRound, StoreError> {
    let mut tx = pool.begin().await?;
    let found: Option<String> =
        sqlx::query_scalar("SELECT id FROM accounts WHERE id = $1 FOR UPDATE")
            .bind(account)
            .fetch_optional(&mut *tx)
            .await?;
    if found.is_none() {
        return Ok(LeaseRound::default());
    }
    sqlx::query("DELETE FROM leases WHERE account_id = $1 AND expires_at < now()")
        .bind(account)
        .execute(&mut *tx)
        .await?;
    let leased: Vec<(String, i64)> = sqlx::query_as(
        "SELECT pool, SUM(amount)::bigint FROM leases WHERE account_id = $1 GROUP BY pool",
    )
    .bind(account)
    .fetch_all(&mut *tx)
    .await?;
    let leased: HashMap<String, u64> = leased
        .into_iter()
        .map(|(p, a)| Ok((p, to_unsigned(a, "leases.amount")?)))
        .collect::<Result<_, StoreError>>()?;

    let layers: Vec<i32> = asks
        .iter()
        .filter_map(|a| match a.pool {
            LeasePool::Layer(i) => Some(i32::from(i)),
            LeasePool::Grant(_) => None,
        })
        .collect();
    let since = asks
        .iter()
        .filter_map(|a| lease::counters_since(&a.limit))
        .min();
    let mut counters: HashMap<i32, Vec<(Millis, u64)>> = HashMap::new();
    if let Some(since) = since {
        let rows: Vec<(i32, i64, i64)> = sqlx::query_as(
            "SELECT layer, at_ms, SUM(units)::bigint FROM usage_counters
             WHERE account_id = $1 AND layer = ANY($2) AND at_ms >= $3
             GROUP BY layer, at_ms",
        )
        .bind(account)
        .bind(&layers)
        .bind(since)
        .fetch_all(&mut *tx)
        .await?;
        for (layer, at, units) in rows {
            // Writers' rows sum to what was committed: never below zero.
            counters
                .entry(layer)
                .or_default()
                .push((at, to_unsigned(units.max(0), "usage_counters.units")?));
        }
    }
    let grant_ids: Vec<i64> = asks
        .iter()
        .filter_map(|a| match a.pool {
            LeasePool::Grant(id) => Some(id),
            LeasePool::Layer(_) => None,
        })
        .collect();
    let balances: HashMap<i64, u64> = if grant_ids.is_empty() {
        HashMap::new()
    } else {
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT id, balance FROM grants
             WHERE account_id = $1 AND id = ANY($2) AND (expires_at IS NULL OR expires_at > $3)",
        )
        .bind(account)
        .bind(&grant_ids)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        rows.into_iter()
            .map(|(id, b)| Ok((id, to_unsigned(b, "grants.balance")?)))
            .collect::<Result<_, StoreError>>()?
    };

    let mut result = LeaseRound::default();
    let (mut keys, mut amounts) = (Vec::new(), Vec::new());
    for ask in asks {
        let key = pool_key(ask.pool);
        let room = match (&ask.limit, ask.pool) {
            (LeaseLimit::Windows(windows), LeasePool::Layer(i)) => lease::window_room(
                windows,
                counters.get(&i32::from(i)).map_or(&[][..], Vec::as_slice),
            ),
            (
                LeaseLimit::FreeTier {
                    allowance,
                    period_start,
                },
                LeasePool::Layer(i),
            ) => {
                let used: u64 = counters.get(&i32::from(i)).map_or(0, |c| {
                    c.iter()
                        .filter(|(at, _)| at == period_start)
                        .map(|(_, u)| *u)
                        .sum()
                });
                allowance.saturating_sub(used)
            }
            (LeaseLimit::Grant, LeasePool::Grant(id)) => balances.get(&id).copied().unwrap_or(0),
            _ => 0,
        };
        let free = room.saturating_sub(leased.get(&key).copied().unwrap_or(0));
        let granted = lease::slice(ask.want, free);
        result.grants.push(LeaseGrant {
            pool: ask.pool,
            granted,
            drained: granted < ask.want,
        });
        if granted > 0 {
            keys.push(key);
            amounts.push(to_bigint(granted, "leases.amount")?);
        }
    }
    sqlx::query(
        "INSERT INTO leases (account_id, pool, replica, amount, expires_at)
         SELECT $1, p, $2, a, now() + $5 * interval '1 millisecond'
         FROM UNNEST($3::text[], $4::bigint[]) AS n(p, a)
         ON CONFLICT (account_id, pool, replica)
         DO UPDATE SET amount = leases.amount + EXCLUDED.amount, expires_at = EXCLUDED.expires_at",
    )
    .bind(account)
    .bind(replica)
    .bind(&keys)
    .bind(&amounts)
    .bind(to_bigint(ttl_ms, "lease ttl")?)
    .execute(&mut *tx)
    .await?;
    // Every lease of the account this replica holds lives as long as the newest.
    let held: Vec<(String, i64)> = sqlx::query_as(
        "UPDATE leases SET expires_at = now() + $3 * interval '1 millisecond'
         WHERE account_id = $1 AND replica = $2 RETURNING pool, amount",
    )
    .bind(account)
    .bind(replica)
    .bind(to_bigint(ttl_ms, "lease ttl")?)
    .fetch_all(&mut *tx)
    .await?;
    for (key, amount) in held {
        if let Some(pool) = parse_pool_key(&key) {
            result
                .held
                .push((pool, to_unsigned(amount, "leases.amount")?));
        }
    }
    tx.commit().await?;
    Ok(result)
}

/// Extends every lease of `replica` by `ttl_ms` from now, skipping rows another transaction
/// holds; returns the leases renewed.
pub(super) async fn renew(
    pool: &PgPool,
    replica: &str,
    ttl_ms: u64,
) -> Result<Vec<HeldLease>, StoreError> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "UPDATE leases l SET expires_at = now() + $2 * interval '1 millisecond'
         FROM (SELECT account_id, pool FROM leases WHERE replica = $1 FOR UPDATE SKIP LOCKED) AS mine
         WHERE l.account_id = mine.account_id AND l.pool = mine.pool AND l.replica = $1
         RETURNING l.account_id, l.pool, l.amount",
    )
    .bind(replica)
    .bind(to_bigint(ttl_ms, "lease ttl")?)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .filter_map(|(account, key, amount)| {
            parse_pool_key(&key).map(|pool| {
                Ok(HeldLease {
                    account,
                    pool,
                    amount: to_unsigned(amount, "leases.amount")?,
                })
            })
        })
        .collect()
}

/// Sets `replica`'s leases of `account` to `kept` (a pool absent or at 0 is given back whole).
pub(super) async fn keep(
    pool: &PgPool,
    replica: &str,
    account: &str,
    kept: &[(LeasePool, u64)],
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    let keys: Vec<String> = kept.iter().map(|(p, _)| pool_key(*p)).collect();
    let amounts: Vec<i64> = kept
        .iter()
        .map(|(_, a)| to_bigint(*a, "leases.amount"))
        .collect::<Result<_, _>>()?;
    sqlx::query(
        "UPDATE leases l SET amount = n.a FROM UNNEST($3::text[], $4::bigint[]) AS n(p, a)
         WHERE l.account_id = $1 AND l.replica = $2 AND l.pool = n.p",
    )
    .bind(account)
    .bind(replica)
    .bind(&keys)
    .bind(&amounts)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "DELETE FROM leases WHERE account_id = $1 AND replica = $2
         AND (amount = 0 OR NOT (pool = ANY($3)))",
    )
    .bind(account)
    .bind(replica)
    .bind(&keys)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Gives back every lease of `replica` (a clean shutdown, after the last commit).
pub(super) async fn drop_all(pool: &PgPool, replica: &str) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM leases WHERE replica = $1")
        .bind(replica)
        .execute(pool)
        .await?;
    Ok(())
}

/// The part of a commit strict mode needs: the window and free-tier units every charge used go
/// to `usage_counters`, and a strict account's draws are taken off this replica's leases, both
/// under the account rows' locks. Called after the grants are locked (the lock order).
pub(super) async fn commit_usage(
    tx: &mut Transaction<'_, Postgres>,
    replica: &str,
    charges: &[&LedgerEntry],
) -> Result<(), StoreError> {
    let mut strict: Vec<&str> = charges
        .iter()
        .filter(|e| e.plan.strict)
        .map(|e| &*e.account)
        .collect();
    strict.sort_unstable();
    strict.dedup();
    if !strict.is_empty() {
        sqlx::query("SELECT id FROM accounts WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&strict)
            .execute(&mut **tx)
            .await?;
    }
    let mut used: Counters<'_> = Counters::new();
    let mut taken: std::collections::BTreeMap<(&str, String), u64> = Default::default();
    for e in charges {
        for d in &e.decision.draws {
            if let Some(at) = bucket(d)
                && d.units > 0
            {
                *used
                    .entry((&e.account, i32::from(d.layer), at))
                    .or_default() += i128::from(d.units);
            }
            if e.plan.strict
                && let Some(pool) = d.lease_pool()
            {
                *taken.entry((&e.account, pool_key(pool))).or_default() += d.lease_amount();
            }
        }
    }
    add_to_counters(tx, replica, used).await?;
    if !taken.is_empty() {
        let mut account = Vec::with_capacity(taken.len());
        let mut key = Vec::with_capacity(taken.len());
        let mut amount = Vec::with_capacity(taken.len());
        for ((a, k), x) in taken {
            account.push(a);
            key.push(k);
            amount.push(to_bigint(x, "leases.amount")?);
        }
        sqlx::query(
            "UPDATE leases l SET amount = GREATEST(l.amount - n.x, 0)
             FROM UNNEST($1::text[], $2::text[], $3::bigint[]) AS n(account_id, pool, x)
             WHERE l.account_id = n.account_id AND l.pool = n.pool AND l.replica = $4",
        )
        .bind(account)
        .bind(key)
        .bind(amount)
        .bind(replica)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// A refund gives its window and free-tier units back to the counters (from this writer's
/// rows: the bucket's sum drops by exactly the refund).
pub(super) async fn refund_usage(
    tx: &mut Transaction<'_, Postgres>,
    replica: &str,
    account: &str,
    draws: &[crate::waterfall::Draw],
) -> Result<(), StoreError> {
    let mut given: Counters<'_> = Counters::new();
    for d in draws {
        if let Some(at) = bucket(d) {
            *given.entry((account, i32::from(d.layer), at)).or_default() -= i128::from(d.units);
        }
    }
    add_to_counters(tx, replica, given).await
}

/// Deltas to `usage_counters` by (account, layer, bucket). Sorted, so that one writer's rows
/// are always locked in one order.
type Counters<'a> = std::collections::BTreeMap<(&'a str, i32, Millis), i128>;

/// The counter bucket a draw counts in: a window's minute start, a free tier's period start.
fn bucket(d: &crate::waterfall::Draw) -> Option<Millis> {
    match d.pool {
        Pool::Window { minute } => Some(minute * MINUTE_MS),
        Pool::FreeTier { period_start } => Some(period_start),
        _ => None,
    }
}

/// Adds `deltas` to this writer's counter rows, in one statement.
async fn add_to_counters(
    tx: &mut Transaction<'_, Postgres>,
    replica: &str,
    deltas: Counters<'_>,
) -> Result<(), StoreError> {
    if deltas.is_empty() {
        return Ok(());
    }
    let n = deltas.len();
    let (mut account, mut layer, mut at_ms, mut units) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for ((a, l, at), u) in deltas {
        account.push(a);
        layer.push(l);
        at_ms.push(at);
        units.push(
            i64::try_from(u)
                .map_err(|_| StoreError::Corrupt(format!("usage_counters.units delta {u}")))?,
        );
    }
    sqlx::query(
        "INSERT INTO usage_counters (account_id, layer, at_ms, writer, units)
         SELECT a, l, t, $5, u FROM UNNEST($1::text[], $2::int[], $3::bigint[], $4::bigint[])
             AS n(a, l, t, u)
         ON CONFLICT (account_id, layer, at_ms, writer)
         DO UPDATE SET units = usage_counters.units + EXCLUDED.units",
    )
    .bind(account)
    .bind(layer)
    .bind(at_ms)
    .bind(units)
    .bind(replica)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Forgets counters older than `before`: no window or period reaches them.
pub(super) async fn prune_counters(pool: &PgPool, before: Millis) -> Result<u64, StoreError> {
    let done = sqlx::query("DELETE FROM usage_counters WHERE at_ms < $1")
        .bind(before)
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}
