//! Instances as the API sees them: starting, reading, listing, their steps
//! and history, and the requests (signal, cancel, retry) that wake them.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::advance::{step_from_row, StoredStep};
use super::Cached;
use super::{decode, Result, Store};
use crate::model::{EventType, HeldReason, InstanceStatus, StartOutcome};

const START_INSTANCE: &str = "SELECT instance_id, created FROM start_instance($1, $2, $3, $4)";
/// The common start in one statement: a fresh, valid id ($1) of a
/// registered workflow ($2, at version $4 or its latest). It inserts
/// nothing otherwise (a taken id, an unknown workflow or version, a bad id),
/// and `start_instance` then decides and says why. The function's plpgsql
/// cost about 0.2 ms a start, a fifth of the idle latency.
const START_FRESH: &str = "
    INSERT INTO instances (id, workflow_name, workflow_version, slot, input, wake_at, priority)
    SELECT $1, $2, w.version, slot_of($1, c.slot_count), coalesce($3, 'null'::jsonb),
           now() - $5::smallint * interval '1 second', $5::smallint
    FROM (SELECT max(version) AS version FROM workflows
          WHERE name = $2 AND ($4::int IS NULL OR version = $4)) w,
         cluster c
    WHERE w.version IS NOT NULL AND valid_id($1)
    ON CONFLICT (id) DO NOTHING
    RETURNING id, workflow_name, workflow_version, status, input, output, error,
              created_at, started_at, updated_at, ended_at, parent_id";
/// Gives the instances $1, just started, the priority $2 (a batch's
/// instances are started by `start_instances`, which knows none).
const PRIORITISE: &str = "
    UPDATE instances SET priority = $2, wake_at = wake_at - $2::smallint * interval '1 second'
    WHERE id = ANY($1)";
const START_INSTANCES: &str =
    "SELECT instance_id, outcome FROM start_instances($1, $2, $3::jsonb[], $4::text[])";
const GET_INSTANCE: &str = "
    SELECT id, workflow_name, workflow_version, status, input, output, error,
           created_at, started_at, updated_at, ended_at, parent_id
    FROM instances WHERE id = $1";
/// The instance list's filter and paging: newest first; the cursor is the
/// (created_at, id) of the last row seen ($1-$8: `list_rows`).
macro_rules! list_where {
    () => {
        "
    FROM instances
    WHERE ($1::text IS NULL OR workflow_name = $1)
      AND ($2::text IS NULL OR status = $2)
      AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4))
      AND ($6::timestamptz IS NULL OR created_at >= $6)
      AND ($7::timestamptz IS NULL OR created_at < $7)
      AND ($8::text IS NULL OR starts_with(id, $8))
    ORDER BY created_at DESC, id DESC
    LIMIT $5"
    };
}
const LIST_INSTANCES: &str = concat!(
    "SELECT id, workflow_name, workflow_version, status, input, output, error,
            created_at, started_at, updated_at, ended_at, parent_id",
    list_where!()
);
/// A page of the list without the values (the console's list shows none).
const LIST_BRIEFS: &str = concat!(
    "SELECT id, workflow_name, workflow_version, status, created_at, updated_at, ended_at",
    list_where!()
);
/// How many instances per status match a filter (all but its status),
/// counted over the newest $5 that match, so a count costs a bounded scan.
const COUNT_INSTANCES: &str = "
    SELECT status, count(*) FROM (
        SELECT status FROM instances
        WHERE ($1::text IS NULL OR workflow_name = $1)
          AND ($2::timestamptz IS NULL OR created_at >= $2)
          AND ($3::timestamptz IS NULL OR created_at < $3)
          AND ($4::text IS NULL OR starts_with(id, $4))
        ORDER BY created_at DESC, id DESC
        LIMIT $5) newest
    GROUP BY status";
