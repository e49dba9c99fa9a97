//! The external-worker protocol: claim, heartbeat, complete, fail, and the
//! results of many tasks at once.

use std::collections::HashSet;
use std::time::Duration;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiError, ApiResult};
use super::extract::{check_id, check_size, ApiJson, ApiPath};
use super::{duration_param, AppState};
use crate::model::{TaskFailure, TaskResult};
use crate::store::TaskOutcome;

/// Claims recheck the queue this often even without a notification (delayed
/// retries become ready without one).
const CLAIM_POLL_MS: u64 = 250;

/// A claim: who asks, how many tasks at most, how long to wait for one,
/// and how long the lease lasts (a duration like `"30s"` or milliseconds).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClaimRequest {
    /// The worker's name (kept on the task and its history).
    worker: String,
    /// 1 to `--max-claim` (1 by default).
    #[serde(default = "one")]
    #[schema(minimum = 1)]
    max: i64,
    /// Long-poll up to this long when no task is ready (0 by default).
    #[schema(value_type = Option<DurationValue>)]
    wait: Option<Value>,
    /// The lease (`--default-claim-lease-ms` by default).
    #[schema(value_type = Option<DurationValue>)]
    lease: Option<Value>,
}

fn one() -> i64 {
    1
}

/// A duration: a string like `"30s"` or `"500ms"`, or milliseconds.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub(crate) enum DurationValue {
    Text(String),
    Milliseconds(u64),
}

/// A task leased to the claimer.
#[derive(Serialize, ToSchema)]
pub(crate) struct ClaimedTask {
    task_id: i64,
    /// Sent back with every heartbeat, complete and fail.
    lease_token: Uuid,
    instance_id: String,
    step_id: String,
    attempt: i32,
    /// The same for every attempt of the step: for the worker's own
    /// deduplication.
    idempotency_key: String,
    input: Value,
    lease_expires_at: DateTime<Utc>,
}

/// What a claim leased (empty if nothing was ready in time).
#[derive(Serialize, ToSchema)]
pub(crate) struct Claimed {
    tasks: Vec<ClaimedTask>,
}

/// Leases up to `max` ready tasks of a queue, waiting up to `wait` for one.
#[utoipa::path(post, path = "/v1/queues/{queue}/claim", tag = "tasks",
    params(("queue" = String, Path, description = "the queue")),
    request_body = ClaimRequest,
    responses((status = 200, description = "the tasks leased", body = Claimed)))]
pub(crate) async fn claim(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(queue): ApiPath<String>,
    ApiJson(req): ApiJson<ClaimRequest>,
) -> ApiResult<Json<Claimed>> {
    check_id("queue", &queue)?;
    caller.check_queue(&queue)?;
    check_id("$.worker", &req.worker)?;
    let limits = &state.inner.limits;
    if req.max < 1 || req.max > limits.max_claim as i64 {
        return Err(ApiError::unprocessable_field(
            "$.max",
            format!("must be from 1 to {}", limits.max_claim),
        ));
    }
    let wait_ms = match &req.wait {
        Some(w) => duration_param("$.wait", w)?,
        None => 0,
    };
    if wait_ms > limits.max_wait_ms {
        return Err(ApiError::unprocessable_field(
            "$.wait",
            format!("must be at most {}ms", limits.max_wait_ms),
        ));
    }
    let lease_ms = lease_param(&state, req.lease.as_ref())?;
    let queues = vec![queue.clone()];
    let store = &state.inner.store;
    let mut wake = state.inner.wakeups.tasks.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    loop {
        let tasks = store
            .claim_tasks(&queues, &req.worker, req.max, lease_ms, |q| {
                state.inner.controls.is_limited(q)
            })
            .await?;
        for t in &tasks {
            state
                .inner
                .metrics
                .task_claimed(&t.queue, t.queue_wait_seconds);
        }
        if !tasks.is_empty() || tokio::time::Instant::now() >= deadline {
            let tasks = tasks
                .into_iter()
                .map(|t| ClaimedTask {
                    task_id: t.task_id,
                    lease_token: t.lease_token,
                    instance_id: t.instance_id,
                    step_id: t.step_id,
                    attempt: t.attempt,
                    idempotency_key: t.idempotency_key,
                    input: t.input,
                    lease_expires_at: t.lease_expires_at,
                })
                .collect();
            return Ok(Json(Claimed { tasks }));
        }
        let until =
            deadline.min(tokio::time::Instant::now() + Duration::from_millis(CLAIM_POLL_MS));
        let _parked = state.inner.metrics.long_poll("claim");
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                msg = wake.recv() => match msg {
                    Ok(q) if *q == *queue || &*q == "*" => break,
                    Ok(_) => continue,
                    Err(_) => break,
                },
            }
        }
    }
}

