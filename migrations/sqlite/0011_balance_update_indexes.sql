-- The ledger writer's hottest table keeps only the indexes a statement reads, in an order that
-- appends. Every commit inserts a balance update per charge; an index led by the account or
-- the grant takes each of those inserts to another page (one per active account), and every
-- such page is rewritten into the WAL at each commit.
--
-- - balance_updates_by_account (account_id, id): no statement reads balance updates by account
--   (they are read by id, or by charge); dropped.
-- - UNIQUE (grant_id, monetization_event_id, reason) becomes UNIQUE (monetization_event_id,
--   grant_id, reason): the same rows are unique (one record per charge, grant and reason), but
--   new charges' ids only grow, so the index appends, and it now serves the reads by charge
--   (a charge's debits for a refund, a ledger page's balance updates).
--
-- SQLite cannot alter a table's UNIQUE: the table is rebuilt (as in 0004; migrations run with
-- foreign keys off and are checked afterwards; nothing refers to balance_updates).

CREATE TABLE balance_updates_new (
    id                     INTEGER PRIMARY KEY,
    account_id             TEXT NOT NULL,
    grant_id               INTEGER NOT NULL REFERENCES grants (id),
    reason                 TEXT NOT NULL CHECK (reason IN ('grant', 'debit', 'refund', 'expired', 'overdraft_forgiven')),
    delta                  INTEGER NOT NULL,
    balance_after          INTEGER NOT NULL CHECK (balance_after >= 0),
    forgiven               INTEGER NOT NULL DEFAULT 0 CHECK (forgiven >= 0),
    monetization_event_id  INTEGER REFERENCES monetization_events (id),
    created_at             INTEGER NOT NULL,
    UNIQUE (monetization_event_id, grant_id, reason)
) STRICT;

INSERT INTO balance_updates_new
SELECT id, account_id, grant_id, reason, delta, balance_after, forgiven, monetization_event_id, created_at
FROM balance_updates;

DROP TABLE balance_updates;
ALTER TABLE balance_updates_new RENAME TO balance_updates;
