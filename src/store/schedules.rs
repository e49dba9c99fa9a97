//! Schedules: their rows, and firing the due ones (the maintenance-duty
//! holder's run). The cron arithmetic is `crate::schedule`'s; this file
//! hands it database time and writes what it decides.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{decode, Result, Store};
use crate::model::Overlap;
use crate::schedule::{self, CronSpec, Due};

macro_rules! columns {
    () => {
        "name, workflow_name, cron, timezone, input, overlap, catchup_ms, paused, \
         next_fire_at, last_fired_at, last_instance_id, created_at, updated_at"
    };
}

const PUT_SCHEDULE: &str = concat!(
    "INSERT INTO schedules (name, workflow_name, cron, timezone, input, overlap,
                            catchup_ms, paused, next_fire_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
     ON CONFLICT (name) DO UPDATE SET
         workflow_name = excluded.workflow_name, cron = excluded.cron,
         timezone = excluded.timezone, input = excluded.input,
         overlap = excluded.overlap, catchup_ms = excluded.catchup_ms,
         paused = excluded.paused, next_fire_at = excluded.next_fire_at,
         updated_at = now()
     RETURNING ",
    columns!()
);
const GET_SCHEDULE: &str = concat!("SELECT ", columns!(), " FROM schedules WHERE name = $1");
const LIST_SCHEDULES: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM schedules WHERE $1::text IS NULL OR name > $1 ORDER BY name LIMIT $2"
);
const SET_PAUSED: &str = concat!(
    "UPDATE schedules SET paused = $2, next_fire_at = $3, updated_at = now()
     WHERE name = $1 RETURNING ",
    columns!()
);
const PAUSE_UNREADABLE: &str = "UPDATE schedules SET paused = true WHERE name = $1";
const DELETE_SCHEDULE: &str = "DELETE FROM schedules WHERE name = $1";

const NOW: &str = "SELECT now()";
const LOCK_SCHEDULE: &str = "
    SELECT cron, timezone, paused, next_fire_at FROM schedules WHERE name = $1 FOR UPDATE";
const WORKFLOW_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM workflows WHERE name = $1)";
const COUNT_SCHEDULES: &str = "SELECT count(*) FROM schedules";

/// The due schedules, oldest firing first, each with whether the instance
/// of its last firing still runs (an instance retention deleted has ended).
const LOCK_DUE: &str = "
    SELECT s.name, s.workflow_name, s.cron, s.timezone, s.input, s.overlap, s.catchup_ms,
           s.next_fire_at, s.last_instance_id,
           coalesce((SELECT i.ended_at IS NULL FROM instances i WHERE i.id = s.last_instance_id),
                    false),
           now()
    FROM schedules s
    WHERE NOT s.paused AND s.next_fire_at <= now()
    ORDER BY s.next_fire_at
    LIMIT $1
    FOR UPDATE OF s SKIP LOCKED";
/// A firing's instance, at the workflow's latest version; nothing if the id
/// is taken (the firing started it before).
const START_FIRING: &str = "
    INSERT INTO instances (id, workflow_name, workflow_version, slot, input, wake_at)
    SELECT $1, $2, w.version, slot_of($1, c.slot_count), $3, now()
    FROM (SELECT max(version) AS version FROM workflows WHERE name = $2) w, cluster c
    WHERE w.version IS NOT NULL
    ON CONFLICT (id) DO NOTHING
    RETURNING id";
const CANCEL_PREVIOUS: &str = "SELECT request_cancel($1, $2)";
const FIRED: &str = "
    UPDATE schedules
    SET next_fire_at = $2,
        last_fired_at = coalesce($3, last_fired_at),
        last_instance_id = coalesce($4, last_instance_id)
    WHERE name = $1";
/// Seconds until the earliest firing of an active schedule (negative if
/// one is due), or NULL if none.
const NEXT_DUE_IN: &str = "
    SELECT extract(epoch FROM min(next_fire_at) - now())::float8
    FROM schedules WHERE NOT paused";

/// A schedule as PUT describes it.
#[derive(Debug, Clone)]
pub(crate) struct NewSchedule {
    pub name: String,
    pub workflow: String,
    pub cron: String,
    pub timezone: String,
    pub input: Value,
    pub overlap: Overlap,
    pub catchup_ms: u64,
    pub paused: bool,
}

