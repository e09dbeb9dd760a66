-- Each grant's balance gets a version: every statement that changes a balance adds one to it,
-- under the row's lock, so versions follow commit order per grant. A replica hears balances
-- from its own commits and from other replicas' notices, which can arrive after a newer
-- balance of the same grant (a notice is delivered in commit order, but a replica's own commit
-- is applied at once): the view keeps the balance of the highest version it has seen and
-- ignores an older one (src/accounts.rs).
ALTER TABLE grants ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
