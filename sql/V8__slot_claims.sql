-- stead schema, version 8: which member last claimed each slot, and whether
-- it let go of it cleanly.
--
-- In-process attempts run inline leave no trace until their batch commits,
-- so an attempt that kills its process would run again, uncounted, on every
-- member that inherits the slot: a crash loop with no attempt limit. A
-- member that takes a slot its previous holder did not release (it died
-- holding it) therefore runs that slot's attempts through task rows for a
-- while, where each attempt is counted before it runs.
CREATE TABLE slot_claims (
    slot       integer PRIMARY KEY,
    member     text NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    -- Set when the member released the slot (a handover or a clean leave).
    released   boolean NOT NULL DEFAULT false
);
