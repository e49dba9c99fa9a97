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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct InstanceState {
    pub id: String,
    pub status: InstanceStatus,
    pub input: Value,
    pub output: Option<Value>,
    pub error: Option<Value>,
    pub steps: Vec<StepState>,
}

/// What happened to an instance since the engine last looked at it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The instance was started (it is `pending`).
    Start,
    /// An attempt of a task or http step finished (or its lease expired).
    TaskFinished {
        step: usize,
        attempt: u32,
        result: TaskResult,
        started_at: Option<DateTime<Utc>>,
        worker: Option<String>,
    },
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
    /// Put an attempt of a step in the queue.
    EnqueueTask {
        step: usize,
        attempt: u32,
        kind: TaskKind,
        queue: String,
        input: Value,
        delay_ms: u64,
        timeout_ms: Option<u64>,
        idempotency_key: String,
    },
    /// The instance ended: remove every task it still has in the queue.
    WithdrawTasks,
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
}
