-- The ledger: accounts and their grants, and three linked datasets (PostgreSQL twin of
-- migrations/sqlite/0001_ledger.sql: same tables, columns and constraints).
-- usage_events: every request, charged or not.  monetization_events: every charge, and why.
-- balance_updates: every change of a grant's balance, and why.  Money is BIGINT everywhere.

CREATE TABLE accounts (
    id          TEXT PRIMARY KEY,
    plan        TEXT NOT NULL,
    suspended   BOOLEAN NOT NULL DEFAULT FALSE,
    created_at  BIGINT NOT NULL
);

CREATE TABLE api_keys (
    key_hash    TEXT PRIMARY KEY,            -- SHA-256 hex; keys are never stored in clear
    account_id  TEXT NOT NULL REFERENCES accounts (id)
);

CREATE TABLE grants (
    id           BIGSERIAL PRIMARY KEY,
    account_id   TEXT NOT NULL REFERENCES accounts (id),
    external_id  TEXT NOT NULL,              -- the granter's id: a grant is given once
    kind         TEXT NOT NULL CHECK (kind IN ('credits', 'promotion', 'enterprise')),
    amount       BIGINT NOT NULL CHECK (amount > 0),
    balance      BIGINT NOT NULL CHECK (balance >= 0 AND balance <= amount),
    expires_at   BIGINT,                     -- ms since epoch; NULL: never
    priority     BIGINT NOT NULL DEFAULT 0,
    features     TEXT,                       -- JSON array of feature names; NULL: all
    created_at   BIGINT NOT NULL,
    UNIQUE (account_id, external_id)
);

CREATE TABLE usage_events (
    id               BIGSERIAL PRIMARY KEY,
    decision_id      TEXT NOT NULL UNIQUE,
    account_id       TEXT NOT NULL,
    feature          TEXT NOT NULL,
    units            BIGINT NOT NULL CHECK (units >= 0),
    outcome          TEXT NOT NULL,
    code             TEXT,
    upstream_status  BIGINT,
    idempotency_key  TEXT NOT NULL,          -- the client's (scoped to the account) or the decision id
    charge_key       TEXT UNIQUE,            -- = idempotency_key when charged: one charge per key, ever
    decision         TEXT NOT NULL,          -- JSON: every layer checked, what it had and gave
    decided_at       BIGINT NOT NULL,
    completed_at     BIGINT NOT NULL,
    recorded_at      BIGINT NOT NULL
);
CREATE INDEX usage_events_by_account ON usage_events (account_id, decided_at);

CREATE TABLE monetization_events (
    id                BIGSERIAL PRIMARY KEY,
    usage_event_id    BIGINT NOT NULL UNIQUE REFERENCES usage_events (id),
    account_id        TEXT NOT NULL,
    feature           TEXT NOT NULL,
    units             BIGINT NOT NULL CHECK (units >= 0),
    credits           BIGINT NOT NULL CHECK (credits >= 0),   -- drawn from grants
    postpaid_credits  BIGINT NOT NULL CHECK (postpaid_credits >= 0),
    credits_per_unit  BIGINT NOT NULL CHECK (credits_per_unit >= 0),
    plan              TEXT NOT NULL,
    price_version     TEXT NOT NULL,
    draws             TEXT NOT NULL,         -- JSON: every pool drawn from, with units and credits
    decided_at        BIGINT NOT NULL,
    created_at        BIGINT NOT NULL
);
CREATE INDEX monetization_events_by_time ON monetization_events (decided_at);

CREATE TABLE balance_updates (
    id                     BIGSERIAL PRIMARY KEY,
    account_id             TEXT NOT NULL,
    grant_id               BIGINT NOT NULL REFERENCES grants (id),
    reason                 TEXT NOT NULL CHECK (reason IN ('grant', 'debit', 'refund', 'expired', 'overdraft_forgiven')),
    delta                  BIGINT NOT NULL,
    balance_after          BIGINT NOT NULL CHECK (balance_after >= 0),
    forgiven               BIGINT NOT NULL DEFAULT 0 CHECK (forgiven >= 0),
    monetization_event_id  BIGINT REFERENCES monetization_events (id),
    created_at             BIGINT NOT NULL,
    UNIQUE (grant_id, monetization_event_id, reason)
);
CREATE INDEX balance_updates_by_account ON balance_updates (account_id, id);
