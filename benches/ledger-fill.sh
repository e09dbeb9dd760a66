# Sourced by benches/replay.sh and benches/reconcile.sh: a large SQLite ledger written with
# direct SQL (sqlite3's recursive CTEs, not the gateway), and the config it was written under.
#
# Expects EVENTS, ACCOUNTS, DB and BIN (a flowgate binary, for `migrate`). `fill_ledger CONFIG`
# (a config written by `ledger_config 50 5 500`, for `migrate`) writes EVENTS usage events 260 ms apart (10 million span a month) over ACCOUNTS accounts on
# one plan (a 5-hour window of 50 tasks and a weekly one of 500, then credits at 5 a task),
# 90 % completed and charged from a credit grant, 5 % denied, 5 % upstream errors; each usage
# event carries a decision JSON of the gateway's size (~450 bytes). With BALANCE_UPDATES=1 it
# also writes what the gateway's store would have: each grant's `grant` update and one `debit`
# per charge carrying the running balance, and the grants' balances after them, so that the
# ledger reconciles clean.

# The config the ledger is written under: $1: 5-hour limit, $2: price of a task, $3: weekly limit.
ledger_config() {
cat <<TOML
[server]
listen = "127.0.0.1:0"
[identity]
mode = "api_key"
[store]
url = "sqlite://$DB"
[upstreams.api]
url = "http://127.0.0.1:9"
[[routes]]
method = "POST"
path = "/v1/tasks"
feature = "task"
upstream = "api"
cost = { header = "x-units" }
[plans.pro]
price_version = "v-$2"
prices = { task = $2 }
[[plans.pro.layers]]
kind = "usage_limit"
name = "limits"
windows = [{ name = "5h", duration = "5h", limit = $1 }, { name = "week", duration = "7days", limit = $3 }]
[[plans.pro.layers]]
kind = "credits"
TOML
}

fill_ledger() {
  command -v sqlite3 >/dev/null || { echo "sqlite3 is needed (apt-get install sqlite3)"; exit 1; }
  rm -f "$DB" "$DB-wal" "$DB-shm"
  local config=$1 start
  "$BIN" migrate --config "$config" >/dev/null
  start=$(date +%s)
  sqlite3 "$DB" >/dev/null <<SQL
PRAGMA journal_mode = OFF;
PRAGMA synchronous = OFF;
BEGIN;
WITH RECURSIVE n(a) AS (SELECT 0 UNION ALL SELECT a + 1 FROM n WHERE a + 1 < $ACCOUNTS)
INSERT INTO accounts (id, plan, suspended, created_at) SELECT 'acct-' || a, 'pro', 0, 0 FROM n;
INSERT INTO grants (id, account_id, external_id, kind, amount, balance, created_at)
  SELECT rowid, id, 'purchase', 'credits', 1000000000, 1000000000, 0 FROM accounts;
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $EVENTS)
INSERT INTO usage_events (id, decision_id, account_id, feature, units, outcome, code, upstream_status,
    idempotency_key, charge_key, decision, decided_at, completed_at, recorded_at)
SELECT i, 'dec-' || i, 'acct-' || (i % $ACCOUNTS), 'task', 1 + i % 3,
       CASE i % 20 WHEN 0 THEN 'denied' WHEN 1 THEN 'upstream_error' ELSE 'completed' END,
       CASE i % 20 WHEN 0 THEN 'usage_limit_reached' END,
       CASE i % 20 WHEN 1 THEN 500 WHEN 0 THEN NULL ELSE 200 END,
       'dec-' || i, CASE WHEN i % 20 > 1 THEN 'd:dec-' || i END,
       '{"plan":"pro","price_version":"v-5","units":' || (1 + i % 3) || ',"credits_per_unit":5,"admitted":true,"denial":null,"layers":[{"layer":"limits","kind":"usage_limit","eligible":true,"available_units":48,"available_credits":null,"gave_units":0,"gave_credits":0,"reset_at":"2027-01-01T05:00:00Z"},{"layer":"credits","kind":"credits","eligible":true,"available_units":199999990,"available_credits":999999950,"gave_units":' || (1 + i % 3) || ',"gave_credits":' || (5 * (1 + i % 3)) || ',"reset_at":null}],"draws":[{"layer":1,"pool":"grant","grant_id":1,"units":1,"credits":5}]}',
       1798761600000 + i * 260, 1798761600000 + i * 260 + 40, 1798761600000 + i * 260 + 50
FROM n;
INSERT INTO monetization_events (id, usage_event_id, account_id, feature, units, credits, postpaid_credits,
    credits_per_unit, plan, price_version, draws, decided_at, created_at, estimated_units, forgiven_units)
SELECT id, id, account_id, 'task', units, 5 * units, 0, 5, 'pro', 'v-5',
       '[{"layer":1,"pool":"grant","grant_id":' || (1 + CAST(substr(account_id, 6) AS INTEGER)) || ',"units":' || units || ',"credits":' || (5 * units) || '}]',
       decided_at, recorded_at, units, 0
FROM usage_events WHERE outcome = 'completed';
COMMIT;
SQL
  if [[ "${BALANCE_UPDATES:-0}" == 1 ]]; then
    sqlite3 "$DB" >/dev/null <<SQL