/// A stored schedule.
#[derive(Debug, Clone)]
pub(crate) struct ScheduleRecord {
    /// What PUT stored.
    pub spec: NewSchedule,
    /// The next firing; `None` if paused or the cron names no later time.
    pub next_fire_at: Option<DateTime<Utc>>,
    pub last_fired_at: Option<DateTime<Utc>>,
    pub last_instance_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

fn schedule_from_row(r: &tokio_postgres::Row) -> Result<ScheduleRecord> {
    Ok(ScheduleRecord {
        spec: NewSchedule {
            name: r.get(0),
            workflow: r.get(1),
            cron: r.get(2),
            timezone: r.get(3),
            input: r.get(4),
            overlap: decode("schedules.overlap", r.get(5))?,
            catchup_ms: r.get::<_, i64>(6) as u64,
            paused: r.get(7),
        },
        next_fire_at: r.get(8),
        last_fired_at: r.get(9),
        last_instance_id: r.get(10),
        created_at: r.get(11),
        updated_at: r.get(12),
    })
}

/// How a PUT ended.
#[derive(Debug)]
pub(crate) enum PutSchedule {
    /// Stored; `true` if it is new.
    Saved(Box<ScheduleRecord>, bool),
    /// The workflow it names is not registered.
    NoWorkflow,
    /// A new schedule would pass the limit (this many exist).
    TooMany(i64),
}

/// What the scheduler's knobs are for one run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FiringLimits {
    /// Most schedules one run fires.
    pub schedules: i64,
    /// Most firings of one schedule one run considers.
    pub firings: usize,
    /// A late firing within this of now is made up whatever the catchup.
    pub grace_ms: u64,
}

/// What one scheduler run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Fired {
    /// Schedules that were due (the batch is full at `FiringLimits::schedules`).
    pub schedules: usize,
    pub started: u64,
    pub skipped: u64,
    pub missed: u64,
    /// Instances a `cancel_previous` firing asked to cancel.
    pub cancelled: u64,
    /// Schedules whose cron or zone this build cannot read (left unfired).
    pub unreadable: u64,
    /// How late each started firing was, in seconds.
    pub lateness_s: Vec<f64>,
}

