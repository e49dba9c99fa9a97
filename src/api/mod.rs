//! The HTTP API (axum): routes, shared state and the request-metrics layer.
//! Handlers validate input, call the store, and shape JSON; they hold no
//! workflow logic.

mod auth;
mod batch;
mod bulk;
mod console;
mod error;
mod extract;
mod instances;
mod keys;
mod openapi;
mod queues;
mod schedules;
mod tasks;
mod workflows;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::Auth;
use crate::config::{Limits, Tuning};
use crate::metrics::{Component, Metrics};
use crate::store::{latest_migration_version, Store};
use crate::wakeups::Wakeups;
use crate::worker::notifier::AdvanceNotifier;
use crate::worker::DefinitionCache;

use error::{ApiError, ApiResult};

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    inner: Arc<Shared>,
}

/// The parts of a node the API uses.
pub(crate) struct Shared {
    pub store: Store,
    pub definitions: DefinitionCache,
    pub wakeups: Wakeups,
    pub notifier: AdvanceNotifier,
    /// The flow controls as this process knows them.
    pub controls: crate::worker::controls::Controls,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub tuning: Tuning,
    pub auth: Auth,
    pub metrics_auth: bool,
    /// One permit per request served at once (`max_concurrent_requests`).
    pub admission: Arc<tokio::sync::Semaphore>,
    /// Grafana's base URL, for the console's links to its panels.
    pub grafana_url: Option<String>,
}

impl From<Shared> for AppState {
    fn from(shared: Shared) -> Self {
        AppState {
            inner: Arc::new(shared),
        }
    }
}

pub(crate) fn router(state: AppState) -> Router {
    let body_limit = state.inner.limits.body_limit_bytes;
    // Every route is registered through the OpenAPI document's router, so
    // none is served without being described.
    let (routes, _) = openapi::routes().split_for_parts();
    routes
        // Only matched routes: an unknown path is a 404 to anyone.
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require))
        // The console's HTML pages: not API operations (so not in the
        // OpenAPI document), with the same table of who may do what.
        .merge(console::routes(state.clone()))
        .route_layer(middleware::from_fn_with_state(state.clone(), admit))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; see the README for the API")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        "this endpoint does not accept that method",
    )
}

/// Serves at most `max_concurrent_requests` at once: past that, 503 with
/// `Retry-After` at once, rather than a queue without end. The health
/// checks and `/metrics` are always served (they are cheap, and a probe
/// must see an overloaded node as alive).
async fn admit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str());
    if matches!(route, Some("/healthz" | "/readyz" | "/metrics")) {
        return next.run(request).await;
    }
    let Ok(_permit) = state.inner.admission.clone().try_acquire_owned() else {
        let limit = state.inner.limits.max_concurrent_requests;
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "Service unavailable",
            format!("this node is serving its limit of {limit} requests at once; retry shortly"),
        )
        .into_response();
    };
    let _counted = InFlight::count(&state.inner.metrics.http_requests_in_flight);
    next.run(request).await
}

/// A request counted in `stead_http_requests_in_flight` while it lives (also
/// when the client goes away and the request is dropped).
struct InFlight(prometheus::IntGauge);

impl InFlight {
    fn count(gauge: &prometheus::IntGauge) -> InFlight {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts and times every request by route template (never by raw path,
/// which would hold ids).
async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    // Extension methods are free text: fold them so labels stay bounded.
    let method: &'static str = match request.method().as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        _ => "OTHER",
    };
    let started = Instant::now();
    let response = next.run(request).await;
    let m = &state.inner.metrics;
    if response.extensions().get::<error::DbFault>().is_some() {
        m.db_error(Component::Api);
    }
    m.http_requests
        .with_label_values(&[method, &route, response.status().as_str()])
        .inc();
    m.http_request_duration
        .with_label_values(&[method, &route])
        .observe(started.elapsed().as_secs_f64());
    // Never the headers: they may carry a key.
    tracing::debug!(
        method,
        route,
        status = response.status().as_u16(),
        "request"
    );
    response
}

/// Prometheus metrics, in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "the metrics", content_type = "text/plain", body = String)))]
async fn metrics(State(state): State<AppState>) -> Response {
    let inner = &state.inner;
    // Pool numbers are read from memory; the gauges that need a query are
    // kept fresh by the maintenance-duty holder (membership::gauges), so a
    // scrape never touches the database.
    let pool = inner.store.pool_status();
    inner.metrics.pool_size.set(pool.size as i64);
    inner
        .metrics
        .pool_in_use
        .set(pool.size.saturating_sub(pool.available) as i64);
    inner.metrics.pool_waiting.set(pool.waiting as i64);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        inner.metrics.render(),
    )
        .into_response()
}