PRAGMA journal_mode = OFF;
PRAGMA synchronous = OFF;
BEGIN;
INSERT INTO balance_updates (id, account_id, grant_id, reason, delta, balance_after, forgiven,
    monetization_event_id, created_at)
  SELECT id, account_id, id, 'grant', amount, amount, 0, NULL, 0 FROM grants ORDER BY id;
INSERT INTO balance_updates (account_id, grant_id, reason, delta, balance_after, forgiven,
    monetization_event_id, created_at)
  SELECT m.account_id, g.id, 'debit', -m.credits,
         g.amount - SUM(m.credits) OVER (PARTITION BY g.id ORDER BY m.id), 0, m.id, m.created_at
  FROM monetization_events m JOIN grants g ON g.account_id = m.account_id
  ORDER BY m.id;
UPDATE grants SET balance = balance + (SELECT COALESCE(SUM(delta), 0) FROM balance_updates b
  WHERE b.grant_id = grants.id AND b.reason = 'debit');
COMMIT;
SQL
  fi
  sqlite3 "$DB" "PRAGMA journal_mode = WAL;" >/dev/null
  echo "filled $EVENTS events in $(( $(date +%s) - start )) s; $(du -h "$DB" | cut -f1)"
}

# The same ledger (balance updates included) in an empty PostgreSQL database: `fill_pg_ledger
# CONFIG URL`, CONFIG's store being URL. The statements above in PostgreSQL's dialect.
fill_pg_ledger() {
  local config=$1 url=$2 start
  "$BIN" migrate --config "$config" >/dev/null
  start=$(date +%s)
  psql -q -v ON_ERROR_STOP=1 "$url" <<SQL
BEGIN;
INSERT INTO accounts (id, plan, suspended, created_at)
  SELECT 'acct-' || a, 'pro', FALSE, 0 FROM generate_series(0, $ACCOUNTS - 1) a;
INSERT INTO grants (id, account_id, external_id, kind, amount, balance, created_at)
  SELECT 1 + a, 'acct-' || a, 'purchase', 'credits', 1000000000, 1000000000, 0
  FROM generate_series(0, $ACCOUNTS - 1) a;
INSERT INTO usage_events (id, decision_id, account_id, feature, units, outcome, code, upstream_status,
    idempotency_key, charge_key, decision, decided_at, completed_at, recorded_at)
SELECT i, 'dec-' || i, 'acct-' || (i % $ACCOUNTS), 'task', 1 + i % 3,
       CASE i % 20 WHEN 0 THEN 'denied' WHEN 1 THEN 'upstream_error' ELSE 'completed' END,
       CASE i % 20 WHEN 0 THEN 'usage_limit_reached' END,
       CASE i % 20 WHEN 1 THEN 500 WHEN 0 THEN NULL ELSE 200 END,
       'dec-' || i, CASE WHEN i % 20 > 1 THEN 'd:dec-' || i END,
       '{"plan":"pro","price_version":"v-5","units":' || (1 + i % 3) || ',"credits_per_unit":5,"admitted":true,"denial":null,"layers":[{"layer":"limits","kind":"usage_limit","eligible":true,"available_units":48,"available_credits":null,"gave_units":0,"gave_credits":0,"reset_at":"2027-01-01T05:00:00Z"},{"layer":"credits","kind":"credits","eligible":true,"available_units":199999990,"available_credits":999999950,"gave_units":' || (1 + i % 3) || ',"gave_credits":' || (5 * (1 + i % 3)) || ',"reset_at":null}],"draws":[{"layer":1,"pool":"grant","grant_id":1,"units":1,"credits":5}]}',
       1798761600000 + i * 260, 1798761600000 + i * 260 + 40, 1798761600000 + i * 260 + 50
FROM generate_series(1, $EVENTS) i;
INSERT INTO monetization_events (id, usage_event_id, account_id, feature, units, credits, postpaid_credits,
    credits_per_unit, plan, price_version, draws, decided_at, created_at, estimated_units, forgiven_units)
SELECT id, id, account_id, 'task', units, 5 * units, 0, 5, 'pro', 'v-5',
       '[{"layer":1,"pool":"grant","grant_id":' || (1 + CAST(substr(account_id, 6) AS INTEGER)) || ',"units":' || units || ',"credits":' || (5 * units) || '}]',
       decided_at, recorded_at, units, 0
FROM usage_events WHERE outcome = 'completed';
INSERT INTO balance_updates (id, account_id, grant_id, reason, delta, balance_after, forgiven,
    monetization_event_id, created_at)
  SELECT id, account_id, id, 'grant', amount, amount, 0, NULL, 0 FROM grants ORDER BY id;
INSERT INTO balance_updates (id, account_id, grant_id, reason, delta, balance_after, forgiven,
    monetization_event_id, created_at)
  SELECT $ACCOUNTS + ROW_NUMBER() OVER (ORDER BY m.id), m.account_id, g.id, 'debit', -m.credits,
         g.amount - SUM(m.credits) OVER (PARTITION BY g.id ORDER BY m.id), 0, m.id, m.created_at
  FROM monetization_events m JOIN grants g ON g.account_id = m.account_id;
UPDATE grants SET balance = balance + (SELECT COALESCE(SUM(delta), 0) FROM balance_updates b
  WHERE b.grant_id = grants.id AND b.reason = 'debit');
COMMIT;
VACUUM ANALYZE;
SQL
  echo "filled $EVENTS events in PostgreSQL in $(( $(date +%s) - start )) s"
}
