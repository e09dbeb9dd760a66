-- Threshold alerts (PostgreSQL twin: migrations/postgres/0010_alerts.sql). One row per alert
-- that fired: unique per (account, rule, period start), so that it fires once per period however
-- many gateways evaluate it or restart. The webhook's body is stored as it will be sent.
CREATE TABLE alerts (
    id               INTEGER PRIMARY KEY,
    account_id       TEXT NOT NULL,
    rule             TEXT NOT NULL,
    period_start     INTEGER NOT NULL,           -- ms since epoch
    payload          TEXT NOT NULL,              -- JSON: the webhook's body
    created_at       INTEGER NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL,           -- also the claim: a sender pushes it past its send
    sent_at          INTEGER,                    -- the webhook answered 2xx (NULL: still to send)
    UNIQUE (account_id, rule, period_start)
) STRICT;
CREATE INDEX alerts_unsent ON alerts (next_attempt_at) WHERE sent_at IS NULL;
