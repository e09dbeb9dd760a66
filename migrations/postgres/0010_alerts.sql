-- Threshold alerts (twin of migrations/sqlite/0009_alerts.sql).
CREATE TABLE alerts (
    id               BIGSERIAL PRIMARY KEY,
    account_id       TEXT NOT NULL,
    rule             TEXT NOT NULL,
    period_start     BIGINT NOT NULL,
    payload          TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT NOT NULL,
    sent_at          BIGINT,
    UNIQUE (account_id, rule, period_start)
);
CREATE INDEX alerts_unsent ON alerts (next_attempt_at) WHERE sent_at IS NULL;
