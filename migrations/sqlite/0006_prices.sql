-- Prices in the ledger: every price version a plan has had, so that reconciliation checks each
-- charge against the version it was charged under, after any number of price changes; and what
-- a dimension-priced charge measured (its model, and the quantity of each dimension).
CREATE TABLE price_tables (
    plan            TEXT NOT NULL,
    version         TEXT NOT NULL,
    effective_from  INTEGER NOT NULL,     -- ms since epoch; the smallest integer: from the start
    prices          TEXT NOT NULL,        -- JSON: credits per unit and rates, by feature name
    PRIMARY KEY (plan, version)
) STRICT;

ALTER TABLE monetization_events ADD COLUMN model TEXT;
ALTER TABLE monetization_events ADD COLUMN dimensions TEXT;  -- JSON object: dimension → quantity