impl Store {
    /// Creates or replaces a schedule; returns it and whether it is new.
    /// The next firing is computed from database time, except that an
    /// update keeping the cron and zone keeps the firing it waited for.
    pub(crate) async fn put_schedule(
        &self,
        new: &NewSchedule,
        spec: &CronSpec,
        max_schedules: u64,
    ) -> Result<PutSchedule> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let exists: bool = tx
            .query_one(WORKFLOW_EXISTS, &[&new.workflow])
            .await?
            .get(0);
        if !exists {
            return Ok(PutSchedule::NoWorkflow);
        }
        let now: DateTime<Utc> = tx.query_one(NOW, &[]).await?.get(0);
        let old = tx.query_opt(LOCK_SCHEDULE, &[&new.name]).await?;
        let next_fire_at = match &old {
            Some(r)
                if r.get::<_, &str>(0) == new.cron
                    && r.get::<_, &str>(1) == new.timezone
                    && !r.get::<_, bool>(2) =>
            {
                r.get::<_, Option<DateTime<Utc>>>(3)
            }
            _ => spec.next_after(now),
        };
        if old.is_none() {
            let count: i64 = tx.query_one(COUNT_SCHEDULES, &[]).await?.get(0);
            if count as u64 >= max_schedules {
                return Ok(PutSchedule::TooMany(count));
            }
        }
        let row = tx
            .query_one(
                PUT_SCHEDULE,
                &[
                    &new.name,
                    &new.workflow,
                    &new.cron,
                    &new.timezone,
                    &new.input,
                    &new.overlap.as_str(),
                    &(new.catchup_ms as i64),
                    &new.paused,
                    &next_fire_at,
                ],
            )
            .await?;
        tx.commit().await?;
        Ok(PutSchedule::Saved(
            Box::new(schedule_from_row(&row)?),
            old.is_none(),
        ))
    }

    pub(crate) async fn get_schedule(&self, name: &str) -> Result<Option<ScheduleRecord>> {
        let conn = self.conn().await?;
        let row = conn.query_opt(GET_SCHEDULE, &[&name]).await?;
        row.as_ref().map(schedule_from_row).transpose()
    }

    /// Schedules in name order, after `after`, at most `limit`.
    pub(crate) async fn list_schedules(
        &self,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ScheduleRecord>> {
        let conn = self.conn().await?;
        let rows = conn.query(LIST_SCHEDULES, &[&after, &limit]).await?;
        rows.iter().map(schedule_from_row).collect()
    }

    /// Deletes a schedule (its instances stay); false if there was none.
    pub(crate) async fn delete_schedule(&self, name: &str) -> Result<bool> {
        let conn = self.conn().await?;
        let n = conn.execute(DELETE_SCHEDULE, &[&name]).await?;
        Ok(n > 0)
    }

    /// Pauses a schedule, or resumes it from its next firing after now (a
    /// pause is not made up). `None` if there is no such schedule.
    pub(crate) async fn set_schedule_paused(
        &self,
        name: &str,
        paused: bool,
    ) -> Result<Option<ScheduleRecord>> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let Some(old) = tx.query_opt(LOCK_SCHEDULE, &[&name]).await? else {
            return Ok(None);
        };
        let now: DateTime<Utc> = tx.query_one(NOW, &[]).await?.get(0);
        let next_fire_at = if paused {
            old.get::<_, Option<DateTime<Utc>>>(3)
        } else {
            CronSpec::parse(old.get(0), old.get(1))
                .ok()
                .and_then(|spec| spec.next_after(now))
        };
        let row = tx
            .query_one(SET_PAUSED, &[&name, &paused, &next_fire_at])
            .await?;
        tx.commit().await?;
        Ok(Some(schedule_from_row(&row)?))
    }

    /// Fires the due schedules, at most `limits.schedules` of them, in one
    /// transaction: each firing's instance is started with its firing's id
    /// and the schedule's next firing moves on together, so a firing
    /// repeated (after a crash or a failover of the duty) starts nothing.
    pub(crate) async fn fire_due_schedules(&self, limits: FiringLimits) -> Result<Fired> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let rows = tx.query(LOCK_DUE, &[&limits.schedules]).await?;
        let mut fired = Fired {
            schedules: rows.len(),
            ..Fired::default()
        };
        for row in &rows {
            let name: &str = row.get(0);
            let workflow: &str = row.get(1);
            let input: Value = row.get(4);
            let now: DateTime<Utc> = row.get(10);
            let Ok(spec) = CronSpec::parse(row.get(2), row.get(3)) else {
                // Written by a build that read it (another zone database,
                // say): pause it, visibly, rather than fire it wrong.
                tracing::warn!(
                    schedule = name,
                    "a schedule's cron or zone cannot be read; paused"
                );
                tx.execute(PAUSE_UNREADABLE, &[&name]).await?;
                fired.unreadable += 1;
                continue;
            };
            let due = Due {
                next_fire_at: row.get(7),
                overlap: decode("schedules.overlap", row.get(5))?,
                window_ms: (row.get::<_, i64>(6) as u64).max(limits.grace_ms),
                previous_running: row.get(9),
            };
            let plan = schedule::plan(&spec, &due, now, limits.firings);
            let previous: Option<String> = row.get(8);
            if plan.cancel_previous {
                if let Some(previous) = &previous {
                    let reason = format!("schedule {name}: a newer firing replaces it");
                    tx.execute(CANCEL_PREVIOUS, &[previous, &reason]).await?;
                    fired.cancelled += 1;
                }
            }
            let mut last = None;
            for at in &plan.start {
                let id = schedule::instance_id(name, *at);
                if tx
                    .query_opt(START_FIRING, &[&id, &workflow, &input])
                    .await?
                    .is_some()
                {
                    fired.started += 1;
                }
                fired
                    .lateness_s
                    .push((now - *at).num_milliseconds() as f64 / 1000.0);
                last = Some((*at, id));
            }
            fired.skipped += plan.skipped;
            fired.missed += plan.missed;
            let (last_at, last_id) = last.unzip();
            tx.execute(FIRED, &[&name, &plan.next_fire_at, &last_at, &last_id])
                .await?;
        }
        tx.commit().await?;
        Ok(fired)
    }

    /// How long until the earliest active schedule's firing (zero if one is
    /// due); `None` if no schedule is active.
    pub(crate) async fn next_firing_in(&self) -> Result<Option<std::time::Duration>> {
        let conn = self.conn().await?;
        let secs: Option<f64> = conn.query_one(NEXT_DUE_IN, &[]).await?.get(0);
        Ok(secs.map(|s| std::time::Duration::from_secs_f64(s.max(0.0))))
    }
}