fn lease_param(state: &AppState, lease: Option<&Value>) -> ApiResult<u64> {
    let lease_ms = match lease {
        Some(l) => duration_param("$.lease", l)?,
        None => state.inner.tuning.default_claim_lease_ms,
    };
    let max = state.inner.limits.max_lease_ms;
    if lease_ms < 100 || lease_ms > max {
        return Err(ApiError::unprocessable_field(
            "$.lease",
            format!("must be from 100ms to {max}ms"),
        ));
    }
    Ok(lease_ms)
}

/// The `{task_id}` of the path: a positive integer, or a 400 naming it.
pub(crate) struct TaskId(i64);

impl<S: Send + Sync> FromRequestParts<S> for TaskId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let ApiPath(raw) = ApiPath::<String>::from_request_parts(parts, state).await?;
        raw.parse::<i64>()
            .ok()
            .filter(|id| *id > 0)
            .map(TaskId)
            .ok_or_else(|| ApiError::bad_field("task_id", "must be a positive integer"))
    }
}

fn lease_lost(task_id: i64) -> ApiError {
    ApiError::conflict(format!(
        "the lease on task {task_id} is not held: it expired, was taken by another worker, \
         or the task no longer exists (e.g. its instance ended)"
    ))
}

/// A heartbeat: the lease token, and optionally a new lease length.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct HeartbeatRequest {
    lease_token: Uuid,
    #[schema(value_type = Option<DurationValue>)]
    lease: Option<Value>,
}

/// A lease extended.
#[derive(Serialize, ToSchema)]
pub(crate) struct Extended {
    task_id: i64,
    lease_expires_at: DateTime<Utc>,
}

/// Extends the lease on a task.
#[utoipa::path(post, path = "/v1/tasks/{task_id}/heartbeat", tag = "tasks",
    params(("task_id" = i64, Path, minimum = 1, description = "the task")),
    request_body = HeartbeatRequest,
    responses((status = 200, description = "extended", body = Extended)))]
pub(crate) async fn heartbeat(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    TaskId(task_id): TaskId,
    ApiJson(req): ApiJson<HeartbeatRequest>,
) -> ApiResult<Json<Extended>> {
    let lease_ms = lease_param(&state, req.lease.as_ref())?;
    check_task_queues(&state, &caller, &[task_id]).await?;
    match state
        .inner
        .store
        .heartbeat_task(task_id, req.lease_token, lease_ms)
        .await?
    {
        Some(expires) => Ok(Json(Extended {
            task_id,
            lease_expires_at: expires,
        })),
        None => Err(lease_lost(task_id)),
    }
}

/// A completion: the lease token and the output (null by default).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CompleteRequest {
    lease_token: Uuid,
    #[serde(default)]
    output: Value,
}

/// A result recorded.
#[derive(Serialize, ToSchema)]
pub(crate) struct Recorded {
    task_id: i64,
    recorded: bool,
}

/// Completes a leased task with its output.
#[utoipa::path(post, path = "/v1/tasks/{task_id}/complete", tag = "tasks",
    params(("task_id" = i64, Path, minimum = 1, description = "the task")),
    request_body = CompleteRequest,
    responses((status = 200, description = "recorded", body = Recorded)))]
pub(crate) async fn complete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    TaskId(task_id): TaskId,
    ApiJson(req): ApiJson<CompleteRequest>,
) -> ApiResult<Json<Recorded>> {
    let max = state.inner.limits.max_step_output_bytes;
    check_size("$.output", &req.output, max, "--max-step-output-bytes")?;
    finish(
        &state,
        &caller,
        task_id,
        req.lease_token,
        TaskResult::Completed(req.output),
    )
    .await
}

/// A failure: the lease token and the error.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct FailRequest {
    lease_token: Uuid,
    error: FailError,
}

/// Why an attempt failed; `retryable: false` fails the step at once.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct FailError {
    message: String,
    #[serde(default = "yes")]
    retryable: bool,
    details: Option<Value>,
}

fn yes() -> bool {
    true
}

/// Fails a leased task: retried per the step's policy unless not retryable.
#[utoipa::path(post, path = "/v1/tasks/{task_id}/fail", tag = "tasks",
    params(("task_id" = i64, Path, minimum = 1, description = "the task")),
    request_body = FailRequest,
    responses((status = 200, description = "recorded", body = Recorded)))]
pub(crate) async fn fail(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    TaskId(task_id): TaskId,
    ApiJson(req): ApiJson<FailRequest>,
) -> ApiResult<Json<Recorded>> {
    finish(
        &state,
        &caller,
        task_id,
        req.lease_token,
        TaskResult::Failed(req.error.into()),
    )
    .await
}

impl From<FailError> for TaskFailure {
    /// `expired` is not a field a worker may send: only the reaper sets it.
    fn from(e: FailError) -> Self {
        TaskFailure::new(e.message, e.retryable, e.details)
    }
}

