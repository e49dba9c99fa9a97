//! Queue limits and pauses (contract §9): `PUT /v1/queues/{queue}`,
//! `POST .../pause`, `.../resume`, `GET /v1/queues`; and pausing a
//! workflow's new instances, `POST /v1/workflows/{name}/pause`, `.../resume`.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult};
use super::extract::{check_id, ApiJson, ApiPath};
use super::AppState;
use crate::store::{QueueControl, QueueLimits};

/// The most a limit may say.
const MAX_LEASED_LIMIT: i32 = 1_000_000;
const MAX_RATE_PER_SECOND: f64 = 100_000.0;
/// Held instances one transaction of a resume wakes.
const RESUME_BATCH: i64 = 500;
/// Most limited queues one list shows.
const MAX_QUEUES_LISTED: i64 = 10_000;

/// Claims per second, cluster-wide (a token bucket).
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Rate {
    /// Claims per second, over 0 and at most 100000.
    per_second: f64,
    /// How many claims may come at once after a quiet spell (default: the
    /// rate rounded up, at least 1).
    #[serde(default)]
    burst: Option<i32>,
}

/// A queue's limits; every field left out is no limit.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct QueueRequest {
    /// Most tasks of the queue leased at once (1 to 1000000).
    #[serde(default)]
    max_leased: Option<i32>,
    #[serde(default)]
    rate: Option<Rate>,
    /// No claims while paused.
    #[serde(default)]
    paused: bool,
}

/// A queue's limits as stored.
#[derive(Serialize, ToSchema)]
pub(crate) struct Queue {
    queue: String,
    paused: bool,
    max_leased: Option<i32>,
    rate: Option<Rate>,
    updated_at: Option<DateTime<Utc>>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct QueueList {
    /// The queues with limits or paused, by name.
    queues: Vec<Queue>,
}

fn queue_json(name: &str, control: Option<QueueControl>) -> Queue {
    match control {
        Some(c) => Queue {
            queue: c.name,
            paused: c.limits.paused,
            max_leased: c.limits.max_leased,
            rate: c.limits.rate.map(|(per_second, burst)| Rate {
                per_second,
                burst: Some(burst),
            }),
            updated_at: Some(c.updated_at),
        },
        None => Queue {
            queue: name.to_string(),
            paused: false,
            max_leased: None,
            rate: None,
            updated_at: None,
        },
    }
}

fn check_queue(queue: &str) -> ApiResult<()> {
    check_id("queue", queue)?;
    if queue == "stead.workflow" {
        return Err(ApiError::unprocessable_field(
            "queue",
            "stead.workflow holds child workflows, which are never claimed: it takes no limits",
        ));
    }
    Ok(())
}

fn limits_of(req: QueueRequest) -> ApiResult<QueueLimits> {
    if let Some(m) = req.max_leased {
        if !(1..=MAX_LEASED_LIMIT).contains(&m) {
            return Err(ApiError::unprocessable_field(
                "$.max_leased",
                format!("must be from 1 to {MAX_LEASED_LIMIT}"),
            ));
        }
    }
    let rate = match req.rate {
        None => None,
        Some(r) => {
            if !(r.per_second > 0.0 && r.per_second <= MAX_RATE_PER_SECOND) {
                return Err(ApiError::unprocessable_field(
                    "$.rate.per_second",
                    format!("must be over 0 and at most {MAX_RATE_PER_SECOND}"),
                ));
            }
            let burst = r.burst.unwrap_or((r.per_second.ceil() as i32).max(1));
            if !(1..=MAX_LEASED_LIMIT).contains(&burst) {
                return Err(ApiError::unprocessable_field(
                    "$.rate.burst",
                    format!("must be from 1 to {MAX_LEASED_LIMIT}"),
                ));
            }
            Some((r.per_second, burst))
        }
    };
    Ok(QueueLimits {
        paused: req.paused,
        max_leased: req.max_leased,
        rate,
    })
}

/// Set a queue's limits (a body with none frees it): they hold for
/// in-process and external claims on every node.
#[utoipa::path(put, path = "/v1/queues/{queue}", tag = "queues",
    params(("queue" = String, Path, description = "the queue")),
    request_body = QueueRequest,
    responses((status = 200, description = "the queue's limits", body = Queue)))]
