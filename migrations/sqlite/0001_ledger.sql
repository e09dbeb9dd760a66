-- The ledger: accounts and their grants, and three linked datasets.
-- usage_events: every request, charged or not.  monetization_events: every charge, and why.
-- balance_updates: every change of a grant's balance, and why.  Money is INTEGER everywhere.

CREATE TABLE accounts (
    id          TEXT PRIMARY KEY,
    plan        TEXT NOT NULL,
    suspended   INTEGER NOT NULL DEFAULT 0 CHECK (suspended IN (0, 1)),
    created_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE api_keys (
    key_hash    TEXT PRIMARY KEY,            -- SHA-256 hex; keys are never stored in clear
    account_id  TEXT NOT NULL REFERENCES accounts (id)
) STRICT;

CREATE TABLE grants (
    id           INTEGER PRIMARY KEY,
    account_id   TEXT NOT NULL REFERENCES accounts (id),
    external_id  TEXT NOT NULL,              -- the granter's id: a grant is given once
    kind         TEXT NOT NULL CHECK (kind IN ('credits', 'promotion', 'enterprise')),
    amount       INTEGER NOT NULL CHECK (amount > 0),
    balance      INTEGER NOT NULL CHECK (balance >= 0 AND balance <= amount),
    expires_at   INTEGER,                    -- ms since epoch; NULL: never
    priority     INTEGER NOT NULL DEFAULT 0,
    features     TEXT,                       -- JSON array of feature names; NULL: all
    created_at   INTEGER NOT NULL,
    UNIQUE (account_id, external_id)
) STRICT;

CREATE TABLE usage_events (
    id               INTEGER PRIMARY KEY,
    decision_id      TEXT NOT NULL UNIQUE,
    account_id       TEXT NOT NULL,
    feature          TEXT NOT NULL,
    units            INTEGER NOT NULL CHECK (units >= 0),
    outcome          TEXT NOT NULL,
    code             TEXT,
    upstream_status  INTEGER,
    idempotency_key  TEXT NOT NULL,          -- the client's (scoped to the account) or the decision id
    charge_key       TEXT UNIQUE,            -- = idempotency_key when charged: one charge per key, ever
    decision         TEXT NOT NULL,          -- JSON: every layer checked, what it had and gave
    decided_at       INTEGER NOT NULL,
    completed_at     INTEGER NOT NULL,
    recorded_at      INTEGER NOT NULL
) STRICT;
CREATE INDEX usage_events_by_account ON usage_events (account_id, decided_at);

CREATE TABLE monetization_events (
    id                INTEGER PRIMARY KEY,
    usage_event_id    INTEGER NOT NULL UNIQUE REFERENCES usage_events (id),
    account_id        TEXT NOT NULL,
    feature           TEXT NOT NULL,
    units             INTEGER NOT NULL CHECK (units >= 0),
    credits           INTEGER NOT NULL CHECK (credits >= 0),   -- drawn from grants
    postpaid_credits  INTEGER NOT NULL CHECK (postpaid_credits >= 0),
    credits_per_unit  INTEGER NOT NULL CHECK (credits_per_unit >= 0),
    plan              TEXT NOT NULL,
    price_version     TEXT NOT NULL,
    draws             TEXT NOT NULL,         -- JSON: every pool drawn from, with units and credits
    decided_at        INTEGER NOT NULL,
    created_at        INTEGER NOT NULL
) STRICT;
CREATE INDEX monetization_events_by_time ON monetization_events (decided_at);

CREATE TABLE balance_updates (
    id                     INTEGER PRIMARY KEY,
    account_id             TEXT NOT NULL,
    grant_id               INTEGER NOT NULL REFERENCES grants (id),
    reason                 TEXT NOT NULL CHECK (reason IN ('grant', 'debit', 'refund', 'expired', 'overdraft_forgiven')),
    delta                  INTEGER NOT NULL,
    balance_after          INTEGER NOT NULL CHECK (balance_after >= 0),
    forgiven               INTEGER NOT NULL DEFAULT 0 CHECK (forgiven >= 0),
    monetization_event_id  INTEGER REFERENCES monetization_events (id),
    created_at             INTEGER NOT NULL,
    UNIQUE (grant_id, monetization_event_id, reason)
) STRICT;
CREATE INDEX balance_updates_by_account ON balance_updates (account_id, id);
