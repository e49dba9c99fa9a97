//! The queue: tasks claimed under a lease with `FOR UPDATE SKIP LOCKED`,
//! heartbeated, finished (fenced by the lease token), and reaped when their
//! lease runs out.

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::notify::NOTIFY_ADVANCE;
use super::{Result, Store};
use crate::model::{TaskFailure, TaskResult, TaskStatus};

/// Claims up to $2 ready tasks of the queues $1 for worker $3 under a lease
/// of $4 ms, bounded by each task's per-attempt timeout; in `ready_key`
/// order (oldest first, less each task's priority in seconds). Each
/// queue is read in its own index order (a LATERAL probe of `tasks_ready`): with
/// `queue = ANY($1)` the index cannot give the order, and every claim read
/// and sorted the queue's whole backlog. The picked rows are updated by id
/// (`= ANY`): joined instead, a generic plan that guesses the LIMIT at a
/// tenth of the table merge-joins the whole primary key. Rows of one queue
/// locked here but cut by the outer LIMIT are released at commit.
macro_rules! claim_tasks {
    ($queues:literal) => {
        concat!(
            "
    WITH picked AS (
        SELECT p.id
        FROM ",
            $queues,
            "
        CROSS JOIN LATERAL (
            SELECT id, ready_key FROM tasks
            WHERE queue = q.queue AND status = 'ready' AND run_at <= now()
            ORDER BY ready_key, id
            LIMIT $2
            FOR UPDATE SKIP LOCKED
        ) p
        ORDER BY p.ready_key, p.id
        LIMIT $2
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
    WHERE t.id = ANY(ARRAY(SELECT id FROM picked))
    RETURNING t.id, t.queue, t.lease_token, t.instance_id, t.step_id, t.attempt,
              t.idempotency_key, t.input, t.lease_expires_at, t.timeout_ms,
              greatest(extract(epoch FROM t.leased_at - t.run_at), 0)::float8"
        )
    };
}

/// The claim of queues without limits: a queue that has a row in `queues`
/// is passed over (its claims take `CLAIM_GOVERNED`, under its row's lock),
/// so a process that has not yet heard of a new limit cannot break it.
const CLAIM_TASKS: &str = claim_tasks!(
    "(SELECT u.queue FROM unnest($1::text[]) AS u(queue)
         WHERE NOT EXISTS (SELECT 1 FROM queues g WHERE g.name = u.queue)) AS q"
);
/// The claim of a limited queue, under its row's lock (`claim_governed`).
pub(super) const CLAIM_GOVERNED: &str = claim_tasks!("unnest($1::text[]) AS q(queue)");

const HEARTBEAT_TASK: &str = "
    UPDATE tasks
    SET lease_expires_at = LEAST(now() + $3::float8 * interval '1 millisecond',
                                 coalesce(attempt_deadline_at, 'infinity'))
    WHERE id = $1 AND lease_token = $2 AND status = 'leased' AND lease_expires_at > now()
    RETURNING lease_expires_at";

/// Records the results of leased tasks whose lease is still held; returns
/// the ids it recorded. (The caller wakes the engine through the coalescing
/// notifier: a NOTIFY per statement would serialise commits.) The rows are
/// found by id alone and locked first, so the lease is judged on their
/// latest version; the update then finds them by id only (`= ANY`, an
/// index probe whatever the plan's row estimates). With the lease's
/// conditions on the updated table, the planner may scan all of
/// `tasks_leased` (which those conditions imply) whenever its statistics
/// say the table is small, and each call read every leased task.
const FINISH_TASKS: &str = "
    WITH held AS (
        SELECT t.id, t.lease_token, t.status, t.lease_expires_at
        FROM tasks t
        WHERE t.id = ANY($1::bigint[])
        FOR UPDATE OF t
    )
    UPDATE tasks t
    SET status = d.status, output = d.output, error = d.error, finished_at = now()
    FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::jsonb[], $5::jsonb[])
             AS d(id, token, status, output, error),
         held h
    WHERE h.id = d.id AND h.lease_token = d.token AND h.status = 'leased'
      AND h.lease_expires_at > now() AND t.id = h.id AND t.id = ANY($1::bigint[])
    RETURNING t.id";

/// Locks up to $1 expired leases of the slots $2, with the timeout they ran
/// past (if that is why they expired) and the worker that held them.
const LOCK_EXPIRED_LEASES: &str = "
    SELECT id, CASE WHEN attempt_deadline_at <= now() THEN timeout_ms END, leased_by
    FROM tasks
    WHERE status = 'leased' AND lease_expires_at <= now() AND slot = ANY($2)
    ORDER BY lease_expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED";

/// Fails the locked attempts $1 with the errors $2, for the engine.
const FAIL_EXPIRED: &str = "
    UPDATE tasks t SET status = 'failed', error = d.error, finished_at = now()
    FROM unnest($1::bigint[], $2::jsonb[]) AS d(id, error)
    WHERE t.id = d.id";

const QUEUE_DEPTH: &str = "
    SELECT queue, ready, leased, delayed, extract(epoch FROM oldest_ready_age)::float8
    FROM queue_depth";

#[derive(Debug, Clone)]
pub(crate) struct ClaimedTask {
    pub task_id: i64,
    pub queue: String,
    pub lease_token: Uuid,
    pub instance_id: String,
    pub step_id: String,
    pub attempt: i32,
    pub idempotency_key: String,
    pub input: Value,
    pub lease_expires_at: DateTime<Utc>,
    pub timeout_ms: Option<i64>,
    /// Schedule-to-start delay: from when the task became ready to its claim.
    pub queue_wait_seconds: f64,
}

