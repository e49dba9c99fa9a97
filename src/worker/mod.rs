//! A worker's background services: the engine driver (`advancer`), the
//! in-process task executor with its built-in handlers, the lease reaper, retention,
//! the LISTEN session (`listener`) and the coalescing notifier. Each is a
//! `service::Service`, run by `service::run`.

pub(crate) mod advancer;
pub(crate) mod builtin;
pub(crate) mod controls;
mod definitions;
pub(crate) mod executor;
mod http_guard;
pub(crate) mod listener;
pub(crate) mod notifier;
pub(crate) mod reaper;
pub(crate) mod retention;
pub(crate) mod scheduler;

pub(crate) use definitions::DefinitionCache;
pub(crate) use http_guard::HttpAllow;
