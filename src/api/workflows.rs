//! Registering and reading workflow definitions.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::error::{ApiError, ApiResult, FieldProblem};
use super::extract::{check_id, ApiJson, ApiPath};
use super::AppState;
use crate::definition::{self, Limits};
use crate::store::WorkflowRecord;

/// Most workflows one list returns.
const MAX_WORKFLOWS_LISTED: i64 = 10_000;

pub(crate) async fn put(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(mut doc): ApiJson<Value>,
) -> ApiResult<Response> {
    check_id("name", &name)?;
    let limits = Limits {
        max_steps: state.inner.limits.max_steps,
    };
    let def = definition::parse(&name, &doc, &limits).map_err(|problems| ApiError {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        kind: "invalid-definition",
        title: "Invalid workflow definition",
        detail: format!("the definition has {} problem(s)", problems.len()),
        errors: problems
            .into_iter()
            .map(|p| FieldProblem {
                path: p.path,
                message: p.message,
            })
            .collect(),
        db_fault: false,
    })?;
    // The stored document always names its workflow, so that the same
    // content hashes the same whether or not the client sent the name.
    doc["name"] = Value::String(name.clone());
    let hash = content_hash(&doc);
    let (record, created) = state
        .inner
        .store
        .register_workflow(&name, &doc, &hash)
        .await?;
    state
        .inner
        .definitions
        .insert(&name, record.version, Arc::new(def));
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({
            "name": record.name,
            "version": record.version,
            "created": created,
            "created_at": record.created_at,
        })),
    )
        .into_response())
}

/// SHA-256 of the document's canonical JSON (object keys sorted, which is
/// how serde_json's map serialises).
pub(crate) fn content_hash(doc: &Value) -> String {
    let canonical = serde_json::to_vec(doc).expect("JSON values serialise");
    Sha256::digest(&canonical)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn summary(r: &WorkflowRecord) -> Value {
    json!({
        "name": r.name,
        "version": r.version,
        "created_at": r.created_at,
        "steps": r.definition.get("steps").and_then(Value::as_array).map(|s| s.len()).unwrap_or(0),
    })
}

fn full(r: &WorkflowRecord) -> Value {
    json!({
        "name": r.name,
        "version": r.version,
        "created_at": r.created_at,
        "definition": r.definition,
    })
}

pub(crate) async fn list(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let records = state
        .inner
        .store
        .list_workflows(MAX_WORKFLOWS_LISTED)
        .await?;
    Ok(Json(json!({
        "workflows": records.iter().map(summary).collect::<Vec<_>>(),
    })))
}

pub(crate) async fn get_latest(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    check_id("name", &name)?;
    let versions = state.inner.store.list_workflow_versions(&name).await?;
    let Some(latest) = versions.last() else {
        return Err(ApiError::not_found(format!(
            "workflow {name:?} is not registered"
        )));
    };
    let mut body = full(latest);
    body["versions"] = versions
        .iter()
        .map(|v| json!({ "version": v.version, "created_at": v.created_at }))
        .collect();
    Ok(Json(body))
}

pub(crate) async fn get_version(
    State(state): State<AppState>,
    ApiPath((name, version)): ApiPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    check_id("name", &name)?;
    let version: i32 = version
        .parse()
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| ApiError::bad_field("version", "must be a positive integer"))?;
    match state.inner.store.get_workflow(&name, Some(version)).await? {
        Some(r) => Ok(Json(full(&r))),
        None => Err(ApiError::not_found(format!(
            "workflow {name:?} has no version {version}"
        ))),
    }
}
