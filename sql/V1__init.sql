-- stead schema, version 1.
--
-- Migrations run with search_path set to the target schema (default
-- "stead"), so nothing here names the schema: two stead clusters can share
-- one database under different schemas. Functions capture that search_path
-- with SET search_path FROM CURRENT, so they work from any caller session.

-- One row describing the cluster: the slot count is fixed when the cluster
-- is created (stead migrate inserts it).
CREATE TABLE cluster (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    slot_count integer NOT NULL CHECK (slot_count BETWEEN 1 AND 65536),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Registered workflow definitions; a new content makes version N+1.
CREATE TABLE workflows (
    name         text NOT NULL,
    version      integer NOT NULL CHECK (version >= 1),
    definition   jsonb NOT NULL,
    content_hash text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version),
    UNIQUE (name, content_hash)
);

-- One row per workflow instance.
CREATE TABLE instances (
    id               text PRIMARY KEY,
    workflow_name    text NOT NULL,
    workflow_version integer NOT NULL,
    slot             integer NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    input            jsonb NOT NULL DEFAULT 'null',
    output           jsonb,
    error            jsonb,
    -- Bumped by every engine transition; a transition commits only if the
    -- version it read is still current (fencing).
    state_version    bigint NOT NULL DEFAULT 0,
    -- Sequence number of the last event in stead.events.
    event_seq        integer NOT NULL DEFAULT 0,
    -- When the engine must look at the instance next (start, timers);
    -- null while it only waits for task results.
    wake_at          timestamptz,
    deadline_at      timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    ended_at         timestamptz,
    FOREIGN KEY (workflow_name, workflow_version) REFERENCES workflows (name, version)
);
CREATE INDEX instances_wake ON instances (wake_at) WHERE wake_at IS NOT NULL;
CREATE INDEX instances_newest ON instances (created_at DESC, id DESC);
CREATE INDEX instances_by_workflow ON instances (workflow_name, created_at DESC, id DESC);

-- One row per step that has left 'pending' (a step not yet reached has no row).
CREATE TABLE steps (
    instance_id  text NOT NULL,
    step_id      text NOT NULL,
    position     integer NOT NULL,
    kind         text NOT NULL,
    status       text NOT NULL
                 CHECK (status IN ('pending', 'scheduled', 'running', 'waiting', 'completed',
                                   'failed', 'skipped', 'cancelled', 'compensated')),
    attempt      integer NOT NULL DEFAULT 0,
    input        jsonb,
    output       jsonb,
    error        jsonb,
    scheduled_at timestamptz,
    started_at   timestamptz,
    ended_at     timestamptz,
    PRIMARY KEY (instance_id, step_id)
);

-- The queue: one row per attempt of a task or http step. Rows leave the
-- table once the engine has recorded their result.
CREATE TABLE tasks (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue               text NOT NULL,
    kind                text NOT NULL CHECK (kind IN ('task', 'http')),
    instance_id         text NOT NULL,
    step_id             text NOT NULL,
    slot                integer NOT NULL,
    attempt             integer NOT NULL,
    status              text NOT NULL DEFAULT 'ready'
                        CHECK (status IN ('ready', 'leased', 'completed', 'failed')),
    input               jsonb NOT NULL DEFAULT 'null',
    idempotency_key     text NOT NULL,
    run_at              timestamptz NOT NULL DEFAULT now(),
    timeout_ms          bigint,
    lease_token         uuid,
    leased_by           text,
    leased_at           timestamptz,
    lease_expires_at    timestamptz,
    attempt_deadline_at timestamptz,
    output              jsonb,
    error               jsonb,
    created_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz
);
CREATE INDEX tasks_ready ON tasks (queue, run_at, id) WHERE status = 'ready';
CREATE INDEX tasks_leased ON tasks (lease_expires_at) WHERE status = 'leased';
CREATE INDEX tasks_by_instance ON tasks (instance_id);
-- Results the engine has not recorded yet.
CREATE INDEX tasks_finished ON tasks (instance_id) WHERE status IN ('completed', 'failed');

-- The append-only history of every instance.
CREATE TABLE events (
    instance_id text NOT NULL,
    seq         integer NOT NULL,
    type        text NOT NULL,
    step_id     text,
    attempt     integer,
    data        jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, seq)
);

-- The slot of an instance id: the first 32 bits of md5(id), modulo the
-- cluster's slot count. Stable across PostgreSQL versions and computable
-- by any client.
CREATE FUNCTION slot_for(instance_id text) RETURNS integer
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path FROM CURRENT
AS $$
    SELECT (('x' || lpad(substr(md5(instance_id), 1, 8), 16, '0'))::bit(64)::bigint
            % (SELECT slot_count FROM cluster))::integer
