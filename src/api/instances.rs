//! Starting, reading, listing and waiting for instances.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult};
use super::extract::{check_id, check_size, parse_json, ApiBytes, ApiJson, ApiPath, QueryParams};
use super::AppState;
use crate::definition::duration::parse_duration_ms;
use crate::model::{Doc, InstanceStatus, StepStatus, Vocabulary};
use crate::store::{InstanceFilter, InstanceRecord, StepRecord};

/// Default page size of the instance list.
const DEFAULT_PAGE: i64 = 50;
/// Long-polls recheck the database this often even without a notification.
const WAIT_POLL_MS: u64 = 1_000;

/// A start: the input, and optionally the instance's id (a repeated start
/// with the same id, workflow and input is answered with the instance it
/// started) and the workflow version (the latest by default).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StartRequest {
    #[serde(default)]
    input: Value,
    /// 1–200 characters of `[A-Za-z0-9._:@-]`; generated when absent.
    id: Option<String>,
    #[schema(minimum = 1)]
    version: Option<i32>,
    /// 0 (the default) to 1000; higher runs first (see the README).
    #[schema(minimum = 0, maximum = 1000)]
    priority: Option<i64>,
}

/// The most a start's priority may be.
pub(crate) const MAX_PRIORITY: i64 = 1000;

/// A start's priority, 0 when absent; out of range is a 422 naming `path`.
pub(crate) fn check_priority(path: &str, priority: Option<i64>) -> ApiResult<i16> {
    match priority {
        None => Ok(0),
        Some(p) if (0..=MAX_PRIORITY).contains(&p) => Ok(p as i16),
        Some(_) => Err(ApiError::unprocessable_field(
            path,
            format!("must be an integer from 0 to {MAX_PRIORITY}"),
        )),
    }
}

/// An instance as the API shows it.
#[derive(Serialize, ToSchema)]
pub(crate) struct Instance {
    id: String,
    workflow: String,
    version: i32,
    status: InstanceStatus,
    input: Value,
    output: Option<Value>,
    error: Option<Value>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
    ended_at: Option<DateTime<Utc>>,
    /// The parent instance, for a child workflow's instance.
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_id: Option<String>,
    /// Why a pending instance does not start (`paused`: its workflow is;
    /// `concurrency`: its key is at the limit), on a read of one instance.
    #[serde(skip_serializing_if = "Option::is_none")]
    held: Option<crate::model::HeldReason>,
}

/// A start's answer: the instance, and whether this request created it
/// (201) or found it started already with the same id and input (200).
#[derive(Serialize, ToSchema)]
pub(crate) struct Started {
    #[serde(flatten)]
    instance: Instance,
    created: bool,
}

/// One step of an instance, in definition order.
#[derive(Serialize, ToSchema)]
pub(crate) struct Step {
    id: String,
    /// The step's kind (`task`, `http`, `sleep`, `signal`, `value`,
    /// `workflow`).
    kind: String,
    status: StepStatus,
    /// The attempt scheduled or last run (0: never scheduled).
    attempt: u32,
    #[schema(value_type = Option<Value>)]
    input: Option<Doc>,
    #[schema(value_type = Option<Value>)]
    output: Option<Doc>,
    error: Option<Value>,
    scheduled_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    ended_at: Option<DateTime<Utc>>,
    /// When a waiting step is looked at next (a sleep's end, a signal's
    /// timeout).
    #[serde(skip_serializing_if = "Option::is_none")]
    wake_at: Option<DateTime<Utc>>,
    /// The elements of a `for_each` step.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    items: Option<Vec<crate::model::ItemState>>,
    /// The step's compensation, once it has begun.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    compensation: Option<crate::model::CompensationState>,
}

/// An instance with its steps.
#[derive(Serialize, ToSchema)]
pub(crate) struct InstanceWithSteps {
    #[serde(flatten)]
    instance: Instance,
    steps: Vec<Step>,
}

/// Start an instance of the latest (or a given) version of a workflow.
#[utoipa::path(post, path = "/v1/workflows/{name}/instances", tag = "instances",
    params(("name" = String, Path, description = "the workflow")),
    request_body = StartRequest,
    responses(
        (status = 201, description = "started", body = Started),
        (status = 200, description = "started before with the same id and input", body = Started),
    ))]
