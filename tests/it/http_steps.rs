//! `http` steps against a local test server: retryable and permanent
//! statuses, the `Idempotency-Key` header, body templates and text bodies.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::support::{events, show, step};
use crate::{pretty, TestDb, TestNode};

/// One request the test server received.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Seen {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

/// What the server answers: status, content type, body.
type Reply = (u16, &'static str, String);

#[derive(Default)]
struct Script {
    /// Per path, the replies to give in order; the last one repeats.
    replies: HashMap<String, Vec<Reply>>,
    seen: Vec<Seen>,
}

/// An HTTP server on 127.0.0.1:0 that answers from a script and records
/// every request.
struct TestServer {
    url: String,
    script: Arc<Mutex<Script>>,
    handle: tokio::task::JoinHandle<()>,
}

impl TestServer {
    async fn start(replies: &[(&str, Vec<Reply>)]) -> TestServer {
        let script = Arc::new(Mutex::new(Script {
            replies: replies
                .iter()
                .map(|(p, r)| (p.to_string(), r.clone()))
                .collect(),
            seen: Vec::new(),
        }));
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        TestServer {
            url: format!("http://{addr}"),
            script,
            handle,
        }
    }

    fn seen(&self, path: &str) -> Vec<Seen> {
        self.script
            .lock()
            .unwrap()
            .seen
            .iter()
            .filter(|s| s.path == path)
            .cloned()
            .collect()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

async fn answer(
    State(script): State<Arc<Mutex<Script>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let mut script = script.lock().unwrap();
    let n = script.seen.iter().filter(|s| s.path == path).count();
    script.seen.push(Seen {
        method,
        path: path.clone(),
        headers,
        body,
    });
    let Some(replies) = script.replies.get(&path) else {
        return (StatusCode::NOT_FOUND, "no such path").into_response();
    };
    let (status, content_type, body) = replies[n.min(replies.len() - 1)].clone();
    (
        StatusCode::from_u16(status).unwrap(),
        [("content-type", content_type)],
        body,
    )
        .into_response()
}

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";

fn reply(status: u16, content_type: &'static str, body: impl Into<String>) -> Reply {
    (status, content_type, body.into())
}

/// 503 is retryable: after two 503s the third attempt's JSON 200 body is
/// the step's output.
#[tokio::test]
async fn http_503_is_retried_then_succeeds_with_the_json_body() {
    let server = TestServer::start(&[(
        "/flaky",
        vec![
            reply(503, TEXT, "busy"),
            reply(503, TEXT, "still busy"),
            reply(200, JSON, r#"{"ok": true, "items": [1, 2]}"#),
        ],
    )])
    .await;
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "http_retry",
        json!({
            "steps": [
                {"id": "call", "http": {"method": "POST", "url": "${input.base}/flaky",
                                        "body": {"x": 1}},
                 "retry": {"max_attempts": 5, "initial_interval": "100ms"}},
                {"id": "use", "value": "${steps.call.output.items.1}"}
            ]
        }),
    )
    .await;
    let id = node
        .start_instance("http_retry", json!({"base": server.url}))
        .await;
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    let call = step(&done, "call");
    assert_eq!(call["output"], json!({"ok": true, "items": [1, 2]}));
    assert_eq!(call["attempt"], 3);
    assert_eq!(step(&done, "use")["output"], 2);
    assert_eq!(server.seen("/flaky").len(), 3);

    let history = node.history(&id).await;
    let failed = events(&history, "step_attempt_failed");
    assert_eq!(failed.len(), 2, "{}", show(&history));
    for e in failed {
        assert_eq!(e["data"]["error"]["retryable"], true, "{}", show(&history));
        assert_eq!(
            e["data"]["error"]["details"]["status"],
            503,
            "{}",
            show(&history)
        );
    }
    node.shutdown().await;
}

/// A 4xx other than 408/429 fails permanently after exactly one attempt,
/// with the status and body in the step error.
#[tokio::test]
async fn http_400_fails_permanently_after_one_attempt() {
    let server =
        TestServer::start(&[("/bad", vec![reply(400, JSON, r#"{"error": "bad order"}"#)])]).await;
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "http_bad",
        json!({
            "steps": [
                {"id": "call", "http": {"method": "POST", "url": "${input.base}/bad",
                                        "body": {"order": 1}},
                 "retry": {"max_attempts": 5, "initial_interval": "100ms"}}
            ]
        }),
    )
    .await;
    let id = node
        .start_instance("http_bad", json!({"base": server.url}))
        .await;
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "failed", "{}", pretty(&done));
    let call = step(&done, "call");
    assert_eq!(call["status"], "failed");
    assert_eq!(call["attempt"], 1);
    assert_eq!(call["error"]["retryable"], false, "{}", pretty(&done));
    assert!(call["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("400"));
    assert_eq!(call["error"]["details"]["status"], 400);
    assert_eq!(
        call["error"]["details"]["body"],
        json!({"error": "bad order"})
    );
    assert_eq!(server.seen("/bad").len(), 1);

    let history = node.history(&id).await;
    assert!(
        events(&history, "step_attempt_failed").is_empty(),
        "{}",
        show(&history)
    );
    assert_eq!(events(&history, "step_failed").len(), 1);
    assert_eq!(events(&history, "instance_failed").len(), 1);
    node.shutdown().await;
}

/// Every attempt of an http step carries the same `Idempotency-Key`; a
/// different step (or instance) has a different key. 408 and 429 retry too.
#[tokio::test]
async fn idempotency_key_is_stable_across_retries() {
    let server = TestServer::start(&[
        (
            "/pay",
            vec![
                reply(408, TEXT, "timeout"),
                reply(429, TEXT, "slow down"),
                reply(500, TEXT, "oops"),
                reply(200, JSON, r#"{"paid": true}"#),
            ],
        ),
        ("/notify", vec![reply(200, JSON, r#"{"sent": true}"#)]),
    ])
    .await;
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "http_keys",
        json!({
            "steps": [
                {"id": "pay", "http": {"method": "POST", "url": "${input.base}/pay",
                                       "body": {"amount": 5}},
                 "retry": {"max_attempts": 6, "initial_interval": "100ms"}},
                {"id": "notify", "http": {"method": "POST", "url": "${input.base}/notify"}}
            ]
        }),
    )
    .await;
    let first = node
        .start_instance("http_keys", json!({"base": server.url}))
        .await;
    let done = node.wait_ended(&first).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(step(&done, "pay")["attempt"], 4);
    assert_eq!(step(&done, "pay")["output"], json!({"paid": true}));

    let pay = server.seen("/pay");
    assert_eq!(pay.len(), 4);
    let keys: Vec<Option<String>> = pay.iter().map(|s| s.header("idempotency-key")).collect();
    let key = keys[0].clone().expect("no Idempotency-Key header");
    assert!(!key.is_empty());
    assert!(
        keys.iter().all(|k| k.as_deref() == Some(key.as_str())),
        "Idempotency-Key changed across retries: {keys:?}"
    );
    let notify_key = server.seen("/notify")[0]
        .header("idempotency-key")
        .expect("no Idempotency-Key on notify");
    assert_ne!(notify_key, key, "two steps share an idempotency key");

    // Another instance of the same workflow gets keys of its own.
    let second = node
        .start_instance("http_keys", json!({"base": server.url}))
        .await;
    let done = node.wait_ended(&second).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    let pay = server.seen("/pay");
    assert_eq!(pay.len(), 5);
    let other = pay[4].header("idempotency-key").unwrap();
    assert_ne!(other, key, "two instances share an idempotency key");
    node.shutdown().await;
}

/// The body template is rendered (types kept, text interpolated) and sent
/// as JSON, with templated headers; the JSON answer is the output.
#[tokio::test]
async fn http_json_body_template_is_sent() {
    let server =
        TestServer::start(&[("/orders", vec![reply(201, JSON, r#"{"id": "ord-1"}"#)])]).await;
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "http_body",
        json!({
            "steps": [
                {"id": "prep", "value": {"sku": "${input.sku}", "qty": 2}},
                {"id": "create", "http": {
                    "method": "PUT",
                    "url": "${input.base}/orders",
                    "headers": {"X-Customer": "${input.customer.id}", "X-Instance": "${instance.id}"},
                    "body": {
                        "customer": "${input.customer}",
                        "amount": "${input.amount}",
                        "line": "${steps.prep.output}",
                        "note": "order for ${input.customer.name} x${steps.prep.output.qty}",
                        "fixed": [true, null, 1.5]
                    }}},
                {"id": "after", "value": "${steps.create.output.id}"}
            ],
            "output": "${steps.after.output}"
        }),
    )
    .await;
    let input = json!({
        "base": server.url,
        "sku": "A-1",
        "amount": 12.5,
        "customer": {"id": "c-9", "name": "Grace"}
    });
    let id = node.start_instance("http_body", input).await;
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(done["output"], "ord-1");
    assert_eq!(step(&done, "create")["output"], json!({"id": "ord-1"}));

    let seen = server.seen("/orders");
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    assert_eq!(req.method, Method::PUT);
    assert!(
        req.header("content-type")
            .unwrap_or_default()
            .starts_with("application/json"),
        "content-type: {:?}",
        req.header("content-type")
    );
    assert_eq!(req.header("x-customer").as_deref(), Some("c-9"));
    assert_eq!(req.header("x-instance").as_deref(), Some(id.as_str()));
    let body: Value = serde_json::from_slice(&req.body)
        .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", req.body));
    assert_eq!(
        body,
        json!({
            "customer": {"id": "c-9", "name": "Grace"},
            "amount": 12.5,
            "line": {"sku": "A-1", "qty": 2},
            "note": "order for Grace x2",
            "fixed": [true, null, 1.5]
        })
    );
    node.shutdown().await;
}

/// A 2xx answer that is not JSON becomes the step output as a string.
#[tokio::test]
async fn http_non_json_200_becomes_a_string_output() {
    let server = TestServer::start(&[
        ("/text", vec![reply(200, TEXT, "plain hello\nsecond line")]),
        ("/html", vec![reply(200, "text/html", "<p>hi</p>")]),
    ])
    .await;
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "http_text",
        json!({
            "steps": [
                {"id": "fetch", "http": {"method": "GET", "url": "${input.base}/text"}},
                {"id": "page", "http": {"method": "GET", "url": "${input.base}/html"}},
                {"id": "wrap", "value": {"got": "${steps.fetch.output}"}}
            ]
        }),
    )
    .await;
    let id = node
        .start_instance("http_text", json!({"base": server.url}))
        .await;
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(
        step(&done, "fetch")["output"],
        json!("plain hello\nsecond line")
    );
    assert_eq!(step(&done, "page")["output"], json!("<p>hi</p>"));
    assert_eq!(
        step(&done, "wrap")["output"],
        json!({"got": "plain hello\nsecond line"})
    );
    let get = &server.seen("/text")[0];
    assert_eq!(get.method, Method::GET);
    assert!(
        get.body.is_empty(),
        "a step without body sent {:?}",
        get.body
    );
    node.shutdown().await;
}
