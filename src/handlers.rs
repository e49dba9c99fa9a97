//! In-process task handlers: the library API for running `task` steps inside
//! a stead process instead of an external worker.
//!
//! ```no_run
//! let mut handlers = stead::Handlers::default();
//! handlers.register("emails", |task: stead::TaskContext| async move {
//!     // send the e-mail, using task.idempotency_key to avoid duplicates
//!     Ok(serde_json::json!({ "sent": true, "to": task.input["to"] }))
//! });
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::Value;

use crate::model::TaskFailure;

/// What a handler gets for one attempt of a task.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// The task row (`stead.tasks.id`); 0 for an attempt run inline,
    /// which has no row (see the README's "Inline execution").
    pub task_id: i64,
    /// The queue the task was claimed from.
    pub queue: String,
    /// The instance whose step this is.
    pub instance_id: String,
    /// The step (its `id` in the definition).
    pub step_id: String,
    /// 1 for the first attempt, then 2, 3, ... on retries (an inline
    /// attempt lost with a crashed worker runs again under its number).
    pub attempt: u32,
    /// Stable across retries of the step: use it to make side effects
    /// exactly-once.
    pub idempotency_key: String,
    /// The step's rendered `input` (null without one).
    pub input: Value,
}

/// Why an attempt failed. Whether to retry is decided by the variant.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TaskError {
    /// Worth another attempt (subject to the step's retry policy).
    #[error("{message}")]
    Retryable {
        /// What went wrong, for people.
        message: String,
        /// Anything structured to keep with it.
        details: Option<Value>,
    },
    /// Retrying cannot help: the step fails now.
    #[error("{message}")]
    Permanent {
        /// What went wrong, for people.
        message: String,
        /// Anything structured to keep with it.
        details: Option<Value>,
    },
}

impl TaskError {
    /// A retryable failure without details.
    pub fn retryable(message: impl Into<String>) -> Self {
        TaskError::Retryable {
            message: message.into(),
            details: None,
        }
    }

    /// A permanent failure without details.
    pub fn permanent(message: impl Into<String>) -> Self {
        TaskError::Permanent {
            message: message.into(),
            details: None,
        }
    }

    /// The failure recorded for the attempt.
    pub(crate) fn into_failure(self) -> TaskFailure {
        match self {
            TaskError::Retryable { message, details } => TaskFailure::new(message, true, details),
            TaskError::Permanent { message, details } => TaskFailure::new(message, false, details),
        }
    }
}

/// A registered handler: called once per attempt.
pub(crate) type HandlerFn =
    Arc<dyn Fn(TaskContext) -> BoxFuture<'static, Result<Value, TaskError>> + Send + Sync>;

/// The in-process handlers of a node, by queue name.
#[derive(Clone, Default)]
pub struct Handlers {
    by_queue: HashMap<String, HandlerFn>,
}

impl std::fmt::Debug for Handlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_queue.keys()).finish()
    }
}

impl Handlers {
    /// Runs `handler` for every task of `queue` claimed by this node.
    pub fn register<F, Fut>(&mut self, queue: &str, handler: F) -> &mut Self
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, TaskError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.by_queue.insert(
            queue.to_string(),
            Arc::new(move |ctx| {
                let handler = handler.clone();
                Box::pin(async move { handler(ctx).await })
            }),
        );
        self
    }

    pub(crate) fn get(&self, queue: &str) -> Option<&HandlerFn> {
        self.by_queue.get(queue)
    }

    /// The queues with a handler, sorted.
    pub fn queues(&self) -> Vec<String> {
        let mut q: Vec<String> = self.by_queue.keys().cloned().collect();
        q.sort();
        q
    }

    /// Whether no handler is registered.
    pub fn is_empty(&self) -> bool {
        self.by_queue.is_empty()
    }
}