pub(crate) async fn start(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<StartRequest>,
) -> ApiResult<Response> {
    check_id("name", &name)?;
    if let Some(id) = &req.id {
        check_id("$.id", id)?;
    }
    check_version(req.version)?;
    let priority = check_priority("$.priority", req.priority)?;
    let limits = &state.inner.limits;
    check_size(
        "$.input",
        &req.input,
        limits.max_input_bytes,
        "--max-input-bytes",
    )?;
    let store = &state.inner.store;
    let (id, created, record) = store
        .start_instance(&name, req.version, &req.input, req.id.as_deref(), priority)
        .await?;
    if created {
        state.inner.notifier.request();
    }
    let record = match record {
        Some(record) => record,
        None => store
            .get_instance(&id)
            .await?
            .ok_or_else(ApiError::internal)?,
    };
    let body = Started {
        instance: instance_json(&record),
        created,
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(body)).into_response())
}

/// A start's `version`, when given, names one: it is positive.
pub(crate) fn check_version(version: Option<i32>) -> ApiResult<()> {
    match version {
        Some(v) if v < 1 => Err(ApiError::unprocessable_field(
            "$.version",
            "must be a positive integer",
        )),
        _ => Ok(()),
    }
}

pub(crate) fn instance_json(r: &InstanceRecord) -> Instance {
    Instance {
        id: r.id.clone(),
        workflow: r.workflow_name.clone(),
        version: r.workflow_version,
        status: r.status,
        input: r.input.clone(),
        output: r.output.clone(),
        error: r.error.clone(),
        created_at: r.created_at,
        started_at: r.started_at,
        updated_at: r.updated_at,
        ended_at: r.ended_at,
        parent_id: r.parent_id.clone(),
        held: r.held,
    }
}

fn step_json(id: &str, kind: &str, record: Option<&StepRecord>) -> Step {
    // A step not reached yet has no row: it is pending, at attempt 0.
    let pending = crate::model::StepState::default();
    let (s, leased) = match record {
        Some(r) => (&r.step.state, r.leased),
        None => (&pending, false),
    };
    let status = shown_status(s.status, leased);
    Step {
        id: id.to_string(),
        kind: kind.to_string(),
        status,
        attempt: s.attempt,
        input: s.input.clone(),
        output: s.output.clone(),
        error: s.error.clone(),
        scheduled_at: s.scheduled_at,
        started_at: s.started_at,
        ended_at: s.ended_at,
        wake_at: s.wake_at,
        items: s.items.clone(),
        compensation: s.compensation.clone(),
    }
}

/// A step's status as shown: the steps table says `scheduled` until the
/// result is recorded; a held lease means a worker is on it right now.
pub(crate) fn shown_status(stored: StepStatus, leased: bool) -> StepStatus {
    if leased && stored == StepStatus::Scheduled {
        StepStatus::Running
    } else {
        stored
    }
}

/// An instance with its steps; with `wait`, once it has ended or after
/// that long (a long-poll).
#[utoipa::path(get, path = "/v1/instances/{id}", tag = "instances",
    params(("id" = String, Path, description = "the instance"),
        ("wait" = Option<String>, Query, description = "wait up to this long for the end, e.g. `30s`")),
    responses(
        (status = 200, description = "the instance", body = InstanceWithSteps),
    ))]
pub(crate) async fn get(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    query: QueryParams,
) -> ApiResult<Json<InstanceWithSteps>> {
    query.only(&["wait"])?;
    check_id("id", &id)?;
    let wait_ms = match query.get("wait") {
        None => 0,
        Some(w) => parse_duration_ms(w)
            .map_err(|e| ApiError::bad_field("query.wait", e))?
            .min(state.inner.limits.max_wait_ms),
    };
    let (record, steps) = read_when_ended(&state, &id, wait_ms).await?;
    let store = &state.inner.store;
    let def = state
        .inner
        .definitions
        .get(store, &record.workflow_name, record.workflow_version)
        .await?;
    let steps = match def {
        Some(def) => def
            .steps
            .iter()
            .map(|d| {
                step_json(
                    &d.id,
                    d.kind.name(),
                    steps.iter().find(|s| s.step.step_id == d.id),
                )
            })
            .collect(),
        None => steps
            .iter()
            .map(|s| step_json(&s.step.step_id, "", Some(s)))
            .collect(),
    };
    Ok(Json(InstanceWithSteps {
        instance: instance_json(&record),
        steps,
    }))
}

