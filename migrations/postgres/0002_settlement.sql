-- Settlement (twin of migrations/sqlite/0002_settlement.sql): usage_events.units is what was
-- used; the monetization event keeps the estimate and the used units nobody could pay.
ALTER TABLE monetization_events ADD COLUMN estimated_units BIGINT NOT NULL DEFAULT 0 CHECK (estimated_units >= 0);
ALTER TABLE monetization_events ADD COLUMN forgiven_units BIGINT NOT NULL DEFAULT 0 CHECK (forgiven_units >= 0);