pub(super) fn claimed_from_row(r: &tokio_postgres::Row) -> ClaimedTask {
    ClaimedTask {
        task_id: r.get(0),
        queue: r.get(1),
        lease_token: r.get(2),
        instance_id: r.get(3),
        step_id: r.get(4),
        attempt: r.get(5),
        idempotency_key: r.get(6),
        input: r.get(7),
        lease_expires_at: r.get(8),
        timeout_ms: r.get(9),
        queue_wait_seconds: r.get(10),
    }
}

/// The result of one leased task, to be recorded if the lease still holds.
#[derive(Debug, Clone)]
pub(crate) struct TaskOutcome {
    pub task_id: i64,
    pub lease_token: Uuid,
    pub result: TaskResult,
}

#[derive(Debug, Clone)]
pub(crate) struct QueueDepth {
    pub queue: String,
    pub ready: i64,
    pub leased: i64,
    pub delayed: i64,
    pub oldest_ready_age_seconds: f64,
}

/// The queue of each existing task among $1.
const TASK_QUEUES: &str = "
    SELECT t.id, t.queue FROM unnest($1::bigint[]) AS k(id)
    CROSS JOIN LATERAL (SELECT id, queue FROM tasks WHERE id = k.id OFFSET 0) t";

impl Store {
    /// The queue of each of these tasks that exists.
    pub(crate) async fn task_queues(&self, ids: &[i64]) -> Result<Vec<(i64, String)>> {
        let rows = self.query_keyed(TASK_QUEUES, &[&ids]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Leases up to `max` ready tasks of `queues` to `worker`: those of
    /// the queues without limits in one statement, then those of each
    /// limited queue (`limited` says which, as this process last heard)
    /// under its limits.
    pub(crate) async fn claim_tasks(
        &self,
        queues: &[String],
        worker: &str,
        max: i64,
        lease_ms: u64,
        limited: impl Fn(&str) -> bool,
    ) -> Result<Vec<ClaimedTask>> {
        let (governed, free): (Vec<&String>, Vec<&String>) =
            queues.iter().partition(|q| limited(q));
        let mut claimed = Vec::new();
        if !free.is_empty() {
            let params: [&(dyn ToSql + Sync); 4] = [&free, &max, &worker, &(lease_ms as f64)];
            let rows = self.query_keyed(CLAIM_TASKS, &params).await?;
            claimed.extend(rows.iter().map(claimed_from_row));
        }
        for queue in governed {
            let room = max - claimed.len() as i64;
            if room <= 0 {
                break;
            }
            claimed.extend(self.claim_governed(queue, worker, room, lease_ms).await?);
        }
        Ok(claimed)
    }

    /// Extends a lease; `None` if the lease was lost.
    pub(crate) async fn heartbeat_task(
        &self,
        task_id: i64,
        lease_token: Uuid,
        lease_ms: u64,
    ) -> Result<Option<DateTime<Utc>>> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                HEARTBEAT_TASK,
                &[&task_id, &lease_token, &(lease_ms as f64)],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Records task results in one statement; returns the ids whose lease was
    /// still held (the others were refused and changed nothing).
    pub(crate) async fn finish_tasks(&self, results: &[TaskOutcome]) -> Result<Vec<i64>> {
        if results.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = results.iter().map(|r| r.task_id).collect();
        let tokens: Vec<Uuid> = results.iter().map(|r| r.lease_token).collect();
        let mut statuses = Vec::with_capacity(results.len());
        let mut outputs: Vec<Option<&Value>> = Vec::with_capacity(results.len());
        let mut errors: Vec<Option<Value>> = Vec::with_capacity(results.len());
        for r in results {
            let (status, output, error) = match &r.result {
                TaskResult::Completed(output) => (TaskStatus::Completed, Some(output), None),
                TaskResult::Failed(failure) => (TaskStatus::Failed, None, Some(failure.to_json())),
            };
            statuses.push(status.as_str());
            outputs.push(output);
            errors.push(error);
        }
        let params: [&(dyn ToSql + Sync); 5] = [&ids, &tokens, &statuses, &outputs, &errors];
        let rows = self.query_keyed(FINISH_TASKS, &params).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Fails up to `limit` attempts of `slots` whose lease expired, as
    /// retryable `expired` failures, and wakes the engine; returns how many.
    pub(crate) async fn reap_expired_leases(&self, limit: i64, slots: &[i32]) -> Result<u64> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let rows = tx.query(LOCK_EXPIRED_LEASES, &[&limit, &slots]).await?;
        if rows.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        let errors: Vec<Value> = rows
            .iter()
            .map(|r| TaskFailure::lease_expired(r.get(1), r.get(2)).to_json())
            .collect();
        tx.execute(FAIL_EXPIRED, &[&ids, &errors]).await?;
        tx.execute(NOTIFY_ADVANCE, &[]).await?;
        tx.commit().await?;
        Ok(ids.len() as u64)
    }

    /// Tasks per queue and state, with the oldest ready task's age.
    pub(crate) async fn queue_depth(&self) -> Result<Vec<QueueDepth>> {
        let conn = self.conn().await?;
        let rows = conn.query(QUEUE_DEPTH, &[]).await?;
        Ok(rows
            .iter()
            .map(|r| QueueDepth {
                queue: r.get(0),
                ready: r.get(1),
                leased: r.get(2),
                delayed: r.get(3),
                oldest_ready_age_seconds: r.get(4),
            })
            .collect())
    }
}