/// An instance and its steps in one statement, so in one snapshot: a row
/// per step that has left `pending` (in definition order), or one row with
/// null step columns. Each step says whether a worker holds a lease on its
/// current attempt (and since when).
const GET_INSTANCE_WITH_STEPS: &str = "
    SELECT i.id, i.workflow_name, i.workflow_version, i.status, i.input, i.output, i.error,
           i.created_at, i.started_at, i.updated_at, i.ended_at, i.parent_id,
           s.step_id, s.status, s.attempt, s.input, s.output, s.error,
           s.scheduled_at, coalesce(t.leased_at, s.started_at), s.ended_at, s.wake_at,
           s.completion_order, s.items, s.compensation, t.leased_at IS NOT NULL, i.held
    FROM instances i
    LEFT JOIN steps s ON s.instance_id = i.id
    LEFT JOIN LATERAL (
        SELECT leased_at FROM tasks
        WHERE instance_id = s.instance_id AND step_id = s.step_id AND status = 'leased'
          AND purpose = 'run' AND kind <> 'workflow' AND item IS NULL
        LIMIT 1) t ON true
    WHERE i.id = $1
    ORDER BY s.position";
const SEND_SIGNAL: &str = "SELECT send_signal($1, $2, $3)";
const REQUEST_CANCEL: &str = "SELECT request_cancel($1, $2)";
const REQUEST_RETRY: &str = "SELECT request_retry($1)";
const GET_HISTORY: &str = "
    SELECT seq, type, step_id, attempt, data, created_at, member
    FROM events WHERE instance_id = $1 ORDER BY seq";

#[derive(Debug, Clone)]
pub(crate) struct InstanceRecord {
    pub id: String,
    pub workflow_name: String,
    pub workflow_version: i32,
    pub status: InstanceStatus,
    pub input: Value,
    pub output: Option<Value>,
    pub error: Option<Value>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    /// The parent instance, for a child workflow.
    pub parent_id: Option<String>,
    /// Why it does not start, if it is held (read with its steps only).
    pub held: Option<HeldReason>,
}

fn instance_from_row(r: &tokio_postgres::Row) -> Result<InstanceRecord> {
    Ok(InstanceRecord {
        id: r.get(0),
        workflow_name: r.get(1),
        workflow_version: r.get(2),
        status: decode("instances.status", r.get(3))?,
        input: r.get(4),
        output: r.get(5),
        error: r.get(6),
        created_at: r.get(7),
        started_at: r.get(8),
        updated_at: r.get(9),
        ended_at: r.get(10),
        parent_id: r.get(11),
        held: None,
    })
}

/// An instance in a list: no values.
#[derive(Debug, Clone)]
pub(crate) struct InstanceBrief {
    pub id: String,
    pub workflow_name: String,
    pub workflow_version: i32,
    pub status: InstanceStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct InstanceFilter {
    pub workflow: Option<String>,
    pub status: Option<InstanceStatus>,
    /// Keyset cursor: rows strictly older than this (created_at, id).
    pub after: Option<(DateTime<Utc>, String)>,
    /// Created at or after this time.
    pub created_after: Option<DateTime<Utc>>,
    /// Created before this time.
    pub created_before: Option<DateTime<Utc>>,
    /// Ids that begin with this.
    pub id_prefix: Option<String>,
    pub limit: i64,
}

/// A step as the API shows it.
#[derive(Debug, Clone)]
pub(crate) struct StepRecord {
    pub step: StoredStep,
    /// A worker holds a lease on the step's current attempt (`started_at`
    /// is then when it took it).
    pub leased: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct EventRecord {
    pub seq: i32,
    pub kind: EventType,
    pub step_id: Option<String>,
    pub attempt: Option<i32>,
    pub data: Value,
    pub created_at: DateTime<Utc>,
    /// The member that made the transition.
    pub member: Option<String>,
}

pub(super) fn event_from_row(r: &tokio_postgres::Row) -> Result<EventRecord> {
    Ok(EventRecord {
        seq: r.get(0),
        kind: decode("events.type", r.get(1))?,
        step_id: r.get(2),
        attempt: r.get(3),
        data: r.get(4),
        created_at: r.get(5),
        member: r.get(6),
    })
}

impl Store {
    /// Starts an instance (idempotent on `id`); returns its id, whether it
    /// was created now, and, when a fresh id took the one-insert path
    /// (`START_FRESH`), the new row. Any other case is decided by the SQL
    /// function `start_instance`, which users call too.
    pub(crate) async fn start_instance(
        &self,
        workflow: &str,
        version: Option<i32>,
        input: &Value,
        id: Option<&str>,
        priority: i16,
    ) -> Result<(String, bool, Option<InstanceRecord>)> {
        let fresh = id.map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_string);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
            [&fresh, &workflow, input, &version, &priority];
        if let Some(row) = self.query_keyed(START_FRESH, &params).await?.first() {
            return Ok((fresh, true, Some(instance_from_row(row)?)));
        }
        let conn = self.conn().await?;
        let row = conn
            .query_one(Cached(START_INSTANCE), &[&workflow, &version, input, &id])
            .await?;
        Ok((row.get(0), row.get(1), None))
    }

