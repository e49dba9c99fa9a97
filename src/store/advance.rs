//! The engine's transaction: lock a batch of instances that need a decision,
//! load what the engine reads about them (grouped by instance), and write
//! everything the decisions produced in one pipelined commit, fenced by each
//! instance's `state_version`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::Object;
use serde_json::Value;
use tokio_postgres::types::{Json, ToSql};

use super::conn::{Conn, Prepared};
use super::notify::{ended_payloads, NOTIFY_ADVANCE, NOTIFY_ENDED, NOTIFY_QUEUES};
use super::workflows::GET_WORKFLOW_VERSION;
use super::{decode, decode_json, Result, Store, StoreError, KEYED_PLANS};
use crate::model::{
    Ending, EventType, HeldReason, InstanceStatus, StepKindName, StepState, TaskKind, TaskPurpose,
    TaskResult, TaskStatus,
};

/// The columns of a locked instance `i` the engine reads (see `due_from_row`).
/// (`OFFSET 0` keeps the signals lookup a probe per row: otherwise the
/// planner may choose to hash every pending signal of the table.)
macro_rules! due_columns {
    () => {
        "i.id, i.workflow_name, i.workflow_version, i.slot, i.status, i.input, i.output,
         i.error, i.state_version, i.event_seq, statement_timestamp(), i.ending, i.deadline_at,
         CASE WHEN i.cancel_requested_at IS NOT NULL
              THEN coalesce(i.cancel_reason, 'cancelled') END,
         i.retry_requested_at IS NOT NULL, i.created_at,
         EXISTS (SELECT 1 FROM signals g WHERE g.instance_id = i.id AND g.consumed_at IS NULL
                 OFFSET 0),
         i.parent_id IS NOT NULL, i.ctid::text, i.stored_bytes,
         i.stored_bytes + pg_column_size(i.input), i.concurrency_key, i.priority"
    };
}

/// Locks up to $1 instances of the slots in the bitmap $2 (bit n of the
/// bytea, as `get_bit` numbers them, set for slot n) that need the engine:
/// first those with unrecorded task results (work already done is recorded
/// before new work is taken up), then woken ones (start, timers, signals,
/// requests) in wake order, each locked straight from the index scan that
/// finds it. The engine's clock is this statement's start (not the
/// transaction's): the snapshot is taken then, so every result it sees
/// finished before it. Column 18 is where the row lies (`ctid`), which the
/// fenced update goes to without a second index probe: a row locked by this
/// transaction does not move before that update.
const LOCK_DUE_INSTANCES: &str = concat!(
    "
    WITH finished AS (
        SELECT DISTINCT instance_id AS id FROM tasks
        WHERE status IN ('completed', 'failed') AND owned_slot($2, slot) LIMIT $1
    )
    (SELECT i.*
     FROM finished d
     -- Locked by its key (a LATERAL probe, which the planner cannot turn
     -- into a hash join over the whole table).
     CROSS JOIN LATERAL (
         SELECT ",
    due_columns!(),
    "
         FROM instances i
         WHERE i.id = d.id
         FOR UPDATE OF i SKIP LOCKED
     ) i)
    UNION ALL
    (SELECT * FROM (
        SELECT ",
    due_columns!(),
    "
        FROM instances i
        WHERE i.wake_at <= now() AND owned_slot($2, i.slot)
          AND i.id NOT IN (SELECT id FROM finished)
        ORDER BY i.wake_at
        LIMIT $1
        FOR UPDATE OF i SKIP LOCKED
     ) woken)
    LIMIT $1"
);

// The loads look up each instance by its key, one index probe per id
// (a LATERAL subquery behind OFFSET 0, which the planner cannot flatten into
// a join): a plain `instance_id = ANY($1)` is planned from the table's
// statistics, and on a table analysed while it was small (steps, at first)
// that plan is a sequential scan of the whole table for every batch.
const LOAD_STEPS: &str = "
    SELECT s.instance_id, s.step_id, s.status, s.attempt, s.input, s.output, s.error,
           s.scheduled_at, s.started_at, s.ended_at, s.wake_at, s.completion_order, s.items,
           s.compensation
    FROM unnest($1::text[]) AS k(id)
    CROSS JOIN LATERAL (SELECT * FROM steps WHERE instance_id = k.id OFFSET 0) s";

const LOAD_SIGNALS: &str = "
    SELECT g.id, g.instance_id, g.name, g.payload
    FROM unnest($1::text[]) AS k(id)
    CROSS JOIN LATERAL (SELECT * FROM signals
                        WHERE instance_id = k.id AND consumed_at IS NULL OFFSET 0) g
    ORDER BY g.id";

const LOAD_FINISHED_TASKS: &str = "
    SELECT t.id, t.instance_id, t.step_id, t.attempt, t.status, t.output, t.error, t.leased_at,
           t.leased_by, t.item, t.purpose, t.queue
    FROM unnest($1::text[]) AS k(id)
    CROSS JOIN LATERAL (SELECT * FROM tasks
                        WHERE instance_id = k.id AND status IN ('completed', 'failed')
                        OFFSET 0) t
    ORDER BY t.finished_at, t.id";

/// Asks the running children of the instances $1 to cancel.
const CANCEL_CHILDREN: &str = "
    UPDATE instances
    SET cancel_requested_at = coalesce(cancel_requested_at, now()),
        cancel_reason = coalesce(cancel_reason, 'parent ' || parent_id || ' is ending'),
        wake_at = now()
    WHERE parent_id = ANY($1) AND status NOT IN ('completed', 'failed', 'cancelled')";

/// Serialises the decisions about these concurrency keys ($1 workflows, $2
/// keys) with every other transaction's, in one order (no deadlock).
const LOCK_KEYS: &str = "
    SELECT count(pg_advisory_xact_lock(h)) FROM (
        SELECT DISTINCT hashtextextended(k, hashtext(w)) AS h
        FROM unnest($1::text[], $2::text[]) AS u(w, k)
        ORDER BY 1) s";
