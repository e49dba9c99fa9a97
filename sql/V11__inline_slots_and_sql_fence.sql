-- stead schema, version 11: the slot of an id computed inline, and an advance
-- batch fenced in SQL.
--
-- slot_for() is a SQL function with SET search_path and a subquery, so
-- PostgreSQL cannot inline it: each call plans its body again, about 56 us,
-- a fifth of a single start's database time. slot_of() takes the slot count
-- as an argument and uses built-ins only, so it is inlined where it is used.

-- The slot of an instance id among slot_count slots: the first 32 bits of
-- md5(id), modulo slot_count (what slot_for has always computed).
CREATE FUNCTION slot_of(instance_id text, slot_count integer) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (('x' || lpad(substr(md5(instance_id), 1, 8), 16, '0'))::bit(64)::bigint
        % slot_count)::integer;

-- The slot of an instance id in this cluster.
CREATE OR REPLACE FUNCTION slot_for(instance_id text) RETURNS integer
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path FROM CURRENT
AS $$ SELECT slot_of(instance_id, (SELECT slot_count FROM cluster)) $$;

-- The start of version 5, with the slot computed inline.
CREATE OR REPLACE FUNCTION start_instance(p_workflow text, p_version integer, p_input jsonb, p_id text)
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
    IF NOT valid_id(v_id) THEN
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
    VALUES (v_id, p_workflow, v_version, slot_of(v_id, (SELECT slot_count FROM cluster)), v_input, now())
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

-- CREATE OR REPLACE drops the settings version 9 gave it.
ALTER FUNCTION start_instance(text, integer, jsonb, text) SET plan_cache_mode = auto;

-- An advance batch's fence: raises (ST412, DETAIL the number moved on) when
-- fewer of the batch's instances were updated than it holds, so the
-- statements and the COMMIT sent in the same round trip write nothing.
CREATE FUNCTION batch_current(updated bigint, expected bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    IF updated <> expected THEN
        RAISE EXCEPTION 'stead: % of the batch''s % instances moved on since they were read',
            expected - updated, expected
            USING ERRCODE = 'ST412', DETAIL = (expected - updated)::text;
    END IF;
    RETURN updated;
END
$$;
