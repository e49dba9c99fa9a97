//! Flow control: queue limits and pauses, paused workflows, and the claims
//! of a limited queue (its row locked, so the limits hold cluster-wide).

use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;

use super::queue::{claimed_from_row, CLAIM_GOVERNED};
use super::{ClaimedTask, Result, Store};

macro_rules! queue_columns {
    () => {
        "name, paused, max_leased, rate_per_second, rate_burst, updated_at"
    };
}

/// Creates or replaces a queue's limits ($2-$5); a new rate starts with a
/// full bucket.
const PUT_QUEUE: &str = concat!(
    "INSERT INTO queues AS q (name, paused, max_leased, rate_per_second, rate_burst, tokens, tokens_at)
     VALUES ($1, $2, $3, $4, $5, coalesce($5, 0), now())
     ON CONFLICT (name) DO UPDATE SET
         paused = excluded.paused, max_leased = excluded.max_leased,
         rate_per_second = excluded.rate_per_second, rate_burst = excluded.rate_burst,
         tokens = CASE WHEN q.rate_per_second IS DISTINCT FROM excluded.rate_per_second
                         OR q.rate_burst IS DISTINCT FROM excluded.rate_burst
                       THEN excluded.tokens ELSE q.tokens END,
         tokens_at = CASE WHEN q.rate_per_second IS DISTINCT FROM excluded.rate_per_second
                            OR q.rate_burst IS DISTINCT FROM excluded.rate_burst
                          THEN now() ELSE q.tokens_at END,
         updated_at = now()
     RETURNING ",
    queue_columns!()
);
const PAUSE_QUEUE: &str = concat!(
    "INSERT INTO queues AS q (name, paused) VALUES ($1, $2)
     ON CONFLICT (name) DO UPDATE SET paused = excluded.paused, updated_at = now()
     RETURNING ",
    queue_columns!()
);
/// A queue row that limits nothing is removed: the queue is free again.
const DROP_FREE_QUEUE: &str = "
    DELETE FROM queues WHERE name = $1 AND NOT paused AND max_leased IS NULL
      AND rate_per_second IS NULL
    RETURNING 1";
const LIST_QUEUES: &str = concat!(
    "SELECT ",
    queue_columns!(),
    " FROM queues ORDER BY name LIMIT $1"
);

/// A limited queue's row, locked, with what a claim may take now: the
/// bucket refilled to now, and the tasks leased.
const LOCK_QUEUE: &str = "
    SELECT paused, max_leased, rate_per_second,
           least(rate_burst, tokens + greatest(extract(epoch FROM now() - tokens_at), 0)
                                      * rate_per_second),
           (SELECT count(*) FROM tasks WHERE queue = $1 AND status = 'leased')
    FROM queues WHERE name = $1
    FOR UPDATE";
const SPEND_TOKENS: &str = "UPDATE queues SET tokens = $2, tokens_at = now() WHERE name = $1";

const PAUSE_WORKFLOW: &str = "
    INSERT INTO workflow_controls (name, paused) VALUES ($1, $2)
    ON CONFLICT (name) DO UPDATE SET paused = excluded.paused, updated_at = now()";
const CONTROLS: &str = "
    SELECT 'queue', name, paused FROM queues
    UNION ALL
    SELECT 'workflow', name, true FROM workflow_controls WHERE paused";
/// Wakes up to $2 of a workflow's instances held while it was paused.
const RELEASE_PAUSED: &str = "
    UPDATE instances SET held = NULL, wake_at = now() - priority * interval '1 second'
    WHERE id IN (SELECT id FROM instances WHERE workflow_name = $1 AND held = 'paused'
                 ORDER BY created_at, id LIMIT $2 FOR UPDATE)";

/// Wakes the oldest waiter of every concurrency key none of whose instances
/// runs: a release that found its waiter locked elsewhere cannot strand it.
const WAKE_STRANDED: &str = "
    UPDATE instances SET wake_at = now() - priority * interval '1 second'
    WHERE id IN (
        SELECT w.id
        FROM (SELECT DISTINCT workflow_name, concurrency_key FROM instances
              WHERE held = 'concurrency' AND ended_at IS NULL) k
        CROSS JOIN LATERAL (
            SELECT id FROM instances
            WHERE workflow_name = k.workflow_name AND concurrency_key = k.concurrency_key
              AND ended_at IS NULL AND held = 'concurrency' AND wake_at IS NULL
            ORDER BY created_at, id LIMIT 1
            FOR UPDATE SKIP LOCKED) w
        WHERE NOT EXISTS (
            SELECT 1 FROM instances r
            WHERE r.workflow_name = k.workflow_name AND r.concurrency_key = k.concurrency_key
              AND r.ended_at IS NULL AND r.held IS NULL))";

/// A queue's limits.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct QueueLimits {
    pub paused: bool,
    pub max_leased: Option<i32>,
    /// Claims per second and the burst.
    pub rate: Option<(f64, i32)>,
}

/// A queue's stored limits.
#[derive(Debug, Clone)]
pub(crate) struct QueueControl {
    pub name: String,
    pub limits: QueueLimits,
    pub updated_at: DateTime<Utc>,
}

