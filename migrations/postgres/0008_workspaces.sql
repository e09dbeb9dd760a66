-- Workspaces: a member account draws the credit grants of its workspace (another account, which
-- has no workspace itself) in its plan's `workspace` layers. NULL: not a member.
ALTER TABLE accounts ADD COLUMN workspace TEXT;
