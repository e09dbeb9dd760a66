-- Only a client's key needs an index of its own to be charged once. A gateway-assigned key is
-- "d:" and the decision id, and decision_id is UNIQUE already: two rows with one such key
-- would be two rows with one decision id. So UNIQUE (account_id, charge_key) becomes a
-- partial unique index over the client keys ("k:"), and a request sent without a key writes
-- no entry there.
--
-- Why: the index is led by the account, so each charge's entry went to its account's page,
-- one page per active account, and every such page is rewritten into the WAL at each commit
-- (as 0011 found for balance_updates). Led by the key instead, a random client key (as SDKs
-- make them) commits more slowly than led by the account; so client keys keep the account
-- first, and the keys that needed no index leave it.
--
-- SQLite cannot drop a table's UNIQUE: the table is rebuilt (as in 0004; migrations run with
-- foreign keys off and are checked afterwards, which keeps monetization_events' references).

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
    shadow           TEXT CHECK (shadow IN ('admit', 'deny')),
    shadow_draws     TEXT
) STRICT;

INSERT INTO usage_events_new
SELECT id, decision_id, account_id, feature, units, outcome, code, upstream_status,
       idempotency_key, charge_key, decision, decided_at, completed_at, recorded_at,
       shadow, shadow_draws
FROM usage_events;

DROP TABLE usage_events;
ALTER TABLE usage_events_new RENAME TO usage_events;
CREATE INDEX usage_events_by_account ON usage_events (account_id, decided_at);
CREATE INDEX usage_events_shadow_draws ON usage_events (decided_at) WHERE shadow_draws IS NOT NULL;
CREATE UNIQUE INDEX usage_events_client_charge ON usage_events (account_id, charge_key)
    WHERE charge_key LIKE 'k:%';