fn control_from_row(r: &tokio_postgres::Row) -> QueueControl {
    let rate: Option<f64> = r.get(3);
    let burst: Option<i32> = r.get(4);
    QueueControl {
        name: r.get(0),
        limits: QueueLimits {
            paused: r.get(1),
            max_leased: r.get(2),
            rate: rate.zip(burst),
        },
        updated_at: r.get(5),
    }
}

/// The names with controls: queues with limits, paused workflows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ControlNames {
    /// With whether each is paused.
    pub queues: Vec<(String, bool)>,
    pub paused_workflows: Vec<String>,
}

impl Store {
    /// Sets a queue's limits; returns what is stored (`None`: no limit is
    /// left, and the queue is free).
    pub(crate) async fn put_queue(
        &self,
        name: &str,
        limits: &QueueLimits,
    ) -> Result<Option<QueueControl>> {
        let (rate, burst) = limits.rate.unzip();
        let params: [&(dyn ToSql + Sync); 5] =
            [&name, &limits.paused, &limits.max_leased, &rate, &burst];
        self.store_queue(PUT_QUEUE, &params).await
    }

    /// Pauses or resumes a queue; returns what is stored, as `put_queue`.
    pub(crate) async fn set_queue_paused(
        &self,
        name: &str,
        paused: bool,
    ) -> Result<Option<QueueControl>> {
        self.store_queue(PAUSE_QUEUE, &[&name, &paused]).await
    }

    /// Runs an upsert of a queue's row ($1 its name), then drops the row if
    /// it limits nothing.
    async fn store_queue(
        &self,
        upsert: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<QueueControl>> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let row = tx.query_one(upsert, params).await?;
        let freed = tx.query_opt(DROP_FREE_QUEUE, &params[..1]).await?.is_some();
        tx.commit().await?;
        Ok((!freed).then(|| control_from_row(&row)))
    }

    pub(crate) async fn list_queues(&self, limit: i64) -> Result<Vec<QueueControl>> {
        let conn = self.conn().await?;
        let rows = conn.query(LIST_QUEUES, &[&limit]).await?;
        Ok(rows.iter().map(control_from_row).collect())
    }

    /// The queues with limits and the paused workflows.
    pub(crate) async fn control_names(&self) -> Result<ControlNames> {
        let conn = self.conn().await?;
        let mut names = ControlNames::default();
        for r in conn.query(CONTROLS, &[]).await? {
            let (kind, name): (&str, String) = (r.get(0), r.get(1));
            match kind {
                "queue" => names.queues.push((name, r.get(2))),
                _ => names.paused_workflows.push(name),
            }
        }
        Ok(names)
    }

    /// Pauses or resumes a workflow's new instances.
    pub(crate) async fn set_workflow_paused(&self, name: &str, paused: bool) -> Result<()> {
        let conn = self.conn().await?;
        conn.execute(PAUSE_WORKFLOW, &[&name, &paused]).await?;
        Ok(())
    }

    /// Wakes up to `limit` of the instances a paused workflow held; returns
    /// how many.
    pub(crate) async fn release_paused(&self, workflow: &str, limit: i64) -> Result<u64> {
        let conn = self.conn().await?;
        Ok(conn.execute(RELEASE_PAUSED, &[&workflow, &limit]).await?)
    }

    /// Wakes the first waiter of each key with none running; returns how
    /// many (the maintenance-duty holder's safety net).
    pub(crate) async fn wake_stranded_waiters(&self) -> Result<u64> {
        let conn = self.conn().await?;
        Ok(conn.execute(WAKE_STRANDED, &[]).await?)
    }

    /// Claims up to `max` tasks of the limited queue `queue`: its row is
    /// locked, so claims on every node take turns, and each takes no more
    /// than the pause, `max_leased` and the rate's bucket allow.
    pub(crate) async fn claim_governed(
        &self,
        queue: &str,
        worker: &str,
        max: i64,
        lease_ms: u64,
    ) -> Result<Vec<ClaimedTask>> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let Some(row) = tx.query_opt(LOCK_QUEUE, &[&queue]).await? else {
            // Freed since this process last looked: claimed freely next time.
            tx.rollback().await?;
            return Ok(Vec::new());
        };
        let paused: bool = row.get(0);
        let max_leased: Option<i32> = row.get(1);
        let rate: Option<f64> = row.get(2);
        let tokens: Option<f64> = row.get(3);
        let leased: i64 = row.get(4);
        let allowed = [
            Some(max),
            max_leased.map(|m| i64::from(m) - leased),
            tokens.map(|t| t.floor() as i64),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(max);
        if paused || allowed <= 0 {
            tx.rollback().await?;
            return Ok(Vec::new());
        }
        let queues = [queue];
        let params: [&(dyn ToSql + Sync); 4] =
            [&queues.as_slice(), &allowed, &worker, &(lease_ms as f64)];
        let rows = tx.query(CLAIM_GOVERNED, &params).await?;
        if let (Some(_), Some(tokens)) = (rate, tokens) {
            let left = tokens - rows.len() as f64;
            tx.execute(SPEND_TOKENS, &[&queue, &left]).await?;
        }
        tx.commit().await?;
        Ok(rows.iter().map(claimed_from_row).collect())
    }
}
