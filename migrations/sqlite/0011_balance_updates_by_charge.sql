-- Reconcile reads each charge with its balance updates in one pass (a join per monetization
-- event, in id order): without this index every reconcile would sort all balance updates by
-- charge first. Charges are written in id order, so new entries land at the index's end.
CREATE INDEX balance_updates_by_charge ON balance_updates (monetization_event_id);
