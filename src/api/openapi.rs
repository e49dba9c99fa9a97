//! The API's OpenAPI 3.1 document, generated from the handlers' own types
//! (utoipa): each handler's `#[utoipa::path]` names its route, its
//! parameters and its bodies, and `routes` registers every handler through
//! it, so no route is served without being described. The problem
//! responses each operation may give are added here from one table
//! (`problems_of`), as the handlers share them.

use std::sync::OnceLock;

use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Document, Ref, ResponseBuilder};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{FieldProblem, ProblemDocument};
use super::{batch, bulk, instances, keys, queues, schedules, tasks, workflows, AppState};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "stead",
        description = "A durable workflow engine on PostgreSQL. Every error is an RFC 9457 \
                       problem document (`application/problem+json`). Send an API key as \
                       `Authorization: Bearer` unless the node runs with `--auth none`."
    ),
    components(schemas(ProblemDocument, FieldProblem)),
    tags(
        (name = "workflows", description = "Registering and reading definitions"),
        (name = "instances", description = "Starting, reading, signalling, cancelling, retrying"),
        (name = "tasks", description = "The external-worker protocol"),
        (name = "schedules", description = "Cron schedules that start workflows"),
        (name = "queues", description = "Queue limits and pauses"),
        (name = "keys", description = "API keys (admins)"),
        (name = "cluster", description = "Members and slots"),
        (name = "health", description = "Probes and metrics, open to all"),
    )
)]
struct ApiDoc;

/// Every route, registered through the document.
pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(workflows::list))
        .routes(routes!(workflows::get_latest, workflows::put))
        .routes(routes!(workflows::get_version))
        .routes(routes!(instances::start))
        .routes(routes!(batch::start_batch))
        .routes(routes!(instances::list))
        .routes(routes!(instances::get))
        .routes(routes!(instances::history))
        .routes(routes!(instances::signal))
        .routes(routes!(instances::cancel))
        .routes(routes!(instances::retry))
        .routes(routes!(bulk::cancel))
        .routes(routes!(bulk::retry))
        .routes(routes!(tasks::claim))
        .routes(routes!(tasks::heartbeat))
        .routes(routes!(tasks::complete))
        .routes(routes!(tasks::fail))
        .routes(routes!(tasks::results))
        .routes(routes!(queues::list))
        .routes(routes!(queues::put))
        .routes(routes!(queues::pause))
        .routes(routes!(queues::resume))
        .routes(routes!(queues::pause_workflow))
        .routes(routes!(queues::resume_workflow))
        .routes(routes!(schedules::list))
        .routes(routes!(schedules::get, schedules::put, schedules::delete))
        .routes(routes!(schedules::pause))
        .routes(routes!(schedules::resume))
        .routes(routes!(keys::list, keys::create))
        .routes(routes!(keys::revoke))
        .routes(routes!(super::cluster))
        .routes(routes!(super::metrics))
        .routes(routes!(super::healthz))
        .routes(routes!(super::readyz))
        .routes(routes!(openapi_json))
}

/// This document (open to all, like the health checks).
#[utoipa::path(get, path = "/v1/openapi.json", tag = "health",
    responses((status = 200, description = "the OpenAPI 3.1 document", body = Object)))]
async fn openapi_json() -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        document(),
    )
        .into_response()
}

/// The document as JSON text, built once.
pub(crate) fn document() -> String {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT
        .get_or_init(|| {
            let (_, mut doc) = routes().split_for_parts();
            complete(&mut doc);
            doc.to_pretty_json().expect("the document serialises")
        })
        .clone()
}

/// The routes no key is needed for.
pub(crate) fn is_open(path: &str) -> bool {
    matches!(
        path,
        "/healthz" | "/readyz" | "/metrics" | "/v1/openapi.json"
    )
}