/// Each key's running count and its oldest $3 waiters.
const KEY_STATES: &str = "
    SELECT u.w, u.k,
           (SELECT count(*) FROM instances i
            WHERE i.workflow_name = u.w AND i.concurrency_key = u.k AND i.ended_at IS NULL
              AND i.held IS NULL),
           ARRAY(SELECT i.created_at FROM instances i
                 WHERE i.workflow_name = u.w AND i.concurrency_key = u.k
                   AND i.ended_at IS NULL AND i.held = 'concurrency'
                 ORDER BY i.created_at, i.id LIMIT $3),
           ARRAY(SELECT i.id FROM instances i
                 WHERE i.workflow_name = u.w AND i.concurrency_key = u.k
                   AND i.ended_at IS NULL AND i.held = 'concurrency'
                 ORDER BY i.created_at, i.id LIMIT $3)
    FROM (SELECT DISTINCT w, k FROM unnest($1::text[], $2::text[]) AS u(w, k)) u";
const HOLD_INSTANCES: &str = "
    UPDATE instances i
    SET held = d.held, concurrency_key = coalesce(d.key, i.concurrency_key), wake_at = NULL
    FROM unnest($1::text[], $2::text[], $3::text[]) AS d(id, held, key)
    WHERE i.id = d.id";
const ADMIT_INSTANCES: &str = "
    UPDATE instances i SET held = NULL, concurrency_key = d.key
    FROM unnest($1::text[], $2::text[]) AS d(id, key)
    WHERE i.id = d.id";
/// A waiter another transaction holds is being decided there.
const WAKE_WAITERS: &str = "
    UPDATE instances SET wake_at = now() - priority * interval '1 second'
    WHERE id IN (SELECT id FROM instances WHERE id = ANY($1) FOR UPDATE SKIP LOCKED)";
const WAKE_RELEASED: &str = "
    UPDATE instances SET wake_at = now() - priority * interval '1 second'
    WHERE id IN (
        SELECT w.id FROM unnest($1::text[], $2::text[], $3::int[]) AS r(workflow, key, n)
        CROSS JOIN LATERAL (
            SELECT id FROM instances
            WHERE workflow_name = r.workflow AND concurrency_key = r.key
              AND ended_at IS NULL AND held = 'concurrency'
            ORDER BY created_at, id
            LIMIT r.n
            FOR UPDATE SKIP LOCKED) w)";

const DELETE_TASKS_BY_ID: &str = "DELETE FROM tasks WHERE id = ANY($1)";
const DELETE_TASKS_OF_INSTANCES: &str = "DELETE FROM tasks WHERE instance_id = ANY($1)";

const UPSERT_STEPS: &str = "
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

/// Ready tasks, each claimed in `ready_key` order: ready at `run_at`, served
/// as if its priority in seconds earlier (migration 19).
const INSERT_TASKS: &str = "
    INSERT INTO tasks (queue, kind, instance_id, step_id, slot, attempt, input,
                       idempotency_key, run_at, timeout_ms, item, purpose, priority, ready_key)
    SELECT queue, kind, instance_id, step_id, slot, attempt, input, idempotency_key,
           now() + delay_ms * interval '1 millisecond', timeout_ms, item, purpose, priority,
           now() + (delay_ms - priority * 1000.0) * interval '1 millisecond'
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::int[],
                $7::jsonb[], $8::text[], $9::float8[], $10::bigint[], $11::int[], $12::text[],
                $13::smallint[])
         AS d(queue, kind, instance_id, step_id, slot, attempt, input, idempotency_key,
              delay_ms, timeout_ms, item, purpose, priority)";

/// Inserts promoted inline attempts: leased to member $15 since the attempt
/// began, as if claimed then, under a lease of `lease_ms` from now (bounded
/// by the attempt's timeout). Returns each row's id with its token.
const INSERT_LEASED_TASKS: &str = "
    INSERT INTO tasks (queue, kind, instance_id, step_id, slot, attempt, input, idempotency_key,
                       run_at, timeout_ms, item, purpose, status, lease_token, leased_by,
                       leased_at, attempt_deadline_at, lease_expires_at)
    SELECT queue, kind, instance_id, step_id, slot, attempt, input, idempotency_key, started_at,
           timeout_ms, item, purpose, 'leased', token, $15::text, started_at,
           started_at + timeout_ms * interval '1 millisecond',
           LEAST(now() + lease_ms * interval '1 millisecond',
                 coalesce(started_at + timeout_ms * interval '1 millisecond', 'infinity'))
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::int[],
                $7::jsonb[], $8::text[], $9::bigint[], $10::int[], $11::text[], $12::uuid[],
                $13::timestamptz[], $14::float8[])
         AS d(queue, kind, instance_id, step_id, slot, attempt, input, idempotency_key,
              timeout_ms, item, purpose, token, started_at, lease_ms)
    RETURNING id, lease_token";

/// Starts child workflows: per child, a task row on the parent that stays
/// leased (forever) until the child reports its end, and the child instance.
/// A child of an unregistered workflow gets a failed task row instead. An
/// existing child (a retried parent) is re-attached to the new task row.
const START_CHILDREN: &str = "
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
    SELECT v.child_id, v.workflow, v.resolved,
           slot_of(v.child_id, (SELECT slot_count FROM cluster)), v.input, now(),
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

/// One history row per instance of the batch: its events since the last
/// decision, first sequence number $2.
const INSERT_HISTORY: &str = "
    INSERT INTO history (instance_id, seq, events, created_at, member)
    SELECT *, $4::timestamptz, $5::text
    FROM unnest($1::text[], $2::int[], $3::jsonb[])";

const CONSUME_SIGNALS: &str = "
    UPDATE signals s SET consumed_at = now(), consumed_by = d.step_id
    FROM unnest($1::bigint[], $2::text[]) AS d(id, step_id)
    WHERE s.id = d.id";

