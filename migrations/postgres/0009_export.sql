-- Billing export (twin of migrations/sqlite/0008_export.sql).
CREATE TABLE export_sinks (
    name         TEXT PRIMARY KEY,
    kind         TEXT NOT NULL CHECK (kind IN ('cloudevents', 'stripe')),
    active       BOOLEAN NOT NULL DEFAULT TRUE,
    lease_owner  TEXT,
    lease_until  BIGINT NOT NULL DEFAULT 0,
    created_at   BIGINT NOT NULL
);

CREATE TABLE export_outbox (
    id                     BIGSERIAL PRIMARY KEY,
    sink                   TEXT NOT NULL REFERENCES export_sinks (name),
    account_id             TEXT NOT NULL,
    monetization_event_id  BIGINT NOT NULL REFERENCES monetization_events (id),
    kind                   TEXT NOT NULL CHECK (kind IN ('charge', 'refund')),
    created_at             BIGINT NOT NULL,
    sent_at                BIGINT,         -- when the receiver answered (NULL: still to send)
    outcome                TEXT CHECK (outcome IN ('sent', 'rejected')),  -- rejected: a 4xx resending cannot fix
    attempts               BIGINT NOT NULL DEFAULT 0,
    UNIQUE (sink, monetization_event_id, kind)
);
CREATE INDEX export_outbox_unsent ON export_outbox (sink, id) WHERE sent_at IS NULL;

-- One row per exported account, locked (in account order, after every grant and account lock)
-- by a commit or refund before it writes outbox rows: two replicas' rows for one account then
-- take their ids in commit order, so id order is each account's order. (Ids come from a
-- sequence before commit; without the lock a later id could commit first.)
CREATE TABLE export_streams (
    account_id  TEXT PRIMARY KEY
);