async fn finish(
    state: &AppState,
    caller: &Caller,
    task_id: i64,
    lease_token: Uuid,
    result: TaskResult,
) -> ApiResult<Json<Recorded>> {
    check_task_queues(state, caller, &[task_id]).await?;
    let outcome = TaskOutcome {
        task_id,
        lease_token,
        result,
    };
    if record(state, &[outcome]).await?.is_empty() {
        return Err(lease_lost(task_id));
    }
    Ok(Json(Recorded {
        task_id,
        recorded: true,
    }))
}

/// 403 if a caller held to some queues names a task of another queue.
/// (A task that does not exist is left to the lease check, which refuses
/// it.) A worker key learns lease tokens only from its own claims; this
/// holds it to its queues even with a token learned elsewhere.
async fn check_task_queues(state: &AppState, caller: &Caller, ids: &[i64]) -> ApiResult<()> {
    if caller.queues.is_none() {
        return Ok(());
    }
    let queues = state.inner.store.task_queues(ids).await?;
    match queues.iter().find(|(_, queue)| !caller.may_work(queue)) {
        Some((id, queue)) => Err(caller.refuse_queue(queue, Some(*id))),
        None => Ok(()),
    }
}

/// Records results whose leases are still held; returns their task ids.
/// The refused ones are counted as stale; any recorded one wakes the engine.
async fn record(state: &AppState, outcomes: &[TaskOutcome]) -> ApiResult<HashSet<i64>> {
    let recorded: HashSet<i64> = state
        .inner
        .store
        .finish_tasks(outcomes)
        .await?
        .into_iter()
        .collect();
    let refused = outcomes.len() - recorded.len();
    if refused > 0 {
        state.inner.metrics.stale_completions.inc_by(refused as u64);
    }
    if !recorded.is_empty() {
        state.inner.notifier.request();
    }
    Ok(recorded)
}

/// The results of up to `--max-claim` tasks.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResultsRequest {
    results: Vec<ResultItem>,
}

/// One task's result: `output` completes it, `error` fails it.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResultItem {
    #[schema(minimum = 1)]
    task_id: i64,
    lease_token: Uuid,
    output: Option<Value>,
    error: Option<FailError>,
}

/// Each result, recorded or refused (its lease was not held), and the
/// counts.
#[derive(Serialize, ToSchema)]
pub(crate) struct ResultsRecorded {
    results: Vec<Recorded>,
    recorded: usize,
    refused: usize,
}

/// Records the results of up to `max_claim` tasks in one transaction, each
/// exactly as its own complete or fail would: a result whose lease is not
/// held is refused (`recorded: false`) and changes nothing, and the others
/// are recorded all the same.
/// Records the results of many tasks in one transaction.
#[utoipa::path(post, path = "/v1/tasks/results", tag = "tasks",
    request_body = ResultsRequest,
    responses((status = 200, description = "result by result", body = ResultsRecorded)))]
pub(crate) async fn results(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<ResultsRequest>,
) -> ApiResult<Json<ResultsRecorded>> {
    let max = state.inner.limits.max_claim;
    if req.results.is_empty() || req.results.len() > max {
        return Err(ApiError::unprocessable_field(
            "$.results",
            format!("must hold from 1 to {max} results"),
        ));
    }
    let mut outcomes = Vec::with_capacity(req.results.len());
    let mut seen = HashSet::with_capacity(req.results.len());
    for (i, item) in req.results.into_iter().enumerate() {
        if item.task_id < 1 {
            return Err(ApiError::unprocessable_field(
                format!("$.results[{i}].task_id"),
                "must be a positive integer",
            ));
        }
        if !seen.insert(item.task_id) {
            return Err(ApiError::unprocessable_field(
                format!("$.results[{i}].task_id"),
                "appears twice: send one result per task",
            ));
        }
        let result = match (item.output, item.error) {
            (Some(_), Some(_)) => {
                return Err(ApiError::unprocessable_field(
                    format!("$.results[{i}]"),
                    "has both output and error: send one",
                ))
            }
            (_, Some(e)) => TaskResult::Failed(e.into()),
            (output, None) => {
                let output = output.unwrap_or(Value::Null);
                let path = format!("$.results[{i}].output");
                let max = state.inner.limits.max_step_output_bytes;
                check_size(path, &output, max, "--max-step-output-bytes")?;
                TaskResult::Completed(output)
            }
        };
        outcomes.push(TaskOutcome {
            task_id: item.task_id,
            lease_token: item.lease_token,
            result,
        });
    }
    let ids: Vec<i64> = outcomes.iter().map(|o| o.task_id).collect();
    check_task_queues(&state, &caller, &ids).await?;
    let recorded = record(&state, &outcomes).await?;
    let refused = outcomes.len() - recorded.len();
    let results = outcomes
        .iter()
        .map(|o| Recorded {
            task_id: o.task_id,
            recorded: recorded.contains(&o.task_id),
        })
        .collect();
    Ok(Json(ResultsRecorded {
        results,
        recorded: recorded.len(),
        refused,
    }))
}
