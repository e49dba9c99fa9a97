-- stead schema, version 4: who made each transition.

-- The member whose advancer wrote each history entry (null for entries
-- written before this version): with the slot owners over time, it shows
-- that a slot was only ever worked by the member holding it.
ALTER TABLE events ADD COLUMN member text;
