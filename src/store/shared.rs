//! The admin and user APIs' statements, written once for both dialects.
//!
//! SQL uses `$n` placeholders, which SQLite accepts too (in order of first appearance, as
//! here). The Rust around each statement is the same for both stores but for the types sqlx
//! is generic over, so [`api_statements!`] expands one body per store, inside the dialect's
//! own module; each module supplies the few things that truly differ (its shim):
//!
//! - `begin_write(&self)`: SQLite takes the write lock at once (`BEGIN IMMEDIATE`), so that a
//!   second writer waits instead of failing on upgrade; PostgreSQL begins normally;
//! - `IDS_IN` and `ids_arg`: an id list (`json_each` of a JSON array, or `= ANY` of an array);
//! - `announce_grant(&self, tx, balance)` and `announce_account(&self, tx, id)`: PostgreSQL
//!   tells the other replicas; SQLite has none;
//! - `begin_view_read(&self)` and `read_mark(&self, tx)`: a read of the view in one snapshot,
//!   and where that snapshot stands among the commits other replicas announce (PostgreSQL's
//!   `pg_current_snapshot()`; SQLite has no other writer);
//! - `ACCOUNT_PAGE`: how a page of an account's usage events is found after and before a
//!   cursor (SQLite must be told to find the ids first);
//! - `grant_from_row` and `GRANT_COLUMNS`, over the dialect's row type.