/// The fenced update of a batch's instances. Each must still be at the
/// version the decision was made from; if any is not, `batch_current` raises
/// (ST412) and the transaction, whose later statements and COMMIT were sent
/// with this one, writes nothing.
const UPDATE_INSTANCES: &str = "
    WITH updated AS (
    UPDATE instances i
    SET status = u.status, output = u.output, error = u.error, event_seq = u.event_seq,
        stored_bytes = u.stored_bytes,
        -- A cancel requested but not yet seen by the engine must still wake
        -- the instance. (A parent in the same batch cancelling its child does
        -- so after this statement: CANCEL_CHILDREN sets wake_at itself.)
        wake_at = CASE WHEN i.cancel_requested_at IS NOT NULL AND u.ending IS NULL
                            AND u.status IN ('pending', 'running')
                       THEN now() ELSE u.wake_at END,
        ending = u.ending, deadline_at = u.deadline_at, retry_requested_at = NULL,
        state_version = i.state_version + 1, updated_at = u.decided_at,
        started_at = CASE WHEN i.started_at IS NULL AND u.status <> 'pending'
                          THEN $10 ELSE i.started_at END,
        ended_at = CASE WHEN u.status IN ('completed', 'failed', 'cancelled')
                        THEN coalesce(i.ended_at, u.decided_at) END
    FROM unnest($1::text[], $2::bigint[], $3::text[], $4::jsonb[], $5::jsonb[], $6::int[],
                $7::timestamptz[], $8::text[], $9::timestamptz[], $11::timestamptz[],
                $13::text[]::tid[], $14::bigint[])
         AS u(id, expected_version, status, output, error, event_seq, wake_at, ending,
              deadline_at, decided_at, row_at, stored_bytes)
    -- Each row is found where it was locked (a TID scan, no index probe);
    -- the id must still match.
    WHERE i.ctid = ANY($13::text[]::tid[]) AND i.ctid = u.row_at AND i.id = u.id
      AND i.state_version = u.expected_version
    RETURNING 1)
    SELECT batch_current(count(*), $12) FROM updated";

/// Reports ended children (among $1) to their parents' task rows.
const REPORT_CHILDREN: &str = "
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

// ---- what a batch reads -------------------------------------------------------

/// The instances one batch locked, with the clock their decisions use.
#[derive(Debug)]
pub(crate) struct DueBatch {
    /// The locking statement's start, by the database clock.
    pub now: DateTime<Utc>,
    pub instances: Vec<DueInstance>,
    /// Locked instances whose rows hold what this version cannot read, with
    /// the error that says which column and value.
    pub unreadable: Vec<(String, StoreError)>,
    /// Locked instances left for a later batch: past the batch's byte bound.
    pub deferred: usize,
}

impl DueBatch {
    /// Moves the instances at the indexes of `bad` to `unreadable`.
    fn set_apart(&mut self, mut bad: HashMap<usize, StoreError>) {
        if bad.is_empty() {
            return;
        }
        let instances = std::mem::take(&mut self.instances);
        for (i, due) in instances.into_iter().enumerate() {
            match bad.remove(&i) {
                Some(e) => self.unreadable.push((due.id, e)),
                None => self.instances.push(due),
            }
        }
    }
}

/// A locked instance with everything the engine reads about it.
#[derive(Debug, Clone)]
pub(crate) struct DueInstance {
    pub id: String,
    pub workflow_name: String,
    pub workflow_version: i32,
    pub slot: i32,
    pub status: InstanceStatus,
    pub input: Value,
    pub output: Option<Value>,
    pub error: Option<Value>,
    pub state_version: i64,
    pub event_seq: i32,
    pub ending: Option<Ending>,
    pub deadline_at: Option<DateTime<Utc>>,
    /// The reason given, if a cancel was requested.
    pub cancel_requested: Option<String>,
    pub retry_requested: bool,
    pub created_at: DateTime<Utc>,
    /// A child instance: its parent is told when it ends.
    pub is_child: bool,
    /// Where its row lay when it was locked.
    pub row_at: RowAt,
    /// What its steps store, in bytes of JSON text, as of its last
    /// decision.
    pub stored_bytes: i64,
    /// Its concurrency key, once it was admitted or held for one.
    pub concurrency_key: Option<String>,
    /// Its priority, which its tasks inherit.
    pub priority: i16,
    /// Steps that have left `pending` (the others have no row).
    pub steps: Vec<StoredStep>,
    /// Finished attempts not yet recorded, oldest first.
    pub results: Vec<FinishedTask>,
    /// Signals not yet consumed, oldest first.
    pub signals: Vec<SignalRow>,
}

/// Where a locked instance's row lies (its `ctid`, as text): the fenced
/// update finds the row there without an index probe. A row this
/// transaction holds locked does not move; a stale one (a batch that lost
/// its lock) no longer matches, and the update refuses it like a stale
/// version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RowAt(pub String);

/// A row of `steps`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredStep {
    pub step_id: String,
    pub state: StepState,
}

/// A finished task row whose result the engine has not recorded yet.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FinishedTask {
    pub task_id: i64,
    pub step_id: String,
    pub attempt: u32,
    /// The `for_each` element, if any.
    pub item: Option<u32>,
    pub purpose: TaskPurpose,
    pub queue: String,
    pub result: TaskResult,
    pub leased_at: Option<DateTime<Utc>>,
    pub leased_by: Option<String>,
}

/// An unconsumed row of `signals`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SignalRow {
    pub id: i64,
    pub name: String,
    pub payload: Value,
}

// ---- what a batch writes ------------------------------------------------------

/// A step row to insert or update.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StepWrite {
    pub instance_id: String,
    pub step_id: String,
    pub position: i32,
    /// For readers of the table.
    pub kind: StepKindName,
    pub state: StepState,
}

/// A task row to insert (an attempt of a step or of its compensation).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NewTask {
    pub queue: String,
    pub kind: TaskKind,
    pub instance_id: String,
    pub step_id: String,
    pub slot: i32,
    pub attempt: i32,
    pub input: Value,
    pub idempotency_key: String,
    pub delay_ms: u64,
    pub timeout_ms: Option<u64>,
    pub item: Option<i32>,
    pub purpose: TaskPurpose,
    /// The instance's priority.
    pub priority: i16,
    /// Set for an inline attempt promoted to the queue while it runs.
    pub lease: Option<Lease>,
}

/// The lease of a promoted inline attempt: its row is inserted `leased` to
/// the member running it, from when it began.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Lease {
    pub token: uuid::Uuid,
    pub started_at: DateTime<Utc>,
    pub lease_ms: u64,
}

/// A child workflow to start (see `START_CHILDREN`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NewChild {
    pub parent_id: String,
    pub parent_slot: i32,
    pub step_id: String,
    pub item: Option<i32>,
    pub child_id: String,
    pub workflow: String,
    pub version: Option<i32>,
    pub input: Value,
}

/// One event of the history (stored inside its transition's row).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NewEvent {
    pub instance_id: String,
    pub seq: i32,
    pub kind: EventType,
    pub step_id: Option<String>,
    pub attempt: Option<i32>,
    pub data: Value,
    /// When it happened, if after the batch's clock (a step run inside the
    /// transition); `None`: at the batch's clock.
    pub at: Option<DateTime<Utc>>,
}

