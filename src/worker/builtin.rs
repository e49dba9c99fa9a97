//! Handlers every stead worker has: `stead.http` (the `http` step kind) and
//! `stead.echo` (returns its input; for trying stead out and benchmarks).

use std::time::Duration;

use serde_json::Value;

use crate::engine::HTTP_QUEUE;
use crate::handlers::{Handlers, TaskContext, TaskError};

pub(crate) const ECHO_QUEUE: &str = "stead.echo";

/// Largest response body an `http` step records.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Adds the built-in handlers to `handlers` (user handlers win on a clash).
pub(crate) fn install(handlers: &mut Handlers, default_http_timeout_ms: u64) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(default_http_timeout_ms))
        .user_agent(concat!("stead/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("building the HTTP client");
    if handlers.get(HTTP_QUEUE).is_none() {
        handlers.register(HTTP_QUEUE, move |task: TaskContext| {
            let client = client.clone();
            async move { http_step(&client, task).await }
        });
    }
    if handlers.get(ECHO_QUEUE).is_none() {
        handlers.register(
            ECHO_QUEUE,
            |task: TaskContext| async move { Ok(task.input) },
        );
    }
}

/// Performs the request described by an `http` step's rendered input:
/// 2xx completes with the JSON body (or the text); 408, 429, 5xx and
/// network errors are retryable; any other status fails permanently.
async fn http_step(client: &reqwest::Client, task: TaskContext) -> Result<Value, TaskError> {
    let input = &task.input;
    let method = input["method"].as_str().unwrap_or("GET");
    let method = reqwest::Method::from_bytes(method.as_bytes())
        .map_err(|_| TaskError::permanent(format!("invalid HTTP method {method:?}")))?;
    let url = input["url"].as_str().unwrap_or_default();
    let url = reqwest::Url::parse(url)
        .map_err(|e| TaskError::permanent(format!("invalid URL {url:?}: {e}")))?;
    let mut request = client
        .request(method, url)
        .header("Idempotency-Key", &task.idempotency_key);
    if let Some(headers) = input["headers"].as_object() {
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str().unwrap_or_default());
        }
    }
    match &input["body"] {
        Value::Null => {}
        Value::String(text) => request = request.body(text.clone()),
        body => request = request.json(body),
    }
    let response = request
        .send()
        .await
        .map_err(|e| TaskError::retryable(format!("request failed: {e}")))?;
    let status = response.status();
    let is_json = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    let bytes = response
        .bytes()
        .await
        .map_err(|e| TaskError::retryable(format!("reading the response failed: {e}")))?;
    let body = if bytes.len() > MAX_RESPONSE_BYTES {
        Value::String(format!("<{} bytes, not recorded>", bytes.len()))
    } else if is_json {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    } else {
        Value::String(String::from_utf8_lossy(&bytes).into_owned())
    };
    if status.is_success() {
        return Ok(body);
    }
    let details = Some(serde_json::json!({ "status": status.as_u16(), "body": body }));
    let message = format!("HTTP {status}");
    let code = status.as_u16();
    if code == 408 || code == 429 || status.is_server_error() {
        Err(TaskError::Retryable { message, details })
    } else {
        Err(TaskError::Permanent { message, details })
    }
}
