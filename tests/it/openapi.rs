//! The OpenAPI document at `/v1/openapi.json`: version 3.1, every route of
//! the API in it (the list is written out here, not taken from the code),
//! each with its request body and the problem documents it may answer, and
//! every route it names served by the node.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::{pretty, TestDb, TestNode};

/// Every route of the API, as method and path template.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/v1/cluster"),
    ("GET", "/v1/workflows"),
    ("GET", "/v1/workflows/{name}"),
    ("PUT", "/v1/workflows/{name}"),
    ("GET", "/v1/workflows/{name}/versions/{version}"),
    ("POST", "/v1/workflows/{name}/instances"),
    ("POST", "/v1/workflows/{name}/instances/batch"),
    ("GET", "/v1/instances"),
    ("GET", "/v1/instances/{id}"),
    ("GET", "/v1/instances/{id}/history"),
    ("POST", "/v1/instances/{id}/signals/{name}"),
    ("POST", "/v1/instances/{id}/cancel"),
    ("POST", "/v1/instances/{id}/retry"),
    ("POST", "/v1/instances/cancel"),
    ("POST", "/v1/instances/retry"),
    ("POST", "/v1/queues/{queue}/claim"),
    ("POST", "/v1/tasks/{task_id}/heartbeat"),
    ("POST", "/v1/tasks/{task_id}/complete"),
    ("POST", "/v1/tasks/{task_id}/fail"),
    ("POST", "/v1/tasks/results"),
    ("GET", "/v1/schedules"),
    ("GET", "/v1/schedules/{name}"),
    ("PUT", "/v1/schedules/{name}"),
    ("DELETE", "/v1/schedules/{name}"),
    ("POST", "/v1/schedules/{name}/pause"),
    ("POST", "/v1/schedules/{name}/resume"),
    ("GET", "/v1/queues"),
    ("PUT", "/v1/queues/{queue}"),
    ("POST", "/v1/queues/{queue}/pause"),
    ("POST", "/v1/queues/{queue}/resume"),
    ("POST", "/v1/workflows/{name}/pause"),
    ("POST", "/v1/workflows/{name}/resume"),
    ("GET", "/v1/keys"),
    ("POST", "/v1/keys"),
    ("DELETE", "/v1/keys/{id}"),
];

/// The operations of a document, as (METHOD, path).
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().unwrap().keys() {
            ops.insert((method.to_uppercase(), path.clone()));
        }
    }
    ops
}

#[tokio::test]
async fn the_document_describes_every_route_with_its_bodies_and_problems() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    let (status, doc) = node.call("GET", "/v1/openapi.json", None).await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let described = operations(&doc);
    let missing: Vec<_> = expected.difference(&described).collect();
    let unknown: Vec<_> = described.difference(&expected).collect();
    assert!(
        missing.is_empty(),
        "routes missing from the document: {missing:?}"
    );
    assert!(
        unknown.is_empty(),
        "the document names routes this test does not know: {unknown:?}"
    );

    for (method, path) in &described {
        let op = &doc["paths"][path][method.to_lowercase()];
        let success = op["responses"]
            .as_object()
            .unwrap()
            .keys()
            .any(|s| s.starts_with('2'));
        assert!(success, "{method} {path} has no success response");
        let bodiless = ["/{id}/retry", "/pause", "/resume"];
        if method != "GET" && method != "DELETE" && !bodiless.iter().any(|b| path.ends_with(b)) {
            assert!(
                op["requestBody"].is_object(),
                "{method} {path} has no request body"
            );
        }
        if path.starts_with("/v1/") && path != "/v1/openapi.json" {
            for status in ["401", "403", "500"] {
                let problem = &op["responses"][status]["content"]["application/problem+json"];
                assert_eq!(
                    problem["schema"]["$ref"],
                    "#/components/schemas/Problem",
                    "{method} {path} {status}: {}",
                    pretty(op)
                );
            }
        }
    }
    let problem = &doc["components"]["schemas"]["Problem"];
    for field in ["type", "title", "status", "detail"] {
        assert!(problem["required"]
            .as_array()
            .unwrap()
            .contains(&json!(field)));
    }
    node.shutdown().await;
}

/// A concrete path of a template: each `{param}` filled in.
fn concrete(template: &str) -> String {
    template
        .replace("{task_id}", "1")
        .replace("{version}", "1")
        .replace(['{', '}'], "")
}

#[tokio::test]
async fn every_route_the_document_names_is_served() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    let (_, doc) = node.call("GET", "/v1/openapi.json", None).await;
    for (method, path) in operations(&doc) {
        let (status, body) = node.call(&method, &concrete(&path), None).await;
        // The fallback of an unknown route or method: nothing served it.
        let unserved = status == 405
            || (status == 404
                && body["detail"]
                    .as_str()
                    .unwrap_or("")
                    .contains("no such endpoint"));
        assert!(!unserved, "{method} {path}: {status} {}", pretty(&body));
    }
    node.shutdown().await;
}
