//! The engine's view of an instance: plain data, loaded and saved by the
//! driver, changed only by `decide`.

use chrono::{DateTime, Utc};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceStatus {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl InstanceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Pending => "pending",
            InstanceStatus::Running => "running",
            InstanceStatus::Completed => "completed",
            InstanceStatus::Failed => "failed",
            InstanceStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => InstanceStatus::Pending,
            "running" => InstanceStatus::Running,
            "completed" => InstanceStatus::Completed,
            "failed" => InstanceStatus::Failed,
            "cancelled" => InstanceStatus::Cancelled,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            InstanceStatus::Completed | InstanceStatus::Failed | InstanceStatus::Cancelled
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    Pending,
    Scheduled,
    Running,
    Waiting,
    Completed,
    Failed,
    Skipped,
    Cancelled,
    Compensated,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Scheduled => "scheduled",
            StepStatus::Running => "running",
            StepStatus::Waiting => "waiting",
            StepStatus::Completed => "completed",
            StepStatus::Failed => "failed",
            StepStatus::Skipped => "skipped",
            StepStatus::Cancelled => "cancelled",
            StepStatus::Compensated => "compensated",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => StepStatus::Pending,
            "scheduled" => StepStatus::Scheduled,
            "running" => StepStatus::Running,
            "waiting" => StepStatus::Waiting,
            "completed" => StepStatus::Completed,
            "failed" => StepStatus::Failed,
            "skipped" => StepStatus::Skipped,
            "cancelled" => StepStatus::Cancelled,
            "compensated" => StepStatus::Compensated,
            _ => return None,
        })
    }

    /// Still able to produce a result.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            StepStatus::Scheduled | StepStatus::Running | StepStatus::Waiting
        )
    }
}

/// One step of an instance, index-aligned with `Definition::steps`.
#[derive(Debug, Clone, PartialEq)]
pub struct StepState {
    pub status: StepStatus,
    /// The attempt currently scheduled or last run (0 = never scheduled).
    pub attempt: u32,
    pub input: Option<Value>,
    pub output: Option<Value>,
    pub error: Option<Value>,
    pub scheduled_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    /// When a waiting step must be looked at: a sleep's end, a signal
    /// step's timeout.
    pub wake_at: Option<DateTime<Utc>>,
    /// Order in which completed steps finished (for compensation).
    pub completion_order: Option<u32>,
    /// Per-item state of a `for_each` step.
    pub items: Option<Vec<ItemState>>,
    /// State of the step's compensation, once it has begun.
    pub compensation: Option<CompensationState>,
}

impl Default for StepState {
    fn default() -> Self {
        StepState {
            status: StepStatus::Pending,
            attempt: 0,
            input: None,
            output: None,
            error: None,
            scheduled_at: None,
            started_at: None,
            ended_at: None,
            wake_at: None,
            completion_order: None,
            items: None,
            compensation: None,
        }
    }
}

/// One element of a `for_each` step.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ItemState {
    pub status: StepStatus,
    pub attempt: u32,
    #[serde(default)]
    pub input: Value,
    #[serde(default)]
    pub output: Option<Value>,
    #[serde(default)]
    pub error: Option<Value>,
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub ended_at: Option<DateTime<Utc>>,
}

/// The compensation of one completed step.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CompensationState {
    /// scheduled, completed or failed.
    pub status: StepStatus,
    pub attempt: u32,
    #[serde(default)]
    pub input: Value,
    #[serde(default)]
    pub output: Option<Value>,
    #[serde(default)]
    pub error: Option<Value>,
}

/// How an instance that is winding down will end, once its compensations
/// have run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Failed,
    Cancelled,
}

impl Ending {
    pub fn as_str(self) -> &'static str {
        match self {
            Ending::Failed => "failed",
            Ending::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "failed" => Some(Ending::Failed),
            "cancelled" => Some(Ending::Cancelled),
            _ => None,
        }
    }
}

/// A signal delivered to the instance and not consumed yet.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingSignal {
    pub id: i64,
    pub name: String,
    pub payload: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InstanceState {
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
}

impl InstanceState {
    /// A fresh instance of a definition with `step_count` steps.
    pub fn new(id: &str, input: Value, step_count: usize) -> Self {
        InstanceState {
            id: id.to_string(),
            status: InstanceStatus::Pending,
            input,
            output: None,
            error: None,
            steps: vec![StepState::default(); step_count],
            ending: None,
            deadline_at: None,
        }
    }
}

/// What happened to an instance since the engine last looked at it. (Timers
/// need no event: every decision compares them with `Context::now`.)
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
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

/// Why a task row exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskPurpose {
    /// An attempt of the step itself (a child workflow for `workflow` steps).
    Run,
    /// An attempt of the step's compensation.
    Compensate,
}

impl TaskPurpose {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskPurpose::Run => "run",
            TaskPurpose::Compensate => "compensate",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "run" => Some(TaskPurpose::Run),
            "compensate" => Some(TaskPurpose::Compensate),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum TaskResult {
    Completed(Value),
    Failed {
        message: String,
        retryable: bool,
        details: Option<Value>,
    },
}

/// Where a queued task is executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    Task,
    Http,
}

impl TaskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Task => "task",
            TaskKind::Http => "http",
        }
    }
}

/// Side effects the driver must carry out, in the same transaction as the
/// new state.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Put an attempt of a step (or of its compensation) in the queue.
    EnqueueTask {
        step: usize,
        item: Option<u32>,
        purpose: TaskPurpose,
        attempt: u32,
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
pub struct HistoryEntry {
    pub kind: &'static str,
    pub step_id: Option<String>,
    pub attempt: Option<u32>,
    pub data: Value,
}

/// The outcome of `decide`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Decision {
    pub commands: Vec<Command>,
    pub history: Vec<HistoryEntry>,
    /// Indices of the steps whose state changed (the driver saves only these).
    pub changed_steps: Vec<usize>,
    /// When the engine must look at the instance again without any event
    /// (the earliest timer or the deadline); `None` = only on events.
    pub wake_at: Option<DateTime<Utc>>,
}
