//! Integration tests: one binary, real PostgreSQL (started by the harness),
//! real nodes. One file per feature.

mod api_validation;
mod auth;
mod batch_start;
mod bench;
mod browser;
mod bulk;
mod cancel;
mod children;
mod console;
mod crash;
mod deadline;
mod dev;
mod fan_out;
mod fault;
mod fault_harness;
mod flow_control;
mod fuzz;
mod guarantees;
mod harness;
mod hold_server;
mod http_steps;
mod limits;
mod logs;
mod membership;
mod metrics;
mod node;
mod openapi;
mod overload;
mod pooler;
mod priorities;
mod prometheus;
mod queue;
mod retention;
mod retries;
mod retry_instance;
mod sagas;
mod schedules;
mod schema;
mod signals;
mod smoke;
mod sql_interface;
mod ssrf;
mod starts;
mod support;
mod timeouts;
mod timers;
mod tls;
mod unreadable;
mod workflows;

use serde_json::Value;

pub use harness::{wait_until, ServeProcess, TestDb};
pub use node::TestNode;

/// Pretty JSON for assertion messages.
pub fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}
