-- Strict mode (several replicas that never overspend). PostgreSQL only: one SQLite process
-- decides every request itself and needs neither table.
--
-- usage_counters: the committed units of every window minute and free-tier period, per account
-- and layer (index in the plan), kept by the commit that charges them and the refund that
-- gives them back. A lease reads them instead of re-reading every monetization event. Each
-- writer (replica) keeps rows of its own, so that replicas charging one busy account never
-- wait on each other's counter row; a bucket's usage is the sum over writers (a refund takes
-- from its own writer's row, which may go below zero; the sum never does).
CREATE TABLE usage_counters (
    account_id  TEXT NOT NULL,
    layer       INTEGER NOT NULL CHECK (layer >= 0),
    at_ms       BIGINT NOT NULL,          -- a window's minute start, or a free tier's period start
    writer      TEXT NOT NULL,            -- the replica that wrote it ('migration': backfilled)
    units       BIGINT NOT NULL,
    PRIMARY KEY (account_id, layer, at_ms, writer)
);
CREATE INDEX usage_counters_by_time ON usage_counters (at_ms);

-- What was committed before this migration, for the last 40 days (the longest free-tier period
-- and every window the example configs use fit in it).
INSERT INTO usage_counters (account_id, layer, at_ms, writer, units)
SELECT m.account_id, (d->>'layer')::int,
       CASE d->>'pool' WHEN 'window' THEN (d->>'minute')::bigint * 60000
                       ELSE (d->>'period_start')::bigint END,
       'migration',
       SUM((d->>'units')::bigint)
FROM monetization_events m, jsonb_array_elements(m.draws::jsonb) AS d
WHERE m.refunded_at IS NULL
  AND d->>'pool' IN ('window', 'free_tier')
  AND m.decided_at >= (EXTRACT(EPOCH FROM now()) * 1000)::bigint - 40 * 86400000::bigint
GROUP BY 1, 2, 3
HAVING SUM((d->>'units')::bigint) > 0;

-- leases: the slice of a pool ('layer:<index>' or 'grant:<id>') a replica may spend. For every
-- pool, committed usage + the leases of every replica stay within the limit (or balance): a
-- lease is taken, and a commit turns lease into usage, under the account row's lock. A lease
-- its replica stops renewing lapses at expires_at (the database's clock).
CREATE TABLE leases (
    account_id  TEXT NOT NULL REFERENCES accounts (id),
    pool        TEXT NOT NULL,
    replica     TEXT NOT NULL,
    amount      BIGINT NOT NULL CHECK (amount >= 0),
    expires_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (account_id, pool, replica)
);
CREATE INDEX leases_by_replica ON leases (replica);