/// The stored form of an event, `{type, step_id?, attempt?, data, at?}`,
/// serialised straight from the event (no JSON tree is built or copied).
#[derive(Debug, serde::Serialize)]
struct StoredEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    step_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempt: Option<i32>,
    data: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    at: Option<DateTime<Utc>>,
}

impl NewEvent {
    fn stored(&self) -> StoredEvent<'_> {
        StoredEvent {
            kind: self.kind.as_str(),
            step_id: self.step_id.as_deref(),
            attempt: self.attempt,
            data: &self.data,
            at: self.at,
        }
    }
}

/// A history row: an instance's consecutive events, from sequence `seq`.
struct HistoryRow<'a> {
    instance_id: &'a str,
    seq: i32,
    events: Vec<StoredEvent<'a>>,
}

/// Groups each instance's run of events into one row.
fn history_rows(events: &[NewEvent]) -> Vec<HistoryRow<'_>> {
    let mut rows: Vec<HistoryRow<'_>> = Vec::new();
    for e in events {
        match rows.last_mut() {
            Some(row) if row.instance_id == e.instance_id => row.events.push(e.stored()),
            _ => rows.push(HistoryRow {
                instance_id: &e.instance_id,
                seq: e.seq,
                events: vec![e.stored()],
            }),
        }
    }
    rows
}

/// An instance's new state, applied only if it is still at
/// `expected_version`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct InstanceUpdate {
    pub id: String,
    pub row_at: RowAt,
    pub expected_version: i64,
    pub status: InstanceStatus,
    pub output: Option<Value>,
    pub error: Option<Value>,
    pub event_seq: i32,
    pub wake_at: Option<DateTime<Utc>>,
    pub ending: Option<Ending>,
    pub deadline_at: Option<DateTime<Utc>>,
    /// What its steps store, in bytes of JSON text.
    pub stored_bytes: i64,
    /// When its last decision was taken (later than the batch's clock when
    /// steps ran inline): its `updated_at`, and `ended_at` if it ended.
    pub decided_at: DateTime<Utc>,
}

/// A pending instance held back instead of decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hold {
    pub id: String,
    pub reason: HeldReason,
    /// The concurrency key it waits for.
    pub key: Option<String>,
}

/// The state of one concurrency key, read under its lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyState {
    pub workflow: String,
    pub key: String,
    /// Instances of the key that run (admitted, not ended).
    pub running: i64,
    /// Its oldest waiters, in start order (created_at, id).
    pub waiters: Vec<(DateTime<Utc>, String)>,
}

/// Everything one advance transaction writes.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct AdvanceWrites {
    /// The engine's clock for this batch (from the locking statement).
    pub now: DateTime<Utc>,
    /// The member whose advancer decided the batch (kept on its events).
    pub member: String,
    pub instances: Vec<InstanceUpdate>,
    pub steps: Vec<StepWrite>,
    pub tasks: Vec<NewTask>,
    /// Promoted inline attempts (rows inserted leased to `member`, which
    /// runs them).
    pub leased_tasks: Vec<NewTask>,
    pub children: Vec<NewChild>,
    pub events: Vec<NewEvent>,
    /// Result rows the engine has read (recorded or stale): deleted.
    pub consumed_tasks: Vec<i64>,
    /// Signals consumed, with the step that took each.
    pub consumed_signals: Vec<(i64, String)>,
    /// Instances whose queued tasks are all withdrawn (winding down).
    pub withdraw_instances: Vec<String>,
    /// Instances whose running children are asked to cancel.
    pub cancel_children_of: Vec<String>,
    /// Instances held pending (not decided): why, and the key they wait for.
    pub holds: Vec<Hold>,
    /// Instances admitted under their concurrency key (decided in the batch).
    pub admitted: Vec<(String, String)>,
    /// Waiting instances to wake: a place of their key is theirs.
    pub wake_waiters: Vec<String>,
    /// Per (workflow, key), how many of its running instances ended: as
    /// many of its oldest waiters are woken.
    pub released: Vec<(String, String, i32)>,
    /// Queues that got tasks (notified once each).
    pub notify_queues: Vec<String>,
    /// Instances that ended in this batch.
    pub ended_instances: Vec<String>,
    /// Those of them that are children, whose parents are told.
    pub ended_children: Vec<String>,
}

// ---- the transaction ----------------------------------------------------------

/// A transaction in which the engine moves a batch of instances on. Dropping
/// it without `commit` discards the connection, which rolls back.
pub(crate) struct AdvanceTx {
    conn: Option<Conn>,
    done: bool,
}

impl Drop for AdvanceTx {
    fn drop(&mut self) {
        if !self.done {
            if let Some(conn) = self.conn.take() {
                // Never return a connection in an open transaction to the pool.
                drop(Object::take(conn.into_object()));
            }
        }
    }
}

impl Store {
    /// Begins an advance transaction and locks up to `limit` due instances
    /// of `slots` (see `AdvanceTx::lock_due`), the BEGIN pipelined with the
    /// locking statement: an idle worker's first step starts one round trip
    /// sooner.
    pub(crate) async fn begin_and_lock_due(
        &self,
        limit: usize,
        max_bytes: u64,
        slots: &[i32],
    ) -> Result<(AdvanceTx, DueBatch)> {
        let conn = self.conn().await?;
        let tx = AdvanceTx::new(conn);
        let c = tx.client();
        let stmt = c.prepare(LOCK_DUE_INSTANCES).await?;
        let owned = slot_bitmap(slots);
        let params: [&(dyn ToSql + Sync); 2] = [&(limit as i64), &owned];
        let ((), rows) = futures::try_join!(c.batch_execute(KEYED_PLANS), c.query(&stmt, &params))?;
        let batch = tx.due_batch(&rows, max_bytes).await?;
        Ok((tx, batch))
    }

    /// Begins an advance transaction on its own (tests build one up step
    /// by step; the advancer uses `begin_and_lock_due`).
    #[cfg(test)]
    pub(crate) async fn begin_advance(&self) -> Result<AdvanceTx> {
        let tx = AdvanceTx::new(self.conn().await?);
        tx.client().batch_execute(KEYED_PLANS).await?;
        Ok(tx)
    }
}