    /// Starts one instance per item (`(input, id)`), each idempotent on its
    /// id, in one round trip; returns each item's id and outcome in item
    /// order. Bad items are outcomes, not errors; an unknown workflow or
    /// version is `NotFound`.
    pub(crate) async fn start_instances(
        &self,
        workflow: &str,
        version: Option<i32>,
        items: &[(Value, Option<String>)],
        priority: i16,
    ) -> Result<Vec<(String, StartOutcome)>> {
        let inputs: Vec<&Value> = items.iter().map(|(input, _)| input).collect();
        let ids: Vec<Option<&str>> = items.iter().map(|(_, id)| id.as_deref()).collect();
        // No ids at all: a null array, which takes the function's one-insert
        // path for generated ids.
        let ids: Option<Vec<Option<&str>>> = ids.iter().any(Option::is_some).then_some(ids);
        let decoded = |rows: Vec<tokio_postgres::Row>| -> Result<Vec<(String, StartOutcome)>> {
            rows.iter()
                .map(|r| Ok((r.get(0), decode("start_instances.outcome", r.get(1))?)))
                .collect()
        };
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&workflow, &version, &inputs, &ids];
        let mut conn = self.conn().await?;
        if priority == 0 {
            return decoded(conn.query(Cached(START_INSTANCES), &params).await?);
        }
        // With a priority, the start and the priority commit together.
        let tx = conn.transaction().await?;
        let started = decoded(tx.query(Cached(START_INSTANCES), &params).await?)?;
        let created: Vec<&str> = started
            .iter()
            .filter(|(_, o)| *o == StartOutcome::Created)
            .map(|(id, _)| id.as_str())
            .collect();
        tx.execute(PRIORITISE, &[&created, &priority]).await?;
        tx.commit().await?;
        Ok(started)
    }

    pub(crate) async fn get_instance(&self, id: &str) -> Result<Option<InstanceRecord>> {
        let conn = self.conn().await?;
        let row = conn.query_opt(Cached(GET_INSTANCE), &[&id]).await?;
        row.as_ref().map(instance_from_row).transpose()
    }

    /// The instance and the steps that have left `pending` (in definition
    /// order), as of one snapshot: read one after the other, they could
    /// straddle an advance's commit and show steps running under an
    /// instance still `pending`.
    pub(crate) async fn get_instance_with_steps(
        &self,
        id: &str,
    ) -> Result<Option<(InstanceRecord, Vec<StepRecord>)>> {
        // Keyed by id: the generic plan is right, and planning the join on
        // every read cost more than running it (it is the last step of a
        // long-poll's answer).
        let rows = self.query_keyed(GET_INSTANCE_WITH_STEPS, &[&id]).await?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let steps = rows
            .iter()
            .filter(|r| r.get::<_, Option<&str>>(12).is_some())
            .map(|r| {
                Ok(StepRecord {
                    step: step_from_row(r, 12)?,
                    leased: r.get(25),
                })
            })
            .collect::<Result<_>>()?;
        let mut instance = instance_from_row(first)?;
        instance.held = first
            .get::<_, Option<&str>>(26)
            .map(|h| decode("instances.held", h))
            .transpose()?;
        Ok(Some((instance, steps)))
    }

