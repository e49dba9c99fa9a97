//! What an operator looks at beside one instance's own rows: its pending
//! signals and children, the instances running per workflow version, the
//! leased tasks, the duty holders, a bounded head of a history. The console
//! reads these; each is bounded by a limit its caller passes.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::instances::{event_from_row, EventRecord};
use super::{decode, Result, Store};
use crate::model::InstanceStatus;

/// A registered version, without its definition.
#[derive(Debug, Clone)]
pub(crate) struct VersionBrief {
    pub workflow: String,
    pub version: i32,
    pub created_at: DateTime<Utc>,
}

const PENDING_SIGNALS: &str = "
    SELECT id, name, payload, created_at FROM signals
    WHERE instance_id = $1 AND consumed_at IS NULL
    ORDER BY id LIMIT $2";
const CHILDREN: &str = "
    SELECT id, status FROM instances WHERE parent_id = $1 ORDER BY id LIMIT $2";
/// Not ended, per workflow version. It reads every instance (there is no
/// index on status: one would cost every transition an index write), so it
/// runs under a statement timeout of its own.
const UNENDED_BY_VERSION: &str = "
    SELECT workflow_name, workflow_version, count(*) FROM instances
    WHERE status IN ('pending', 'running')
    GROUP BY 1, 2";
const LEASED_TASKS: &str = "
    SELECT id, queue, instance_id, step_id, attempt, item, purpose = 'compensate', leased_by,
           leased_at, lease_expires_at, extract(epoch FROM lease_expires_at - now())::float8
    FROM tasks WHERE status = 'leased' AND kind <> 'workflow'
    ORDER BY lease_expires_at LIMIT $1";
const INSTANCE_LEASES: &str = "
    SELECT id, queue, instance_id, step_id, attempt, item, purpose = 'compensate', leased_by,
           leased_at, lease_expires_at, extract(epoch FROM lease_expires_at - now())::float8
    FROM tasks WHERE instance_id = $1 AND status = 'leased' AND kind <> 'workflow'
    ORDER BY id LIMIT $2";
const DUTY_HOLDERS: &str = "SELECT duty, holder FROM duty_holders ORDER BY duty";
/// The `events` view's expansion, over only the history rows up to $2 (the
/// view's computed seq would make the whole history be read first).
const HISTORY_HEAD: &str = "
    SELECT h.seq + e.n::integer - 1, e.ev ->> 'type', e.ev ->> 'step_id',
           (e.ev ->> 'attempt')::integer, coalesce(e.ev -> 'data', '{}'::jsonb),
           coalesce((e.ev ->> 'at')::timestamptz, h.created_at), h.member
    FROM history h
    CROSS JOIN LATERAL jsonb_array_elements(h.events) WITH ORDINALITY AS e(ev, n)
    WHERE h.instance_id = $1 AND h.seq <= $2 AND h.seq + e.n::integer - 1 <= $2
    ORDER BY 1";
/// Registered versions (of one workflow, or all), without definitions.
const WORKFLOW_VERSIONS: &str = "
    SELECT name, version, created_at FROM workflows
    WHERE ($1::text IS NULL OR name = $1)
    ORDER BY name, version LIMIT $2";

/// A signal sent and not yet taken by a step.
#[derive(Debug, Clone)]
pub(crate) struct PendingSignal {
    pub id: i64,
    pub name: String,
    pub payload: Value,
    pub created_at: DateTime<Utc>,
}

/// Instances of one workflow version that have not ended.
#[derive(Debug, Clone)]
pub(crate) struct VersionCount {
    pub workflow: String,
    pub version: i32,
    pub unended: i64,
}

/// A task a worker holds.
#[derive(Debug, Clone)]
pub(crate) struct LeasedTask {
    pub id: i64,
    pub queue: String,
    pub instance_id: String,
    pub step_id: String,
    pub attempt: i32,
    pub item: Option<i32>,
    /// An attempt of the step's compensation.
    pub compensation: bool,
    pub worker: Option<String>,
    pub leased_at: Option<DateTime<Utc>>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Seconds until the lease expires (negative: expired, not reaped yet).
    pub expires_in_s: Option<f64>,
}

