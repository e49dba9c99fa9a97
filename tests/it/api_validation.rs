//! Bad input over HTTP: every client mistake is a 4xx problem document
//! (RFC 9457) naming the field; nothing makes the server answer 500 or lose
//! data. Plus registration versioning.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::stream::{self, StreamExt};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::{pretty, wait_until, TestDb, TestNode};

/// One answer: status, content type and body (JSON, or the text as a string).
struct Answer {
    status: u16,
    content_type: String,
    body: Value,
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}) {}",
            self.status,
            self.content_type,
            pretty(&self.body)
        )
    }
}

/// Sends `body` as-is (no JSON encoding) with an optional content type.
async fn raw(
    node: &TestNode,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<Answer, String> {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = node.http.request(m, format!("{}{path}", node.url));
    if let Some(ct) = content_type {
        req = req.header(reqwest::header::CONTENT_TYPE, ct);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("{method} {path}: transport error: {e}"))?;
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| format!("{method} {path}: reading the body: {e}"))?;
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok(Answer {
        status,
        content_type,
        body,
    })
}

async fn send_json(node: &TestNode, method: &str, path: &str, body: &Value) -> Answer {
    raw(
        node,
        method,
        path,
        Some("application/json"),
        Some(serde_json::to_vec(body).unwrap()),
    )
    .await
    .unwrap()
}

async fn send(node: &TestNode, method: &str, path: &str) -> Answer {
    raw(node, method, path, None, None).await.unwrap()
}

/// Asserts a problem document with `status` (and its `status` member).
fn assert_problem(a: &Answer, status: u16, what: &str) {
    assert_eq!(a.status, status, "{what}: {a}");
    assert_eq!(
        a.content_type, "application/problem+json",
        "{what}: problem documents are application/problem+json: {a}"
    );
    assert_eq!(a.body["status"], json!(status), "{what}: {a}");
    assert!(a.body["type"].is_string(), "{what}: no type: {a}");
    assert!(a.body["title"].is_string(), "{what}: no title: {a}");
}