/// Expands the API statements as methods of `$store` (see the module documentation).
macro_rules! api_statements {
    ($store:ty) => {
        const ACCOUNT: &str = "SELECT id, plan, suspended, created_at, workspace, shadow,
                (SELECT COUNT(*) FROM api_keys k WHERE k.account_id = a.id AND k.revoked_at IS NULL) AS api_keys
             FROM accounts a WHERE id = $1";

        impl $store {
            pub(in crate::store) async fn create_account(
                &self,
                id: &str,
                plan: &str,
                suspended: bool,
                shadow: bool,
                now: Millis,
            ) -> Result<bool, StoreError> {
                let mut tx = self.begin_write().await?;
                let created: Option<String> = sqlx::query_scalar(
                    "INSERT INTO accounts (id, plan, suspended, created_at, shadow) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (id) DO NOTHING RETURNING id",
                )
                .bind(id)
                .bind(plan)
                .bind(suspended)
                .bind(now)
                .bind(shadow)
                .fetch_optional(&mut *tx)
                .await?;
                if created.is_some() {
                    self.announce_account(&mut tx, id).await?;
                }
                tx.commit().await?;
                Ok(created.is_some())
            }

            /// Stores each price version once; one stored before with other prices (or
            /// another start) is refused, and nothing is written.
            pub(in crate::store) async fn seed_prices(
                &self,
                tables: &[crate::store::StoredPriceTable],
            ) -> Result<(), StoreError> {
                let mut tx = self.begin_write().await?;
                for t in tables {
                    sqlx::query(
                        "INSERT INTO price_tables (plan, version, effective_from, prices) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (plan, version) DO NOTHING",
                    )
                    .bind(&t.plan)
                    .bind(&t.version)
                    .bind(t.effective_from)
                    .bind(&t.prices)
                    .execute(&mut *tx)
                    .await?;
                    let (from, prices): (i64, String) = sqlx::query_as(
                        "SELECT effective_from, prices FROM price_tables WHERE plan = $1 AND version = $2",
                    )
                    .bind(&t.plan)
                    .bind(&t.version)
                    .fetch_one(&mut *tx)
                    .await?;
                    if from != t.effective_from || prices != t.prices {
                        return Err(StoreError::PriceVersionChanged {
                            plan: t.plan.clone(),
                            version: t.version.clone(),
                        });
                    }
                }
                tx.commit().await?;
                Ok(())
            }

            /// Creates or updates the configured accounts, their API keys and their grants
            /// (each grant once). Replicas seed the same accounts in the same (config) order:
            /// the second waits on the first's rows, then finds them there.
            pub(in crate::store) async fn seed(
                &self,
                seeds: &[AccountSeed],
                now: Millis,
            ) -> Result<(), StoreError> {
                let mut tx = self.begin_write().await?;
                for seed in seeds {
                    sqlx::query(
                        "INSERT INTO accounts (id, plan, suspended, created_at, workspace, shadow) VALUES ($1, $2, $3, $4, $5, $6)
                         ON CONFLICT (id) DO UPDATE SET plan = excluded.plan, suspended = excluded.suspended,
                             workspace = excluded.workspace, shadow = excluded.shadow",
                    )
                    .bind(&seed.id)
                    .bind(&seed.plan)
                    .bind(seed.suspended)
                    .bind(now)
                    .bind(seed.workspace.as_deref())
                    .bind(seed.shadow)
                    .execute(&mut *tx)
                    .await?;
                    // A configured key revoked through the API stays revoked.
                    for key in &seed.keys {
                        sqlx::query(
                            "INSERT INTO api_keys (key_hash, account_id, prefix, created_at) VALUES ($1, $2, $3, $4)
                             ON CONFLICT (key_hash) DO UPDATE SET account_id = excluded.account_id, prefix = excluded.prefix",
                        )
                        .bind(&key.hash)
                        .bind(&seed.id)
                        .bind(&key.prefix)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    }
                    for g in &seed.grants {
                        insert_grant(&mut tx, &seed.id, g, now).await?;
                    }
                    self.announce_account(&mut tx, &seed.id).await?;
                }
                tx.commit().await?;
                Ok(())
            }

            pub(in crate::store) async fn account(
                &self,
                id: &str,
            ) -> Result<Option<AccountRow>, StoreError> {
                Ok(sqlx::query_as(ACCOUNT)
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            pub(in crate::store) async fn update_account(
                &self,
                id: &str,
                plan: Option<&str>,
                suspended: Option<bool>,
                shadow: Option<bool>,
            ) -> Result<Option<AccountRow>, StoreError> {
                let mut tx = self.begin_write().await?;
                let updated = sqlx::query(
                    "UPDATE accounts SET plan = COALESCE($1, plan), suspended = COALESCE($2, suspended),
                         shadow = COALESCE($3, shadow)
                     WHERE id = $4",
                )
                .bind(plan)
                .bind(suspended)
                .bind(shadow)
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                let row = if updated == 0 {
                    None
                } else {
                    self.announce_account(&mut tx, id).await?;
                    sqlx::query_as(ACCOUNT)
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?
                };
                tx.commit().await?;
                Ok(row)
            }

            pub(in crate::store) async fn add_api_key(
                &self,
                account: &str,
                key: &KeySeed,
                now: Millis,
            ) -> Result<Option<ApiKeyRow>, StoreError> {
                let mut tx = self.begin_write().await?;
                let exists: Option<String> =
                    sqlx::query_scalar("SELECT id FROM accounts WHERE id = $1")
                        .bind(account)
                        .fetch_optional(&mut *tx)
                        .await?;
                if exists.is_none() {
                    return Ok(None);
                }
                let row: ApiKeyRow = sqlx::query_as(
                    "INSERT INTO api_keys (key_hash, account_id, prefix, created_at) VALUES ($1, $2, $3, $4)
                     RETURNING key_hash, prefix, created_at, revoked_at",
                )
                .bind(&key.hash)
                .bind(account)
                .bind(&key.prefix)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
                self.announce_account(&mut tx, account).await?;
                tx.commit().await?;
                Ok(Some(row))
            }

            /// Every API key of `account`, revoked ones included, oldest first.
            pub(in crate::store) async fn api_keys(
                &self,
                account: &str,
            ) -> Result<Vec<ApiKeyRow>, StoreError> {
                Ok(sqlx::query_as(
                    "SELECT key_hash, prefix, created_at, revoked_at FROM api_keys
                     WHERE account_id = $1 ORDER BY created_at, prefix",
                )
                .bind(account)
                .fetch_all(&self.pool)
                .await?)
            }

            /// Revokes the key of `account` whose prefix is `prefix`, unless several live keys
            /// share it. A key revoked before is answered as it is, and nothing changes.
            pub(in crate::store) async fn revoke_api_key(
                &self,
                account: &str,
                prefix: &str,
                now: Millis,
            ) -> Result<Revoked, StoreError> {
                let mut tx = self.begin_write().await?;
                let keys: Vec<ApiKeyRow> = sqlx::query_as(
                    "SELECT key_hash, prefix, created_at, revoked_at FROM api_keys
                     WHERE account_id = $1 AND prefix = $2 ORDER BY created_at",
                )
                .bind(account)
                .bind(prefix)
                .fetch_all(&mut *tx)
                .await?;
                let live: Vec<&ApiKeyRow> = keys.iter().filter(|k| k.revoked_at.is_none()).collect();
                let revoked = match live.as_slice() {
                    [] => match keys.into_iter().next() {
                        Some(before) => Revoked::Before(before),
                        None => Revoked::NotFound,
                    },
                    [key] => {
                        let row: ApiKeyRow = sqlx::query_as(
                            "UPDATE api_keys SET revoked_at = $1 WHERE key_hash = $2
                             RETURNING key_hash, prefix, created_at, revoked_at",
                        )
                        .bind(now)
                        .bind(&key.key_hash)
                        .fetch_one(&mut *tx)
                        .await?;
                        self.announce_account(&mut tx, account).await?;
                        Revoked::Now(row)
                    }
                    several => Revoked::Ambiguous(several.len()),
                };
                tx.commit().await?;
                Ok(revoked)
            }

            /// Gives `g` to `account` once per external id, with its balance update. A second
            /// transaction with the same key waits on the first's unique index entry, then
            /// inserts nothing and reads the first's grant.
            pub(in crate::store) async fn grant(
                &self,
                account: &str,
                g: &GrantSeed,
                now: Millis,
            ) -> Result<Option<Granted>, StoreError> {
                let mut tx = self.begin_write().await?;
                let exists: Option<String> =
                    sqlx::query_scalar("SELECT id FROM accounts WHERE id = $1")
                        .bind(account)
                        .fetch_optional(&mut *tx)
                        .await?;
                if exists.is_none() {
                    return Ok(None);
                }
                let inserted = insert_grant(&mut tx, account, g, now).await?;
                if let Some(grant_id) = inserted {
                    let balance = GrantBalance {
                        account: account.to_owned(),
                        grant_id,
                        balance: g.amount,
                        // A new grant's row starts at version 0.
                        version: Some(0),
                    };
                    self.announce_grant(&mut tx, balance).await?;
                }
                let row = sqlx::query(&format!(
                    "{GRANT_COLUMNS} WHERE account_id = $1 AND external_id = $2"
                ))
                .bind(account)
                .bind(&g.external_id)
                .fetch_one(&mut *tx)
                .await?;
                let grant: StoredGrant = grant_from_row(&row)?;
                tx.commit().await?;
                Ok(Some(if inserted.is_some() {
                    Granted::Created(grant)
                } else {
                    Granted::Existing(grant)
                }))
            }

            pub(in crate::store) async fn ledger_page(
                &self,
                account: &str,
                page: Page,
                limit: u32,
            ) -> Result<Vec<LedgerEvent>, StoreError> {
                let (sql, cursor) = match page {
                    Page::After(after) => (ACCOUNT_PAGE[0], after),
                    Page::Before(before) => (ACCOUNT_PAGE[1], before.unwrap_or(i64::MAX)),
                };
                let usage: Vec<UsageEventRecord> = sqlx::query_as(&format!(
                    "SELECT {} FROM usage_events {sql}",
                    columns::USAGE
                ))
                .bind(account)
                .bind(cursor)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                self.attach(usage).await
            }

            pub(in crate::store) async fn ledger_event(
                &self,
                decision_id: &str,
            ) -> Result<Option<LedgerEvent>, StoreError> {
                let usage: Vec<UsageEventRecord> = sqlx::query_as(&format!(
                    "SELECT {} FROM usage_events WHERE decision_id = $1",
                    columns::USAGE
                ))
                .bind(decision_id)
                .fetch_all(&self.pool)
                .await?;
                Ok(self.attach(usage).await?.into_iter().next())
            }

            /// Reads the charges and balance updates of `usage` and joins them.
            async fn attach(
                &self,
                usage: Vec<UsageEventRecord>,
            ) -> Result<Vec<LedgerEvent>, StoreError> {
                if usage.is_empty() {
                    return Ok(Vec::new());
                }
                let monetization: Vec<MonetizationRecord> = sqlx::query_as(&format!(
                    "SELECT {} FROM monetization_events WHERE usage_event_id {IDS_IN} ORDER BY id",
                    columns::MONETIZATION
                ))
                .bind(ids_arg(usage.iter().map(|u| u.id))?)
                .fetch_all(&self.pool)
                .await?;
                let updates: Vec<BalanceUpdateRecord> = if monetization.is_empty() {
                    Vec::new()
                } else {
                    sqlx::query_as(&format!(
                        "SELECT {} FROM balance_updates WHERE monetization_event_id {IDS_IN} ORDER BY id",
                        columns::BALANCE_UPDATES
                    ))
                    .bind(ids_arg(monetization.iter().map(|m| m.id))?)
                    .fetch_all(&self.pool)
                    .await?
                };
                Ok(join(usage, monetization, updates))
            }

            pub(in crate::store) async fn account_draws_since(
                &self,
                account: &str,
                since: Millis,
            ) -> Result<Vec<Draw>, StoreError> {
                let mut conn = self.pool.acquire().await?;
                account_draws_in(&mut conn, account, since).await
            }

            /// As `account_draws_since`, in one snapshot, with where that snapshot stands in
            /// the commits other replicas announce (see `crate::store::ReadMark`).
            pub(in crate::store) async fn account_history(
                &self,
                account: &str,
                since: Millis,
            ) -> Result<(Vec<Draw>, Option<crate::store::ReadMark>), StoreError> {
                let mut tx = self.begin_view_read().await?;
                let mark = self.read_mark(&mut tx).await?;
                let draws = account_draws_in(&mut tx, account, since).await?;
                tx.commit().await?;
                Ok((draws, mark))
            }
        }

        async fn account_draws_in(
            conn: &mut <DB as sqlx::Database>::Connection,
            account: &str,
            since: Millis,
        ) -> Result<Vec<Draw>, StoreError> {
            let rows = sqlx::query(crate::store::ACCOUNT_DRAWS_SQL)
            .bind(account)
            .bind(since)
            .fetch_all(&mut *conn)
            .await?;
            let mut draws = Vec::new();
            for r in rows {
                draws.extend(parse_draws(r.get("draws"))?);
            }
            Ok(draws)
        }

        async fn load_accounts_in(
            conn: &mut <DB as sqlx::Database>::Connection,
        ) -> Result<Vec<crate::store::StoredAccount>, StoreError> {
            let mut accounts: Vec<crate::store::StoredAccount> =
                sqlx::query("SELECT id, plan, suspended, workspace, shadow FROM accounts ORDER BY id")
                    .fetch_all(&mut *conn)
                    .await?
                    .into_iter()
                    .map(|r| crate::store::StoredAccount {
                        id: r.get("id"),
                        plan: r.get("plan"),
                        suspended: r.get("suspended"),
                        shadow: r.get("shadow"),
                        workspace: r.get("workspace"),
                        key_hashes: Vec::new(),
                        grants: Vec::new(),
                    })
                    .collect();
            let keys: Vec<(String, String)> =
                sqlx::query_as("SELECT account_id, key_hash FROM api_keys WHERE revoked_at IS NULL")
                    .fetch_all(&mut *conn)
                    .await?;
            let grants = sqlx::query(&format!("{GRANT_COLUMNS} ORDER BY id"))
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(|r| Ok((r.get("account_id"), grant_from_row(r)?)))
                .collect::<Result<Vec<_>, StoreError>>()?;
            crate::store::attach_keys_and_grants(&mut accounts, keys, grants);
            Ok(accounts)
        }

        async fn load_draws_in(
            conn: &mut <DB as sqlx::Database>::Connection,
            since: Millis,
        ) -> Result<Vec<(String, Vec<Draw>)>, StoreError> {
            // Shadow decisions' window and free-tier draws count too (counters, not money).
            let rows = sqlx::query(
                "SELECT account_id, draws FROM monetization_events
                 WHERE decided_at >= $1 AND refunded_at IS NULL
                 UNION ALL
                 SELECT account_id, shadow_draws AS draws FROM usage_events
                 WHERE decided_at >= $1 AND shadow_draws IS NOT NULL",
            )
            .bind(since)
            .fetch_all(&mut *conn)
            .await?;
            rows.into_iter()
                .map(|r| {
                    let draws: Vec<Draw> = serde_json::from_str(r.get("draws"))
                        .map_err(|e| StoreError::Corrupt(format!("monetization_events.draws: {e}")))?;
                    Ok((r.get("account_id"), draws))
                })
                .collect()
        }

        /// The reads the view and the tests make, the same on both dialects.
        impl $store {
        pub(in crate::store) async fn load_accounts(&self) -> Result<Vec<crate::store::StoredAccount>, StoreError> {
            let mut conn = self.pool.acquire().await?;
            load_accounts_in(&mut conn).await
        }

        /// Accounts and the draws since `since`, read in one snapshot, with where that
        /// snapshot stands in the commits other replicas announce.
        pub(in crate::store) async fn read_view(
            &self,
            since: Millis,
        ) -> Result<crate::store::ViewRead, StoreError> {
            let mut tx = self.begin_view_read().await?;
            let mark = self.read_mark(&mut tx).await?;
            let accounts = load_accounts_in(&mut tx).await?;
            let draws = load_draws_in(&mut tx, since).await?;
            tx.commit().await?;
            Ok(crate::store::ViewRead { accounts, draws, mark })
        }

        pub(in crate::store) async fn counts(&self) -> Result<crate::store::LedgerCounts, StoreError> {
            let r = sqlx::query(
                "SELECT (SELECT COUNT(*) FROM usage_events) AS u, (SELECT COUNT(*) FROM monetization_events) AS m,
                        (SELECT COUNT(*) FROM balance_updates) AS b",
            )
            .fetch_one(&self.pool)
            .await?;
            Ok(crate::store::LedgerCounts {
                usage_events: crate::store::shared::to_unsigned(r.get("u"), "count(usage_events)")?,
                monetization_events: crate::store::shared::to_unsigned(r.get("m"), "count(monetization_events)")?,
                balance_updates: crate::store::shared::to_unsigned(r.get("b"), "count(balance_updates)")?,
            })
        }

        pub(in crate::store) async fn usage_events(
            &self,
            account: &str,
            limit: u32,
        ) -> Result<Vec<crate::store::UsageEventRow>, StoreError> {
            let rows = sqlx::query(
                "SELECT u.decision_id, u.feature, u.units, u.outcome, u.code, u.upstream_status, u.decided_at,
                        m.id IS NOT NULL AS charged, COALESCE(m.credits, 0) AS credits
                 FROM usage_events u LEFT JOIN monetization_events m ON m.usage_event_id = u.id
                 WHERE u.account_id = $1 ORDER BY u.id DESC LIMIT $2",
            )
            .bind(account)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(crate::store::UsageEventRow {
                        decision_id: r.get("decision_id"),
                        feature: r.get("feature"),
                        units: crate::store::shared::to_unsigned(r.get("units"), "usage_events.units")?,
                        outcome: r.get("outcome"),
                        code: r.get("code"),
                        upstream_status: r
                            .get::<Option<i64>, _>("upstream_status")
                            .map(|s| {
                                u16::try_from(s).map_err(|_| {
                                    StoreError::Corrupt(format!("usage_events.upstream_status = {s}"))
                                })
                            })
                            .transpose()?,
                        charged: r.get("charged"),
                        credits: crate::store::shared::to_unsigned(r.get("credits"), "monetization_events.credits")?,
                        decided_at: r.get("decided_at"),
                    })
                })
                .collect()
        }

        pub(in crate::store) async fn grants(&self, account: &str) -> Result<Vec<StoredGrant>, StoreError> {
            sqlx::query(&format!(
                "{GRANT_COLUMNS} WHERE account_id = $1 ORDER BY id"
            ))
            .bind(account)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(grant_from_row)
            .collect()
        }
        }

        /// Inserts a grant and its `grant` balance update unless the account has one with its
        /// external id; returns the new grant's id. The one statement for configured grants
        /// (seeded at start-up) and API grants alike.
        pub(in crate::store) async fn insert_grant(
            tx: &mut sqlx::Transaction<'_, DB>,
            account: &str,
            g: &GrantSeed,
            now: Millis,
        ) -> Result<Option<i64>, StoreError> {
            let amount = crate::store::shared::to_bigint(g.amount, "grants.amount")?;
            let features = g
                .features
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .map_err(|e| StoreError::Corrupt(format!("grant features: {e}")))?;
            let inserted: Option<i64> = sqlx::query_scalar(
                "INSERT INTO grants (account_id, external_id, kind, amount, balance, expires_at, priority, features, created_at)
                 VALUES ($1, $2, $3, $4, $4, $5, $6, $7, $8)
                 ON CONFLICT (account_id, external_id) DO NOTHING RETURNING id",
            )
            .bind(account)
            .bind(&g.external_id)
            .bind(g.kind.as_str())
            .bind(amount)
            .bind(g.expires_at)
            .bind(i64::from(g.priority))
            .bind(features)
            .bind(now)
            .fetch_optional(&mut **tx)
            .await?;
            if let Some(grant_id) = inserted {
                sqlx::query(
                    "INSERT INTO balance_updates (account_id, grant_id, reason, delta, balance_after, created_at)
                     VALUES ($1, $2, 'grant', $3, $3, $4)",
                )
                .bind(account)
                .bind(grant_id)
                .bind(amount)
                .bind(now)
                .execute(&mut **tx)
                .await?;
            }
            Ok(inserted)
        }
    };
}