impl Store {
    /// The first `limit` registered versions (of `workflow`, or of all), by
    /// name and version.
    pub(crate) async fn workflow_versions(
        &self,
        workflow: Option<&str>,
        limit: i64,
    ) -> Result<Vec<VersionBrief>> {
        let conn = self.conn().await?;
        let rows = conn.query(WORKFLOW_VERSIONS, &[&workflow, &limit]).await?;
        Ok(rows
            .iter()
            .map(|r| VersionBrief {
                workflow: r.get(0),
                version: r.get(1),
                created_at: r.get(2),
            })
            .collect())
    }

    /// The first `limit` signals sent to `instance_id` that no step took.
    pub(crate) async fn pending_signals(
        &self,
        instance_id: &str,
        limit: i64,
    ) -> Result<Vec<PendingSignal>> {
        let conn = self.conn().await?;
        let rows = conn.query(PENDING_SIGNALS, &[&instance_id, &limit]).await?;
        Ok(rows
            .iter()
            .map(|r| PendingSignal {
                id: r.get(0),
                name: r.get(1),
                payload: r.get(2),
                created_at: r.get(3),
            })
            .collect())
    }

    /// The first `limit` child instances of `parent_id`, with their status.
    pub(crate) async fn children(
        &self,
        parent_id: &str,
        limit: i64,
    ) -> Result<Vec<(String, InstanceStatus)>> {
        let conn = self.conn().await?;
        let rows = conn.query(CHILDREN, &[&parent_id, &limit]).await?;
        rows.iter()
            .map(|r| Ok((r.get(0), decode("instances.status", r.get(1))?)))
            .collect()
    }

    /// Instances not ended, per workflow version; `None` if counting them
    /// took longer than `timeout_ms`.
    pub(crate) async fn unended_by_version(
        &self,
        timeout_ms: u64,
    ) -> Result<Option<Vec<VersionCount>>> {
        let Some(rows) = self
            .query_within(UNENDED_BY_VERSION, &[], timeout_ms)
            .await?
        else {
            return Ok(None);
        };
        Ok(Some(
            rows.iter()
                .map(|r| VersionCount {
                    workflow: r.get(0),
                    version: r.get(1),
                    unended: r.get(2),
                })
                .collect(),
        ))
    }

    /// The `limit` leased tasks whose leases expire first.
    pub(crate) async fn leased_tasks(&self, limit: i64) -> Result<Vec<LeasedTask>> {
        let conn = self.conn().await?;
        let rows = conn.query(LEASED_TASKS, &[&limit]).await?;
        Ok(rows.iter().map(lease_from_row).collect())
    }

    /// The first `limit` leases held on attempts of `instance_id`.
    pub(crate) async fn instance_leases(
        &self,
        instance_id: &str,
        limit: i64,
    ) -> Result<Vec<LeasedTask>> {
        let conn = self.conn().await?;
        let rows = conn.query(INSTANCE_LEASES, &[&instance_id, &limit]).await?;
        Ok(rows.iter().map(lease_from_row).collect())
    }

    /// Each singleton duty and the member holding it.
    pub(crate) async fn duty_holders(&self) -> Result<Vec<(String, Option<String>)>> {
        let conn = self.conn().await?;
        let rows = conn.query(DUTY_HOLDERS, &[]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The history's events up to `last_seq`, in order.
    pub(crate) async fn history_head(&self, id: &str, last_seq: i32) -> Result<Vec<EventRecord>> {
        let conn = self.conn().await?;
        let rows = conn.query(HISTORY_HEAD, &[&id, &last_seq]).await?;
        rows.iter().map(event_from_row).collect()
    }
}

impl Store {
    /// Runs a read under a statement timeout of its own: `None` if it took
    /// longer than `timeout_ms`.
    pub(super) async fn query_within(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        timeout_ms: u64,
    ) -> Result<Option<Vec<tokio_postgres::Row>>> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        tx.batch_execute(&format!("SET LOCAL statement_timeout = {timeout_ms}"))
            .await?;
        match tx.query(sql, params).await {
            Ok(rows) => {
                tx.commit().await?;
                Ok(Some(rows))
            }
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) => {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn lease_from_row(r: &tokio_postgres::Row) -> LeasedTask {
    LeasedTask {
        id: r.get(0),
        queue: r.get(1),
        instance_id: r.get(2),
        step_id: r.get(3),
        attempt: r.get(4),
        item: r.get(5),
        compensation: r.get(6),
        worker: r.get(7),
        leased_at: r.get(8),
        lease_expires_at: r.get(9),
        expires_in_s: r.get(10),
    }
}
