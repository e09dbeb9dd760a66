-- Only a client's key needs an index of its own to be charged once. A gateway-assigned key is
-- "d:" and the decision id, and decision_id is UNIQUE already: two rows with one such key
-- would be two rows with one decision id. So UNIQUE (account_id, charge_key) becomes a
-- partial unique index over the client keys ("k:"), and a request sent without a key writes
-- no entry there. `ON CONFLICT DO NOTHING` names no index, so it covers this one as it
-- covered the constraint; a second writer with the same gateway-assigned key waits on the
-- decision id's entry instead, in the same (account, key) insert order.

ALTER TABLE usage_events DROP CONSTRAINT usage_events_account_charge_key;
CREATE UNIQUE INDEX usage_events_client_charge ON usage_events (account_id, charge_key)
    WHERE charge_key LIKE 'k:%';