/// Adds the bearer-key scheme and each operation's problem responses.
fn complete(doc: &mut Document) {
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "api_key",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("stead_<id>_<secret>")
                .build(),
        ),
    );
    for (path, item) in doc.paths.paths.iter_mut() {
        let operations = [
            ("GET", &mut item.get),
            ("PUT", &mut item.put),
            ("POST", &mut item.post),
            ("DELETE", &mut item.delete),
        ];
        for (method, operation) in operations {
            let Some(operation) = operation.as_mut() else {
                continue;
            };
            if !is_open(path) {
                let requirement = utoipa::openapi::security::SecurityRequirement::new(
                    "api_key",
                    Vec::<String>::new(),
                );
                operation.security = Some(vec![requirement]);
            }
            for status in problems_of(method, path) {
                add_problem(operation, *status);
            }
        }
    }
}

/// The problem statuses an operation may answer (besides its successes).
pub(crate) fn problems_of(method: &str, path: &str) -> &'static [u16] {
    const KEYED: &[u16] = &[401, 403, 500, 503];
    match (method, path) {
        ("GET", "/healthz" | "/metrics" | "/v1/openapi.json") => &[],
        ("GET", "/readyz") => &[503],
        ("GET", "/v1/workflows" | "/v1/cluster" | "/v1/keys") => KEYED,
        ("GET", "/v1/schedules") => &[400, 401, 403, 500, 503],
        ("PUT", "/v1/schedules/{name}") => &[400, 401, 403, 409, 413, 422, 500, 503],
        ("DELETE", "/v1/schedules/{name}") => &[400, 401, 403, 404, 500, 503],
        ("GET", "/v1/queues") => KEYED,
        ("PUT", "/v1/queues/{queue}") => &[400, 401, 403, 413, 422, 500, 503],
        (
            "POST",
            "/v1/schedules/{name}/pause"
            | "/v1/schedules/{name}/resume"
            | "/v1/workflows/{name}/pause"
            | "/v1/workflows/{name}/resume",
        ) => &[400, 401, 403, 404, 500, 503],
        ("GET", "/v1/instances") => &[400, 401, 403, 500, 503],
        ("GET", _) => &[400, 401, 403, 404, 500, 503],
        ("PUT", "/v1/workflows/{name}") => &[400, 401, 403, 413, 422, 500, 503],
        ("POST", "/v1/workflows/{name}/instances") => {
            &[400, 401, 403, 404, 409, 413, 422, 500, 503]
        }
        ("POST", "/v1/workflows/{name}/instances/batch") => {
            &[400, 401, 403, 404, 413, 422, 500, 503]
        }
        ("POST", "/v1/keys") => &[400, 401, 403, 413, 422, 500, 503],
        ("DELETE", _) => &[401, 403, 404, 500, 503],
        ("POST", "/v1/queues/{queue}/pause" | "/v1/queues/{queue}/resume") => {
            &[400, 401, 403, 422, 500, 503]
        }
        ("POST", "/v1/queues/{queue}/claim" | "/v1/tasks/results") => {
            &[400, 401, 403, 413, 422, 500, 503]
        }
        // Signals, cancels, retries and the task calls.
        _ => &[400, 401, 403, 404, 409, 413, 422, 500, 503],
    }
}

fn add_problem(operation: &mut Operation, status: u16) {
    let description = match status {
        400 => "a malformed request: the problem names the field",
        401 => "no key, or one that is not valid",
        403 => "the key's role or queues do not allow this",
        404 => "no such thing",
        409 => "the request conflicts with the state it found",
        413 => "past a size limit (the problem names the limit)",
        422 => "a well-formed request the API cannot take: the problem names the field",
        500 => "a fault of the server",
        _ => "overloaded or not ready: retry after `Retry-After` seconds",
    };
    let problem = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("Problem")))
        .build();
    let response = ResponseBuilder::new()
        .description(description)
        .content("application/problem+json", problem)
        .build();
    operation
        .responses
        .responses
        .entry(status.to_string())
        .or_insert(response.into());
}

#[cfg(test)]
mod tests {
    use axum::http::Method;

    use super::*;

    #[test]
    fn the_routes_it_marks_open_are_exactly_those_the_api_lets_anyone_use() {
        let doc: serde_json::Value = serde_json::from_str(&document()).unwrap();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                let open = super::super::auth::need_of(&method, path, false).is_none();
                assert_eq!(open, is_open(path), "{method} {path}");
                assert_eq!(op["security"].is_array(), !open, "{method} {path}");
            }
        }
    }
}