/// The instance and its steps once it has ended, or as they are after
/// `wait_ms` (at once for 0); 404 if it does not exist. Each read is the
/// answer if it is the last, so an end costs one read, not a check and a
/// read.
async fn read_when_ended(
    state: &AppState,
    id: &str,
    wait_ms: u64,
) -> ApiResult<(InstanceRecord, Vec<StepRecord>)> {
    let store = &state.inner.store;
    // Subscribe before reading, so an end between the read and the wait is
    // not missed.
    let mut ended = state.inner.wakeups.ended.subscribe();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(wait_ms);
    loop {
        let (record, steps) = store
            .get_instance_with_steps(id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("instance {id:?} does not exist")))?;
        if record.status.is_terminal() || tokio::time::Instant::now() >= deadline {
            return Ok((record, steps));
        }
        let poll = tokio::time::Instant::now() + std::time::Duration::from_millis(WAIT_POLL_MS);
        let until = poll.min(deadline);
        let _parked = state.inner.metrics.long_poll("instance");
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                msg = ended.recv() => match msg {
                    Ok(ended_id) if &*ended_id == id => break,
                    Ok(_) => continue,
                    Err(RecvError::Lagged(_)) => break,
                    Err(RecvError::Closed) => break,
                },
            }
        }
    }
}

/// A page of instances, newest first.
#[derive(Serialize, ToSchema)]
pub(crate) struct InstancePage {
    instances: Vec<Instance>,
    /// Pass as `cursor` for the next page; null on the last.
    next_cursor: Option<String>,
}

/// Instances, newest first, filtered and paged by cursor.
#[utoipa::path(get, path = "/v1/instances", tag = "instances",
    params(("workflow" = Option<String>, Query, description = "only this workflow's"),
        ("status" = Option<InstanceStatus>, Query, description = "only those in this status"),
        ("created_after" = Option<String>, Query, description = "created at or after this time (RFC 3339; without a zone, UTC)"),
        ("created_before" = Option<String>, Query, description = "created before this time (RFC 3339; without a zone, UTC)"),
        ("id_prefix" = Option<String>, Query, description = "only ids that begin with this"),
        ("limit" = Option<i64>, Query, minimum = 1, description = "page size (50; at most --max-page)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the page before")),
    responses(
        (status = 200, description = "a page", body = InstancePage),
    ))]
pub(crate) async fn list(
    State(state): State<AppState>,
    query: QueryParams,
) -> ApiResult<Json<InstancePage>> {
    query.only(LIST_PARAMS)?;
    let filter = instance_filter(&query, state.inner.limits.max_page)?;
    let rows = state.inner.store.list_instances(&filter).await?;
    let last = rows.last().map(|r| (r.created_at, r.id.as_str()));
    let next_cursor = next_cursor(&filter, rows.len(), last);
    Ok(Json(InstancePage {
        instances: rows.iter().map(instance_json).collect(),
        next_cursor,
    }))
}

/// The parameters of the instance list (and the console's).
pub(crate) const LIST_PARAMS: &[&str] = &[
    "workflow",
    "status",
    "created_after",
    "created_before",
    "id_prefix",
    "limit",
    "cursor",
];

/// The filter the list parameters name; a bad one is a 400 naming it.
pub(crate) fn instance_filter(query: &QueryParams, max_page: usize) -> ApiResult<InstanceFilter> {
    let param = |name: &str| query.get(name);
    let mut filter = InstanceFilter {
        limit: DEFAULT_PAGE,
        ..Default::default()
    };
    if let Some(w) = param("workflow") {
        check_id("query.workflow", w)?;
        filter.workflow = Some(w.to_string());
    }
    if let Some(s) = param("status") {
        filter.status = Some(InstanceStatus::parse(s).ok_or_else(|| {
            ApiError::bad_field(
                "query.status",
                "must be one of pending, running, completed, failed, cancelled",
            )
        })?);
    }
    filter.created_after = param("created_after")
        .map(|t| parse_time("query.created_after", t))
        .transpose()?;
    filter.created_before = param("created_before")
        .map(|t| parse_time("query.created_before", t))
        .transpose()?;
    if let Some(p) = param("id_prefix") {
        if p.len() > 200 || !super::extract::is_valid_id(p) {
            return Err(ApiError::bad_field(
                "query.id_prefix",
                "must be 1-200 characters of [A-Za-z0-9._:@-]",
            ));
        }
        filter.id_prefix = Some(p.to_string());
    }
    if let Some(l) = param("limit") {
        let max = max_page as i64;
        filter.limit = l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=max).contains(l))
            .ok_or_else(|| {
                ApiError::bad_field("query.limit", format!("must be an integer from 1 to {max}"))
            })?;
    }
    if let Some(c) = param("cursor") {
        filter.after = Some(decode_cursor(c).ok_or_else(|| {
            ApiError::bad_field("query.cursor", "not a cursor returned by this API")
        })?);
    }
    Ok(filter)
}