/// Which of the sizes, taken in order, fit in `max_bytes` together: the
/// first always (so an instance larger than the bound still moves on,
/// alone), then each that still fits, skipping those that do not (so one
/// large instance does not hold back the small ones behind it).
fn rows_within(sizes: impl Iterator<Item = i64>, max_bytes: u64) -> Vec<bool> {
    let mut total = 0u64;
    let mut first = true;
    sizes
        .map(|size| {
            let size = size.max(0) as u64;
            let keep = first || total.saturating_add(size) <= max_bytes;
            if keep {
                total = total.saturating_add(size);
            }
            first = false;
            keep
        })
        .collect()
}

/// The slots as a bitmap for `owned_slot`: bit n (bit n % 8 of byte n / 8)
/// set for slot n.
fn slot_bitmap(slots: &[i32]) -> Vec<u8> {
    let len = slots
        .iter()
        .map(|&s| s.max(0) as usize / 8 + 1)
        .max()
        .unwrap_or(0);
    let mut bits = vec![0u8; len];
    for &s in slots.iter().filter(|&&s| s >= 0) {
        bits[s as usize / 8] |= 1 << (s % 8);
    }
    bits
}

impl AdvanceTx {
    fn new(conn: Conn) -> Self {
        AdvanceTx {
            conn: Some(conn),
            done: false,
        }
    }

    fn client(&self) -> &Conn {
        self.conn.as_ref().expect("transaction is open")
    }

    /// Locks up to `limit` due instances of `slots` and loads their steps,
    /// unrecorded results and pending signals. An instance whose rows this
    /// version cannot read is set apart in `unreadable` (still locked, to be
    /// left as it is), so that it cannot hold up the others.
    #[cfg(test)]
    pub(crate) async fn lock_due(&self, limit: usize, slots: &[i32]) -> Result<DueBatch> {
        let c = self.client();
        let stmt = c.prepare(LOCK_DUE_INSTANCES).await?;
        let rows = c
            .query(&stmt, &[&(limit as i64), &slot_bitmap(slots)])
            .await?;
        self.due_batch(&rows, u64::MAX).await
    }

    /// The batch of the locked rows, with what each instance needs loaded:
    /// those whose stored state and input fit in `max_bytes` together, in
    /// lock order (the first always does). The rest stay locked, untouched,
    /// until this transaction ends, and come up in a later batch
    /// (`deferred`).
    async fn due_batch(&self, rows: &[tokio_postgres::Row], max_bytes: u64) -> Result<DueBatch> {
        let now = rows.first().map_or_else(Utc::now, |r| r.get(10));
        let mut batch = DueBatch {
            now,
            instances: Vec::with_capacity(rows.len()),
            unreadable: Vec::new(),
            deferred: 0,
        };
        // What loading a row costs: its steps' stored state and its input
        // (as stored: a lower bound on its text).
        let kept = rows_within(rows.iter().map(|r| r.get::<_, i64>(20)), max_bytes);
        let mut with_signals = Vec::new();
        for (r, keep) in rows.iter().zip(kept) {
            if !keep {
                batch.deferred += 1;
                continue;
            }
            match due_from_row(r) {
                Ok(due) => {
                    if r.get::<_, bool>(16) {
                        with_signals.push(due.id.clone());
                    }
                    batch.instances.push(due);
                }
                Err(e) => batch.unreadable.push((r.get(0), e)),
            }
        }
        if !batch.instances.is_empty() {
            self.load_into(&mut batch, &with_signals).await?;
        }
        Ok(batch)
    }

    /// Adds each instance's steps, results and signals (of those that have
    /// any pending: `with_signals`), in one round trip, or none when no
    /// instance has any of them.
    async fn load_into(&self, batch: &mut DueBatch, with_signals: &[String]) -> Result<()> {
        let c = self.client();
        let ids: Vec<&str> = with_signals.iter().map(String::as_str).collect();
        // Steps and task rows are written only by advance transactions,
        // which bump the state version: an instance still at version 0 (a
        // fresh start) has none, so its lookups are skipped.
        let advanced: Vec<&str> = batch
            .instances
            .iter()
            .filter(|i| i.state_version > 0)
            .map(|i| i.id.as_str())
            .collect();
        if advanced.is_empty() && ids.is_empty() {
            return Ok(());
        }
        let (steps, tasks, signals) = futures::try_join!(
            c.prepare(LOAD_STEPS),
            c.prepare(LOAD_FINISHED_TASKS),
            c.prepare(LOAD_SIGNALS)
        )?;
        let (steps, tasks, signals) = futures::try_join!(
            query_by_ids(c, &steps, &advanced),
            query_by_ids(c, &tasks, &advanced),
            query_by_ids(c, &signals, &ids)
        )?;
        let index: HashMap<String, usize> = batch
            .instances
            .iter()
            .enumerate()
            .map(|(i, d)| (d.id.clone(), i))
            .collect();
        // The instance a row belongs to, by its `instance_id` column.
        let owner =
            |r: &tokio_postgres::Row, column: usize| index.get(r.get::<_, &str>(column)).copied();
        let mut bad: HashMap<usize, StoreError> = HashMap::new();
        let instances = &mut batch.instances;
        for r in &steps {
            if let Some(i) = owner(r, 0) {
                match step_from_row(r, 1) {
                    Ok(step) => instances[i].steps.push(step),
                    Err(e) => {
                        bad.entry(i).or_insert(e);
                    }
                }
            }
        }
        for r in &tasks {
            if let Some(i) = owner(r, 1) {
                match finished_from_row(r) {
                    Ok(result) => instances[i].results.push(result),
                    Err(e) => {
                        bad.entry(i).or_insert(e);
                    }
                }
            }
        }
        for r in &signals {
            if let Some(i) = owner(r, 1) {
                instances[i].signals.push(signal_from_row(r));
            }
        }
        batch.set_apart(bad);
        Ok(())
    }

    /// A stored definition document, read inside this transaction.
    pub(crate) async fn get_workflow(&self, name: &str, version: i32) -> Result<Option<Value>> {
        let row = self
            .client()
            .query_opt(GET_WORKFLOW_VERSION, &[&name, &version])
            .await?;
        Ok(row.map(|r| r.get(2)))
    }

