//! `TestNode`: a stead node started in-process on port 0 against a `TestDb`,
//! with short intervals so tests run fast, plus small API helpers.

use std::time::Duration;

use serde_json::{json, Value};
use stead::{Config, Handlers};

use crate::harness::TestDb;

pub struct TestNode {
    pub url: String,
    pub http: reqwest::Client,
    node: Option<stead::Node>,
}

impl TestNode {
    /// A config for `db` with test-friendly intervals.
    pub fn config(db: &TestDb) -> Config {
        Self::config_for(&db.url, &db.name)
    }

    /// A config for the database at `url` with test-friendly intervals.
    pub fn config_for(url: &str, name: &str) -> Config {
        let mut config = Config::new(url.to_string());
        config.listen = "127.0.0.1:0".into();
        // Open: the tests of keys and roles turn keys on themselves.
        config.auth = stead::Auth::None;
        // The tests' HTTP servers listen on loopback.
        config.http_allow = vec!["127.0.0.0/8".into(), "::1".into()];
        config.name = format!("test-{name}");
        config.tuning.poll_interval_ms = 100;
        config.tuning.reap_interval_ms = 100;
        config.tuning.heartbeat_ms = 200;
        config.tuning.member_ttl_ms = 2_000;
        config.tuning.gauge_refresh_ms = 200;
        config.tuning.pool_size = 8;
        config.tuning.shutdown_timeout_ms = 5_000;
        config
    }

    pub async fn start(db: &TestDb) -> TestNode {
        Self::start_with(Self::config(db)).await
    }

    pub async fn start_with_handlers(db: &TestDb, handlers: Handlers) -> TestNode {
        let mut config = Self::config(db);
        config.handlers = handlers;
        Self::start_with(config).await
    }

    pub async fn start_with(config: Config) -> TestNode {
        let node = stead::start(config).await.expect("starting a test node");
        TestNode {
            url: node.api_url().expect("node serves the API"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(90))
                .build()
                .unwrap(),
            node: Some(node),
        }
    }

    /// A client of a node running elsewhere (a `stead serve` process) at
    /// `base_url`; `shutdown` leaves that node alone.
    pub fn remote(base_url: &str) -> TestNode {
        TestNode {
            url: base_url.to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(90))
                .build()
                .unwrap(),
            node: None,
        }
    }

    pub async fn shutdown(mut self) {
        if let Some(node) = self.node.take() {
            node.shutdown().await;
        }
    }

    /// Sends a request; returns (status, JSON body or the text as a string).
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_with_key(None, method, path, body).await
    }

    /// `call` with `key` as the bearer token.
    pub async fn call_with_key(
        &self,
        key: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Registers a definition; panics unless 200/201.
    pub async fn put_workflow(&self, name: &str, def: Value) -> Value {
        let (status, body) = self
            .call("PUT", &format!("/v1/workflows/{name}"), Some(def))
            .await;
        assert!(
            status == 200 || status == 201,
            "PUT workflow {name}: {status} {body}"
        );
        body
    }

    /// Starts an instance; returns its id.
    pub async fn start_instance(&self, workflow: &str, input: Value) -> String {
        let (status, body) = self
            .call(
                "POST",
                &format!("/v1/workflows/{workflow}/instances"),
                Some(json!({ "input": input })),
            )
            .await;
        assert_eq!(status, 201, "start {workflow}: {body}");
        body["id"].as_str().unwrap().to_string()
    }

    /// Waits (long-poll, up to 60 s) for the instance to end; returns it.
    pub async fn wait_ended(&self, id: &str) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = self
                .call("GET", &format!("/v1/instances/{id}?wait=10s"), None)
                .await;
            assert_eq!(status, 200, "GET instance {id}: {body}");
            if body["ended_at"].is_string() {
                return body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "instance {id} did not end within 60s: {body}"
            );
        }
    }

    /// Waits until the API shows step `step_id` of instance `id` in
    /// `status`; returns the instance. An in-process step runs inline
    /// before its start is committed, so its `running` state becomes
    /// visible only when the inline batch hands it over (within
    /// `--inline-budget-ms`), not the moment its handler is entered.
    pub async fn wait_step(&self, id: &str, step_id: &str, status: &str) -> Value {
        let what = format!("step {step_id} of {id} to be {status}");
        crate::wait_until(&what, Duration::from_secs(60), || async {
            let (code, body) = self.call("GET", &format!("/v1/instances/{id}"), None).await;
            let seen = body["steps"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["id"] == step_id))
                .map(|s| s["status"] == status);
            (code == 200 && seen == Some(true)).then_some(body)
        })
        .await
    }

    pub async fn history(&self, id: &str) -> Vec<Value> {
        let (status, body) = self
            .call("GET", &format!("/v1/instances/{id}/history"), None)
            .await;
        assert_eq!(status, 200, "history {id}: {body}");
        body["events"].as_array().unwrap().clone()
    }
}