/// The cursor of the page after `rows`, unless they are the last.
/// (`rows` rows were read, the last created at `last`.)
pub(crate) fn next_cursor(
    filter: &InstanceFilter,
    rows: usize,
    last: Option<(DateTime<Utc>, &str)>,
) -> Option<String> {
    if rows as i64 == filter.limit {
        last.map(|(created_at, id)| encode_cursor(created_at, id))
    } else {
        None
    }
}

/// A time parameter: RFC 3339, or a date and time without a zone (as an
/// HTML `datetime-local` field sends it), read as UTC.
pub(crate) fn parse_time(path: &str, text: &str) -> ApiResult<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%d",
    ]
    .iter()
    .find_map(|f| {
        chrono::NaiveDateTime::parse_from_str(text, f)
            .ok()
            .or_else(|| {
                chrono::NaiveDate::parse_from_str(text, f)
                    .ok()
                    .and_then(|d| d.and_hms_opt(0, 0, 0))
            })
    })
    .filter(|t| (1..=9999).contains(&chrono::Datelike::year(t)))
    .map(|t| t.and_utc())
    .ok_or_else(|| {
        ApiError::bad_field(
            path,
            "must be a time like 2026-12-01T09:30:00Z (RFC 3339; without a zone, UTC)",
        )
    })
}

/// Cursors are opaque to clients: hex of "<micros>:<id>".
fn encode_cursor(created_at: DateTime<Utc>, id: &str) -> String {
    format!("{}:{id}", created_at.timestamp_micros())
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_cursor(cursor: &str) -> Option<(DateTime<Utc>, String)> {
    if cursor.len() % 2 != 0 || cursor.len() > 1024 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..cursor.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(cursor.get(i..i + 2)?, 16).ok())
        .collect();
    let text = String::from_utf8(bytes?).ok()?;
    let (micros, id) = text.split_once(':')?;
    let micros: i64 = micros.parse().ok()?;
    // Only times PostgreSQL can hold and ids we could have issued.
    if !(0..=253_402_300_799_000_000).contains(&micros) || !super::extract::is_valid_id(id) {
        return None;
    }
    let time = DateTime::from_timestamp_micros(micros)?;
    Some((time, id.to_string()))
}

/// One event of an instance's history.
#[derive(Serialize, ToSchema)]
pub(crate) struct HistoryEvent {
    /// 1, 2, 3…: gapless per instance.
    seq: i32,
    #[serde(rename = "type")]
    kind: crate::model::EventType,
    step_id: Option<String>,
    attempt: Option<i32>,
    data: Value,
    at: DateTime<Utc>,
    /// The member whose advancer recorded it.
    member: Option<String>,
}

/// An instance's history, oldest first.
#[derive(Serialize, ToSchema)]
pub(crate) struct History {
    instance_id: String,
    events: Vec<HistoryEvent>,
}

/// Every event of an instance, in order.
#[utoipa::path(get, path = "/v1/instances/{id}/history", tag = "instances",
    params(("id" = String, Path, description = "the instance")),
    responses(
        (status = 200, description = "the history", body = History),
    ))]
pub(crate) async fn history(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<History>> {
    check_id("id", &id)?;
    let store = &state.inner.store;
    if store.get_instance(&id).await?.is_none() {
        return Err(ApiError::not_found(format!(
            "instance {id:?} does not exist"
        )));
    }
    let events = store.history(&id).await?;
    let events = events
        .into_iter()
        .map(|e| HistoryEvent {
            seq: e.seq,
            kind: e.kind,
            step_id: e.step_id,
            attempt: e.attempt,
            data: e.data,
            at: e.created_at,
            member: e.member,
        })
        .collect();
    Ok(Json(History {
        instance_id: id,
        events,
    }))
}

/// A signal, taken.
#[derive(Serialize, ToSchema)]
pub(crate) struct SignalAccepted {
    instance_id: String,
    signal: String,
    signal_id: i64,
}

/// Sends a signal: the body is its payload, any JSON (an empty body is
/// null). Buffered until a step waits for it.
#[utoipa::path(post, path = "/v1/instances/{id}/signals/{name}", tag = "instances",
    params(("id" = String, Path, description = "the instance"),
        ("name" = String, Path, description = "the signal")),
    request_body(content = Value, description = "the payload", content_type = "application/json"),
    responses(
        (status = 202, description = "taken", body = SignalAccepted),
    ))]
