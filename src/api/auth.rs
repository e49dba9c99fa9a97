//! Who is calling: every route but the health checks (and `/metrics`, unless
//! `--metrics-auth`) needs `Authorization: Bearer <key>` of a role that may
//! make the request. The key is looked up on every request (one keyed read),
//! so a revoked key stops working at once on every node. A worker key is
//! further held to its queues by the task handlers (`Caller::may_work`).

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, ApiResult};
use super::AppState;
use crate::auth::{self, Auth, Need, Role};

/// The caller of a request, as its key says (or anyone, with `--auth none`).
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub role: Role,
    /// The queues it may work; `None`: every queue.
    pub queues: Option<Vec<String>>,
}

impl Caller {
    /// Anyone, when the API runs without keys.
    pub(super) fn open() -> Self {
        Caller {
            role: Role::Admin,
            queues: None,
        }
    }

    /// Whether it may claim and finish tasks of `queue`.
    pub(crate) fn may_work(&self, queue: &str) -> bool {
        match &self.queues {
            None => true,
            Some(qs) => qs.iter().any(|q| q == queue),
        }
    }

    /// 403 unless it may work `queue`.
    pub(crate) fn check_queue(&self, queue: &str) -> ApiResult<()> {
        if self.may_work(queue) {
            Ok(())
        } else {
            Err(self.refuse_queue(queue, None))
        }
    }

    /// The 403 for work on `queue` (of task `task`) it may not do.
    pub(crate) fn refuse_queue(&self, queue: &str, task: Option<i64>) -> ApiError {
        let of_task = task
            .map(|id| format!("task {id} is of the queue {queue:?}; "))
            .unwrap_or_default();
        forbidden(format!(
            "{of_task}this key may work only the queues {}, not {queue:?}",
            self.queues.as_deref().unwrap_or_default().join(", ")
        ))
    }
}

fn forbidden(detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
}

fn unauthorized(detail: &str) -> Response {
    let mut response = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Unauthorized",
        detail,
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"stead\""),
    );
    response
}

/// What each route needs of the caller (`None`: open to anyone). Deny by
/// default: a method a route does not list needs `admin`.
pub(crate) fn need_of(method: &Method, route: &str, metrics_auth: bool) -> Option<Need> {
    let read = *method == Method::GET || *method == Method::HEAD;
    let need = match route {
        "/healthz" | "/readyz" | "/v1/openapi.json" => return None,
        "/metrics" => return metrics_auth.then_some(Need::Read),
        "/v1/workflows/{name}" if *method == Method::PUT => Need::Admin,
        // A schedule starts instances for ever: set up like a workflow.
        "/v1/schedules/{name}" if *method == Method::PUT || *method == Method::DELETE => {
            Need::Admin
        }
        "/v1/schedules" | "/v1/schedules/{name}" if read => Need::Read,
        "/v1/schedules/{name}/pause" | "/v1/schedules/{name}/resume" if *method == Method::POST => {
            Need::Operate
        }
        "/v1/workflows"
        | "/v1/workflows/{name}"
        | "/v1/workflows/{name}/versions/{version}"
        | "/v1/instances"
        | "/v1/instances/{id}"
        | "/v1/instances/{id}/history"
        | "/v1/cluster"
            if read =>
        {
            Need::Read
        }
        "/v1/workflows/{name}/instances"
        | "/v1/workflows/{name}/instances/batch"
        | "/v1/instances/cancel"
        | "/v1/instances/retry"
        | "/v1/instances/{id}/signals/{name}"
        | "/v1/instances/{id}/cancel"
        | "/v1/instances/{id}/retry"
            if *method == Method::POST =>
        {
            Need::Operate
        }
        // The console: its pages read, its forms act on instances; the
        // login form and the assets are open.
        "/login" | "/logout" | "/assets/{file}" => return None,
        "/" | "/instances/{id}" | "/workflows" | "/workflows/{name}" | "/queues" | "/cluster"
            if read =>
        {
            Need::Read
        }
        "/" | "/instances/{id}/cancel" | "/instances/{id}/retry" | "/instances/{id}/signal"
            if *method == Method::POST =>
        {
            Need::Operate
        }
        "/v1/queues/{queue}/claim"
        | "/v1/tasks/{task_id}/heartbeat"
        | "/v1/tasks/{task_id}/complete"
        | "/v1/tasks/{task_id}/fail"
        | "/v1/tasks/results"
            if *method == Method::POST =>
        {
            Need::Work
        }
        _ => Need::Admin,
    };
    Some(need)
}

/// What the request's route needs (`need_of`), by its route template.
pub(super) fn need_of_request(request: &Request, metrics_auth: bool) -> Option<Need> {
    // The route template borrowed, not copied: this runs on every request.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("", |p| p.as_str());
    need_of(request.method(), route, metrics_auth)
}

/// The middleware of every route: admits the request with its `Caller`, or
/// answers 401 (no key, or not a live key) or 403 (a key whose role may
/// not make it).
pub(crate) async fn require(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(need) = need_of_request(&request, state.inner.metrics_auth) else {
        return next.run(request).await;
    };
    let caller = match state.inner.auth {
        Auth::None => Caller::open(),
        Auth::Keys => match identify(
            &state,
            request.headers().get(header::AUTHORIZATION).cloned(),
        )
        .await
        {
            Ok(caller) => caller,
            Err(response) => return response,
        },
    };
    if !caller.role.may(need) {
        return forbidden(format!(
            "{}; this key's role is {}",
            need.describe(),
            caller.role
        ))
        .into_response();
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// The caller the request's key names, or the 401 (or 503) to answer.
async fn identify(state: &AppState, header: Option<HeaderValue>) -> Result<Caller, Response> {
    let Some(value) = header else {
        return Err(unauthorized(
            "this API needs a key: send Authorization: Bearer <key> (make one with `stead key create`)",
        ));
    };
    let presented = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default();
    caller_of_key(state, presented)
        .await
        .map_err(|refused| match refused {
            Refused::Malformed => {
                unauthorized("the Authorization header must be `Bearer stead_<id>_<secret>`")
            }
            // The same answer for an unknown, revoked or wrong key.
            Refused::NotLive => unauthorized("the key is not valid (unknown, revoked or mistyped)"),
            Refused::Store(e) => e.into_response(),
        })
}

/// Why a presented key names no caller.
pub(super) enum Refused {
    /// It does not have a key's shape.
    Malformed,
    /// Unknown, revoked or mistyped (one answer for all three).
    NotLive,
    /// The database could not say.
    Store(ApiError),
}

/// The caller a presented key (`stead_<id>_<secret>`) names.
pub(super) async fn caller_of_key(state: &AppState, presented: &str) -> Result<Caller, Refused> {
    let (id, secret) = auth::parse(presented).ok_or(Refused::Malformed)?;
    let key = state
        .inner
        .store
        .find_live_key(id)
        .await
        .map_err(|e| Refused::Store(e.into()))?;
    match key {
        Some(key) if auth::matches(secret, &key.secret_sha256) => Ok(Caller {
            role: key.role,
            queues: (key.role == Role::Worker).then_some(key.queues),
        }),
        _ => Err(Refused::NotLive),
    }
}
