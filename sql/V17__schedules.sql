-- stead schema, version 17: schedules.
--
-- A schedule starts an instance of a workflow at each time its cron names
-- in its zone. The maintenance-duty holder fires the due ones (database
-- time): it locks the schedule's row, starts the instance with the id
-- `sched:<name>:<firing in UTC>` and moves next_fire_at on, in one
-- transaction, so a firing starts exactly one instance however often it is
-- tried. next_fire_at is computed by stead (the cron and zone rules are
-- its), NULL when the cron names no further time.
CREATE TABLE schedules (
    name             text PRIMARY KEY
                     CHECK (length(name) BETWEEN 1 AND 160 AND name !~ '[^A-Za-z0-9._@-]'),
    workflow_name    text NOT NULL,
    cron             text NOT NULL,
    timezone         text NOT NULL DEFAULT 'UTC',
    input            jsonb NOT NULL DEFAULT 'null',
    overlap          text NOT NULL DEFAULT 'skip'
                     CHECK (overlap IN ('skip', 'allow', 'cancel_previous')),
    -- How far back late firings are made up (after downtime); at least the
    -- node's schedule grace.
    catchup_ms       bigint NOT NULL DEFAULT 0 CHECK (catchup_ms >= 0),
    paused           boolean NOT NULL DEFAULT false,
    next_fire_at     timestamptz,
    last_fired_at    timestamptz,
    last_instance_id text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX schedules_due ON schedules (next_fire_at) WHERE NOT paused;

-- Operator view: each schedule with the status of the instance its last
-- firing started.
CREATE VIEW schedule_overview AS
SELECT s.name, s.workflow_name, s.cron, s.timezone, s.overlap, s.catchup_ms, s.paused,
       s.next_fire_at, s.last_fired_at, s.last_instance_id,
       i.status AS last_instance_status
FROM schedules s
LEFT JOIN instances i ON i.id = s.last_instance_id;
