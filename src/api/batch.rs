//! Starting many instances at once: `POST /v1/workflows/{name}/instances/batch`.
//!
//! A body of the wrong shape starts nothing (one problem document naming the
//! field, as everywhere). A well-formed batch is started in one transaction
//! and answered item by item: the good items start even when others are
//! refused (an invalid id, or an id that exists with a different input),
//! each refusal carrying its own problem document.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult};
use super::extract::{check_id, check_size, ApiJson, ApiPath};
use super::instances::check_version;
use super::AppState;
use crate::model::StartOutcome;

/// Up to `--max-batch-start` starts of one workflow version.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchStartRequest {
    items: Vec<BatchItem>,
    #[schema(minimum = 1)]
    version: Option<i32>,
    /// The priority of every instance it starts (0 to 1000).
    #[schema(minimum = 0, maximum = 1000)]
    priority: Option<i64>,
}

/// One start of a batch: its input, and optionally its id.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchItem {
    #[serde(default)]
    input: Value,
    id: Option<String>,
}

/// What became of one item of a batch, by its index in the request.
#[derive(Serialize, ToSchema)]
pub(crate) struct BatchResult {
    index: usize,
    id: String,
    outcome: StartOutcome,
    /// Why it was refused (`conflict` or `invalid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<super::error::ProblemDocument>)]
    problem: Option<Value>,
}

/// A batch's answer, item by item, with the counts.
#[derive(Serialize, ToSchema)]
pub(crate) struct BatchStarted {
    results: Vec<BatchResult>,
    created: usize,
    existing: usize,
    rejected: usize,
}

/// Starts many instances in one transaction; each item is answered on its
/// own (good ones start even when others are refused).
#[utoipa::path(post, path = "/v1/workflows/{name}/instances/batch", tag = "instances",
    params(("name" = String, Path, description = "the workflow")),
    request_body = BatchStartRequest,
    responses((status = 200, description = "item by item", body = BatchStarted)))]
pub(crate) async fn start_batch(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<BatchStartRequest>,
) -> ApiResult<Json<BatchStarted>> {
    check_id("name", &name)?;
    check_version(req.version)?;
    let max_items = state.inner.limits.max_batch_start;
    if req.items.len() > max_items {
        return Err(ApiError::unprocessable_field(
            "$.items",
            format!("at most {max_items} items per batch; send the rest in another"),
        ));
    }
    let max_input = state.inner.limits.max_input_bytes;
    for (i, item) in req.items.iter().enumerate() {
        let path = format!("$.items[{i}].input");
        check_size(path, &item.input, max_input, "--max-input-bytes")?;
    }
    let priority = super::instances::check_priority("$.priority", req.priority)?;
    let items: Vec<(Value, Option<String>)> =
        req.items.into_iter().map(|i| (i.input, i.id)).collect();
    let outcomes = state
        .inner
        .store
        .start_instances(&name, req.version, &items, priority)
        .await?;
    if outcomes.iter().any(|(_, o)| *o == StartOutcome::Created) {
        state.inner.notifier.request();
    }
    Ok(Json(batch_json(&outcomes)))
}

/// `{results: [{index, id, outcome, problem?}], created, existing, rejected}`.
fn batch_json(outcomes: &[(String, StartOutcome)]) -> BatchStarted {
    let count = |wanted: StartOutcome| outcomes.iter().filter(|(_, o)| *o == wanted).count();
    let results = outcomes
        .iter()
        .enumerate()
        .map(|(index, (id, outcome))| BatchResult {
            index,
            id: id.clone(),
            outcome: *outcome,
            problem: item_problem(index, id, *outcome).map(|p| p.to_json()),
        })
        .collect();
    let created = count(StartOutcome::Created);
    let existing = count(StartOutcome::Existing);
    BatchStarted {
        results,
        created,
        existing,
        rejected: outcomes.len() - created - existing,
    }
}

fn item_problem(index: usize, id: &str, outcome: StartOutcome) -> Option<ApiError> {
    match outcome {
        StartOutcome::Created | StartOutcome::Existing => None,
        StartOutcome::Conflict => Some(ApiError::conflict(format!(
            "$.items[{index}]: instance \"{id}\" already exists with a different workflow or input"
        ))),
        StartOutcome::Invalid => check_id(&format!("$.items[{index}].id"), id).err(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refused_item_carries_its_own_problem_naming_it() {
        let body = serde_json::to_value(batch_json(&[
            ("a".into(), StartOutcome::Created),
            ("b".into(), StartOutcome::Existing),
            ("c".into(), StartOutcome::Conflict),
            ("bad id".into(), StartOutcome::Invalid),
        ]))
        .unwrap();
        assert_eq!(
            (body["created"].as_u64(), body["existing"].as_u64()),
            (Some(1), Some(1))
        );
        assert_eq!(body["rejected"], 2);
        assert!(body["results"][0].get("problem").is_none());
        assert_eq!(body["results"][2]["problem"]["status"], 409);
        let invalid = &body["results"][3]["problem"];
        assert_eq!(invalid["status"], 422);
        assert_eq!(invalid["errors"][0]["path"], "$.items[3].id");
    }
}
