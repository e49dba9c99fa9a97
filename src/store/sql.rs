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
pub const GET_INSTANCE: &str = "
    SELECT id, workflow_name, workflow_version, status, input, output, error,
           created_at, started_at, updated_at, ended_at, parent_id
    FROM instances WHERE id = $1";
/// Newest first; the cursor is the (created_at, id) of the last row seen.
pub const LIST_INSTANCES: &str = "
    SELECT id, workflow_name, workflow_version, status, input, output, error,
           created_at, started_at, updated_at, ended_at, parent_id
    FROM instances
    WHERE ($1::text IS NULL OR workflow_name = $1)
      AND ($2::text IS NULL OR status = $2)
      AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4))
    ORDER BY created_at DESC, id DESC
    LIMIT $5";
pub const GET_STEPS: &str = "
    SELECT s.step_id, s.status, s.attempt, s.input, s.output, s.error,
           s.scheduled_at, coalesce(t.leased_at, s.started_at), s.ended_at, t.leased_at IS NOT NULL,
           s.wake_at, s.items, s.compensation
    FROM steps s
    LEFT JOIN LATERAL (
        SELECT leased_at FROM tasks
        WHERE instance_id = s.instance_id AND step_id = s.step_id AND status = 'leased'
          AND purpose = 'run' AND kind <> 'workflow' AND item IS NULL
        LIMIT 1) t ON true
    WHERE s.instance_id = $1
    ORDER BY s.position";
pub const SEND_SIGNAL: &str = "SELECT send_signal($1, $2, $3)";
pub const REQUEST_CANCEL: &str = "SELECT request_cancel($1, $2)";
pub const REQUEST_RETRY: &str = "SELECT request_retry($1)";
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
              t.idempotency_key, t.input, t.lease_expires_at, t.timeout_ms,
              greatest(extract(epoch FROM t.leased_at - t.run_at), 0)::float8";

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

/// Turns expired leases of the slots $2 into failed (retryable) attempts for
/// the engine.
pub const REAP_EXPIRED_LEASES: &str = "
    WITH expired AS (
        SELECT id FROM tasks
        WHERE status = 'leased' AND lease_expires_at <= now() AND slot = ANY($2)
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
                'retryable', true, 'expired', true)
        FROM expired
        WHERE t.id = expired.id
        RETURNING t.id
    )
    SELECT id, (SELECT pg_notify(channel('advance'), '')) FROM reaped";

pub const QUEUE_DEPTH: &str =
    "SELECT queue, ready, leased, delayed, extract(epoch FROM oldest_ready_age)::float8 FROM queue_depth";
/// Live members, slots, and slots some member's session holds (from
/// `pg_locks`): the cluster gauges the maintenance-duty holder exports.
pub const CLUSTER_COUNTS: &str = "
    SELECT (SELECT count(*) FROM members_overview WHERE alive),
           (SELECT slot_count FROM cluster)::bigint,
           (SELECT count(DISTINCT slot) FROM slot_owners WHERE owner IS NOT NULL)";

// ---- engine transitions ----------------------------------------------------

/// Locks up to $1 instances of the slots $2 that need the engine: woken ones
/// (start, timers, signals, requests) and ones with unrecorded task results.
/// The engine's clock is this statement's start (not the transaction's): the
/// snapshot is taken then, so every result it sees finished before it.
pub const LOCK_DUE_INSTANCES: &str = "
    WITH due AS (
        (SELECT id FROM instances
         WHERE wake_at <= now() AND slot = ANY($2) ORDER BY wake_at LIMIT $1)
        UNION
        (SELECT DISTINCT instance_id FROM tasks
         WHERE status IN ('completed', 'failed') AND slot = ANY($2) LIMIT $1)
    )
    SELECT i.id, i.workflow_name, i.workflow_version, i.slot, i.status, i.input, i.output,
           i.error, i.state_version, i.event_seq, statement_timestamp(), i.ending, i.deadline_at,
           i.cancel_requested_at IS NOT NULL, coalesce(i.cancel_reason, 'cancelled'),
           i.retry_requested_at IS NOT NULL, i.created_at
    FROM instances i
    WHERE i.id IN (SELECT id FROM due)
    LIMIT $1
    FOR UPDATE OF i SKIP LOCKED";