pub(super) use api_statements;

/// A count or amount as the stores' signed 64-bit integers.
pub(super) fn to_bigint(v: u64, what: &str) -> Result<i64, super::StoreError> {
    i64::try_from(v)
        .map_err(|_| super::StoreError::Corrupt(format!("{what} = {v} exceeds a 64-bit integer")))
}

/// A BIGINT read back as a count (the schema's `CHECK`s keep these non-negative).
pub(super) fn to_unsigned(v: i64, what: &str) -> Result<u64, super::StoreError> {
    u64::try_from(v).map_err(|_| super::StoreError::Corrupt(format!("{what} = {v} is negative")))
}

/// Expands `flowgate replay`'s reads as methods of `$store` (the same text on both dialects;
/// see [`super::replay`]). Nothing here writes. `$scan` follows the events' table: SQLite's
/// planner would walk `usage_events_by_account` for its narrow rows and then look every row up
/// in the table at random (3× slower over 200 000 events, benches/replay.sh); `NOT INDEXED`
/// makes it read the table in order and sort.
macro_rules! replay_statements {
    ($store:ty, $scan:literal) => {
        impl $store {
            /// Calls `f` with every usage event decided before `to`, in (decided_at, id) order,
            /// with its charge; rows are streamed, one at a time.
            pub(in crate::store) async fn replay_events(
                &self,
                to: crate::waterfall::Millis,
                f: &mut (dyn for<'r> FnMut(crate::store::ReplayEvent<'r>) + Send),
            ) -> Result<u64, crate::store::StoreError> {
                use futures_util::TryStreamExt;
                use crate::store::shared::to_unsigned;
                let mut rows = sqlx::query(concat!(
                    "SELECT u.account_id, u.feature, u.units, u.outcome, u.code, u.decided_at, u.completed_at,
                            m.credits, m.postpaid_credits, m.estimated_units, m.draws, m.model, m.dimensions,
                            m.refunded_at
                     FROM usage_events u ", $scan, " LEFT JOIN monetization_events m ON m.usage_event_id = u.id
                     WHERE u.decided_at < $1
                     ORDER BY u.decided_at, u.id",
                ))
                .bind(to)
                .fetch(&self.pool);
                let mut read = 0;
                while let Some(r) = rows.try_next().await? {
                    let draws: Option<&str> = r.try_get(10)?;
                    let charge = match draws {
                        None => None,
                        Some(draws) => Some(crate::store::ReplayCharge {
                            credits: to_unsigned(r.try_get(7)?, "monetization_events.credits")?,
                            postpaid_credits: to_unsigned(
                                r.try_get(8)?,
                                "monetization_events.postpaid_credits",
                            )?,
                            estimated_units: to_unsigned(
                                r.try_get(9)?,
                                "monetization_events.estimated_units",
                            )?,
                            draws,
                            model: r.try_get(11)?,
                            dimensions: r.try_get(12)?,
                            refunded_at: r.try_get(13)?,
                        }),
                    };
                    f(crate::store::ReplayEvent {
                        account: r.try_get(0)?,
                        feature: r.try_get(1)?,
                        units: to_unsigned(r.try_get(2)?, "usage_events.units")?,
                        outcome: r.try_get(3)?,
                        code: r.try_get(4)?,
                        decided_at: r.try_get(5)?,
                        completed_at: r.try_get(6)?,
                        charge,
                    });
                    read += 1;
                }
                Ok(read)
            }

            /// Every grant as it was given, in (created_at, id) order.
            pub(in crate::store) async fn grant_history(
                &self,
            ) -> Result<Vec<crate::store::GrantHistory>, crate::store::StoreError> {
                sqlx::query(
                    "SELECT id, account_id, kind, amount, expires_at, priority, features, created_at
                     FROM grants ORDER BY created_at, id",
                )
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| {
                    let kind: String = r.try_get("kind")?;
                    let features: Option<String> = r.try_get("features")?;
                    Ok(crate::store::GrantHistory {
                        id: r.try_get("id")?,
                        account: r.try_get("account_id")?,
                        kind: crate::waterfall::GrantKind::parse(&kind)
                            .ok_or_else(|| crate::store::StoreError::Corrupt(format!("grants.kind = {kind:?}")))?,
                        amount: crate::store::shared::to_unsigned(r.try_get("amount")?, "grants.amount")?,
                        expires_at: r.try_get("expires_at")?,
                        priority: r.try_get::<i64, _>("priority")?.try_into().map_err(|_| {
                            crate::store::StoreError::Corrupt("grants.priority out of range".into())
                        })?,
                        features: features
                            .map(|f| {
                                serde_json::from_str(&f)
                                    .map_err(|e| crate::store::StoreError::Corrupt(format!("grants.features: {e}")))
                            })
                            .transpose()?,
                        created_at: r.try_get("created_at")?,
                    })
                })
                .collect()
        }
        }
    };
}

pub(super) use replay_statements;
