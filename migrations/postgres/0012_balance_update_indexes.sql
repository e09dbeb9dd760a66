-- The ledger writer's hottest table keeps only the indexes a statement reads, in an order that
-- appends (see the SQLite migration 0011 for the reasoning; the same two changes):
-- - balance_updates_by_account: no statement reads balance updates by account; dropped.
-- - the unique key (grant_id, monetization_event_id, reason) is rebuilt as
--   (monetization_event_id, grant_id, reason): the same rows are unique, inserts go to the
--   index's right edge, and reads by charge (refunds, ledger pages) use it.

DROP INDEX balance_updates_by_account;
ALTER TABLE balance_updates
    DROP CONSTRAINT balance_updates_grant_id_monetization_event_id_reason_key,
    ADD CONSTRAINT balance_updates_charge_grant_reason UNIQUE (monetization_event_id, grant_id, reason);
