-- Shadow mode: an account whose requests are decided and recorded but never blocked and never
-- charged (a plan or a route can be shadowed in the config too).
ALTER TABLE accounts ADD COLUMN shadow INTEGER NOT NULL DEFAULT 0 CHECK (shadow IN (0, 1));

-- A shadow decision's usage event: `shadow` is what enforcing would have done, 'admit' or
-- 'deny' (NULL: the decision was enforced); `code` then holds the would-be denial's code.
-- `shadow_draws` (JSON, like monetization_events.draws) are the window and free-tier draws
-- the request counted: counters, not money, rebuilt from here on a restart. A shadow event
-- never has a charge_key, a monetization event or a balance update.
ALTER TABLE usage_events ADD COLUMN shadow TEXT CHECK (shadow IN ('admit', 'deny'));
ALTER TABLE usage_events ADD COLUMN shadow_draws TEXT;
CREATE INDEX usage_events_shadow_draws ON usage_events (decided_at) WHERE shadow_draws IS NOT NULL;