pub(crate) async fn put(
    State(state): State<AppState>,
    ApiPath(queue): ApiPath<String>,
    ApiJson(req): ApiJson<QueueRequest>,
) -> ApiResult<Json<Queue>> {
    check_queue(&queue)?;
    let limits = limits_of(req)?;
    let store = &state.inner.store;
    let stored = store.put_queue(&queue, &limits).await?;
    state.inner.controls.reload(store).await?;
    Ok(Json(queue_json(&queue, stored)))
}

/// The queues with limits or paused.
#[utoipa::path(get, path = "/v1/queues", tag = "queues",
    responses((status = 200, description = "the limited queues", body = QueueList)))]
pub(crate) async fn list(State(state): State<AppState>) -> ApiResult<Json<QueueList>> {
    let rows = state.inner.store.list_queues(MAX_QUEUES_LISTED).await?;
    Ok(Json(QueueList {
        queues: rows
            .into_iter()
            .map(|c| queue_json(&c.name.clone(), Some(c)))
            .collect(),
    }))
}

/// Pause claims on a queue (tasks already leased run on).
#[utoipa::path(post, path = "/v1/queues/{queue}/pause", tag = "queues",
    params(("queue" = String, Path, description = "the queue")),
    responses((status = 200, description = "paused", body = Queue)))]
pub(crate) async fn pause(
    State(state): State<AppState>,
    ApiPath(queue): ApiPath<String>,
) -> ApiResult<Json<Queue>> {
    set_queue_paused(state, queue, true).await
}

/// Resume claims on a queue.
#[utoipa::path(post, path = "/v1/queues/{queue}/resume", tag = "queues",
    params(("queue" = String, Path, description = "the queue")),
    responses((status = 200, description = "resumed", body = Queue)))]
pub(crate) async fn resume(
    State(state): State<AppState>,
    ApiPath(queue): ApiPath<String>,
) -> ApiResult<Json<Queue>> {
    set_queue_paused(state, queue, false).await
}

async fn set_queue_paused(state: AppState, queue: String, paused: bool) -> ApiResult<Json<Queue>> {
    check_queue(&queue)?;
    let store = &state.inner.store;
    let stored = store.set_queue_paused(&queue, paused).await?;
    state.inner.controls.reload(store).await?;
    if !paused {
        let _ = state.inner.wakeups.tasks.send(queue.as_str().into());
    }
    Ok(Json(queue_json(&queue, stored)))
}

/// Whether a workflow's new instances are held.
#[derive(Serialize, ToSchema)]
pub(crate) struct WorkflowPause {
    workflow: String,
    paused: bool,
    /// Held instances a resume woke.
    #[serde(skip_serializing_if = "Option::is_none")]
    released: Option<u64>,
}

/// Pause a workflow: its new instances wait `pending` (held `paused`)
/// until it is resumed; running ones go on.
#[utoipa::path(post, path = "/v1/workflows/{name}/pause", tag = "workflows",
    params(("name" = String, Path, description = "the workflow")),
    responses((status = 200, description = "paused", body = WorkflowPause)))]
pub(crate) async fn pause_workflow(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<WorkflowPause>> {
    set_workflow_paused(state, name, true).await
}

/// Resume a workflow: the instances it held start, in start order.
#[utoipa::path(post, path = "/v1/workflows/{name}/resume", tag = "workflows",
    params(("name" = String, Path, description = "the workflow")),
    responses((status = 200, description = "resumed", body = WorkflowPause)))]
pub(crate) async fn resume_workflow(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<WorkflowPause>> {
    set_workflow_paused(state, name, false).await
}

async fn set_workflow_paused(
    state: AppState,
    name: String,
    paused: bool,
) -> ApiResult<Json<WorkflowPause>> {
    check_id("name", &name)?;
    let store = &state.inner.store;
    if store.get_workflow(&name, None).await?.is_none() {
        return Err(ApiError::not_found(format!(
            "workflow {name:?} is not registered"
        )));
    }
    store.set_workflow_paused(&name, paused).await?;
    state.inner.controls.reload(store).await?;
    let mut released = None;
    if !paused {
        let mut total = 0;
        loop {
            let n = store.release_paused(&name, RESUME_BATCH).await?;
            total += n;
            if n < RESUME_BATCH as u64 {
                break;
            }
        }
        if total > 0 {
            state.inner.notifier.request();
        }
        released = Some(total);
    }
    Ok(Json(WorkflowPause {
        workflow: name,
        paused,
        released,
    }))
}