pub const LOAD_STEPS: &str = "
    SELECT instance_id, step_id, status, attempt, input, output, error,
           scheduled_at, started_at, ended_at, wake_at, completion_order, items, compensation
    FROM steps WHERE instance_id = ANY($1)";

pub const LOAD_SIGNALS: &str = "
    SELECT id, instance_id, name, payload FROM signals
    WHERE instance_id = ANY($1) AND consumed_at IS NULL
    ORDER BY id";

pub const LOAD_FINISHED_TASKS: &str = "
    SELECT id, instance_id, step_id, attempt, status, output, error, leased_at, leased_by,
           item, purpose, queue
    FROM tasks
    WHERE instance_id = ANY($1) AND status IN ('completed', 'failed')
    ORDER BY finished_at, id";

pub const UPSERT_STEPS: &str = "
    INSERT INTO steps (instance_id, step_id, position, kind, status, attempt, input, output,
                       error, scheduled_at, started_at, ended_at, wake_at, completion_order,
                       items, compensation)
    SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::text[], $6::int[],
                         $7::jsonb[], $8::jsonb[], $9::jsonb[], $10::timestamptz[],
                         $11::timestamptz[], $12::timestamptz[], $13::timestamptz[], $14::int[],
                         $15::jsonb[], $16::jsonb[])
    ON CONFLICT (instance_id, step_id) DO UPDATE
    SET status = excluded.status, attempt = excluded.attempt, input = excluded.input,
        output = excluded.output, error = excluded.error,
        scheduled_at = excluded.scheduled_at, started_at = excluded.started_at,
        ended_at = excluded.ended_at, wake_at = excluded.wake_at,
        completion_order = excluded.completion_order, items = excluded.items,
        compensation = excluded.compensation";

pub const INSERT_TASKS: &str = "
    INSERT INTO tasks (queue, kind, instance_id, step_id, slot, attempt, input,
                       idempotency_key, run_at, timeout_ms, item, purpose)
    SELECT queue, kind, instance_id, step_id, slot, attempt, input, idempotency_key,
           now() + delay_ms * interval '1 millisecond', timeout_ms, item, purpose
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::int[],
                $7::jsonb[], $8::text[], $9::float8[], $10::bigint[], $11::int[], $12::text[])
         AS d(queue, kind, instance_id, step_id, slot, attempt, input, idempotency_key,
              delay_ms, timeout_ms, item, purpose)";

/// Starts child workflows: per child, a task row on the parent that stays
/// leased (forever) until the child reports its end, and the child instance.
/// A child of an unregistered workflow gets a failed task row instead. An
/// existing child (a retried parent) is re-attached to the new task row.
pub const START_CHILDREN: &str = "
    WITH d AS (
        SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::text[],
                             $6::int[], $7::jsonb[], $8::int[])
               AS d(parent_id, step_id, item, child_id, workflow, version, input, parent_slot)
    ), v AS (
        SELECT d.*, (SELECT max(w.version) FROM workflows w
                     WHERE w.name = d.workflow AND (d.version IS NULL OR w.version = d.version))
                    AS resolved
        FROM d
    ), t AS (
        INSERT INTO tasks (queue, kind, instance_id, step_id, slot, attempt, item, purpose, input,
                           idempotency_key, status, lease_token, leased_by, leased_at,
                           lease_expires_at, error, finished_at)
        SELECT 'stead.workflow', 'workflow', parent_id, step_id, parent_slot, 1, item, 'run', input,
               child_id,
               CASE WHEN resolved IS NULL THEN 'failed' ELSE 'leased' END,
               gen_random_uuid(), child_id, now(), 'infinity',
               CASE WHEN resolved IS NULL THEN jsonb_build_object(
                   'message', CASE WHEN version IS NULL
                                   THEN format('workflow %s is not registered', workflow)
                                   ELSE format('workflow %s has no version %s', workflow, version) END,
                   'retryable', false) END,
               CASE WHEN resolved IS NULL THEN now() END
        FROM v
        RETURNING id, idempotency_key
    )
    INSERT INTO instances (id, workflow_name, workflow_version, slot, input, wake_at,
                           parent_id, parent_step, parent_task_id)
    SELECT v.child_id, v.workflow, v.resolved, slot_for(v.child_id), v.input, now(),
           v.parent_id, v.step_id, t.id
    FROM v JOIN t ON t.idempotency_key = v.child_id
    WHERE v.resolved IS NOT NULL
    ON CONFLICT (id) DO UPDATE
    SET parent_task_id = excluded.parent_task_id,
        wake_at = now(),
        -- A child that failed or was cancelled runs again from its failed
        -- steps (the parent is being retried); a completed one reports its
        -- output again.
        retry_requested_at = CASE WHEN instances.status IN ('failed', 'cancelled')
                                  THEN now() ELSE instances.retry_requested_at END,
        cancel_requested_at = CASE WHEN instances.status IN ('failed', 'cancelled')
                                   THEN NULL ELSE instances.cancel_requested_at END,
        cancel_reason = CASE WHEN instances.status IN ('failed', 'cancelled')
                             THEN NULL ELSE instances.cancel_reason END";