    /// Writes a batch of transitions and commits. Fails with
    /// `StoreError::Fenced` (and rolls back) if any instance moved on since
    /// it was read.
    /// Returns the ids of the promoted attempts' rows, by lease token.
    pub(crate) async fn commit(mut self, writes: &AdvanceWrites) -> Result<Vec<(uuid::Uuid, i64)>> {
        let mut pipeline = Pipeline::default();
        plan_statements(&mut pipeline, writes);
        let (results, commit) = pipeline.run_and_commit(self.client()).await?;
        // A statement that failed aborted the transaction, and the COMMIT
        // sent after it ended it as a rollback: the connection is clean.
        self.done = commit.is_ok();
        let mut results = results.into_iter();
        // The fenced update runs first. If it found an instance moved on,
        // whatever failed after it failed because of that: the batch is
        // stale, not broken.
        if let Err(e) = results.next().expect("the instance update") {
            return Err(fenced_or(e, writes.instances.len()));
        }
        let mut leased = Vec::new();
        for result in results {
            let ran = result?;
            leased.extend(ran.rows.iter().map(|r| (r.get(1), r.get(0))));
        }
        commit?;
        Ok(leased)
    }

    /// Locks the concurrency keys `(workflow, key)` for the rest of the
    /// transaction, in one order.
    pub(crate) async fn lock_keys(&self, keys: &[(String, String)]) -> Result<()> {
        let (w, k): (Vec<&str>, Vec<&str>) =
            keys.iter().map(|(w, k)| (w.as_str(), k.as_str())).unzip();
        self.client().query_one(LOCK_KEYS, &[&w, &k]).await?;
        Ok(())
    }

    /// The running count and oldest `waiters` waiters of each key (locked
    /// by `lock_keys` first, so the counts stay true until commit).
    pub(crate) async fn key_states(
        &self,
        keys: &[(String, String)],
        waiters: i64,
    ) -> Result<Vec<KeyState>> {
        let (w, k): (Vec<&str>, Vec<&str>) =
            keys.iter().map(|(w, k)| (w.as_str(), k.as_str())).unzip();
        let rows = self.client().query(KEY_STATES, &[&w, &k, &waiters]).await?;
        Ok(rows
            .iter()
            .map(|r| {
                let times: Vec<DateTime<Utc>> = r.get(3);
                let ids: Vec<String> = r.get(4);
                KeyState {
                    workflow: r.get(0),
                    key: r.get(1),
                    running: r.get(2),
                    waiters: times.into_iter().zip(ids).collect(),
                }
            })
            .collect())
    }

    /// Ends the transaction without writing anything.
    pub(crate) async fn rollback(mut self) -> Result<()> {
        self.client().batch_execute("ROLLBACK").await?;
        self.done = true;
        Ok(())
    }
}

// ---- rows ---------------------------------------------------------------------

fn due_from_row(r: &tokio_postgres::Row) -> Result<DueInstance> {
    Ok(DueInstance {
        id: r.get(0),
        workflow_name: r.get(1),
        workflow_version: r.get(2),
        slot: r.get(3),
        status: decode("instances.status", r.get(4))?,
        input: r.get(5),
        output: r.get(6),
        error: r.get(7),
        state_version: r.get(8),
        event_seq: r.get(9),
        ending: r
            .get::<_, Option<&str>>(11)
            .map(|e| decode("instances.ending", e))
            .transpose()?,
        deadline_at: r.get(12),
        cancel_requested: r.get(13),
        retry_requested: r.get(14),
        created_at: r.get(15),
        is_child: r.get(17),
        row_at: RowAt(r.get(18)),
        stored_bytes: r.get(19),
        concurrency_key: r.get(21),
        priority: r.get(22),
        steps: Vec::new(),
        results: Vec::new(),
        signals: Vec::new(),
    })
}

/// A count the database keeps as `integer`, never negative.
fn count(value: i32) -> u32 {
    value.max(0) as u32
}

/// A step row whose columns start at `first`: step_id, status, attempt,
/// input, output, error, scheduled_at, started_at, ended_at, wake_at,
/// completion_order, items, compensation.
pub(super) fn step_from_row(r: &tokio_postgres::Row, first: usize) -> Result<StoredStep> {
    let c = |i: usize| first + i;
    let items: Option<Value> = r.get(c(11));
    let compensation: Option<Value> = r.get(c(12));
    Ok(StoredStep {
        step_id: r.get(c(0)),
        state: StepState {
            status: decode("steps.status", r.get(c(1)))?,
            attempt: count(r.get(c(2))),
            input: r.get(c(3)),
            output: r.get(c(4)),
            error: r.get(c(5)),
            scheduled_at: r.get(c(6)),
            started_at: r.get(c(7)),
            ended_at: r.get(c(8)),
            wake_at: r.get(c(9)),
            completion_order: r.get::<_, Option<i32>>(c(10)).map(count),
            items: items.map(|v| decode_json("steps.items", v)).transpose()?,
            compensation: compensation
                .map(|v| decode_json("steps.compensation", v))
                .transpose()?,
        },
    })
}

fn finished_from_row(r: &tokio_postgres::Row) -> Result<FinishedTask> {
    let status: TaskStatus = decode("tasks.status", r.get(4))?;
    // The query reads finished rows only: anything but completed is a
    // failure, whose error must have the stored shape.
    let result = match status {
        TaskStatus::Completed => {
            TaskResult::Completed(r.get::<_, Option<Value>>(5).unwrap_or(Value::Null))
        }
        _ => TaskResult::Failed(decode_json(
            "tasks.error",
            r.get::<_, Option<Value>>(6).unwrap_or(Value::Null),
        )?),
    };
    Ok(FinishedTask {
        task_id: r.get(0),
        step_id: r.get(2),
        attempt: count(r.get(3)),
        result,
        leased_at: r.get(7),
        leased_by: r.get(8),
        // A negative item is no element: the result is the step's.
        item: r
            .get::<_, Option<i32>>(9)
            .and_then(|k| u32::try_from(k).ok()),
        purpose: decode("tasks.purpose", r.get(10))?,
        queue: r.get(11),
    })
}

fn signal_from_row(r: &tokio_postgres::Row) -> SignalRow {
    SignalRow {
        id: r.get(0),
        name: r.get(2),
        payload: r.get(3),
    }
}

// ---- the pipelined commit -------------------------------------------------------

type Param<'a> = Box<dyn ToSql + Sync + Send + 'a>;

/// One column of a batch statement: `f` of every row, as a Postgres array.
fn col<'a, T, U>(rows: &'a [T], f: impl Fn(&'a T) -> U) -> Param<'a>
where
    U: ToSql + Sync + Send + 'a,
{
    Box::new(rows.iter().map(f).collect::<Vec<U>>())
}

/// Runs a lookup by instance ids; none when there are no ids.
async fn query_by_ids(
    c: &Conn,
    statement: &Prepared<'_>,
    ids: &[&str],
) -> std::result::Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    c.query(statement, &[&ids]).await
}

