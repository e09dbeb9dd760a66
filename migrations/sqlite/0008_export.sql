-- Billing export (PostgreSQL twin: migrations/postgres/0009_export.sql).
-- export_sinks: the configured receivers; the gateway registers its [[export]] sinks at start-up,
-- and the commit writes an outbox row for every active one. The lease says which gateway sends
-- a sink's rows (one sender per sink keeps each account's events in order).
CREATE TABLE export_sinks (
    name         TEXT PRIMARY KEY,
    kind         TEXT NOT NULL CHECK (kind IN ('cloudevents', 'stripe')),
    active       INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
    lease_owner  TEXT,
    lease_until  INTEGER NOT NULL DEFAULT 0,   -- ms since epoch
    created_at   INTEGER NOT NULL
) STRICT;

-- One row per (sink, charge or refund), written in the transaction that commits the charge (or
-- the refund); sent in id order, marked sent only after the receiver answered 2xx.
CREATE TABLE export_outbox (
    id                     INTEGER PRIMARY KEY,
    sink                   TEXT NOT NULL REFERENCES export_sinks (name),
    account_id             TEXT NOT NULL,
    monetization_event_id  INTEGER NOT NULL REFERENCES monetization_events (id),
    kind                   TEXT NOT NULL CHECK (kind IN ('charge', 'refund')),
    created_at             INTEGER NOT NULL,
    sent_at                INTEGER,         -- when the receiver answered (NULL: still to send)
    outcome                TEXT CHECK (outcome IN ('sent', 'rejected')),  -- rejected: a 4xx resending cannot fix
    attempts               INTEGER NOT NULL DEFAULT 0,
    UNIQUE (sink, monetization_event_id, kind)
) STRICT;
CREATE INDEX export_outbox_unsent ON export_outbox (sink, id) WHERE sent_at IS NULL;
