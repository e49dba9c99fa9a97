//! A small HTTP client of the stead API, used by the client subcommands and
//! by `stead bench`.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};

#[derive(Clone)]
pub struct ApiClient {
    base: String,
    http: reqwest::Client,
}

impl ApiClient {
    pub fn new(base: &str) -> anyhow::Result<Self> {
        Self::with_key(base, None)
    }

    /// The client of `--server` with `--api-key`.
    pub fn from_args(server: &super::options::ServerArgs) -> anyhow::Result<Self> {
        Self::with_key(&server.server, server.api_key.as_deref())
    }

    pub fn with_key(base: &str, api_key: Option<&str>) -> anyhow::Result<Self> {
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            bail!("--server must be an http:// or https:// URL, got {base:?}");
        }
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(key) = api_key {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| anyhow!("--api-key holds characters a header cannot carry"))?;
            // Kept out of debug output.
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .pool_max_idle_per_host(256)
            .default_headers(headers)
            .build()?;
        Ok(ApiClient { base, http })
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<(u16, Value)> {
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the stead API at {}", self.base))?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, body))
    }

    /// Sends and turns a problem document into an error that shows it.
    async fn ok(&self, request: reqwest::RequestBuilder) -> anyhow::Result<(u16, Value)> {
        let (status, body) = self.send(request).await?;
        if status >= 400 {
            return Err(anyhow!(describe_problem(status, &body)));
        }
        Ok((status, body))
    }

    pub async fn put_workflow(
        &self,
        name: &str,
        definition: &Value,
    ) -> anyhow::Result<(u16, Value)> {
        self.ok(self
            .http
            .put(format!("{}/v1/workflows/{name}", self.base))
            .json(definition))
            .await
    }

    pub async fn list_workflows(&self) -> anyhow::Result<Value> {
        Ok(self
            .ok(self.http.get(format!("{}/v1/workflows", self.base)))
            .await?
            .1)
    }

    pub async fn start(
        &self,
        workflow: &str,
        input: &Value,
        id: Option<&str>,
        version: Option<i32>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut body = json!({ "input": input });
        if let Some(id) = id {
            body["id"] = json!(id);
        }
        if let Some(v) = version {
            body["version"] = json!(v);
        }
        self.ok(self
            .http
            .post(format!("{}/v1/workflows/{workflow}/instances", self.base))
            .json(&body))
            .await
    }

    /// `POST .../instances/batch` with `items` (`{input, id?}` each).
    pub async fn start_batch(
        &self,
        workflow: &str,
        items: &[Value],
        version: Option<i32>,
    ) -> anyhow::Result<Value> {
        let mut body = json!({ "items": items });
        if let Some(v) = version {
            body["version"] = json!(v);
        }
        let url = format!("{}/v1/workflows/{workflow}/instances/batch", self.base);
        Ok(self.ok(self.http.post(url).json(&body)).await?.1)
    }

    pub async fn instance(&self, id: &str, wait: Option<&str>) -> anyhow::Result<Value> {
        let mut url = format!("{}/v1/instances/{id}", self.base);
        if let Some(w) = wait {
            url.push_str(&format!("?wait={w}"));
        }
        Ok(self.ok(self.http.get(url)).await?.1)
    }

    pub async fn list(&self, query: &[(&str, String)]) -> anyhow::Result<Value> {
        Ok(self
            .ok(self
                .http
                .get(format!("{}/v1/instances", self.base))
                .query(query))
            .await?
            .1)
    }

    pub async fn cluster(&self) -> anyhow::Result<Value> {
        let url = format!("{}/v1/cluster", self.base);
        Ok(self.ok(self.http.get(url)).await?.1)
    }

    pub async fn history(&self, id: &str) -> anyhow::Result<Value> {
        Ok(self
            .ok(self
                .http
                .get(format!("{}/v1/instances/{id}/history", self.base)))
            .await?
            .1)
    }
}

impl ApiClient {
    pub async fn signal(&self, id: &str, name: &str, payload: &Value) -> anyhow::Result<Value> {
        let url = format!("{}/v1/instances/{id}/signals/{name}", self.base);
        Ok(self.ok(self.http.post(url).json(payload)).await?.1)
    }

    pub async fn cancel(&self, id: &str, reason: Option<&str>) -> anyhow::Result<Value> {
        let url = format!("{}/v1/instances/{id}/cancel", self.base);
        Ok(self
            .ok(self.http.post(url).json(&json!({ "reason": reason })))
            .await?
            .1)
    }

    pub async fn retry(&self, id: &str) -> anyhow::Result<Value> {
        let url = format!("{}/v1/instances/{id}/retry", self.base);
        Ok(self.ok(self.http.post(url)).await?.1)
    }
}

/// Calls by path, for the commands that only relay a body (schedules,
/// queues, bulk actions).
impl ApiClient {
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        Ok(self.ok(self.http.get(url)).await?.1)
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        Ok(self.ok(self.http.put(url).json(body)).await?.1)
    }

    pub async fn post_json(&self, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let request = self.http.post(url);
        let request = match body {
            Some(body) => request.json(body),
            None => request,
        };
        Ok(self.ok(request).await?.1)
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        let url = format!("{}{path}", self.base);
        self.ok(self.http.delete(url)).await?;
        Ok(())
    }
}

/// A readable rendering of a problem document.
pub fn describe_problem(status: u16, body: &Value) -> String {
    let mut out = format!(
        "HTTP {status}: {}",
        body.get("title")
            .and_then(Value::as_str)
            .unwrap_or("request failed")
    );
    if let Some(detail) = body.get("detail").and_then(Value::as_str) {
        out.push_str(&format!(": {detail}"));
    } else if let Value::String(s) = body {
        out.push_str(&format!(": {s}"));
    }
    if let Some(errors) = body.get("errors").and_then(Value::as_array) {
        for e in errors {
            out.push_str(&format!(
                "\n  {}: {}",
                e["path"].as_str().unwrap_or("?"),
                e["message"].as_str().unwrap_or("?")
            ));
        }
    }
    out
}