/// The `path`s of the problem's `errors`.
fn error_paths(a: &Answer) -> Vec<String> {
    a.body["errors"]
        .as_array()
        .map(|errs| {
            errs.iter()
                .filter_map(|e| e["path"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts a 4xx problem document whose `errors` name `field`.
fn assert_names_field(a: &Answer, field: &str, what: &str) {
    assert!(
        (400..500).contains(&a.status),
        "{what}: expected a 4xx, got {a}"
    );
    assert_problem(a, a.status, what);
    assert!(
        error_paths(a).iter().any(|p| p == field),
        "{what}: the problem should name {field:?} in `errors`: {a}"
    );
}

#[tokio::test]
async fn invalid_definition_reports_every_problem_at_once() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;

    let def = json!({
        "steps": [
            {"id": "Bad Id!", "value": 1},
            {"id": "b", "value": 2, "needs": ["ghost"]},
            {"id": "c", "value": 3, "needs": ["d"]},
            {"id": "d", "value": 4, "needs": ["c"]},
            {"id": "e", "value": 5, "retry": {"max_attempts": 0}},
            {"id": "f", "value": 6, "retry": {"initial_interval": "soon"}},
            {"id": "g", "value": 7, "frobnicate": true}
        ],
        "extra": 1
    });
    let a = send_json(&node, "PUT", "/v1/workflows/broken", &def).await;
    assert_problem(&a, 422, "invalid definition");
    let paths = error_paths(&a);
    for expected in [
        "$.steps[0].id",
        "$.steps[1].needs[0]",
        "$.steps[2].needs",
        "$.steps[4].retry.max_attempts",
        "$.steps[5].retry.initial_interval",
        "$.steps[6].frobnicate",
        "$.extra",
    ] {
        assert!(
            paths.iter().any(|p| p == expected),
            "problem path {expected} missing: {a}"
        );
    }
    // Every problem has a message.
    for e in a.body["errors"].as_array().unwrap() {
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{a}");
    }
    // The cycle message names both steps.
    let cycle = a.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == "$.steps[2].needs")
        .unwrap();
    let msg = cycle["message"].as_str().unwrap();
    assert!(msg.contains('c') && msg.contains('d'), "{msg}");

    // Nothing was registered.
    let got = send(&node, "GET", "/v1/workflows/broken").await;
    assert_problem(&got, 404, "GET an invalid definition");
    let client = db.client().await;
    let n: i64 = client
        .query_one("SELECT count(*) FROM stead.workflows", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);

    // A definition that is not an object at all.
    let a = send_json(&node, "PUT", "/v1/workflows/broken", &json!([1, 2])).await;
    assert_problem(&a, 422, "definition that is an array");
    assert!(error_paths(&a).iter().any(|p| p == "$"), "{a}");
    node.shutdown().await;
}

#[tokio::test]
async fn malformed_json_is_400() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow("ok", json!({"steps": [{"id": "a", "value": 1}]}))
        .await;
    for (method, path) in [
        ("PUT", "/v1/workflows/ok"),
        ("POST", "/v1/workflows/ok/instances"),
        ("POST", "/v1/queues/q/claim"),
        ("POST", "/v1/tasks/1/complete"),
    ] {
        for body in [
            &b"{\"steps\": ["[..],
            b"{input: 1}",
            b"not json at all",
            b"",
        ] {
            let a = raw(
                &node,
                method,
                path,
                Some("application/json"),
                Some(body.to_vec()),
            )
            .await
            .unwrap();
            let what = format!("{method} {path} with {:?}", String::from_utf8_lossy(body));
            assert_problem(&a, 400, &what);
            assert!(error_paths(&a).iter().any(|p| p == "$"), "{what}: {a}");
        }
    }
    node.shutdown().await;
}

#[tokio::test]
async fn wrong_types_and_unknown_fields_name_the_field() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow("ok", json!({"steps": [{"id": "a", "value": 1}]}))
        .await;
    let start = "/v1/workflows/ok/instances";
    let claim = "/v1/queues/q/claim";

    let cases: Vec<(&str, Value, &str)> = vec![
        (start, json!({"input": 1, "id": 5}), "$.id"),
        (start, json!({"input": 1, "version": "one"}), "$.version"),
        (start, json!({"input": 1, "version": 0}), "$.version"),
        (claim, json!({"worker": 5}), "$.worker"),
        (claim, json!({"worker": "w", "max": "ten"}), "$.max"),
        (claim, json!({"worker": "w", "max": 0}), "$.max"),
        (claim, json!({"worker": "w", "wait": true}), "$.wait"),
        (claim, json!({"worker": "w", "wait": "forever"}), "$.wait"),
        (claim, json!({"worker": "w", "lease": "1ms"}), "$.lease"),
        (claim, json!({"max": 1}), "$.worker"),
    ];
    for (path, body, field) in cases {
        let a = send_json(&node, "POST", path, &body).await;
        assert_names_field(&a, field, &format!("POST {path} {body}"));
    }

    // Unknown fields are refused, and the problem says which.
    for (path, body) in [
        (start, json!({"input": 1, "bogus": true})),
        (claim, json!({"worker": "w", "bogus": true})),
    ] {
        let a = send_json(&node, "POST", path, &body).await;
        assert!((400..500).contains(&a.status), "POST {path} {body}: {a}");
        assert_problem(&a, a.status, "unknown field");
        assert!(
            a.body.to_string().contains("bogus"),
            "the problem should name the unknown field: {a}"
        );
    }
    // Nothing was started by any of that.
    let client = db.client().await;
    let n: i64 = client
        .query_one("SELECT count(*) FROM stead.instances", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    node.shutdown().await;
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow("ok", json!({"steps": [{"id": "a", "value": 1}]}))
        .await;
    let big = "x".repeat(1024 * 1024 + 10);
    for (method, path, body) in [
        (
            "PUT",
            "/v1/workflows/ok",
            json!({"steps": [{"id": "a", "value": big}]}),
        ),
        ("POST", "/v1/workflows/ok/instances", json!({"input": big})),
        ("POST", "/v1/queues/q/claim", json!({"worker": big})),
    ] {
        let a = send_json(&node, method, path, &body).await;
        assert_problem(&a, 413, &format!("{method} {path} with 1 MiB"));
    }
    // Just under the limit is fine.
    let fits = "y".repeat(1000 * 1000);
    let a = send_json(
        &node,
        "POST",
        "/v1/workflows/ok/instances",
        &json!({"input": fits}),
    )
    .await;
    assert_eq!(a.status, 201, "{a}");
    // The big workflow was not registered: still version 1.
    let a = send(&node, "GET", "/v1/workflows/ok").await;
    assert_eq!(a.body["version"], 1, "{a}");
    node.shutdown().await;
}

#[tokio::test]
async fn bad_ids_are_refused_naming_the_field() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow("ok", json!({"steps": [{"id": "a", "value": 1}]}))
        .await;
    let long = "a".repeat(201);
    let max = "a".repeat(200);

    // In the path.
    for (path, field) in [
        (format!("/v1/instances/{long}"), "id"),
        ("/v1/instances/bad%20id".to_string(), "id"),
        ("/v1/instances/caf%C3%A9".to_string(), "id"),
        (format!("/v1/instances/{long}/history"), "id"),
        ("/v1/instances/a%2Fb/history".to_string(), "id"),
        (format!("/v1/workflows/{long}"), "name"),
        ("/v1/workflows/no%20spaces".to_string(), "name"),
    ] {
        let a = send(&node, "GET", &path).await;
        assert_names_field(&a, field, &format!("GET {path}"));
    }
    let a = send_json(
        &node,
        "PUT",
        &format!("/v1/workflows/{long}"),
        &json!({"steps": [{"id": "a", "value": 1}]}),
    )
    .await;
    assert!((400..500).contains(&a.status), "{a}");
    assert_problem(&a, a.status, "PUT a too long name");
    let a = send_json(
        &node,
        "POST",
        "/v1/workflows/bad!name/instances",
        &json!({"input": 1}),
    )
    .await;
    assert_names_field(&a, "name", "start with a bad name");
    let a = send_json(
        &node,
        "POST",
        "/v1/queues/bad%20q/claim",
        &json!({"worker": "w"}),
    )
    .await;
    assert_names_field(&a, "queue", "claim from a bad queue");
    let a = send_json(
        &node,
        "POST",
        "/v1/tasks/abc/complete",
        &json!({"lease_token": uuid::Uuid::new_v4(), "output": 1}),
    )
    .await;
    assert_names_field(&a, "task_id", "complete a task with a bad id");

    // In the start body.
    for bad in [long.as_str(), "bad id", "semi;colon", "", "ünïcode", "a/b"] {
        let a = send_json(
            &node,
            "POST",
            "/v1/workflows/ok/instances",
            &json!({"input": 1, "id": bad}),
        )
        .await;
        assert_names_field(&a, "$.id", &format!("start with id {bad:?}"));
    }
    // The longest allowed id and every allowed character are fine.
    for good in [max.as_str(), "Az09._:@-"] {
        let a = send_json(
            &node,
            "POST",
            "/v1/workflows/ok/instances",
            &json!({"input": 1, "id": good}),
        )
        .await;
        assert_eq!(a.status, 201, "start with id {good:?}: {a}");
        assert_eq!(a.body["id"], good);
    }
    let client = db.client().await;
    let n: i64 = client
        .query_one("SELECT count(*) FROM stead.instances", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "only the two valid ids were started");
    node.shutdown().await;
}

#[tokio::test]
async fn unknown_things_wrong_methods_and_bad_query_params() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;

    let a = send(&node, "GET", "/v1/instances/does-not-exist").await;
    assert_problem(&a, 404, "unknown instance");
    let a = send(&node, "GET", "/v1/instances/does-not-exist?wait=1s").await;
    assert_problem(&a, 404, "unknown instance, long-poll");
    let a = send(&node, "GET", "/v1/instances/does-not-exist/history").await;
    assert_problem(&a, 404, "history of an unknown instance");
    let a = send(&node, "GET", "/v1/workflows/nope").await;
    assert_problem(&a, 404, "unknown workflow");
    let a = send(&node, "GET", "/v1/workflows/nope/versions/1").await;
    assert_problem(&a, 404, "unknown workflow version");

    for path in ["/v1/nope", "/v1", "/v2/instances", "/v1/instances/x/y/z"] {
        let a = send(&node, "GET", path).await;
        assert_problem(&a, 404, &format!("unknown route {path}"));
    }
    for (method, path) in [
        ("DELETE", "/v1/workflows/x"),
        ("POST", "/v1/workflows/x"),
        ("GET", "/v1/workflows/x/instances"),
        ("PUT", "/v1/instances/x"),
        ("DELETE", "/v1/instances"),
        ("GET", "/v1/queues/q/claim"),
        ("GET", "/v1/tasks/1/complete"),
        ("POST", "/healthz"),
    ] {
        let a = send(&node, method, path).await;
        assert_problem(&a, 405, &format!("{method} {path}"));
    }

    for (query, field) in [
        ("limit=0", "query.limit"),
        ("limit=-1", "query.limit"),
        ("limit=abc", "query.limit"),
        ("limit=1000000", "query.limit"),
        ("status=bogus", "query.status"),
        ("cursor=xyz", "query.cursor"),
        ("cursor=zz", "query.cursor"),
        ("workflow=bad%20name", "query.workflow"),
        ("colour=blue", "query.colour"),
    ] {
        let path = format!("/v1/instances?{query}");
        let a = send(&node, "GET", &path).await;
        assert_problem(&a, 400, &path);
        assert_names_field(&a, field, &path);
    }
    for (query, field) in [
        ("wait=forever", "query.wait"),
        ("wait=-1s", "query.wait"),
        ("wait=", "query.wait"),
        ("timeout=1s", "query.timeout"),
    ] {
        let path = format!("/v1/instances/some-id?{query}");
        let a = send(&node, "GET", &path).await;
        assert_problem(&a, 400, &path);
        assert_names_field(&a, field, &path);
    }
    node.shutdown().await;
}

