-- stead schema, version 16: generated instance ids are time-ordered.
--
-- A random (v4) UUID puts each new instance, its steps, its history and its
-- tasks at a random place of every index keyed by the instance id, so once
-- those indexes outgrow memory every start and every step reads and dirties
-- a page of its own (and writes it whole to the WAL after each checkpoint):
-- throughput fell by a third from 10 thousand to 1 million stored
-- instances. A version-7 UUID (RFC 9562: 48 bits of Unix milliseconds,
-- then 74 random bits) sorts by creation time, so new rows go to the
-- right-hand pages of those indexes, which stay in memory however much
-- history is kept. Ids given by the caller are used as they are.

-- A version-7 UUID (the time from clock_timestamp(), so ids generated in
-- one statement still follow each other). A plain SQL expression, so it is
-- inlined where it is used.
CREATE FUNCTION uuid_v7() RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE
RETURN encode(
    set_bit(
        set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1),
        53, 1),
    'hex')::uuid;

-- The batch start of version 10, with time-ordered ids.
CREATE OR REPLACE FUNCTION start_instances(p_workflow text, p_version integer, p_inputs jsonb[], p_ids text[])
RETURNS TABLE (ord integer, instance_id text, outcome text)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    v_version integer := p_version;
    v_ids     text[];
    v_created text[];
    v_slots   integer := (SELECT slot_count FROM cluster);
    v_inserted bigint;
BEGIN
    IF p_ids IS NOT NULL AND cardinality(p_ids) <> cardinality(p_inputs) THEN
        RAISE EXCEPTION 'stead: ids must have one element per input (% ids for % inputs)',
            cardinality(p_ids), cardinality(p_inputs) USING ERRCODE = '22023';
    END IF;
    IF v_version IS NULL THEN
        SELECT max(w.version) INTO v_version FROM workflows w WHERE w.name = p_workflow;
        IF v_version IS NULL THEN
            RAISE EXCEPTION 'stead: workflow "%" is not registered', p_workflow USING ERRCODE = 'ST404';
        END IF;
    ELSIF NOT EXISTS (SELECT 1 FROM workflows w WHERE w.name = p_workflow AND w.version = v_version) THEN
        RAISE EXCEPTION 'stead: workflow "%" has no version %', p_workflow, v_version USING ERRCODE = 'ST404';
    END IF;
    IF coalesce(cardinality(p_inputs), 0) = 0 THEN
        RETURN;
    END IF;

    v_ids := ARRAY(SELECT coalesce(p_ids[o], uuid_v7()::text)
                   FROM generate_subscripts(p_inputs, 1) o ORDER BY o);

    -- Every id generated here: all valid and distinct, so one insert with
    -- no check, sort or second look, unless (never, in practice) a random
    -- id was taken.
    IF p_ids IS NULL THEN
        INSERT INTO instances (id, workflow_name, workflow_version, slot, input, wake_at)
        SELECT t.id, p_workflow, v_version,
               (('x' || lpad(substr(md5(t.id), 1, 8), 16, '0'))::bit(64)::bigint % v_slots)::integer,
               coalesce(t.input, 'null'::jsonb), now()
        FROM unnest(v_ids, p_inputs) AS t(id, input)
        ON CONFLICT (id) DO NOTHING;
        GET DIAGNOSTICS v_inserted = ROW_COUNT;
        IF v_inserted = cardinality(v_ids) THEN
            RETURN QUERY SELECT t.o::integer, t.id, 'created'::text
                         FROM unnest(v_ids) WITH ORDINALITY AS t(id, o) ORDER BY t.o;
            RETURN;
        END IF;
        RAISE EXCEPTION 'stead: a generated instance id was already taken; start the batch again'
            USING ERRCODE = '40001';
    END IF;

    -- Statement 1: insert the valid ids, the first occurrence of each.
    WITH inserted AS (
        INSERT INTO instances (id, workflow_name, workflow_version, slot, input, wake_at)
        -- slot_for(id), inlined: a function call per row costs more than
        -- the insert.
        SELECT DISTINCT ON (t.id) t.id, p_workflow, v_version,
               (('x' || lpad(substr(md5(t.id), 1, 8), 16, '0'))::bit(64)::bigint % v_slots)::integer,
               coalesce(t.input, 'null'::jsonb), now()
        FROM unnest(v_ids, p_inputs) WITH ORDINALITY AS t(id, input, o)
        WHERE valid_id(t.id)
        ORDER BY t.id, t.o
        ON CONFLICT (id) DO NOTHING
        RETURNING id
    )
    SELECT coalesce(array_agg(inserted.id), '{}') INTO v_created FROM inserted;

    -- Statement 2, a fresh snapshot (read committed): it sees what statement
    -- 1 inserted and what a concurrent start committed meanwhile.
    RETURN QUERY
    SELECT t.o::integer,
           t.id,
           CASE
               WHEN NOT valid_id(t.id) THEN 'invalid'
               WHEN c.id IS NOT NULL
                    AND t.o = min(t.o) OVER (PARTITION BY t.id) THEN 'created'
               WHEN e.workflow_name = p_workflow
                    AND e.input = coalesce(t.input, 'null'::jsonb)
                    AND (p_version IS NULL OR e.workflow_version = p_version) THEN 'existing'
               ELSE 'conflict'
           END
    FROM unnest(v_ids, p_inputs) WITH ORDINALITY AS t(id, input, o)
    LEFT JOIN unnest(v_created) AS c(id) ON c.id = t.id
    LEFT JOIN instances e ON e.id = t.id
    ORDER BY t.o;
END
$$;

ALTER FUNCTION start_instances(text, integer, jsonb[], text[]) SET plan_cache_mode = auto;

-- The start of version 11, with a time-ordered id.
CREATE OR REPLACE FUNCTION start_instance(p_workflow text, p_version integer, p_input jsonb, p_id text)
RETURNS TABLE (instance_id text, created boolean)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    v_version integer := p_version;
    v_id      text := coalesce(p_id, uuid_v7()::text);
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

ALTER FUNCTION start_instance(text, integer, jsonb, text) SET plan_cache_mode = auto;

-- The list filtered by a status other than completed (failed, cancelled,
-- running, pending: what an operator looks for) read the newest-first index
-- past every completed instance, 0.1 s at a million stored and growing with
-- them. This index holds only the instances not completed, so such a page
-- is a probe whatever the history holds; a completed instance leaves it,
-- so it stays the size of what is in flight or went wrong.
CREATE INDEX instances_unfinished ON instances (status, created_at DESC, id DESC)
    WHERE status <> 'completed';