/// Reports ended children (among $1) to their parents' task rows.
pub const REPORT_CHILDREN: &str = "
    UPDATE tasks t
    SET status = CASE WHEN c.status = 'completed' THEN 'completed' ELSE 'failed' END,
        output = CASE WHEN c.status = 'completed' THEN c.output END,
        error = CASE WHEN c.status <> 'completed' THEN jsonb_build_object(
                    'message', format('child workflow %s %s', c.id, c.status),
                    'retryable', false,
                    'details', c.error) END,
        finished_at = now()
    FROM instances c
    WHERE c.id = ANY($1) AND t.id = c.parent_task_id AND t.status = 'leased'
      AND c.status IN ('completed', 'failed', 'cancelled') AND c.retry_requested_at IS NULL";

/// Asks the running children of the instances $1 to cancel.
pub const CANCEL_CHILDREN: &str = "
    UPDATE instances
    SET cancel_requested_at = coalesce(cancel_requested_at, now()),
        cancel_reason = coalesce(cancel_reason, 'parent ' || parent_id || ' is ending'),
        wake_at = now()
    WHERE parent_id = ANY($1) AND status NOT IN ('completed', 'failed', 'cancelled')";

pub const CONSUME_SIGNALS: &str = "
    UPDATE signals s SET consumed_at = now(), consumed_by = d.step_id
    FROM unnest($1::bigint[], $2::text[]) AS d(id, step_id)
    WHERE s.id = d.id";

pub const INSERT_EVENTS: &str = "
    INSERT INTO events (instance_id, seq, type, step_id, attempt, data, created_at)
    SELECT *, $7::timestamptz
    FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::int[], $6::jsonb[])";

/// Applies new instance states, fenced by the state version each was read
/// at; the caller checks that every row was updated.
pub const UPDATE_INSTANCES: &str = "
    UPDATE instances i
    SET status = u.status, output = u.output, error = u.error, event_seq = u.event_seq,
        -- A cancel requested in this very transaction (a parent in the same
        -- batch cancelling its child) must still wake the instance.
        wake_at = CASE WHEN i.cancel_requested_at IS NOT NULL AND u.ending IS NULL
                            AND u.status IN ('pending', 'running')
                       THEN now() ELSE u.wake_at END,
        ending = u.ending, deadline_at = u.deadline_at, retry_requested_at = NULL,
        state_version = i.state_version + 1, updated_at = $10,
        started_at = CASE WHEN i.started_at IS NULL AND u.status <> 'pending'
                          THEN $10 ELSE i.started_at END,
        ended_at = CASE WHEN u.status IN ('completed', 'failed', 'cancelled')
                        THEN coalesce(i.ended_at, $10) END
    FROM unnest($1::text[], $2::bigint[], $3::text[], $4::jsonb[], $5::jsonb[], $6::int[],
                $7::timestamptz[], $8::text[], $9::timestamptz[])
         AS u(id, expected_version, status, output, error, event_seq, wake_at, ending,
              deadline_at)
    WHERE i.id = u.id AND i.state_version = u.expected_version";

