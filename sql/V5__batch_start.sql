-- stead schema, version 5: starting many instances at once, and starts
-- that cost less.

-- Whether an id is 1-200 characters of [A-Za-z0-9._:@-]. (A bounded
-- repetition like {1,200} makes PostgreSQL's regex engine slow, about 70 us
-- a call; a length test and a negated class are not.)
CREATE FUNCTION valid_id(id text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN length(id) BETWEEN 1 AND 200 AND id !~ '[^A-Za-z0-9._:@-]';

-- The same start as version 1's, with the faster id check.
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

-- Starts one instance per element of p_inputs (ids from p_ids, or generated
-- where p_ids or its element is null), all of one workflow version, in two
-- statements whatever the batch size. One row per input, in input order:
-- ord (1-based), the id, and the outcome:
--   created   - inserted now;
--   existing  - already there with the same workflow and input (idempotent);
--   conflict  - already there with a different workflow, version or input;
--   invalid   - the id is not 1-200 characters of [A-Za-z0-9._:@-].
-- The same id twice in one batch is the first created and the second
-- existing (same input) or conflict (different input). Nothing raises for a
-- bad item: callers decide (start_workflows raises, the HTTP API reports
-- each item). An unknown workflow or version raises ST404. No NOTIFY.
CREATE FUNCTION start_instances(p_workflow text, p_version integer, p_inputs jsonb[], p_ids text[])
RETURNS TABLE (ord integer, instance_id text, outcome text)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    v_version integer := p_version;
    v_ids     text[];
    v_created text[];
    v_slots   integer := (SELECT slot_count FROM cluster);
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

    v_ids := ARRAY(SELECT coalesce(p_ids[o], gen_random_uuid()::text)
                   FROM generate_subscripts(p_inputs, 1) o ORDER BY o);

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

-- Start many instances of a workflow from SQL, inside the caller's
-- transaction, all or nothing: an invalid id, or an id that exists with a
-- different input, raises (22023 / ST409) and so starts none of them.
-- Returns the ids in input order; ids may be null or hold nulls (generated).
CREATE FUNCTION start_workflows(name text, inputs jsonb[], ids text[] DEFAULT NULL)
RETURNS SETOF text
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    v_row     record;
    v_created boolean := false;
BEGIN
    FOR v_row IN SELECT * FROM start_instances(name, NULL, inputs, ids) LOOP
        IF v_row.outcome = 'invalid' THEN
            RAISE EXCEPTION 'stead: instance id "%" (element %) must be 1-200 characters of [A-Za-z0-9._:@-]',
                v_row.instance_id, v_row.ord USING ERRCODE = '22023';
        ELSIF v_row.outcome = 'conflict' THEN
            RAISE EXCEPTION 'stead: instance "%" (element %) already exists with a different workflow or input',
                v_row.instance_id, v_row.ord USING ERRCODE = 'ST409';
        END IF;
        v_created := v_created OR v_row.outcome = 'created';
        RETURN NEXT v_row.instance_id;
    END LOOP;
    IF v_created THEN
        PERFORM pg_notify(channel('advance'), '');
    END IF;
END
$$;
