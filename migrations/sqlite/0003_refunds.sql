-- Refunds: a charge refunded by an operator gives its credits back to exactly the grants that
-- paid (balance updates with reason 'refund') and its units back to the windows and free tier;
-- refunded_at marks it, so that it neither counts against windows after a restart nor is
-- refunded twice.
ALTER TABLE monetization_events ADD COLUMN refunded_at INTEGER;
