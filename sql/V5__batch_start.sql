-- stead schema, version 5: starting many instances at once.

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
        SELECT DISTINCT ON (t.id) t.id, p_workflow, v_version, slot_for(t.id),
               coalesce(t.input, 'null'::jsonb), now()
        FROM unnest(v_ids, p_inputs) WITH ORDINALITY AS t(id, input, o)
        WHERE t.id ~ '^[A-Za-z0-9._:@-]{1,200}$'
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
               WHEN t.id !~ '^[A-Za-z0-9._:@-]{1,200}$' THEN 'invalid'
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
