//! The engine's view of an instance and what it says back: plain data,
//! loaded and saved by the driver, changed only by `decide`.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::model::{
    Ending, EventType, InstanceStatus, StepState, TaskKind, TaskPurpose, TaskResult,
};

/// A signal delivered to the instance and not consumed yet.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PendingSignal {
    pub id: i64,
    pub name: String,
    pub payload: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct InstanceState {
    pub id: String,
    pub status: InstanceStatus,
    pub input: Value,
    pub output: Option<Value>,
    pub error: Option<Value>,
    pub steps: Vec<StepState>,
    /// Set while the instance winds down (compensations run) towards its end.
    pub ending: Option<Ending>,
    /// The workflow deadline, set when the instance starts.
    pub deadline_at: Option<DateTime<Utc>>,
    /// What the steps store, in bytes of JSON text (`stored_bytes`): kept
    /// by the engine as it admits inputs and outputs, checked against
    /// `max_instance_bytes`.
    pub stored_bytes: u64,
    /// History events recorded so far (before this decision's).
    pub recorded_events: u32,
}

impl InstanceState {
    /// A fresh instance of a definition with `step_count` steps.
    pub(crate) fn new(id: &str, input: Value, step_count: usize) -> Self {
        InstanceState {
            id: id.to_string(),
            status: InstanceStatus::Pending,
            input,
            output: None,
            error: None,
            steps: vec![StepState::default(); step_count],
            ending: None,
            deadline_at: None,
            stored_bytes: 0,
            recorded_events: 0,
        }
    }
}

/// What happened to an instance since the engine last looked at it. (Timers
/// need no event: every decision compares them with `Context::now`.)
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    /// The instance was started (it is `pending`).
    Start,
    /// An attempt of a task, http, child-workflow or compensation finished
    /// (or its lease expired).
    TaskFinished {
        step: usize,
        /// The `for_each` element, if any.
        item: Option<u32>,
        purpose: TaskPurpose,
        attempt: u32,
        result: TaskResult,
        started_at: Option<DateTime<Utc>>,
        worker: Option<String>,
    },
    /// A signal is waiting to be consumed.
    Signal(PendingSignal),
    /// Someone asked to cancel the instance.
    CancelRequested { reason: String },
    /// Someone asked to retry the failed instance from its failed steps.
    RetryRequested,
}

/// Side effects the driver must carry out, in the same transaction as the
/// new state.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Command {
    /// Put an attempt of a step (or of its compensation) in the queue.
    EnqueueTask {
        step: usize,
        item: Option<u32>,
        purpose: TaskPurpose,
        attempt: u32,
        /// `Task` or `Http`: children are started with `StartChild`.
        kind: TaskKind,
        queue: String,
        input: Value,
        delay_ms: u64,
        timeout_ms: Option<u64>,
        idempotency_key: String,
    },
    /// Start a child workflow instance for a `workflow` step; its end is
    /// reported back like a task result.
    StartChild {
        step: usize,
        item: Option<u32>,
        child_id: String,
        workflow: String,
        version: Option<i32>,
        input: Value,
    },
    /// The instance is winding down: remove every task of its steps from the
    /// queue (this runs before the decision's new tasks are inserted).
    WithdrawTasks,
    /// Cancel every child workflow still running.
    CancelChildren,
    /// The signal was consumed by a step.
    ConsumeSignal { id: i64, step: usize },
}

/// One entry for the instance's append-only history.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HistoryEntry {
    pub kind: EventType,
    pub step_id: Option<String>,
    pub attempt: Option<u32>,
    pub data: Value,
}

/// The outcome of `decide`.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Decision {
    pub commands: Vec<Command>,
    pub history: Vec<HistoryEntry>,
    /// Indices of the steps whose state changed (the driver saves only these).
    pub changed_steps: Vec<usize>,
    /// When the engine must look at the instance again without any event
    /// (the earliest timer or the deadline, or now if it spent its byte
    /// budget); `None` = only on events.
    pub wake_at: Option<DateTime<Utc>>,
    /// Bytes the decision added to what the instance stores.
    pub added_bytes: u64,
    /// The decision spent its byte budget with steps left to start:
    /// `wake_at` is now, and the driver may put the instance behind the
    /// others due.
    pub paused: bool,
}
