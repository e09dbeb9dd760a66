-- A charge key is unique within its account: two columns under one unique index, never one
-- joined string (account "a" with key "b:c" and account "a:b" with key "c" used to share
-- "a:b:c"). charge_key becomes "k:<client key>" or "d:<decision id>", so a client's key can
-- never equal a gateway-assigned one; idempotency_key keeps the client's key as sent.
--
-- SQLite cannot drop a column's UNIQUE: the table is rebuilt (SQLite's documented procedure;
-- SqliteStore::migrate runs migrations with foreign keys off and checks them afterwards, so
-- that monetization_events' references survive the swap).

CREATE TABLE usage_events_new (
    id               INTEGER PRIMARY KEY,
    decision_id      TEXT NOT NULL UNIQUE,
    account_id       TEXT NOT NULL,
    feature          TEXT NOT NULL,
    units            INTEGER NOT NULL CHECK (units >= 0),
    outcome          TEXT NOT NULL,
    code             TEXT,
    upstream_status  INTEGER,
    idempotency_key  TEXT NOT NULL,          -- the client's key as sent, or the decision id
    charge_key       TEXT,                   -- when charged: one charge per key per account, ever
    decision         TEXT NOT NULL,          -- JSON: every layer checked, what it had and gave
    decided_at       INTEGER NOT NULL,
    completed_at     INTEGER NOT NULL,
    recorded_at      INTEGER NOT NULL,
    UNIQUE (account_id, charge_key)
) STRICT;

INSERT INTO usage_events_new
SELECT id, decision_id, account_id, feature, units, outcome, code, upstream_status,
       CASE
           WHEN idempotency_key <> decision_id
                AND substr(idempotency_key, 1, length(account_id) + 1) = account_id || ':'
           THEN substr(idempotency_key, length(account_id) + 2)
           ELSE idempotency_key
       END,
       CASE
           WHEN charge_key IS NULL THEN NULL
           WHEN charge_key = decision_id THEN 'd:' || decision_id
           ELSE 'k:' || substr(charge_key, length(account_id) + 2)
       END,
       decision, decided_at, completed_at, recorded_at
FROM usage_events;

DROP TABLE usage_events;
ALTER TABLE usage_events_new RENAME TO usage_events;
CREATE INDEX usage_events_by_account ON usage_events (account_id, decided_at);
