-- A charge key is unique within its account: two columns under one unique index, never one
-- joined string (account "a" with key "b:c" and account "a:b" with key "c" used to share
-- "a:b:c"). charge_key becomes "k:<client key>" or "d:<decision id>", so a client's key can
-- never equal a gateway-assigned one; idempotency_key keeps the client's key as sent.

ALTER TABLE usage_events DROP CONSTRAINT usage_events_charge_key_key;

UPDATE usage_events
SET charge_key = CASE
        WHEN charge_key = decision_id THEN 'd:' || decision_id
        ELSE 'k:' || substr(charge_key, length(account_id) + 2)
    END
WHERE charge_key IS NOT NULL;

UPDATE usage_events
SET idempotency_key = substr(idempotency_key, length(account_id) + 2)
WHERE idempotency_key <> decision_id
  AND left(idempotency_key, length(account_id) + 1) = account_id || ':';

ALTER TABLE usage_events
    ADD CONSTRAINT usage_events_account_charge_key UNIQUE (account_id, charge_key);
