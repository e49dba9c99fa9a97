//! Bulk actions (contract §3): `POST /v1/instances/cancel` and
//! `POST /v1/instances/retry` ask every instance a filter matches, in
//! bounded batches, and answer with how many.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult};
use super::extract::{check_id, is_valid_id, ApiJson};
use super::instances::parse_time;
use super::AppState;
use crate::model::InstanceStatus;
use crate::store::{BulkAction, BulkFilter};

/// Which instances: every field given must hold (at least one is needed).
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct Filter {
    workflow: Option<String>,
    status: Option<InstanceStatus>,
    /// Created at or after this time (RFC 3339; without a zone, UTC).
    created_after: Option<String>,
    /// Created before this time.
    created_before: Option<String>,
    /// These instances (at most --max-page).
    ids: Option<Vec<String>>,
    /// Ids that begin with this (`sched:nightly:` for a schedule's).
    id_prefix: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BulkCancelRequest {
    filter: Filter,
    #[schema(max_length = 1000)]
    reason: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BulkRetryRequest {
    filter: Filter,
}

/// How many instances were asked.
#[derive(Serialize, ToSchema)]
pub(crate) struct BulkAnswer {
    /// Instances asked by this request (each acts at its next decision).
    requested: u64,
    /// The request stopped at --max-bulk: send it again for the rest (an
    /// instance asked before is not asked again).
    more: bool,
}

/// Longest cancel reason.
const MAX_REASON_CHARS: usize = 1000;

fn bulk_filter(f: Filter, max_ids: usize) -> ApiResult<BulkFilter> {
    let given = f.workflow.is_some()
        || f.status.is_some()
        || f.created_after.is_some()
        || f.created_before.is_some()
        || f.ids.is_some()
        || f.id_prefix.is_some();
    if !given {
        return Err(ApiError::unprocessable_field(
            "$.filter",
            "name at least one of workflow, status, created_after, created_before, ids, \
             id_prefix (an empty filter would match every instance)",
        ));
    }
    if let Some(w) = &f.workflow {
        check_id("$.filter.workflow", w)?;
    }
    if let Some(ids) = &f.ids {
        if ids.len() > max_ids {
            return Err(ApiError::too_large(
                "$.filter.ids",
                format!("at most {max_ids} ids (--max-page)"),
            ));
        }
        for (i, id) in ids.iter().enumerate() {
            check_id(&format!("$.filter.ids[{i}]"), id)?;
        }
    }
    if let Some(p) = &f.id_prefix {
        if !is_valid_id(p) {
            return Err(ApiError::bad_field(
                "$.filter.id_prefix",
                "must be 1-200 characters of [A-Za-z0-9._:@-]",
            ));
        }
    }
    Ok(BulkFilter {
        workflow: f.workflow,
        status: f.status,
        created_after: f
            .created_after
            .map(|t| parse_time("$.filter.created_after", &t))
            .transpose()?,
        created_before: f
            .created_before
            .map(|t| parse_time("$.filter.created_before", &t))
            .transpose()?,
        ids: f.ids,
        id_prefix: f.id_prefix,
    })
}

/// Cancel every instance the filter matches that has not ended (their
/// compensations run, their children are cancelled).
#[utoipa::path(post, path = "/v1/instances/cancel", tag = "instances",
    request_body = BulkCancelRequest,
    responses((status = 200, description = "how many were asked", body = BulkAnswer)))]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<BulkCancelRequest>,
) -> ApiResult<Json<BulkAnswer>> {
    let filter = bulk_filter(req.filter, state.inner.limits.max_page)?;
    let reason = req
        .reason
        .unwrap_or_else(|| "cancelled in bulk".to_string());
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(ApiError::bad_field(
            "$.reason",
            format!("at most {MAX_REASON_CHARS} characters"),
        ));
    }
    run(&state, &BulkAction::Cancel { reason }, &filter).await
}

/// Retry every failed instance the filter matches.
#[utoipa::path(post, path = "/v1/instances/retry", tag = "instances",
    request_body = BulkRetryRequest,
    responses((status = 200, description = "how many were asked", body = BulkAnswer)))]
pub(crate) async fn retry(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<BulkRetryRequest>,
) -> ApiResult<Json<BulkAnswer>> {
    let filter = bulk_filter(req.filter, state.inner.limits.max_page)?;
    run(&state, &BulkAction::Retry, &filter).await
}

/// Batch after batch until the filter has no more or --max-bulk is
/// reached; the engine is woken after each.
async fn run(
    state: &AppState,
    action: &BulkAction,
    filter: &BulkFilter,
) -> ApiResult<Json<BulkAnswer>> {
    let max = state.inner.limits.max_bulk;
    let batch = state.inner.tuning.bulk_batch_size as u64;
    let mut requested = 0u64;
    let mut after = String::new();
    loop {
        let limit = batch.min(max - requested) as i64;
        let done = state
            .inner
            .store
            .bulk_batch(action, filter, &after, limit)
            .await?;
        requested += done.asked;
        if done.asked > 0 {
            state.inner.notifier.request();
        }
        match done.next_after {
            Some(next) if requested < max => after = next,
            Some(_) => {
                return Ok(Json(BulkAnswer {
                    requested,
                    more: true,
                }))
            }
            None => {
                return Ok(Json(BulkAnswer {
                    requested,
                    more: false,
                }))
            }
        }
    }
}
