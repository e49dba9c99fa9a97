-- stead schema, version 2: timers, signals, cancellation, compensation,
-- fan-out and child workflows.

ALTER TABLE instances
    ADD COLUMN parent_id           text,
    ADD COLUMN parent_step         text,
    -- The parent's task row this child reports its end to.
    ADD COLUMN parent_task_id      bigint,
    ADD COLUMN cancel_requested_at timestamptz,
    ADD COLUMN cancel_reason       text,
    ADD COLUMN retry_requested_at  timestamptz,
    -- Set while the instance winds down (compensations run) towards this end.
    ADD COLUMN ending              text CHECK (ending IN ('failed', 'cancelled'));
CREATE INDEX instances_children ON instances (parent_id) WHERE parent_id IS NOT NULL;

ALTER TABLE steps
    ADD COLUMN wake_at          timestamptz,
    ADD COLUMN completion_order integer,
    -- for_each: one element per item {status, attempt, input, output, error, started_at, ended_at}.
    ADD COLUMN items            jsonb,
    -- {status, attempt, input, output, error} once the step's compensation began.
    ADD COLUMN compensation     jsonb;

ALTER TABLE tasks
    ADD COLUMN item    integer,
    ADD COLUMN purpose text NOT NULL DEFAULT 'run' CHECK (purpose IN ('run', 'compensate'));
ALTER TABLE tasks DROP CONSTRAINT tasks_kind_check;
ALTER TABLE tasks ADD CONSTRAINT tasks_kind_check CHECK (kind IN ('task', 'http', 'workflow'));

-- Signals delivered to instances; buffered until a step consumes them.
CREATE TABLE signals (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id text NOT NULL,
    name        text NOT NULL,
    payload     jsonb NOT NULL DEFAULT 'null',
    created_at  timestamptz NOT NULL DEFAULT now(),
    consumed_at timestamptz,
    consumed_by text
);
CREATE INDEX signals_pending ON signals (instance_id, id) WHERE consumed_at IS NULL;

-- The status of an instance; raises ST404 if there is none.
CREATE FUNCTION existing_status(p_id text) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_status text;
BEGIN
    SELECT status INTO v_status FROM instances WHERE id = p_id;
    IF v_status IS NULL THEN
        RAISE EXCEPTION 'stead: instance "%" does not exist', p_id USING ERRCODE = 'ST404';
    END IF;
    RETURN v_status;
END
$$;

-- Delivers a signal (the one path used by the HTTP API and by SQL). Raises
-- ST404 for an unknown instance and ST409 for an ended one.
CREATE FUNCTION send_signal(p_id text, p_name text, p_payload jsonb) RETURNS bigint
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    v_status text;
    v_signal bigint;
BEGIN
    IF p_name IS NULL OR p_name !~ '^[A-Za-z0-9._:@-]{1,200}$' THEN
        RAISE EXCEPTION 'stead: signal name must be 1-200 characters of [A-Za-z0-9._:@-]'
            USING ERRCODE = '22023';
    END IF;
    v_status := existing_status(p_id);
    IF v_status IN ('completed', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'stead: instance "%" has ended (%)', p_id, v_status USING ERRCODE = 'ST409';
    END IF;
    INSERT INTO signals (instance_id, name, payload)
    VALUES (p_id, p_name, coalesce(p_payload, 'null'::jsonb))
    RETURNING id INTO v_signal;
    UPDATE instances SET wake_at = now()
    WHERE id = p_id AND (wake_at IS NULL OR wake_at > now());
    RETURN v_signal;
END
$$;

-- Asks an instance to cancel (compensations run, then it ends 'cancelled').
-- Cancelling twice is harmless; an ended instance raises ST409.
CREATE FUNCTION request_cancel(p_id text, p_reason text) RETURNS void
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    v_status text;
BEGIN
    UPDATE instances
    SET cancel_requested_at = coalesce(cancel_requested_at, now()),
        cancel_reason = coalesce(cancel_reason, p_reason, 'cancelled'),
        wake_at = now()
    WHERE id = p_id AND status NOT IN ('completed', 'failed', 'cancelled')
    RETURNING status INTO v_status;
    IF v_status IS NULL THEN
        RAISE EXCEPTION 'stead: instance "%" has already ended (%)', p_id, existing_status(p_id)
            USING ERRCODE = 'ST409';
    END IF;
END
$$;

-- Asks a failed instance to run again from its failed steps.
CREATE FUNCTION request_retry(p_id text) RETURNS void
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    v_status text;
BEGIN
    UPDATE instances SET retry_requested_at = now(), wake_at = now()
    WHERE id = p_id AND status = 'failed'
    RETURNING status INTO v_status;
    IF v_status IS NULL THEN
        RAISE EXCEPTION 'stead: only failed instances can be retried; "%" is %', p_id,
            existing_status(p_id) USING ERRCODE = 'ST409';
    END IF;
END
$$;

-- SQL interface, usable inside the caller's transaction.
CREATE FUNCTION signal(id text, name text, payload jsonb DEFAULT 'null') RETURNS void
LANGUAGE sql
SET search_path FROM CURRENT
AS $$ SELECT send_signal(id, name, payload), pg_notify(channel('advance'), '') $$;

CREATE FUNCTION cancel(id text, reason text DEFAULT NULL) RETURNS void
LANGUAGE sql
SET search_path FROM CURRENT
AS $$ SELECT request_cancel(id, reason), pg_notify(channel('advance'), '') $$;

-- Operator view: instances waiting on timers or signals.
CREATE VIEW waiting_steps AS
SELECT s.instance_id, s.step_id, s.kind, s.wake_at, s.scheduled_at AS waiting_since
FROM steps s
WHERE s.status = 'waiting';
