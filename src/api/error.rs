//! The one error type of the API and its problem+json rendering (RFC 9457).
//! Database faults become 500/503 without internals; only client mistakes
//! are 4xx.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::Chain;
use crate::store::StoreError;

/// One problem with one field of the request.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub(crate) struct FieldProblem {
    /// JSON path (`$.steps[0].id`) or parameter name (`query.limit`).
    pub(crate) path: String,
    pub(crate) message: String,
}

#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) kind: &'static str,
    pub(crate) title: &'static str,
    pub(crate) detail: String,
    pub(crate) errors: Vec<FieldProblem>,
    /// The database failed (not the client): counted in
    /// `stead_db_errors_total{component="api"}` by the metrics layer.
    pub(crate) db_fault: bool,
}

/// Marks a response caused by a database fault, for the metrics layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DbFault;

/// An RFC 9457 problem document (`application/problem+json`): what every
/// error response holds.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Problem)]
pub(crate) struct ProblemDocument<'a> {
    /// `urn:stead:problem:<kind>`, e.g. `urn:stead:problem:validation`.
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    /// The HTTP status, again.
    status: u16,
    /// What went wrong and what to do about it.
    detail: &'a str,
    /// The fields at fault, each with its JSON path or parameter name.
    #[serde(skip_serializing_if = "<[FieldProblem]>::is_empty")]
    errors: &'a [FieldProblem],
}

impl ApiError {
    pub(crate) fn new(
        status: StatusCode,
        kind: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            kind,
            title,
            detail: detail.into(),
            errors: Vec::new(),
            db_fault: false,
        }
    }

    /// 400 with one named field.
    pub(crate) fn bad_field(path: impl Into<String>, message: impl Into<String>) -> Self {
        let path = path.into();
        let message = message.into();
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid-request",
            title: "Invalid request",
            detail: format!("{path}: {message}"),
            errors: vec![FieldProblem { path, message }],
            db_fault: false,
        }
    }

    /// 422 with one named field.
    pub(crate) fn unprocessable_field(path: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::bad_field(path, message);
        e.status = StatusCode::UNPROCESSABLE_ENTITY;
        e
    }

    /// 413 for a value of the request past a documented limit.
    pub(crate) fn too_large(path: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::bad_field(path, message);
        e.status = StatusCode::PAYLOAD_TOO_LARGE;
        e.kind = "limit";
        e.title = "Over a limit";
        e
    }

    pub(crate) fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    pub(crate) fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", "Conflict", detail)
    }

    pub(crate) fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "the server failed to handle the request; it has been logged",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { message, .. } => ApiError::not_found(message),
            StoreError::Conflict { message, .. } => ApiError::conflict(message),
            StoreError::Invalid { message, .. } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-request",
                "Invalid request",
                message,
            ),
            StoreError::Transient(_) => {
                tracing::warn!(error = %Chain(&e), "request failed on a transient database error");
                let mut e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "Service unavailable",
                    "the database is temporarily unavailable; retry later",
                );
                e.db_fault = true;
                e
            }
            StoreError::Permanent(_) | StoreError::Fenced { .. } => {
                tracing::error!(error = %Chain(&e), "request failed on a database error");
                let mut e = ApiError::internal();
                e.db_fault = true;
                e
            }
        }
    }
}

impl ApiError {
    fn document(&self) -> ProblemDocument<'_> {
        ProblemDocument {
            kind: format!("urn:stead:problem:{}", self.kind),
            title: self.title,
            status: self.status.as_u16(),
            detail: &self.detail,
            errors: &self.errors,
        }
    }

    /// The problem document as a JSON value, for a response that reports
    /// several problems (one per item of a batch).
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.document()).unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.document()).unwrap_or_default();
        let mut response = (self.status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.db_fault {
            response.extensions_mut().insert(DbFault);
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;