/// One garbage request.
struct Garbage {
    method: &'static str,
    path: String,
    content_type: Option<&'static str>,
    body: Option<Vec<u8>>,
}

fn hex(s: &[u8]) -> String {
    s.iter().map(|b| format!("{b:02x}")).collect()
}

fn garbage_requests() -> Vec<Garbage> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let nested_arrays = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes();
    let nested_objects =
        format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000)).into_bytes();
    let nested_input = format!(
        "{{\"input\": {}1{}}}",
        "{\"a\":".repeat(10_000),
        "}".repeat(10_000)
    )
    .into_bytes();
    let mut bodies: Vec<(Option<&'static str>, Vec<u8>)> =
        vec![
        (Some("application/json"), nested_arrays),
        (Some("application/json"), nested_objects),
        (Some("application/json"), nested_input),
        (Some("application/json"), br#"{"input": 1e400}"#.to_vec()),
        (
            Some("application/json"),
            format!("{{\"input\": {}}}", "9".repeat(500)).into_bytes(),
        ),
        (
            Some("application/json"),
            br#"{"worker": "w", "max": 99999999999999999999999}"#.to_vec(),
        ),
        (
            Some("application/json"),
            br#"{"input": 1, "version": 99999999999999}"#.to_vec(),
        ),
        (
            Some("application/json"),
            br#"{"input": "\u0000", "id": "nul-input"}"#.to_vec(),
        ),
        (
            Some("application/json"),
            br#"{"steps": [{"id": "a", "value": "\u0000"}], "description": 5}"#.to_vec(),
        ),
        (
            Some("application/json"),
            b"{\"input\": \"\xff\xfe\", \"id\": \"bad-utf8\"}".to_vec(),
        ),
        (Some("application/json"), br#"{"input": "\ud800"}"#.to_vec()),
        (Some("application/json"), b"".to_vec()),
        (Some("application/json"), b"null".to_vec()),
        (Some("application/json"), b"[]".to_vec()),
        (Some("application/json"), b"\"just a string\"".to_vec()),
        (Some("text/plain"), b"hello".to_vec()),
        (
            Some("application/x-www-form-urlencoded"),
            b"input=1&id=x".to_vec(),
        ),
        (Some("multipart/form-data; boundary=zz"), b"--zz\r\n\r\n--zz--".to_vec()),
        (None, b"{\"lease_token\": \"not-a-uuid\", \"output\": 1}".to_vec()),
        (
            Some("application/json"),
            br#"{"lease_token": "00000000-0000-0000-0000-000000000000", "error": {"message": 5}}"#
                .to_vec(),
        ),
    ];
    for _ in 0..4 {
        let len = rng.gen_range(1..3000);
        let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        bodies.push((Some("application/json"), bytes));
    }

    let with_body: &[(&'static str, &str)] = &[
        ("PUT", "/v1/workflows/keep"),
        ("POST", "/v1/workflows/keep/instances"),
        ("POST", "/v1/queues/stead.echo/claim"),
        ("POST", "/v1/tasks/1/heartbeat"),
        ("POST", "/v1/tasks/1/complete"),
        ("POST", "/v1/tasks/1/fail"),
    ];
    let mut out = Vec::new();
    for (i, (ct, body)) in bodies.iter().enumerate() {
        // Every body at two endpoints, rotating, so each endpoint gets a mix.
        for k in 0..2 {
            let (method, path) = with_body[(i * 2 + k) % with_body.len()];
            out.push(Garbage {
                method,
                path: path.to_string(),
                content_type: *ct,
                body: Some(body.clone()),
            });
        }
    }
    // The hard cases at every body endpoint.
    for (method, path) in with_body {
        for k in [0, 1, 7, 9] {
            out.push(Garbage {
                method,
                path: path.to_string(),
                content_type: bodies[k].0,
                body: Some(bodies[k].1.clone()),
            });
        }
    }

    let micros_too_early = -6_000_000_000_000_000_000i64;
    let paths = [
        "/v1/instances/%F0%9F%92%A9".to_string(),
        "/v1/instances/%FF%FE".to_string(),
        "/v1/instances/%FF%FE/history".to_string(),
        "/v1/instances/..%2F..%2Fetc%2Fpasswd".to_string(),
        "/v1/instances/%00".to_string(),
        "/v1/workflows/%C3%A9t%C3%A9".to_string(),
        "/v1/workflows/%FF".to_string(),
        "/v1/workflows/keep/versions/99999999999999999999".to_string(),
        "/v1/workflows/keep/versions/2147483647".to_string(),
        "/v1/workflows/keep/versions/-1".to_string(),
        "/v1/workflows/keep/versions/%F0%9F%92%A9".to_string(),
        "/v1/tasks/-1/complete".to_string(),
        "/v1/tasks/99999999999999999999999/complete".to_string(),
        format!("/v1/instances?cursor={}", hex(b"1:\0")),
        format!(
            "/v1/instances?cursor={}",
            hex(format!("{micros_too_early}:x").as_bytes())
        ),
        format!("/v1/instances?cursor={}", hex(b"9223372036854775807:x")),
        format!("/v1/instances?cursor={}", hex("1:\u{1F4A9}".as_bytes())),
        format!("/v1/instances?cursor={}", "a".repeat(5000)),
        "/v1/instances?limit=99999999999999999999".to_string(),
        "/v1/instances?status=%FF".to_string(),
        "/v1/instances?workflow=%00".to_string(),
        "/v1/instances?limit=1&limit=2&limit=x".to_string(),
        "/v1/instances?%%%%".to_string(),
        "/v1/instances/x?wait=99999999999999999999999d".to_string(),
        "/v1/instances/x?wait=0ms".to_string(),
        format!("/v1/instances/{}", "z".repeat(10_000)),
        "/v1/workflows?whatever=1".to_string(),
        "/metrics?x=%FF".to_string(),
        "/readyz".to_string(),
    ];
    for path in paths {
        out.push(Garbage {
            method: "GET",
            path,
            content_type: None,
            body: None,
        });
    }
    // Text that PostgreSQL cannot store (NUL) in an otherwise valid definition.
    out.push(Garbage {
        method: "PUT",
        path: "/v1/workflows/nul".to_string(),
        content_type: Some("application/json"),
        body: Some(br#"{"steps": [{"id": "a", "value": "\u0000"}]}"#.to_vec()),
    });
    // The same in a task result (with a lease token nobody holds).
    for (path, body) in [
        (
            "/v1/tasks/1/complete",
            &br#"{"lease_token": "00000000-0000-0000-0000-000000000001", "output": "\u0000"}"#[..],
        ),
        (
            "/v1/tasks/1/fail",
            br#"{"lease_token": "00000000-0000-0000-0000-000000000001", "error": {"message": "\u0000"}}"#,
        ),
    ] {
        out.push(Garbage {
            method: "POST",
            path: path.to_string(),
            content_type: Some("application/json"),
            body: Some(body.to_vec()),
        });
    }
    // Bodies where none is expected, and odd methods.
    for (method, path) in [
        ("GET", "/v1/workflows"),
        ("GET", "/v1/instances"),
        ("GET", "/healthz"),
        ("PATCH", "/v1/workflows/keep"),
        ("OPTIONS", "/v1/instances"),
        ("HEAD", "/v1/instances/x"),
    ] {
        out.push(Garbage {
            method,
            path: path.to_string(),
            content_type: Some("application/json"),
            body: Some(b"{\"garbage\": [1, 2".to_vec()),
        });
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_makes_the_server_fail_or_lose_data() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    let def = json!({
        "steps": [
            {"id": "shape", "value": {"n": "${input.n}"}},
            {"id": "echo", "task": {"queue": "stead.echo", "input": "${steps.shape.output}"}}
        ],
        "output": "${steps.echo.output}"
    });
    node.put_workflow("keep", def).await;
    let id = node.start_instance("keep", json!({"n": 7})).await;
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    let workflow_before = send(&node, "GET", "/v1/workflows/keep").await.body;
    let instance_before = send(&node, "GET", &format!("/v1/instances/{id}"))
        .await
        .body;
    let history_before = node.history(&id).await;

    let requests = garbage_requests();
    assert!(requests.len() >= 100, "{} requests", requests.len());
    let answers: Vec<(String, Result<Answer, String>)> = stream::iter(requests)
        .map(|g| {
            let node = &node;
            async move {
                let label = format!(
                    "{} {} ({} body bytes, {:?})",
                    g.method,
                    if g.path.len() > 120 {
                        format!("{}...", &g.path[..120])
                    } else {
                        g.path.clone()
                    },
                    g.body.as_ref().map_or(0, Vec::len),
                    g.content_type
                );
                (
                    label,
                    raw(node, g.method, &g.path, g.content_type, g.body).await,
                )
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;

    let mut failures = Vec::new();
    for (label, answer) in &answers {
        match answer {
            Err(e) => failures.push(format!("{label}: {e}")),
            Ok(a) if a.status >= 500 => failures.push(format!("{label}: {a}")),
            Ok(a) if a.status >= 400 && a.content_type != "application/problem+json" => failures
                .push(format!(
                    "{label}: a 4xx that is not a problem document: {a}"
                )),
            Ok(_) => {}
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} garbage requests were answered badly:\n{}",
        failures.len(),
        answers.len(),
        failures.join("\n")
    );

    // Still alive, still ready.
    let a = send(&node, "GET", "/healthz").await;
    assert_eq!(a.status, 200, "{a}");
    let a = send(&node, "GET", "/readyz").await;
    assert_eq!(a.status, 200, "{a}");

    // Nothing lost or changed.
    let workflow_after = send(&node, "GET", "/v1/workflows/keep").await.body;
    assert_eq!(workflow_after, workflow_before);
    let instance_after = send(&node, "GET", &format!("/v1/instances/{id}"))
        .await
        .body;
    assert_eq!(instance_after, instance_before);
    assert_eq!(node.history(&id).await, history_before);
    let client = db.client().await;
    let versions: i64 = client
        .query_one(
            "SELECT count(*) FROM stead.workflows WHERE name = 'keep'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        versions, 1,
        "no garbage was registered as a version of keep"
    );

    // And it still works.
    let id2 = node.start_instance("keep", json!({"n": 8})).await;
    let done = node.wait_ended(&id2).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(done["output"], json!({"n": 8}));
    node.shutdown().await;
}

#[tokio::test]
async fn registration_is_versioned_by_content() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    let v1 = json!({
        "steps": [{"id": "work", "task": {"queue": "versions.q", "input": "${input}"}}],
        "output": {"v": 1, "got": "${steps.work.output}"}
    });
    let v2 = json!({
        "steps": [{"id": "work", "task": {"queue": "versions.q", "input": "${input}"}}],
        "output": {"v": 2, "got": "${steps.work.output}"}
    });

    let a = send_json(&node, "PUT", "/v1/workflows/reg", &v1).await;
    assert_eq!(a.status, 201, "{a}");
    assert_eq!(a.body["version"], 1, "{a}");
    assert_eq!(a.body["created"], true, "{a}");
    assert_eq!(a.body["name"], "reg", "{a}");

    // The same content again (also with the name spelled out): a no-op.
    let a = send_json(&node, "PUT", "/v1/workflows/reg", &v1).await;
    assert_eq!(a.status, 200, "{a}");
    assert_eq!(a.body["version"], 1, "{a}");
    assert_eq!(a.body["created"], false, "{a}");
    let mut named = v1.clone();
    named["name"] = json!("reg");
    let a = send_json(&node, "PUT", "/v1/workflows/reg", &named).await;
    assert_eq!(a.status, 200, "{a}");
    assert_eq!(a.body["version"], 1, "{a}");

    // An instance on v1, still running when v2 arrives.
    let a = send_json(
        &node,
        "POST",
        "/v1/workflows/reg/instances",
        &json!({"input": {"x": 1}, "id": "on-v1"}),
    )
    .await;
    assert_eq!(a.status, 201, "{a}");
    assert_eq!(a.body["version"], 1, "{a}");

    let a = send_json(&node, "PUT", "/v1/workflows/reg", &v2).await;
    assert_eq!(a.status, 201, "{a}");
    assert_eq!(a.body["version"], 2, "{a}");
    assert_eq!(a.body["created"], true, "{a}");
    // Registering v2's content again is a no-op too.
    let a = send_json(&node, "PUT", "/v1/workflows/reg", &v2).await;
    assert_eq!(
        (a.status, a.body["version"].clone()),
        (200, json!(2)),
        "{a}"
    );

    let latest = send(&node, "GET", "/v1/workflows/reg").await;
    assert_eq!(latest.status, 200, "{latest}");
    assert_eq!(latest.body["version"], 2, "{latest}");
    assert_eq!(latest.body["definition"]["output"]["v"], 2, "{latest}");
    let listed: Vec<i64> = latest.body["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| v["version"].as_i64().unwrap())
        .collect();
    assert_eq!(listed, vec![1, 2], "{latest}");
    let first = send(&node, "GET", "/v1/workflows/reg/versions/1").await;
    assert_eq!(first.status, 200, "{first}");
    assert_eq!(first.body["version"], 1);
    assert_eq!(first.body["definition"]["output"]["v"], 1, "{first}");
    assert_eq!(
        first.body["definition"]["steps"], v1["steps"],
        "version 1 is stored as registered"
    );
    let second = send(&node, "GET", "/v1/workflows/reg/versions/2").await;
    assert_eq!(second.body["definition"]["output"]["v"], 2, "{second}");
    let a = send(&node, "GET", "/v1/workflows/reg/versions/3").await;
    assert_problem(&a, 404, "a version that does not exist");
    let a = send(&node, "GET", "/v1/workflows/reg/versions/0").await;
    assert_names_field(&a, "version", "version 0");
    let all = send(&node, "GET", "/v1/workflows").await;
    let reg = all.body["workflows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "reg")
        .cloned()
        .unwrap_or_else(|| panic!("reg is listed: {all}"));
    assert_eq!(reg["version"], 2, "{all}");

    // A new instance runs v2; the old one stays on v1 and finishes with v1.
    let a = send_json(
        &node,
        "POST",
        "/v1/workflows/reg/instances",
        &json!({"input": {"x": 2}, "id": "on-v2"}),
    )
    .await;
    assert_eq!(
        (a.status, a.body["version"].clone()),
        (201, json!(2)),
        "{a}"
    );

    // Work both tasks as an external worker.
    let done = AtomicUsize::new(0);
    wait_until(
        "both tasks are claimed and completed",
        Duration::from_secs(15),
        || {
            let node = &node;
            let done = &done;
            async move {
                let a = send_json(
                    node,
                    "POST",
                    "/v1/queues/versions.q/claim",
                    &json!({"worker": "tester", "max": 10, "wait": "1s"}),
                )
                .await;
                assert_eq!(a.status, 200, "{a}");
                for t in a.body["tasks"].as_array().unwrap() {
                    let c = send_json(
                        node,
                        "POST",
                        &format!("/v1/tasks/{}/complete", t["task_id"]),
                        &json!({"lease_token": t["lease_token"], "output": t["input"]}),
                    )
                    .await;
                    assert_eq!(c.status, 200, "{c}");
                    done.fetch_add(1, Ordering::SeqCst);
                }
                done.load(Ordering::SeqCst) == 2
            }
        },
    )
    .await;

    let old = node.wait_ended("on-v1").await;
    assert_eq!(old["status"], "completed", "{}", pretty(&old));
    assert_eq!(old["version"], 1, "{}", pretty(&old));
    assert_eq!(old["output"], json!({"v": 1, "got": {"x": 1}}));
    let new = node.wait_ended("on-v2").await;
    assert_eq!(new["version"], 2, "{}", pretty(&new));
    assert_eq!(new["output"], json!({"v": 2, "got": {"x": 2}}));

    // Asking for a version explicitly works, and an unknown one is a 404.
    let a = send_json(
        &node,
        "POST",
        "/v1/workflows/reg/instances",
        &json!({"input": 3, "version": 1}),
    )
    .await;
    assert_eq!(
        (a.status, a.body["version"].clone()),
        (201, json!(1)),
        "{a}"
    );
    let a = send_json(
        &node,
        "POST",
        "/v1/workflows/reg/instances",
        &json!({"input": 3, "version": 9}),
    )
    .await;
    assert_problem(&a, 404, "start on an unknown version");
    node.shutdown().await;
}
