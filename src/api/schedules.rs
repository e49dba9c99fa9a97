//! Schedules (contract §9): create or replace, read (with the next firings
//! and the last instances), list, delete, pause and resume.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult};
use super::extract::{check_id, check_size, ApiJson, ApiPath, QueryParams};
use super::instances::{instance_json, Instance};
use super::AppState;
use crate::definition::duration::{format_duration_ms, parse_duration_ms};
use crate::model::Overlap;
use crate::schedule::CronSpec;
use crate::store::{InstanceFilter, NewSchedule, PutSchedule, ScheduleRecord};

/// Firings shown ahead in a schedule's answer.
const NEXT_FIRINGS_SHOWN: usize = 5;
/// Instances shown of a schedule's last firings.
const LAST_INSTANCES_SHOWN: i64 = 10;
/// Longest schedule name: its instance ids (`sched:<name>:<time>`) must
/// stay within the 200 characters of an id.
const MAX_NAME_CHARS: usize = 160;
/// The default page of the list.
const DEFAULT_PAGE: i64 = 100;

/// A schedule as PUT takes it.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ScheduleRequest {
    /// The workflow each firing starts (its latest version at the firing).
    workflow: String,
    /// 5 fields (minute hour day-of-month month day-of-week) or 6 with
    /// seconds first, e.g. `0 3 * * *` or `*/10 * * * * *`.
    cron: String,
    /// An IANA time zone the cron is read in (`UTC` by default).
    #[serde(default)]
    timezone: Option<String>,
    /// The input of every instance it starts.
    #[serde(default)]
    input: Value,
    /// What a firing does while the previous firing's instance runs.
    #[serde(default)]
    #[schema(value_type = Option<Overlap>)]
    overlap: Option<Overlap>,
    /// How far back firings missed while no node ran are made up, e.g.
    /// `1h` (default `0s`: none, beyond the node's grace).
    #[serde(default)]
    catchup: Option<String>,
    /// Store it paused.
    #[serde(default)]
    paused: bool,
}

/// A schedule as the API shows it.
#[derive(Serialize, ToSchema)]
pub(crate) struct Schedule {
    name: String,
    workflow: String,
    cron: String,
    timezone: String,
    input: Value,
    overlap: Overlap,
    catchup: String,
    paused: bool,
    /// The firing it waits for (none while paused or if the cron names no
    /// later time).
    next_fire_at: Option<DateTime<Utc>>,
    last_fired_at: Option<DateTime<Utc>>,
    last_instance_id: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// A schedule with what is coming and what it started.
#[derive(Serialize, ToSchema)]
pub(crate) struct ScheduleDetail {
    #[serde(flatten)]
    schedule: Schedule,
    /// The next firings (up to 5).
    next_firings: Vec<DateTime<Utc>>,
    /// The instances of its last firings, newest first (up to 10).
    last_instances: Vec<Instance>,
}

/// A page of schedules in name order.
#[derive(Serialize, ToSchema)]
pub(crate) struct SchedulePage {
    schedules: Vec<Schedule>,
    /// Pass as `cursor` for the next page; absent on the last.
    next_cursor: Option<String>,
}

fn schedule_json(r: ScheduleRecord) -> Schedule {
    let s = r.spec;
    Schedule {
        name: s.name,
        workflow: s.workflow,
        cron: s.cron,
        timezone: s.timezone,
        input: s.input,
        overlap: s.overlap,
        catchup: format_duration_ms(s.catchup_ms),
        paused: s.paused,
        next_fire_at: r.next_fire_at,
        last_fired_at: r.last_fired_at,
        last_instance_id: r.last_instance_id,
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

/// A schedule name: an id of at most 160 characters, without `:` (its
/// instance ids put one after it).
fn check_name(name: &str) -> ApiResult<()> {
    check_id("name", name)?;
    if name.len() > MAX_NAME_CHARS || name.contains(':') {
        return Err(ApiError::bad_field(
            "name",
            format!("a schedule name is 1-{MAX_NAME_CHARS} characters of [A-Za-z0-9._@-]"),
        ));
    }
    Ok(())
}

/// Create or replace a schedule.
#[utoipa::path(put, path = "/v1/schedules/{name}", tag = "schedules",
    params(("name" = String, Path, description = "the schedule")),
    request_body = ScheduleRequest,
    responses(
        (status = 201, description = "created", body = ScheduleDetail),
        (status = 200, description = "replaced", body = ScheduleDetail),
    ))]
pub(crate) async fn put(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<ScheduleRequest>,
) -> ApiResult<Response> {
    check_name(&name)?;
    check_id("$.workflow", &req.workflow)?;
    let limits = &state.inner.limits;
    check_size(
        "$.input",
        &req.input,
        limits.max_input_bytes,
        "--max-input-bytes",
    )?;
    let timezone = req.timezone.unwrap_or_else(|| "UTC".to_string());
    let spec = CronSpec::parse_live(&req.cron, &timezone, Utc::now())
        .map_err(|e| ApiError::unprocessable_field(format!("$.{}", e.field()), e.to_string()))?;
    let catchup_ms = match &req.catchup {
        None => 0,
        Some(c) => {
            parse_duration_ms(c).map_err(|e| ApiError::unprocessable_field("$.catchup", e))?
        }
    };
    let new = NewSchedule {
        name,
        workflow: req.workflow,
        cron: req.cron.split_whitespace().collect::<Vec<_>>().join(" "),
        timezone,
        input: req.input,
        overlap: req.overlap.unwrap_or(Overlap::Skip),
        catchup_ms,
        paused: req.paused,
    };
    let store = &state.inner.store;
    let (record, created) = match store
        .put_schedule(&new, &spec, limits.max_schedules)
        .await?
    {
        PutSchedule::Saved(record, created) => (*record, created),
        PutSchedule::NoWorkflow => {
            return Err(ApiError::unprocessable_field(
                "$.workflow",
                format!("workflow {:?} is not registered", new.workflow),
            ))
        }
        PutSchedule::TooMany(count) => {
            return Err(ApiError::conflict(format!(
                "there are {count} schedules, the most --max-schedules allows; delete one first"
            )))
        }
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(detail(&state, record, Some(&spec)).await?)).into_response())
}

