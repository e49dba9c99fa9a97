//! Registering and reading workflow definitions.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult, FieldProblem};
use super::extract::{check_id, ApiJson, ApiPath};
use super::AppState;
use crate::definition::{self, Limits};
use crate::store::WorkflowRecord;

/// Most workflows one list returns.
const MAX_WORKFLOWS_LISTED: i64 = 10_000;

/// A registration's answer.
#[derive(Serialize, ToSchema)]
pub(crate) struct Registered {
    name: String,
    version: i32,
    /// A new version (201), or the same document as the latest one (200).
    created: bool,
    created_at: DateTime<Utc>,
}

/// Registers a definition: a new version if it differs from the latest.
#[utoipa::path(put, path = "/v1/workflows/{name}", tag = "workflows",
    params(("name" = String, Path, description = "the workflow")),
    request_body(content = Object, description = "the definition (see the README)"),
    responses(
        (status = 201, description = "a new version", body = Registered),
        (status = 200, description = "the same as the latest version", body = Registered),
    ))]
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
        .register_workflow(&name, &doc, &hash, def.retention_ms)
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
        Json(Registered {
            name: record.name,
            version: record.version,
            created,
            created_at: record.created_at,
        }),
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

/// A workflow in the list: its latest version.
#[derive(Serialize, ToSchema)]
pub(crate) struct WorkflowSummary {
    name: String,
    version: i32,
    created_at: DateTime<Utc>,
    /// How many steps the latest version has.
    steps: usize,
}

fn summary(r: &WorkflowRecord) -> WorkflowSummary {
    WorkflowSummary {
        name: r.name.clone(),
        version: r.version,
        created_at: r.created_at,
        steps: r
            .definition
            .get("steps")
            .and_then(Value::as_array)
            .map_or(0, Vec::len),
    }
}

/// One version of a workflow.
#[derive(Serialize, ToSchema)]
pub(crate) struct WorkflowVersion {
    name: String,
    version: i32,
    created_at: DateTime<Utc>,
    /// The definition as registered (with its `name`).
    #[schema(value_type = Object)]
    definition: Value,
    /// Every version, oldest first (only on the latest).
    #[serde(skip_serializing_if = "Option::is_none")]
    versions: Option<Vec<VersionEntry>>,
}

/// A version in a workflow's list of versions.
#[derive(Serialize, ToSchema)]
pub(crate) struct VersionEntry {
    version: i32,
    created_at: DateTime<Utc>,
}

fn full(r: &WorkflowRecord) -> WorkflowVersion {
    WorkflowVersion {
        name: r.name.clone(),
        version: r.version,
        created_at: r.created_at,
        definition: r.definition.clone(),
        versions: None,
    }
}

/// The registered workflows.
#[derive(Serialize, ToSchema)]
pub(crate) struct WorkflowList {
    workflows: Vec<WorkflowSummary>,
}

/// Every registered workflow, by its latest version.
#[utoipa::path(get, path = "/v1/workflows", tag = "workflows",
    responses((status = 200, description = "the workflows", body = WorkflowList)))]
pub(crate) async fn list(State(state): State<AppState>) -> ApiResult<Json<WorkflowList>> {
    let records = state
        .inner
        .store
        .list_workflows(MAX_WORKFLOWS_LISTED)
        .await?;
    Ok(Json(WorkflowList {
        workflows: records.iter().map(summary).collect(),
    }))
}

/// The latest version of a workflow, with the list of its versions.
#[utoipa::path(get, path = "/v1/workflows/{name}", tag = "workflows",
    params(("name" = String, Path, description = "the workflow")),
    responses((status = 200, description = "the latest version", body = WorkflowVersion)))]
pub(crate) async fn get_latest(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<WorkflowVersion>> {
    check_id("name", &name)?;
    let versions = state.inner.store.list_workflow_versions(&name).await?;
    let Some(latest) = versions.last() else {
        return Err(ApiError::not_found(format!(
            "workflow {name:?} is not registered"
        )));
    };
    let mut body = full(latest);
    body.versions = Some(
        versions
            .iter()
            .map(|v| VersionEntry {
                version: v.version,
                created_at: v.created_at,
            })
            .collect(),
    );
    Ok(Json(body))
}

/// One version of a workflow.
#[utoipa::path(get, path = "/v1/workflows/{name}/versions/{version}", tag = "workflows",
    params(("name" = String, Path, description = "the workflow"),
        ("version" = i32, Path, minimum = 1, description = "the version")),
    responses((status = 200, description = "the version", body = WorkflowVersion)))]
pub(crate) async fn get_version(
    State(state): State<AppState>,
    ApiPath((name, version)): ApiPath<(String, String)>,
) -> ApiResult<Json<WorkflowVersion>> {
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
