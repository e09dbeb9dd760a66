-- API keys get what an operator lists and revokes them by: a non-secret prefix of the key, when
-- it was created, and when it was revoked (a revoked key stays, for the record, but identifies
-- nobody). Keys stored before this migration show a prefix of their hash instead.
ALTER TABLE api_keys ADD COLUMN prefix TEXT NOT NULL DEFAULT '';
ALTER TABLE api_keys ADD COLUMN created_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN revoked_at BIGINT;
UPDATE api_keys SET prefix = 'sha256:' || substr(key_hash, 1, 8) WHERE prefix = '';
CREATE INDEX api_keys_account ON api_keys (account_id, prefix);