/// The schedule with its next firings and last instances.
async fn detail(
    state: &AppState,
    record: ScheduleRecord,
    spec: Option<&CronSpec>,
) -> ApiResult<ScheduleDetail> {
    let next_firings = match (record.next_fire_at, spec) {
        (Some(next), Some(spec)) if !record.spec.paused => std::iter::once(next)
            .chain(spec.upcoming(next, NEXT_FIRINGS_SHOWN - 1))
            .collect(),
        _ => Vec::new(),
    };
    let filter = InstanceFilter {
        id_prefix: Some(format!("sched:{}:", record.spec.name)),
        limit: LAST_INSTANCES_SHOWN,
        ..Default::default()
    };
    let last = state.inner.store.list_instances(&filter).await?;
    Ok(ScheduleDetail {
        schedule: schedule_json(record),
        next_firings,
        last_instances: last.iter().map(instance_json).collect(),
    })
}

/// Read a schedule, with its next firings and the instances of its last
/// firings.
#[utoipa::path(get, path = "/v1/schedules/{name}", tag = "schedules",
    params(("name" = String, Path, description = "the schedule")),
    responses((status = 200, description = "the schedule", body = ScheduleDetail)))]
pub(crate) async fn get(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<ScheduleDetail>> {
    check_name(&name)?;
    let record = found(&name, state.inner.store.get_schedule(&name).await?)?;
    // A stored cron this build cannot read shows no firings ahead.
    let spec = CronSpec::parse(&record.spec.cron, &record.spec.timezone).ok();
    Ok(Json(detail(&state, record, spec.as_ref()).await?))
}

fn found(name: &str, record: Option<ScheduleRecord>) -> ApiResult<ScheduleRecord> {
    record.ok_or_else(|| ApiError::not_found(format!("schedule {name:?} does not exist")))
}

/// List schedules in name order.
#[utoipa::path(get, path = "/v1/schedules", tag = "schedules",
    params(("limit" = Option<i64>, Query, minimum = 1, description = "page size (100; at most --max-page)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the page before")),
    responses((status = 200, description = "a page", body = SchedulePage)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    query: QueryParams,
) -> ApiResult<Json<SchedulePage>> {
    query.only(&["limit", "cursor"])?;
    let max = state.inner.limits.max_page as i64;
    let limit = match query.get("limit") {
        None => DEFAULT_PAGE.min(max),
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=max).contains(l))
            .ok_or_else(|| {
                ApiError::bad_field("query.limit", format!("must be an integer from 1 to {max}"))
            })?,
    };
    let cursor = query.get("cursor");
    if let Some(c) = cursor {
        check_id("query.cursor", c)?;
    }
    let rows = state.inner.store.list_schedules(cursor, limit).await?;
    let next_cursor = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.spec.name.clone()))
        .flatten();
    Ok(Json(SchedulePage {
        schedules: rows.into_iter().map(schedule_json).collect(),
        next_cursor,
    }))
}

/// Delete a schedule; the instances it started stay.
#[utoipa::path(delete, path = "/v1/schedules/{name}", tag = "schedules",
    params(("name" = String, Path, description = "the schedule")),
    responses((status = 204, description = "deleted")))]
pub(crate) async fn delete(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<StatusCode> {
    check_name(&name)?;
    if state.inner.store.delete_schedule(&name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "schedule {name:?} does not exist"
        )))
    }
}

/// Pause a schedule: it fires no more until resumed.
#[utoipa::path(post, path = "/v1/schedules/{name}/pause", tag = "schedules",
    params(("name" = String, Path, description = "the schedule")),
    responses((status = 200, description = "paused", body = Schedule)))]
pub(crate) async fn pause(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<Schedule>> {
    set_paused(state, name, true).await
}

/// Resume a schedule from its next firing after now (firings while it was
/// paused are not made up).
#[utoipa::path(post, path = "/v1/schedules/{name}/resume", tag = "schedules",
    params(("name" = String, Path, description = "the schedule")),
    responses((status = 200, description = "resumed", body = Schedule)))]
pub(crate) async fn resume(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<Schedule>> {
    set_paused(state, name, false).await
}

async fn set_paused(state: AppState, name: String, paused: bool) -> ApiResult<Json<Schedule>> {
    check_name(&name)?;
    let record = state.inner.store.set_schedule_paused(&name, paused).await?;
    Ok(Json(schedule_json(found(&name, record)?)))
}
