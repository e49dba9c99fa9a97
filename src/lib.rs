//! stead: a durable workflow engine whose only dependency is PostgreSQL.
//!
//! This library is what the `stead` binary runs, for embedding in a Rust
//! program: build a [`Config`], register in-process [`Handlers`] for your
//! task queues, and [`start`] a [`Node`] (or [`run`] one until a shutdown
//! future resolves). Workflows are registered and started over the node's
//! HTTP API (or from SQL); see the README for both. [`embedded`] runs a
//! private PostgreSQL from the machine's server binaries, as `stead dev`
//! and the tests do.
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use serde_json::json;
//! use stead::embedded::{Cluster, PgBinaries, RunAs};
//!
//! // A private PostgreSQL (run as the `postgres` user when we are root).
//! let dir = std::env::temp_dir().join(format!("stead-example-{}", std::process::id()));
//! let mut cluster = Cluster::init(&PgBinaries::find()?, &RunAs::detect()?, &dir)?;
//! let database_url = cluster.start_child().await?;
//!
//! // A node with one in-process handler, its API on a free port.
//! let mut config = stead::Config::new(database_url);
//! config.listen = "127.0.0.1:0".into();
//! // No API keys, for this example on loopback (the default needs keys).
//! config.auth = stead::Auth::None;
//! config.handlers.register("greetings", |task: stead::TaskContext| async move {
//!     // Side effects should use task.idempotency_key: attempts may repeat.
//!     Ok(json!({ "greeting": format!("hello {}", task.input["name"].as_str().unwrap_or("?")) }))
//! });
//! let node = stead::start(config).await?;
//! let api = node.api_url().expect("the node serves the API");
//!
//! // Register a workflow, start an instance and wait for its end.
//! let http = reqwest::Client::new();
//! let workflow = json!({"steps": [
//!     {"id": "greet", "task": {"queue": "greetings", "input": {"name": "${input.name}"}}}
//! ]});
//! http.put(format!("{api}/v1/workflows/greet")).json(&workflow).send().await?.error_for_status()?;
//! let start = json!({"id": "greet-1", "input": {"name": "world"}});
//! http.post(format!("{api}/v1/workflows/greet/instances")).json(&start).send().await?.error_for_status()?;
//! let instance: serde_json::Value = http
//!     .get(format!("{api}/v1/instances/greet-1?wait=30s"))
//!     .send().await?.json().await?;
//! assert_eq!(instance["status"], "completed");
//! assert_eq!(instance["output"]["greet"]["greeting"], "hello world");
//!
//! node.shutdown().await;
//! cluster.stop()?;
//! std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```
//!
//! See ARCHITECTURE.md for how it works inside.

#![warn(missing_docs)]

mod api;
pub mod auth;
mod config;
mod definition;
pub mod embedded;
mod engine;
mod error;
mod handlers;
pub mod keys;
mod membership;
mod metrics;
mod model;
mod node;
mod ring;
mod schedule;
mod service;
mod store;
#[cfg(test)]
mod testing;
mod wakeups;
mod worker;

pub use auth::{Auth, Role};
pub use config::{default_member_name, Config, Limits, Tuning, MIN_GAUGE_REFRESH_MS};
pub use error::{Chain, Error};
pub use handlers::{Handlers, TaskContext, TaskError};
pub use node::{run, start, Node};

/// Applies the migrations to `schema` of the database at `database_url`,
/// creating the schema (with `slot_count` slots) if it does not exist.
/// Concurrent migrators serialise on an advisory lock.
pub async fn migrate(database_url: &str, schema: &str, slot_count: u32) -> Result<(), Error> {
    let store = store::Store::new(store::StoreConfig {
        database_url: database_url.to_string(),
        direct_database_url: None,
        schema: schema.to_string(),
        pool_size: 1,
        pool_wait_timeout_ms: 10_000,
        statement_timeout_ms: 0,
        idle_in_transaction_timeout_ms: 0,
        application_name: "stead migrate".into(),
    })?;
    store
        .migrate(slot_count)
        .await
        .map_err(|e| Error::Migrate(Box::new(e)))
}

/// The schema version this build knows: the number of its last migration
/// (`GET /readyz` reports the database's).
pub fn schema_version() -> i32 {
    store::latest_migration_version()
}

/// Reads a retention such as `--retention`'s: `0` (keep for ever) or a
/// duration like `"7d"`, `"12h"` or `"1s"`, in milliseconds.
pub fn parse_retention(s: &str) -> Result<u64, String> {
    if s == "0" {
        return Ok(0);
    }
    definition::duration::parse_duration_ms(s)
}
