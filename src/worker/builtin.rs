//! Handlers every stead worker has: `stead.http` (the `http` step kind) and
//! `stead.echo` (returns its input; for trying stead out and benchmarks).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::http_guard::{refusal_in, GuardedResolver, Refused};
use super::HttpAllow;
use crate::engine::HTTP_QUEUE;
use crate::error::Chain;
use crate::handlers::{Handlers, TaskContext, TaskError};

pub(crate) const ECHO_QUEUE: &str = "stead.echo";

/// How `http` steps run: their default timeout, what they may read, how
/// many redirects they follow and what the SSRF guard opens.
pub(crate) struct HttpSteps {
    pub default_timeout_ms: u64,
    pub max_response_bytes: usize,
    pub max_redirects: usize,
    pub allow: HttpAllow,
}

/// Adds the built-in handlers to `handlers` (user handlers win on a clash).
pub(crate) fn install(handlers: &mut Handlers, http: &HttpSteps) {
    let allow = Arc::new(http.allow.clone());
    let max_redirects = http.max_redirects;
    let redirect_allow = allow.clone();
    // Every hop is judged: an address in the URL here, a name by the
    // resolver when the client connects.
    let redirects = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > max_redirects {
            let error = format!("more than {max_redirects} redirects (--http-max-redirects)");
            return attempt.error(error);
        }
        match literal_refusal(&redirect_allow, attempt.url()) {
            Some(refused) => attempt.error(refused),
            None => attempt.follow(),
        }
    });
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(http.default_timeout_ms))
        .user_agent(concat!("stead/", env!("CARGO_PKG_VERSION")))
        .redirect(redirects)
        .dns_resolver(Arc::new(GuardedResolver {
            allow: allow.clone(),
        }))
        // A proxy would resolve and connect past the guard.
        .no_proxy()
        .build()
        .expect("building the HTTP client");
    let max_bytes = http.max_response_bytes;
    if handlers.get(HTTP_QUEUE).is_none() {
        handlers.register(HTTP_QUEUE, move |task: TaskContext| {
            let (client, allow) = (client.clone(), allow.clone());
            async move { http_step(&client, &allow, max_bytes, task).await }
        });
    }
    if handlers.get(ECHO_QUEUE).is_none() {
        handlers.register(
            ECHO_QUEUE,
            |task: TaskContext| async move { Ok(task.input) },
        );
    }
}

/// The guard's refusal of a URL whose host is an address (names are judged
/// by the resolver).
fn literal_refusal(allow: &HttpAllow, url: &reqwest::Url) -> Option<Refused> {
    let addr = match url.host()? {
        url::Host::Ipv4(v4) => IpAddr::V4(v4),
        url::Host::Ipv6(v6) => IpAddr::V6(v6),
        url::Host::Domain(_) => return None,
    };
    allow.check(url.host_str()?, addr).err()
}

/// Performs the request described by an `http` step's rendered input:
/// 2xx completes with the JSON body (or the text); 408, 429, 5xx and
/// network errors are retryable; any other status fails permanently.
async fn http_step(
    client: &reqwest::Client,
    allow: &HttpAllow,
    max_bytes: usize,
    task: TaskContext,
) -> Result<Value, TaskError> {
    let input = &task.input;
    let method = input["method"].as_str().unwrap_or("GET");
    let method = reqwest::Method::from_bytes(method.as_bytes())
        .map_err(|_| TaskError::permanent(format!("invalid HTTP method {method:?}")))?;
    let url = input["url"].as_str().unwrap_or_default();
    let url = reqwest::Url::parse(url)
        .map_err(|e| TaskError::permanent(format!("invalid URL {url:?}: {e}")))?;
    if let Some(refused) = literal_refusal(allow, &url) {
        return Err(TaskError::permanent(refused.to_string()));
    }
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
    let response = request.send().await.map_err(|e| match refusal_in(&e) {
        Some(refused) => TaskError::permanent(refused.to_string()),
        None => TaskError::retryable(format!("request failed: {}", Chain(&e))),
    })?;
    let status = response.status();
    let is_json = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    let bytes = read_capped(response, max_bytes).await?;
    let body = if is_json {
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

/// The response body, read only up to `max` bytes: a longer one fails the
/// step permanently (its length is known from the header or the reading).
async fn read_capped(mut response: reqwest::Response, max: usize) -> Result<Vec<u8>, TaskError> {
    let too_long = || {
        TaskError::permanent(format!(
            "limit: the response body is longer than {max} bytes (--http-max-response-bytes)"
        ))
    };
    if response.content_length().is_some_and(|n| n > max as u64) {
        return Err(too_long());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| TaskError::retryable(format!("reading the response failed: {}", Chain(&e))))?
    {
        if body.len() + chunk.len() > max {
            return Err(too_long());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
