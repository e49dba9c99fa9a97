//! Integration tests: one binary, real PostgreSQL (started by the harness),
//! real nodes. One file per feature.

mod harness;
mod node;
mod smoke;

use serde_json::Value;

pub use harness::{wait_until, ServeProcess, TestDb};
pub use node::TestNode;

/// Pretty JSON for assertion messages.
pub fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}
