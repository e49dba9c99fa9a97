//! Every SQL statement stead runs, as named constants. Statements are
//! unqualified: each session's search_path is set to the cluster's schema.

// ---- migrations and health -------------------------------------------------

pub const MIGRATION_LOCK: &str = "SELECT pg_advisory_lock($1)";
pub const MIGRATION_UNLOCK: &str = "SELECT pg_advisory_unlock($1)";
pub const INIT_CLUSTER: &str =
    "INSERT INTO cluster (slot_count) VALUES ($1) ON CONFLICT (singleton) DO NOTHING";
pub const SCHEMA_VERSION: &str =
    "SELECT coalesce(max(version), 0)::int FROM refinery_schema_history";
pub const SLOT_COUNT: &str = "SELECT slot_count FROM cluster";

// ---- workflows -------------------------------------------------------------

/// Serialises registrations of one workflow name; correctness rests on the
/// unique constraints, the lock only avoids pointless conflicts.
pub const LOCK_WORKFLOW_NAME: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))";
pub const FIND_WORKFLOW_BY_HASH: &str =
    "SELECT version, created_at FROM workflows WHERE name = $1 AND content_hash = $2";
pub const INSERT_WORKFLOW: &str = "
    INSERT INTO workflows (name, version, definition, content_hash)
    SELECT $1, coalesce(max(version), 0) + 1, $2, $3 FROM workflows WHERE name = $1
    RETURNING version, created_at";
pub const GET_WORKFLOW_LATEST: &str = "
    SELECT name, version, definition, created_at FROM workflows
    WHERE name = $1 ORDER BY version DESC LIMIT 1";
pub const GET_WORKFLOW_VERSION: &str =
    "SELECT name, version, definition, created_at FROM workflows WHERE name = $1 AND version = $2";
pub const LIST_WORKFLOWS: &str = "
    SELECT DISTINCT ON (name) name, version, definition, created_at
    FROM workflows ORDER BY name, version DESC LIMIT $1";
pub const LIST_WORKFLOW_VERSIONS: &str = "
    SELECT name, version, definition, created_at FROM workflows
    WHERE name = $1 ORDER BY version";

// ---- instances -------------------------------------------------------------

pub const START_INSTANCE: &str = "SELECT instance_id, created FROM start_instance($1, $2, $3, $4)";
pub const INSTANCE_COLUMNS: &str = "id, workflow_name, workflow_version, status, input, output, \
     error, created_at, started_at, updated_at, ended_at";
pub const GET_INSTANCE: &str = "
    SELECT id, workflow_name, workflow_version, status, input, output, error,
           created_at, started_at, updated_at, ended_at
    FROM instances WHERE id = $1";
/// Newest first; the cursor is the (created_at, id) of the last row seen.
pub const LIST_INSTANCES: &str = "
    SELECT id, workflow_name, workflow_version, status, input, output, error,
           created_at, started_at, updated_at, ended_at
    FROM instances
    WHERE ($1::text IS NULL OR workflow_name = $1)
      AND ($2::text IS NULL OR status = $2)
      AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4))
    ORDER BY created_at DESC, id DESC
    LIMIT $5";
pub const GET_STEPS: &str = "
    SELECT s.step_id, s.status, s.attempt, s.input, s.output, s.error,
           s.scheduled_at, coalesce(t.leased_at, s.started_at), s.ended_at, t.leased_at IS NOT NULL
    FROM steps s
    LEFT JOIN LATERAL (
        SELECT leased_at FROM tasks
        WHERE instance_id = s.instance_id AND step_id = s.step_id AND status = 'leased'
        LIMIT 1) t ON true
    WHERE s.instance_id = $1
    ORDER BY s.position";
pub const GET_HISTORY: &str = "
    SELECT seq, type, step_id, attempt, data, created_at
    FROM events WHERE instance_id = $1 ORDER BY seq";

// ---- queue -----------------------------------------------------------------

/// Claims up to $2 ready tasks of the queues $1 for worker $3 under a lease
/// of $4 ms, bounded by each task's per-attempt timeout.
pub const CLAIM_TASKS: &str = "
    WITH picked AS (
        SELECT id FROM tasks
        WHERE queue = ANY($1) AND status = 'ready' AND run_at <= now()
        ORDER BY run_at, id
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    )
    UPDATE tasks t
    SET status = 'leased',
        lease_token = gen_random_uuid(),
        leased_by = $3,
        leased_at = now(),
        attempt_deadline_at = now() + t.timeout_ms * interval '1 millisecond',
        lease_expires_at = LEAST(now() + $4::float8 * interval '1 millisecond',
                                 coalesce(now() + t.timeout_ms * interval '1 millisecond',
                                          'infinity'))
    FROM picked
    WHERE t.id = picked.id
    RETURNING t.id, t.queue, t.kind, t.lease_token, t.instance_id, t.step_id, t.attempt,
              t.idempotency_key, t.input, t.lease_expires_at, t.timeout_ms";

pub const HEARTBEAT_TASK: &str = "
    UPDATE tasks
    SET lease_expires_at = LEAST(now() + $3::float8 * interval '1 millisecond',
                                 coalesce(attempt_deadline_at, 'infinity'))
    WHERE id = $1 AND lease_token = $2 AND status = 'leased' AND lease_expires_at > now()
    RETURNING lease_expires_at";

/// Records the results of leased tasks whose lease is still held; returns
/// the ids it recorded. (The caller wakes the engine through the coalescing
/// notifier: a NOTIFY per statement would serialise commits.)
pub const FINISH_TASKS: &str = "
    WITH done AS (
        UPDATE tasks t
        SET status = d.status, output = d.output, error = d.error, finished_at = now()
        FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::jsonb[], $5::jsonb[])
             AS d(id, token, status, output, error)
        WHERE t.id = d.id AND t.lease_token = d.token AND t.status = 'leased'
          AND t.lease_expires_at > now()
        RETURNING t.id
    )
    SELECT id FROM done";

