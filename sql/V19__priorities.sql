-- stead schema, version 19: priorities.
--
-- An instance's priority (0-1000, default 0; higher first) is inherited by
-- its tasks. Work is served as if it had become ready `priority` seconds
-- earlier than it did: an instance starts with wake_at that much in the
-- past, and a ready task is claimed in ready_key order (run_at less its
-- priority in seconds). So a higher priority goes first, and a lower one
-- waits at most the difference in seconds longer than work that became
-- ready with it: nothing starves.
ALTER TABLE instances ADD COLUMN priority smallint NOT NULL DEFAULT 0
    CHECK (priority BETWEEN 0 AND 1000);
ALTER TABLE tasks ADD COLUMN priority smallint NOT NULL DEFAULT 0;
-- Set for every ready task (NULL for rows inserted leased).
ALTER TABLE tasks ADD COLUMN ready_key timestamptz;
UPDATE tasks SET ready_key = run_at WHERE status = 'ready';

DROP INDEX tasks_ready;
CREATE INDEX tasks_ready ON tasks (queue, ready_key, id) WHERE status = 'ready';
