//! stead: a durable workflow engine whose only dependency is PostgreSQL.
//!
//! `run(config, shutdown)` is the single entry point: it migrates, starts the
//! API and the workers, and stops them all when `shutdown` resolves. `start`
//! does the same but hands back a `Node` (tests use it to learn the port).
//! See ARCHITECTURE.md for the map.

pub mod api;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod definition;
pub mod dev;
pub mod embedded;
pub mod engine;
pub mod handlers;
pub mod membership;
pub mod metrics;
mod node;
pub mod ring;
pub mod store;
pub mod worker;

pub use config::Config;
pub use handlers::{Handlers, TaskContext, TaskError};
pub use node::{run, start, Node};