pub const NOTIFY_ADVANCE: &str = "SELECT pg_notify(channel('advance'), '')";

pub const DELETE_TASKS_BY_ID: &str = "DELETE FROM tasks WHERE id = ANY($1)";
pub const DELETE_TASKS_OF_INSTANCES: &str = "DELETE FROM tasks WHERE instance_id = ANY($1)";
pub const NOTIFY: &str = "SELECT pg_notify(channel($1), '')";
pub const NOTIFY_QUEUES: &str =
    "SELECT pg_notify(channel('tasks'), q) FROM unnest($1::text[]) AS q";
pub const NOTIFY_ENDED: &str =
    "SELECT pg_notify(channel('ended'), id) FROM unnest($1::text[]) AS id";

// ---- membership (on each member's dedicated session) ------------------------

pub const LOCK_CLASS: &str = "SELECT lock_class, slot_count FROM cluster";

/// Registers (or re-registers) a member on this session.
pub const REGISTER_MEMBER: &str = "
    INSERT INTO members (name, backend_pid, backend_start, ttl_ms, api_url)
    SELECT $1, pg_backend_pid(),
           (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()), $2, $3
    ON CONFLICT (name) DO UPDATE
    SET backend_pid = excluded.backend_pid, backend_start = excluded.backend_start,
        ttl_ms = excluded.ttl_ms, api_url = excluded.api_url,
        joined_at = now(), heartbeat_at = now()";

/// Heartbeats; no row means this member was removed (it must rejoin).
pub const HEARTBEAT_MEMBER: &str = "
    UPDATE members SET heartbeat_at = now()
    WHERE name = $1 AND backend_pid = pg_backend_pid()
    RETURNING name";

/// Removes members past their TTL or whose session is gone, and terminates
/// their sessions so the slot locks they held are released.
pub const REAP_MEMBERS: &str = "
    WITH dead AS (
        DELETE FROM members m
        WHERE m.name <> $1
          AND (m.heartbeat_at + make_interval(secs => m.ttl_ms / 1000.0) < now()
               OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                              WHERE a.pid = m.backend_pid
                                AND a.backend_start IS NOT DISTINCT FROM m.backend_start))
        RETURNING m.name, m.backend_pid, m.backend_start, m.heartbeat_at
    )
    SELECT d.name, extract(epoch FROM now() - d.heartbeat_at)::float8,
           (SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a
            WHERE a.pid = d.backend_pid AND a.backend_start IS NOT DISTINCT FROM d.backend_start)
    FROM dead d";

/// Live members: heartbeat within the TTL by database time, and the session
/// still there (so every member notices a crashed one at its next heartbeat,
/// without waiting for the maintenance holder to remove it).
pub const LIVE_MEMBERS: &str = "
    SELECT m.name FROM members m
    WHERE m.heartbeat_at + make_interval(secs => m.ttl_ms / 1000.0) >= now()
      AND EXISTS (SELECT 1 FROM pg_stat_activity a
                  WHERE a.pid = m.backend_pid
                    AND a.backend_start IS NOT DISTINCT FROM m.backend_start)
    ORDER BY m.name";

/// Takes a singleton duty's lock (key -1 = maintenance) for this session.
pub const TRY_LOCK_DUTY: &str = "SELECT pg_try_advisory_lock($1, $2)";
pub const TRY_LOCK_SLOTS: &str =
    "SELECT s FROM unnest($2::int[]) AS s WHERE pg_try_advisory_lock($1, s)";
pub const UNLOCK_SLOTS: &str =
    "SELECT s FROM unnest($2::int[]) AS s WHERE pg_advisory_unlock($1, s)";

pub const LEAVE_MEMBER: &str =
    "DELETE FROM members WHERE name = $1 AND backend_pid = pg_backend_pid()";

pub const CLUSTER_MEMBERS: &str = "
    SELECT name, alive, heartbeat_at, extract(epoch FROM since_heartbeat)::float8, ttl_ms,
           joined_at, slots_owned, api_url
    FROM members_overview ORDER BY name";
pub const CLUSTER_SLOTS: &str = "SELECT slot, owner FROM slot_owners ORDER BY slot";
