//! The parsed, validated form of a workflow definition.
//!
//! `parse` (in `validate.rs`) turns the user's JSON document into these types
//! after checking everything; the engine only ever sees a `Definition` that
//! passed validation. Templates stay as `serde_json::Value` and are rendered
//! with `template::render` when a step is scheduled.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::model::StepKindName;

/// A whole workflow definition, validated.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Definition {
    pub name: String,
    pub steps: Vec<Step>,
    /// Template for the instance output; `None` means the instance output is
    /// an object of every step's output keyed by step id.
    pub output: Option<Value>,
    /// Workflow deadline, measured from the instance start.
    pub timeout_ms: Option<u64>,
    /// How long ended instances of this version are kept (`"retention"`);
    /// `None` takes the node's `--retention`, `Some(0)` keeps them for ever.
    pub retention_ms: Option<u64>,
    /// Workflow-level default retry policy (already merged over the built-in
    /// defaults). Each step's `retry` below is already merged over this one.
    pub retry: RetryPolicy,
    /// At most `limit` instances with the same rendered key run at once
    /// (`"concurrency"`).
    pub concurrency: Option<Concurrency>,
}

/// A per-key concurrency limit.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Concurrency {
    /// A template over `input` and `instance.id`, rendered as text.
    pub key: Value,
    pub limit: u32,
}

impl Concurrency {
    /// The key of an instance with this input.
    pub(crate) fn key_of(&self, input: &Value, instance_id: &str) -> String {
        use crate::definition::template::{as_text, render, Scope};
        let no_steps = |_: &str| None;
        let scope = Scope {
            input,
            instance_id,
            step_outputs: &no_steps,
            item: None,
            index: None,
        };
        as_text(&render(&self.key, &scope))
    }
}

impl Definition {
    pub(crate) fn step_index(&self, id: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.id == id)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Step {
    pub id: String,
    pub kind: StepKind,
    /// Indices into `Definition::steps` of the steps that must finish first,
    /// already resolved from the `needs` ids (or the implicit previous step).
    pub needs: Vec<usize>,
    /// `when` template; `None` means always run.
    pub when: Option<Value>,
    /// Effective policy: step `retry` fields over the workflow default over
    /// the built-in defaults.
    pub retry: RetryPolicy,
    /// Per-attempt timeout.
    pub timeout_ms: Option<u64>,
    pub compensate: Option<Compensation>,
    pub on_failure: OnFailure,
    pub for_each: Option<ForEach>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StepKind {
    /// Work for a named queue; `input` is a template (absent = null).
    Task { queue: String, input: Option<Value> },
    /// stead itself calls a URL.
    Http(HttpCall),
    /// A durable timer.
    Sleep(SleepSpec),
    /// Wait for a named signal; output is its payload.
    Signal {
        name: String,
        timeout_ms: Option<u64>,
    },
    /// Evaluate a template inline.
    Value(Value),
    /// Start a child workflow; `input` is a template (absent = null).
    Workflow {
        name: String,
        version: Option<i32>,
        input: Option<Value>,
    },
}

impl StepKind {
    /// The kind as the definition names it (and `steps.kind` stores it).
    pub(crate) fn kind_name(&self) -> StepKindName {
        match self {
            StepKind::Task { .. } => StepKindName::Task,
            StepKind::Http(_) => StepKindName::Http,
            StepKind::Sleep(_) => StepKindName::Sleep,
            StepKind::Signal { .. } => StepKindName::Signal,
            StepKind::Value(_) => StepKindName::Value,
            StepKind::Workflow { .. } => StepKindName::Workflow,
        }
    }

    /// The kind's name as it appears in the JSON document.
    pub(crate) fn name(&self) -> &'static str {
        self.kind_name().as_str()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HttpCall {
    /// Upper-case HTTP method (GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS).
    pub method: String,
    /// Template that must render to a string URL.
    pub url: Value,
    /// Header name → template (rendered to text).
    pub headers: BTreeMap<String, Value>,
    /// Body template; `None` sends no body.
    pub body: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SleepSpec {
    Duration {
        ms: u64,
    },
    /// Template that must render to an RFC 3339 timestamp.
    Until(Value),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Compensation {
    pub action: CompensationAction,
    /// The compensation's own retry policy (its `retry` over the workflow default).
    pub retry: RetryPolicy,
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum CompensationAction {
    Http(HttpCall),
    Task { queue: String, input: Option<Value> },
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ForEach {
    /// Template that must render to an array.
    pub items: Value,
    /// At most this many items run at once; `None` = no limit.
    pub max_parallel: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_interval_ms: u64,
    pub multiplier: f64,
    pub max_interval_ms: u64,
    pub jitter: bool,
}

impl Default for RetryPolicy {
    /// The contract's defaults: 3 attempts, 1s initial, x2, 5m max, jitter on.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_interval_ms: 1_000,
            multiplier: 2.0,
            max_interval_ms: 300_000,
            jitter: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum OnFailure {
    #[default]
    Fail,
    Continue,
}

/// One problem found in a definition, with the JSON path of the offending
/// value, e.g. `$.steps[2].retry.max_attempts`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Problem {
    pub path: String,
    pub message: String,
}

/// Limits applied while validating (configurable by the operator).
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub max_steps: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_steps: 1000 }
    }
}
