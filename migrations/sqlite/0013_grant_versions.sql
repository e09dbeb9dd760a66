-- Each grant's balance gets a version: every statement that changes a balance adds one to it,
-- under the row's write lock, so versions follow commit order per grant. A replica hears
-- balances from its own commits and, on PostgreSQL, from other replicas' notices, which can
-- arrive after a newer balance of the same grant: the view keeps the balance of the highest
-- version it has seen and ignores an older one (src/accounts.rs).
ALTER TABLE grants ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
