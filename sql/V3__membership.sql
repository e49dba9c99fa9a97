-- stead schema, version 3: membership and slot ownership.

-- The advisory-lock class of this cluster's slot locks: the first key of
-- pg_try_advisory_lock(class, slot). Derived from the schema name, so two
-- clusters sharing a database never share a lock.
ALTER TABLE cluster ADD COLUMN lock_class integer;
UPDATE cluster SET lock_class = hashtext('stead-slots:' || current_schema());
ALTER TABLE cluster ALTER COLUMN lock_class SET DEFAULT hashtext('stead-slots:' || current_schema());

-- One row per worker member. Liveness is judged by the database clock:
-- heartbeat_at + ttl_ms against now().
CREATE TABLE members (
    name          text PRIMARY KEY,
    -- The member's dedicated session, which holds its slot locks.
    backend_pid   integer NOT NULL,
    backend_start timestamptz,
    ttl_ms        integer NOT NULL CHECK (ttl_ms > 0),
    joined_at     timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    api_url       text
);

-- Operator view: slot -> owner, as PostgreSQL itself sees it (pg_locks).
CREATE VIEW slot_owners AS
SELECT l.objid::integer AS slot,
       m.name AS owner,
       l.pid AS backend_pid
FROM pg_locks l
JOIN cluster c ON l.classid::integer = c.lock_class
LEFT JOIN members m ON m.backend_pid = l.pid
WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted
  AND l.objid::bigint < c.slot_count
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database());

-- Operator view: who holds the singleton duties (advisory locks of the same
-- class with negative keys: -1 = maintenance).
CREATE VIEW duty_holders AS
SELECT CASE l.objid::bigint WHEN 4294967295 THEN 'maintenance' ELSE l.objid::text END AS duty,
       m.name AS holder,
       l.pid AS backend_pid
FROM pg_locks l
JOIN cluster c ON l.classid::integer = c.lock_class
LEFT JOIN members m ON m.backend_pid = l.pid
WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted
  AND l.objid::bigint >= c.slot_count
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database());

-- Operator view: members with liveness and owned-slot counts.
CREATE VIEW members_overview AS
SELECT m.name,
       m.heartbeat_at + make_interval(secs => m.ttl_ms / 1000.0) > now()
           AND EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = m.backend_pid) AS alive,
       m.heartbeat_at,
       now() - m.heartbeat_at AS since_heartbeat,
       m.ttl_ms,
       m.joined_at,
       m.backend_pid,
       (SELECT count(*) FROM slot_owners o WHERE o.backend_pid = m.backend_pid) AS slots_owned,
       m.api_url
FROM members m;
