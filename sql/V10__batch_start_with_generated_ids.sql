-- stead schema, version 10: a batch start with generated ids is one insert.
--
-- When no ids are given, every id is a fresh UUID: valid and distinct, so
-- the checks, the de-duplicating sort and the second statement that tells
-- created from existing are skipped; a batch of 1000 costs about half as
-- much. (A generated id already taken, which does not happen in practice,
-- raises a serialization failure, 40001, and the batch can be sent again;
-- nothing of it was started.) With ids, the function is as in version 5.
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

    v_ids := ARRAY(SELECT coalesce(p_ids[o], gen_random_uuid()::text)
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