    pub(crate) async fn list_instances(
        &self,
        filter: &InstanceFilter,
    ) -> Result<Vec<InstanceRecord>> {
        let rows = self.list_rows(LIST_INSTANCES, filter).await?;
        rows.iter().map(instance_from_row).collect()
    }

    /// A page of instances as `list_instances` pages them, without values.
    pub(crate) async fn list_instance_briefs(
        &self,
        filter: &InstanceFilter,
    ) -> Result<Vec<InstanceBrief>> {
        let rows = self.list_rows(LIST_BRIEFS, filter).await?;
        rows.iter()
            .map(|r| {
                Ok(InstanceBrief {
                    id: r.get(0),
                    workflow_name: r.get(1),
                    workflow_version: r.get(2),
                    status: decode("instances.status", r.get(3))?,
                    created_at: r.get(4),
                    updated_at: r.get(5),
                    ended_at: r.get(6),
                })
            })
            .collect()
    }

    /// Runs a list statement (`list_where!`) with the filter's parameters.
    async fn list_rows(
        &self,
        sql: &str,
        filter: &InstanceFilter,
    ) -> Result<Vec<tokio_postgres::Row>> {
        let conn = self.conn().await?;
        let (after_time, after_id) = match &filter.after {
            Some((t, id)) => (Some(*t), Some(id.as_str())),
            None => (None, None),
        };
        let status = filter.status.map(InstanceStatus::as_str);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 8] = [
            &filter.workflow,
            &status,
            &after_time,
            &after_id,
            &filter.limit,
            &filter.created_after,
            &filter.created_before,
            &filter.id_prefix,
        ];
        Ok(conn.query(sql, &params).await?)
    }

    /// Instances per status among the newest `scan` that match `filter`
    /// (its status, cursor and limit aside); `None` if counting took longer
    /// than `timeout_ms` (a filter few rows match walks far back).
    pub(crate) async fn count_instances(
        &self,
        filter: &InstanceFilter,
        scan: i64,
        timeout_ms: u64,
    ) -> Result<Option<Vec<(InstanceStatus, i64)>>> {
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [
            &filter.workflow,
            &filter.created_after,
            &filter.created_before,
            &filter.id_prefix,
            &scan,
        ];
        let Some(rows) = self
            .query_within(COUNT_INSTANCES, &params, timeout_ms)
            .await?
        else {
            return Ok(None);
        };
        rows.iter()
            .map(|r| Ok((decode("instances.status", r.get(0))?, r.get(1))))
            .collect::<Result<_>>()
            .map(Some)
    }

    /// Delivers a signal; returns its id.
    pub(crate) async fn send_signal(&self, id: &str, name: &str, payload: &Value) -> Result<i64> {
        let conn = self.conn().await?;
        let row = conn
            .query_one(Cached(SEND_SIGNAL), &[&id, &name, payload])
            .await?;
        Ok(row.get(0))
    }

    pub(crate) async fn request_cancel(&self, id: &str, reason: Option<&str>) -> Result<()> {
        let conn = self.conn().await?;
        conn.execute(REQUEST_CANCEL, &[&id, &reason]).await?;
        Ok(())
    }

    pub(crate) async fn request_retry(&self, id: &str) -> Result<()> {
        let conn = self.conn().await?;
        conn.execute(REQUEST_RETRY, &[&id]).await?;
        Ok(())
    }

    pub(crate) async fn history(&self, id: &str) -> Result<Vec<EventRecord>> {
        let conn = self.conn().await?;
        let rows = conn.query(GET_HISTORY, &[&id]).await?;
        rows.iter().map(event_from_row).collect()
    }
}