/// A JSON column of typed state (plain structs always serialise).
fn json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("engine state serialises to JSON")
}

/// Statements sent together: every one goes out before the first answer is
/// read, so a batch costs one round trip however many statements it has.
#[derive(Default)]
struct Pipeline<'a> {
    statements: Vec<Statement<'a>>,
}

struct Statement<'a> {
    text: &'static str,
    params: Vec<Param<'a>>,
    /// Read the rows it returns (otherwise only how many it affected).
    returns_rows: bool,
}

/// What one statement of a pipeline did, or its error.
type RanOrError = std::result::Result<Ran, tokio_postgres::Error>;

/// What one statement of a pipeline did.
struct Ran {
    rows: Vec<tokio_postgres::Row>,
}

impl<'a> Pipeline<'a> {
    fn push(&mut self, text: &'static str, params: Vec<Param<'a>>) {
        self.statements.push(Statement {
            text,
            params,
            returns_rows: false,
        });
    }

    fn push_rows(&mut self, text: &'static str, params: Vec<Param<'a>>) {
        self.statements.push(Statement {
            text,
            params,
            returns_rows: true,
        });
    }

    /// Runs every statement and then COMMIT, all sent before the first
    /// answer is read; returns, in order, what each statement did or its
    /// error, and what COMMIT did.
    async fn run_and_commit(&self, c: &Conn) -> Result<(Vec<RanOrError>, Result<()>)> {
        let mut prepared = Vec::with_capacity(self.statements.len());
        for statement in &self.statements {
            prepared.push(c.prepare(statement.text).await?);
        }
        let runs = self.statements.iter().zip(&prepared).map(|(st, stmt)| {
            let params: Vec<&(dyn ToSql + Sync)> = st
                .params
                .iter()
                .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                .collect();
            async move {
                if st.returns_rows {
                    let rows = c.query(stmt, &params).await?;
                    Ok(Ran { rows })
                } else {
                    c.execute(stmt, &params).await?;
                    Ok(Ran { rows: Vec::new() })
                }
            }
        });
        // join! polls the statements first, so each is on the wire before
        // COMMIT is.
        let (ran, commit) =
            futures::join!(futures::future::join_all(runs), c.batch_execute("COMMIT"));
        Ok((ran, commit.map_err(StoreError::from)))
    }
}

/// The statements of a batch, in the order they must run. The fenced update
/// of the batch's own instances (locked already) comes first, so that a
/// stale batch is known as such whatever fails after it. Children are asked
/// to cancel before any task row is touched, so the transaction never holds
/// a task row while waiting for a child's row lock.
fn plan_statements<'a>(p: &mut Pipeline<'a>, w: &'a AdvanceWrites) {
    let mut update = instance_columns(&w.instances);
    update.push(Box::new(w.now));
    update.push(col(&w.instances, |r| r.decided_at));
    update.push(Box::new(w.instances.len() as i64));
    update.push(col(&w.instances, |r| r.row_at.0.as_str()));
    update.push(col(&w.instances, |r| r.stored_bytes));
    p.push(UPDATE_INSTANCES, update);
    if !w.cancel_children_of.is_empty() {
        p.push(CANCEL_CHILDREN, vec![Box::new(&w.cancel_children_of)]);
    }
    plan_concurrency(p, w);
    if !w.consumed_tasks.is_empty() {
        p.push(DELETE_TASKS_BY_ID, vec![Box::new(&w.consumed_tasks)]);
    }
    if !w.withdraw_instances.is_empty() {
        p.push(
            DELETE_TASKS_OF_INSTANCES,
            vec![Box::new(&w.withdraw_instances)],
        );
    }
    if !w.steps.is_empty() {
        p.push(UPSERT_STEPS, step_columns(&w.steps));
    }
    if !w.tasks.is_empty() {
        p.push(INSERT_TASKS, task_columns(&w.tasks));
    }
    if !w.leased_tasks.is_empty() {
        p.push_rows(
            INSERT_LEASED_TASKS,
            leased_task_columns(&w.leased_tasks, &w.member),
        );
    }
    if !w.children.is_empty() {
        p.push(START_CHILDREN, child_columns(&w.children));
    }
    if !w.events.is_empty() {
        let rows = history_rows(&w.events);
        let ids: Vec<&'a str> = rows.iter().map(|r| r.instance_id).collect();
        let seqs: Vec<i32> = rows.iter().map(|r| r.seq).collect();
        let events: Vec<Json<Vec<StoredEvent<'a>>>> =
            rows.into_iter().map(|r| Json(r.events)).collect();
        let mut params: Vec<Param<'a>> = vec![Box::new(ids), Box::new(seqs), Box::new(events)];
        params.push(Box::new(w.now));
        params.push(Box::new(w.member.as_str()));
        p.push(INSERT_HISTORY, params);
    }
    if !w.consumed_signals.is_empty() {
        let s = &w.consumed_signals;
        p.push(
            CONSUME_SIGNALS,
            vec![col(s, |(id, _)| *id), col(s, |(_, step)| step.as_str())],
        );
    }
    plan_notifications(p, w);
}

/// Holds, admissions and wake-ups of flow control (after the fenced update:
/// the rows held or admitted here are this transaction's).
fn plan_concurrency<'a>(p: &mut Pipeline<'a>, w: &'a AdvanceWrites) {
    if !w.holds.is_empty() {
        let h = &w.holds;
        p.push(
            HOLD_INSTANCES,
            vec![
                col(h, |x| x.id.as_str()),
                col(h, |x| x.reason.as_str()),
                col(h, |x| x.key.as_deref()),
            ],
        );
    }
    if !w.admitted.is_empty() {
        let a = &w.admitted;
        p.push(
            ADMIT_INSTANCES,
            vec![col(a, |(id, _)| id.as_str()), col(a, |(_, k)| k.as_str())],
        );
    }
    if !w.wake_waiters.is_empty() {
        p.push(WAKE_WAITERS, vec![Box::new(&w.wake_waiters)]);
    }
    if !w.released.is_empty() {
        let r = &w.released;
        p.push(
            WAKE_RELEASED,
            vec![
                col(r, |(wf, _, _)| wf.as_str()),
                col(r, |(_, k, _)| k.as_str()),
                col(r, |(_, _, n)| *n),
            ],
        );
    }
}