$$;

-- The NOTIFY channel names of this schema.
CREATE FUNCTION channel(name text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path FROM CURRENT
AS $$ SELECT current_schema() || '.' || name $$;

-- Starts an instance (the one path used by the HTTP API and by SQL). It does
-- not NOTIFY: a NOTIFY serialises commits on a database-wide lock, so the API
-- coalesces its wake-ups instead (start_workflow below notifies).
-- Idempotent on id: the same id with the same workflow and input returns the
-- existing instance (created = false); a different one raises SQLSTATE ST409.
-- An unknown workflow or version raises ST404.
CREATE FUNCTION start_instance(p_workflow text, p_version integer, p_input jsonb, p_id text)
RETURNS TABLE (instance_id text, created boolean)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    v_version integer := p_version;
    v_id      text := coalesce(p_id, gen_random_uuid()::text);
    v_input   jsonb := coalesce(p_input, 'null'::jsonb);
    v_existing instances%ROWTYPE;
BEGIN
    IF v_id !~ '^[A-Za-z0-9._:@-]{1,200}$' THEN
        RAISE EXCEPTION 'stead: instance id must be 1-200 characters of [A-Za-z0-9._:@-]'
            USING ERRCODE = '22023';
    END IF;
    IF v_version IS NULL THEN
        SELECT max(w.version) INTO v_version FROM workflows w WHERE w.name = p_workflow;
        IF v_version IS NULL THEN
            RAISE EXCEPTION 'stead: workflow "%" is not registered', p_workflow USING ERRCODE = 'ST404';
        END IF;
    ELSIF NOT EXISTS (SELECT 1 FROM workflows w WHERE w.name = p_workflow AND w.version = v_version) THEN
        RAISE EXCEPTION 'stead: workflow "%" has no version %', p_workflow, v_version USING ERRCODE = 'ST404';
    END IF;

    INSERT INTO instances (id, workflow_name, workflow_version, slot, input, wake_at)
    VALUES (v_id, p_workflow, v_version, slot_for(v_id), v_input, now())
    ON CONFLICT (id) DO NOTHING;
    IF FOUND THEN
        RETURN QUERY SELECT v_id, true;
        RETURN;
    END IF;

    SELECT * INTO v_existing FROM instances i WHERE i.id = v_id;
    IF v_existing.workflow_name <> p_workflow OR v_existing.input <> v_input
       OR (p_version IS NOT NULL AND v_existing.workflow_version <> p_version) THEN
        RAISE EXCEPTION 'stead: instance "%" already exists with a different workflow or input', v_id
            USING ERRCODE = 'ST409';
    END IF;
    RETURN QUERY SELECT v_id, false;
END
$$;

-- Start a workflow from SQL, inside the caller's transaction: if that
-- transaction rolls back, the instance never existed.
CREATE FUNCTION start_workflow(name text, input jsonb, id text DEFAULT NULL) RETURNS text
LANGUAGE sql
SET search_path FROM CURRENT
AS $$
    SELECT s.instance_id
    FROM start_instance(name, NULL, input, id) s
    LEFT JOIN LATERAL (SELECT pg_notify(channel('advance'), '') WHERE s.created) n ON true
$$;

-- Operator view: one row per instance with the steps it is currently on.
CREATE VIEW instance_overview AS
SELECT i.id,
       i.workflow_name AS workflow,
       i.workflow_version AS version,
       i.status,
       coalesce((SELECT array_agg(s.step_id ORDER BY s.position)
                 FROM steps s
                 WHERE s.instance_id = i.id AND s.status IN ('scheduled', 'running', 'waiting')),
                '{}') AS current_steps,
       (SELECT count(*) FROM steps s WHERE s.instance_id = i.id
                                      AND s.status IN ('completed', 'skipped')) AS steps_done,
       i.error ->> 'message' AS error,
       i.created_at,
       i.updated_at,
       i.ended_at,
       i.ended_at - i.created_at AS duration
FROM instances i;

-- Operator view: queue depth per queue.
CREATE VIEW queue_depth AS
SELECT queue,
       count(*) FILTER (WHERE status = 'ready' AND run_at <= now()) AS ready,
       count(*) FILTER (WHERE status = 'leased') AS leased,
       count(*) FILTER (WHERE status = 'ready' AND run_at > now()) AS delayed,
       coalesce(now() - min(run_at) FILTER (WHERE status = 'ready' AND run_at <= now()),
                interval '0') AS oldest_ready_age
FROM tasks
WHERE status IN ('ready', 'leased')
GROUP BY queue;
