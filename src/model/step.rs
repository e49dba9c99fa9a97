//! The stored shape of one step of an instance: a row of `steps`, with the
//! `items` and `compensation` columns as typed JSON.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{Doc, StepStatus};

/// One step of an instance, index-aligned with `Definition::steps` inside
/// the engine.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StepState {
    pub status: StepStatus,
    /// The attempt currently scheduled or last run (0 = never scheduled).
    pub attempt: u32,
    /// Held as text, parsed when read (`Doc`): most of what an instance
    /// stores, and loaded with each of its decisions.
    pub input: Option<Doc>,
    pub output: Option<Doc>,
    pub error: Option<Value>,
    pub scheduled_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    /// When a waiting step must be looked at: a sleep's end, a signal
    /// step's timeout.
    pub wake_at: Option<DateTime<Utc>>,
    /// Order in which completed steps finished (for compensation).
    pub completion_order: Option<u32>,
    /// Per-item state of a `for_each` step (`steps.items`).
    pub items: Option<Vec<ItemState>>,
    /// State of the step's compensation, once it has begun
    /// (`steps.compensation`).
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
pub(crate) struct ItemState {
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

impl ItemState {
    /// An element not started yet.
    pub(crate) fn pending(input: Value) -> Self {
        ItemState {
            status: StepStatus::Pending,
            attempt: 0,
            input,
            output: None,
            error: None,
            started_at: None,
            ended_at: None,
        }
    }
}

/// The compensation of one completed step.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct CompensationState {
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