/// Turns expired leases into failed (retryable) attempts for the engine.
pub const REAP_EXPIRED_LEASES: &str = "
    WITH expired AS (
        SELECT id FROM tasks
        WHERE status = 'leased' AND lease_expires_at <= now()
        ORDER BY lease_expires_at
        LIMIT $1
        FOR UPDATE SKIP LOCKED
    ), reaped AS (
        UPDATE tasks t
        SET status = 'failed', finished_at = now(),
            error = jsonb_build_object(
                'message', CASE WHEN t.attempt_deadline_at <= now()
                                THEN 'attempt timed out after ' || t.timeout_ms || 'ms'
                                ELSE 'lease expired (worker ' || coalesce(t.leased_by, '?')
                                     || ' did not complete or heartbeat in time)' END,
                'retryable', true)
        FROM expired
        WHERE t.id = expired.id
        RETURNING t.id
    )
    SELECT id, (SELECT pg_notify(channel('advance'), '')) FROM reaped";

pub const QUEUE_DEPTH: &str =
    "SELECT queue, ready, leased, delayed, extract(epoch FROM oldest_ready_age)::float8 FROM queue_depth";

// ---- engine transitions ----------------------------------------------------

/// Locks up to $1 instances that need the engine: woken ones (start,
/// timers) and ones with unrecorded task results.
pub const LOCK_DUE_INSTANCES: &str = "
    WITH due AS (
        (SELECT id FROM instances WHERE wake_at <= now() ORDER BY wake_at LIMIT $1)
        UNION
        (SELECT DISTINCT instance_id FROM tasks WHERE status IN ('completed', 'failed') LIMIT $1)
    )
    SELECT i.id, i.workflow_name, i.workflow_version, i.slot, i.status, i.input, i.output,
           i.error, i.state_version, i.event_seq, now()
    FROM instances i
    WHERE i.id IN (SELECT id FROM due)
    LIMIT $1
    FOR UPDATE OF i SKIP LOCKED";

pub const LOAD_STEPS: &str = "
    SELECT instance_id, step_id, status, attempt, input, output, error,
           scheduled_at, started_at, ended_at
    FROM steps WHERE instance_id = ANY($1)";

pub const LOAD_FINISHED_TASKS: &str = "
    SELECT id, instance_id, step_id, attempt, status, output, error, leased_at, leased_by
    FROM tasks
    WHERE instance_id = ANY($1) AND status IN ('completed', 'failed')
    ORDER BY finished_at, id";

pub const UPSERT_STEPS: &str = "
    INSERT INTO steps (instance_id, step_id, position, kind, status, attempt, input, output,
                       error, scheduled_at, started_at, ended_at)
    SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::text[], $6::int[],
                         $7::jsonb[], $8::jsonb[], $9::jsonb[], $10::timestamptz[],
                         $11::timestamptz[], $12::timestamptz[])
    ON CONFLICT (instance_id, step_id) DO UPDATE
    SET status = excluded.status, attempt = excluded.attempt, input = excluded.input,
        output = excluded.output, error = excluded.error,
        scheduled_at = excluded.scheduled_at, started_at = excluded.started_at,
        ended_at = excluded.ended_at";

pub const INSERT_TASKS: &str = "
    INSERT INTO tasks (queue, kind, instance_id, step_id, slot, attempt, input,
                       idempotency_key, run_at, timeout_ms)
    SELECT queue, kind, instance_id, step_id, slot, attempt, input, idempotency_key,
           now() + delay_ms * interval '1 millisecond', timeout_ms
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::int[],
                $7::jsonb[], $8::text[], $9::float8[], $10::bigint[])
         AS d(queue, kind, instance_id, step_id, slot, attempt, input, idempotency_key,
              delay_ms, timeout_ms)";

pub const INSERT_EVENTS: &str = "
    INSERT INTO events (instance_id, seq, type, step_id, attempt, data)
    SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::int[], $6::jsonb[])";

/// Applies new instance states, fenced by the state version each was read
/// at; the caller checks that every row was updated.
pub const UPDATE_INSTANCES: &str = "
    UPDATE instances i
    SET status = u.status, output = u.output, error = u.error, event_seq = u.event_seq,
        wake_at = u.wake_at, state_version = i.state_version + 1, updated_at = now(),
        started_at = CASE WHEN i.started_at IS NULL AND u.status <> 'pending'
                          THEN now() ELSE i.started_at END,
        ended_at = CASE WHEN u.status IN ('completed', 'failed', 'cancelled')
                        THEN coalesce(i.ended_at, now()) END
    FROM unnest($1::text[], $2::bigint[], $3::text[], $4::jsonb[], $5::jsonb[], $6::int[],
                $7::timestamptz[])
         AS u(id, expected_version, status, output, error, event_seq, wake_at)
    WHERE i.id = u.id AND i.state_version = u.expected_version";

pub const DELETE_TASKS_BY_ID: &str = "DELETE FROM tasks WHERE id = ANY($1)";
pub const DELETE_TASKS_OF_INSTANCES: &str = "DELETE FROM tasks WHERE instance_id = ANY($1)";
pub const NOTIFY: &str = "SELECT pg_notify(channel($1), '')";
pub const NOTIFY_QUEUES: &str =
    "SELECT pg_notify(channel('tasks'), q) FROM unnest($1::text[]) AS q";
pub const NOTIFY_ENDED: &str =
    "SELECT pg_notify(channel('ended'), id) FROM unnest($1::text[]) AS id";