/// A member of the cluster.
#[derive(Serialize, ToSchema)]
pub(crate) struct Member {
    name: String,
    /// Heartbeating within its TTL.
    alive: bool,
    heartbeat_at: chrono::DateTime<chrono::Utc>,
    seconds_since_heartbeat: f64,
    ttl_ms: i32,
    joined_at: chrono::DateTime<chrono::Utc>,
    /// Where its API listens, if it serves one.
    api_url: Option<String>,
    /// The slots it holds.
    slots: Vec<i32>,
}

/// The cluster: members and who holds which slot.
#[derive(Serialize, ToSchema)]
pub(crate) struct Cluster {
    slot_count: i32,
    members: Vec<Member>,
    /// Slots no live member holds (taken over within a heartbeat or two).
    unowned_slots: Vec<i32>,
}

/// Members with their heartbeats and the slots each owns (as pg_locks shows).
#[utoipa::path(get, path = "/v1/cluster", tag = "cluster",
    responses((status = 200, description = "the cluster", body = Cluster)))]
async fn cluster(State(state): State<AppState>) -> ApiResult<Json<Cluster>> {
    let store = &state.inner.store;
    let members = store.cluster_members().await?;
    let owners = store.slot_owners().await?;
    let slot_count = store.slot_count().await?;
    let mut by_member: std::collections::BTreeMap<String, Vec<i32>> = Default::default();
    let mut unowned: Vec<i32> = (0..slot_count).collect();
    for (slot, owner) in &owners {
        unowned.retain(|s| s != slot);
        by_member
            .entry(owner.clone().unwrap_or_else(|| "(unknown session)".into()))
            .or_default()
            .push(*slot);
    }
    let members = members
        .into_iter()
        .map(|m| Member {
            slots: by_member.get(&m.name).cloned().unwrap_or_default(),
            name: m.name,
            alive: m.alive,
            heartbeat_at: m.heartbeat_at,
            seconds_since_heartbeat: m.since_heartbeat_s,
            ttl_ms: m.ttl_ms,
            joined_at: m.joined_at,
            api_url: m.api_url,
        })
        .collect();
    Ok(Json(Cluster {
        slot_count,
        members,
        unowned_slots: unowned,
    }))
}

/// A health answer.
#[derive(Serialize, ToSchema)]
pub(crate) struct Health {
    /// `ok` (healthz) or `ready` (readyz).
    status: &'static str,
    /// The database's schema version (readyz).
    #[serde(skip_serializing_if = "Option::is_none")]
    schema_version: Option<i32>,
}

/// Alive: the process serves requests (no database needed).
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "alive", body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok",
        schema_version: None,
    })
}

/// Ready when the database answers and its schema is the one this binary
/// expects.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "ready", body = Health)))]
async fn readyz(State(state): State<AppState>) -> Response {
    let expected = latest_migration_version();
    match state.inner.store.schema_version().await {
        Ok(v) if v == expected => Json(Health {
            status: "ready",
            schema_version: Some(v),
        })
        .into_response(),
        Ok(v) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "Not ready",
            format!("database schema is at version {v}, this binary needs {expected}; run stead migrate"),
        )
        .into_response(),
        Err(e) => {
            tracing::warn!(error = %crate::error::Chain(&e), "readiness check failed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not-ready",
                "Not ready",
                "the database is not reachable",
            )
            .into_response()
        }
    }
}

/// Parses a duration parameter: a string like "30s"/"500ms" or a number of
/// milliseconds.
pub(crate) fn duration_param(path: &str, value: &serde_json::Value) -> ApiResult<u64> {
    match value {
        serde_json::Value::Number(n) => n.as_u64().ok_or_else(|| {
            ApiError::unprocessable_field(
                path,
                "must be a non-negative number of milliseconds or a duration like \"30s\"",
            )
        }),
        serde_json::Value::String(s) => crate::definition::duration::parse_duration_ms(s)
            .map_err(|e| ApiError::unprocessable_field(path, e)),
        _ => Err(ApiError::unprocessable_field(
            path,
            "must be a duration like \"30s\" or a number of milliseconds",
        )),
    }
}
