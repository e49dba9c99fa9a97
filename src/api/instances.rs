//! Starting, reading, listing and waiting for instances.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use super::error::{ApiError, ApiResult};
use super::extract::{check_id, check_size, parse_json, ApiBytes, ApiJson, ApiPath, QueryParams};
use super::AppState;
use crate::definition::duration::parse_duration_ms;
use crate::model::{InstanceStatus, StepStatus, Vocabulary};
use crate::store::{InstanceFilter, InstanceRecord, StepRecord};

/// Default page size of the instance list.
const DEFAULT_PAGE: i64 = 50;
/// Long-polls recheck the database this often even without a notification.
const WAIT_POLL_MS: u64 = 1_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StartRequest {
    #[serde(default)]
    input: Value,
    id: Option<String>,
    version: Option<i32>,
}

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
    let limits = &state.inner.limits;
    check_size(
        "$.input",
        &req.input,
        limits.max_input_bytes,
        "--max-input-bytes",
    )?;
    let store = &state.inner.store;
    let (id, created, record) = store
        .start_instance(&name, req.version, &req.input, req.id.as_deref())
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
    let mut body = instance_json(&record);
    body["created"] = json!(created);
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

pub(crate) fn instance_json(r: &InstanceRecord) -> Value {
    let mut v = json!({
        "id": r.id,
        "workflow": r.workflow_name,
        "version": r.workflow_version,
        "status": r.status,
        "input": r.input,
        "output": r.output,
        "error": r.error,
        "created_at": r.created_at,
        "started_at": r.started_at,
        "updated_at": r.updated_at,
        "ended_at": r.ended_at,
    });
    if let Some(parent) = &r.parent_id {
        v["parent_id"] = json!(parent);
    }
    v
}

fn step_json(id: &str, kind: &str, record: Option<&StepRecord>) -> Value {
    let Some(record) = record else {
        return json!({ "id": id, "kind": kind, "status": "pending", "attempt": 0 });
    };
    let s = &record.step.state;
    // The steps table says 'scheduled' until the result is recorded; a held
    // lease means a worker is on it right now.
    let status = if record.leased && s.status == StepStatus::Scheduled {
        StepStatus::Running
    } else {
        s.status
    };
    let mut v = json!({
        "id": id,
        "kind": kind,
        "status": status,
        "attempt": s.attempt,
        "input": s.input,
        "output": s.output,
        "error": s.error,
        "scheduled_at": s.scheduled_at,
        "started_at": s.started_at,
        "ended_at": s.ended_at,
    });
    if s.wake_at.is_some() {
        v["wake_at"] = json!(s.wake_at);
    }
    if let Some(items) = &s.items {
        v["items"] = json!(items);
    }
    if let Some(c) = &s.compensation {
        v["compensation"] = json!(c);
    }
    v
}

pub(crate) async fn get(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    query: QueryParams,
) -> ApiResult<Json<Value>> {
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
    let mut body = instance_json(&record);
    body["steps"] = match def {
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
    Ok(Json(body))
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

pub(crate) async fn list(
    State(state): State<AppState>,
    query: QueryParams,
) -> ApiResult<Json<Value>> {
    query.only(&["workflow", "status", "limit", "cursor"])?;
    let mut filter = InstanceFilter {
        limit: DEFAULT_PAGE,
        ..Default::default()
    };
    if let Some(w) = query.get("workflow") {
        check_id("query.workflow", w)?;
        filter.workflow = Some(w.to_string());
    }
    if let Some(s) = query.get("status") {
        filter.status = Some(InstanceStatus::parse(s).ok_or_else(|| {
            ApiError::bad_field(
                "query.status",
                "must be one of pending, running, completed, failed, cancelled",
            )
        })?);
    }
    if let Some(l) = query.get("limit") {
        let max = state.inner.limits.max_page as i64;
        filter.limit = l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=max).contains(l))
            .ok_or_else(|| {
                ApiError::bad_field("query.limit", format!("must be an integer from 1 to {max}"))
            })?;
    }
    if let Some(c) = query.get("cursor") {
        filter.after = Some(decode_cursor(c).ok_or_else(|| {
            ApiError::bad_field("query.cursor", "not a cursor returned by this API")
        })?);
    }
    let rows = state.inner.store.list_instances(&filter).await?;
    let next_cursor = if rows.len() as i64 == filter.limit {
        rows.last().map(|r| encode_cursor(r.created_at, &r.id))
    } else {
        None
    };
    Ok(Json(json!({
        "instances": rows.iter().map(instance_json).collect::<Vec<_>>(),
        "next_cursor": next_cursor,
    })))
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

pub(crate) async fn history(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    check_id("id", &id)?;
    let store = &state.inner.store;
    if store.get_instance(&id).await?.is_none() {
        return Err(ApiError::not_found(format!(
            "instance {id:?} does not exist"
        )));
    }
    let events = store.history(&id).await?;
    Ok(Json(json!({
        "instance_id": id,
        "events": events.iter().map(|e| json!({
            "seq": e.seq,
            "type": e.kind,
            "step_id": e.step_id,
            "attempt": e.attempt,
            "data": e.data,
            "at": e.created_at,
            "member": e.member,
        })).collect::<Vec<_>>(),
    })))
}

/// `POST /v1/instances/{id}/signals/{name}`: the body is the payload (an
/// empty body is null). Buffered until a step waits for it.
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
        Json(json!({ "instance_id": id, "signal": name, "signal_id": signal_id })),
    )
        .into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct CancelRequest {
    reason: Option<String>,
}

/// `POST /v1/instances/{id}/cancel` with an optional `{reason}`.
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
        Json(json!({ "instance_id": id, "cancel_requested": true })),
    )
        .into_response())
}

/// `POST /v1/instances/{id}/retry`: a failed instance runs again from its
/// failed steps.
pub(crate) async fn retry(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Response> {
    check_id("id", &id)?;
    state.inner.store.request_retry(&id).await?;
    state.inner.notifier.request();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "instance_id": id, "retry_requested": true })),
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
}
