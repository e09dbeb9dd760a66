-- Refunds (twin of migrations/sqlite/0003_refunds.sql).
ALTER TABLE monetization_events ADD COLUMN refunded_at BIGINT;
