-- Settlement: a route may charge an estimate up front and settle the true cost from the
-- response. usage_events.units is what was used; the monetization event keeps the estimate and
-- the used units nobody could pay (forgiven), so the difference is on the record.
ALTER TABLE monetization_events ADD COLUMN estimated_units INTEGER NOT NULL DEFAULT 0 CHECK (estimated_units >= 0);
ALTER TABLE monetization_events ADD COLUMN forgiven_units INTEGER NOT NULL DEFAULT 0 CHECK (forgiven_units >= 0);