pub(crate) async fn signal(
    State(state): State<AppState>,
    ApiPath((id, name)): ApiPath<(String, String)>,
    ApiBytes(body): ApiBytes,
) -> ApiResult<Response> {
    check_id("id", &id)?;
    check_id("name", &name)?;
    let payload: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        parse_json(&body)?
    };
    let max = state.inner.limits.max_signal_payload_bytes;
    check_size("body", &payload, max, "--max-signal-payload-bytes")?;
    let signal_id = state.inner.store.send_signal(&id, &name, &payload).await?;
    state.inner.notifier.request();
    Ok((
        StatusCode::ACCEPTED,
        Json(SignalAccepted {
            instance_id: id,
            signal: name,
            signal_id,
        }),
    )
        .into_response())
}

/// A cancel, with an optional reason (the body may be empty).
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CancelRequest {
    #[schema(max_length = 1000)]
    reason: Option<String>,
}

/// A request taken: the instance's engine acts on it at its next decision.
#[derive(Serialize, ToSchema)]
pub(crate) struct Requested {
    instance_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    cancel_requested: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_requested: Option<bool>,
}

/// Cancels an instance (compensations run); its children are cancelled too.
#[utoipa::path(post, path = "/v1/instances/{id}/cancel", tag = "instances",
    params(("id" = String, Path, description = "the instance")),
    request_body(content = Option<CancelRequest>, description = "optional; may be empty"),
    responses((status = 202, description = "taken", body = Requested)))]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiBytes(body): ApiBytes,
) -> ApiResult<Response> {
    check_id("id", &id)?;
    let req: CancelRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CancelRequest::default()
    } else {
        parse_json(&body)?
    };
    if req.reason.as_ref().is_some_and(|r| r.len() > 1000) {
        return Err(ApiError::unprocessable_field(
            "$.reason",
            "must be at most 1000 characters",
        ));
    }
    state
        .inner
        .store
        .request_cancel(&id, req.reason.as_deref())
        .await?;
    state.inner.notifier.request();
    Ok((
        StatusCode::ACCEPTED,
        Json(Requested {
            instance_id: id,
            cancel_requested: Some(true),
            retry_requested: None,
        }),
    )
        .into_response())
}

/// Runs a failed instance again from its failed steps.
#[utoipa::path(post, path = "/v1/instances/{id}/retry", tag = "instances",
    params(("id" = String, Path, description = "the instance")),
    responses((status = 202, description = "taken", body = Requested)))]
pub(crate) async fn retry(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Response> {
    check_id("id", &id)?;
    state.inner.store.request_retry(&id).await?;
    state.inner.notifier.request();
    Ok((
        StatusCode::ACCEPTED,
        Json(Requested {
            instance_id: id,
            cancel_requested: None,
            retry_requested: Some(true),
        }),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips() {
        let t = DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let c = encode_cursor(t, "order:42");
        assert_eq!(decode_cursor(&c), Some((t, "order:42".to_string())));
        assert_eq!(decode_cursor("zz"), None);
        assert_eq!(decode_cursor("abc"), None);
    }

    #[test]
    fn times_are_rfc3339_or_a_form_field_read_as_utc() {
        let at = |t: &str| parse_time("t", t).map(|t| t.to_rfc3339()).ok();
        assert_eq!(
            at("2026-12-01T09:30:00+01:00").as_deref(),
            Some("2026-12-01T08:30:00+00:00")
        );
        assert_eq!(
            at("2026-12-01T09:30").as_deref(),
            Some("2026-12-01T09:30:00+00:00")
        );
        assert_eq!(
            at("2026-12-01").as_deref(),
            Some("2026-12-01T00:00:00+00:00")
        );
        assert_eq!(at("yesterday"), None);
        assert_eq!(at("2026-13-01T00:00"), None);
    }
}