/// Tells parents about children that ended (or were re-attached), and wakes
/// whoever waits: workers of queues that got tasks, waiters on ended
/// instances, advancers of new children and of parents told.
fn plan_notifications<'a>(p: &mut Pipeline<'a>, w: &'a AdvanceWrites) {
    let mut report: Vec<&str> = w.ended_children.iter().map(String::as_str).collect();
    report.extend(w.children.iter().map(|c| c.child_id.as_str()));
    if !report.is_empty() {
        p.push(REPORT_CHILDREN, vec![Box::new(report)]);
    }
    if !w.notify_queues.is_empty() {
        p.push(NOTIFY_QUEUES, vec![Box::new(&w.notify_queues)]);
    }
    if !w.ended_instances.is_empty() {
        p.push(
            NOTIFY_ENDED,
            vec![Box::new(ended_payloads(&w.ended_instances))],
        );
    }
    if !w.children.is_empty() || !w.ended_children.is_empty() {
        p.push(NOTIFY_ADVANCE, vec![]);
    }
}

fn step_columns(s: &[StepWrite]) -> Vec<Param<'_>> {
    vec![
        col(s, |r| r.instance_id.as_str()),
        col(s, |r| r.step_id.as_str()),
        col(s, |r| r.position),
        col(s, |r| r.kind.as_str()),
        col(s, |r| r.state.status.as_str()),
        col(s, |r| r.state.attempt as i32),
        col(s, |r| r.state.input.as_ref()),
        col(s, |r| r.state.output.as_ref()),
        col(s, |r| r.state.error.as_ref()),
        col(s, |r| r.state.scheduled_at),
        col(s, |r| r.state.started_at),
        col(s, |r| r.state.ended_at),
        col(s, |r| r.state.wake_at),
        col(s, |r| r.state.completion_order.map(|o| o as i32)),
        col(s, |r| r.state.items.as_ref().map(json)),
        col(s, |r| r.state.compensation.as_ref().map(json)),
    ]
}

/// The columns every new task row starts with, queued or leased.
fn task_identity_columns(t: &[NewTask]) -> Vec<Param<'_>> {
    vec![
        col(t, |r| r.queue.as_str()),
        col(t, |r| r.kind.as_str()),
        col(t, |r| r.instance_id.as_str()),
        col(t, |r| r.step_id.as_str()),
        col(t, |r| r.slot),
        col(t, |r| r.attempt),
        col(t, |r| &r.input),
        col(t, |r| r.idempotency_key.as_str()),
    ]
}

fn task_columns(t: &[NewTask]) -> Vec<Param<'_>> {
    let mut columns = task_identity_columns(t);
    columns.extend([
        col(t, |r| r.delay_ms as f64),
        col(t, |r| r.timeout_ms.map(|v| v as i64)),
        col(t, |r| r.item),
        col(t, |r| r.purpose.as_str()),
        col(t, |r| r.priority),
    ]);
    columns
}

fn leased_task_columns<'a>(t: &'a [NewTask], worker: &'a str) -> Vec<Param<'a>> {
    let lease = |r: &'a NewTask| r.lease.as_ref().expect("a promoted attempt has a lease");
    let mut columns = task_identity_columns(t);
    columns.extend([
        col(t, |r| r.timeout_ms.map(|v| v as i64)),
        col(t, |r| r.item),
        col(t, |r| r.purpose.as_str()),
        col(t, move |r| lease(r).token),
        col(t, move |r| lease(r).started_at),
        col(t, move |r| lease(r).lease_ms as f64),
        Box::new(worker) as Param<'a>,
    ]);
    columns
}

fn child_columns(ch: &[NewChild]) -> Vec<Param<'_>> {
    vec![
        col(ch, |r| r.parent_id.as_str()),
        col(ch, |r| r.step_id.as_str()),
        col(ch, |r| r.item),
        col(ch, |r| r.child_id.as_str()),
        col(ch, |r| r.workflow.as_str()),
        col(ch, |r| r.version),
        col(ch, |r| &r.input),
        col(ch, |r| r.parent_slot),
    ]
}

fn instance_columns(u: &[InstanceUpdate]) -> Vec<Param<'_>> {
    vec![
        col(u, |r| r.id.as_str()),
        col(u, |r| r.expected_version),
        col(u, |r| r.status.as_str()),
        col(u, |r| r.output.as_ref()),
        col(u, |r| r.error.as_ref()),
        col(u, |r| r.event_seq),
        col(u, |r| r.wake_at),
        col(u, |r| r.ending.map(Ending::as_str)),
        col(u, |r| r.deadline_at),
    ]
}

/// The error of a batch's instance update: `Fenced` if `batch_current`
/// found instances moved on (how many is its DETAIL), else what it is.
fn fenced_or(e: tokio_postgres::Error, batch: usize) -> StoreError {
    match e.as_db_error() {
        Some(db) if db.code().code() == "ST412" => StoreError::Fenced {
            moved: db.detail().and_then(|d| d.parse().ok()).unwrap_or(batch),
            batch,
        },
        _ => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::{rows_within, slot_bitmap};

    #[test]
    fn a_batch_keeps_the_rows_that_fit_in_its_bytes_and_always_the_first() {
        let fit = |sizes: &[i64], max| rows_within(sizes.iter().copied(), max);
        assert_eq!(fit(&[10, 10, 10], 30), [true, true, true]);
        assert_eq!(fit(&[10, 10, 11], 30), [true, true, false]);
        assert_eq!(fit(&[100, 1], 30), [true, false], "the first alone");
        assert_eq!(
            fit(&[10, 25, 5], 30),
            [true, false, true],
            "past a large one"
        );
        assert_eq!(fit(&[], 30), Vec::<bool>::new());
        assert_eq!(fit(&[0, 0, 0], 0), [true, true, true]);
    }

    #[test]
    fn a_slot_bitmap_sets_bit_n_of_byte_n_over_8_for_each_slot() {
        assert_eq!(slot_bitmap(&[]), Vec::<u8>::new());
        assert_eq!(slot_bitmap(&[0, 3, 9]), vec![0b0000_1001, 0b0000_0010]);
        assert_eq!(slot_bitmap(&[255]).len(), 32);
        assert_eq!(slot_bitmap(&[255])[31], 0b1000_0000);
    }
}
