//! The engine's decision core: `decide(definition, state, events)` returns the
//! new state and the commands to carry out. It does no IO and reads no clock
//! or random source of its own: time and jitter come in through `Context`, so
//! every decision is reproducible in a unit test.

mod state;

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};

use crate::definition::template::{self, Scope};
use crate::definition::{Definition, OnFailure, RetryPolicy, StepKind};

pub use state::*;

/// The internal queue that holds `http` steps, executed by stead itself.
pub const HTTP_QUEUE: &str = "stead.http";

/// What the engine needs from the outside world for one decision.
pub struct Context<'a> {
    pub now: DateTime<Utc>,
    /// Returns a uniformly distributed number in [0, 1) for retry jitter.
    pub random: &'a mut dyn FnMut() -> f64,
}

/// Applies `events` to `state` and decides what happens next.
pub fn decide(
    def: &Definition,
    state: &mut InstanceState,
    events: &[Event],
    ctx: &mut Context<'_>,
) -> Decision {
    let mut run = Run {
        def,
        state,
        ctx,
        decision: Decision::default(),
        changed: BTreeSet::new(),
    };
    if run.state.steps.len() != def.steps.len() {
        run.state
            .steps
            .resize(def.steps.len(), StepState::default());
    }
    for event in events {
        run.apply(event);
    }
    if run.state.status == InstanceStatus::Running {
        run.advance();
    }
    let mut decision = run.decision;
    decision.changed_steps = run.changed.into_iter().collect();
    decision
}

/// The retry delay before attempt `attempt + 1`, after attempt `attempt`
/// (1-based) failed. `random` is in [0, 1); with jitter the delay is spread
/// over ±20% and never exceeds `max_interval_ms`.
pub fn backoff_ms(policy: &RetryPolicy, attempt: u32, random: f64) -> u64 {
    let exponent = attempt.saturating_sub(1).min(64) as i32;
    let base = policy.initial_interval_ms as f64 * policy.multiplier.powi(exponent);
    let capped = base.min(policy.max_interval_ms as f64);
    let jittered = if policy.jitter {
        capped * (0.8 + 0.4 * random.clamp(0.0, 1.0))
    } else {
        capped
    };
    jittered.min(policy.max_interval_ms as f64).max(0.0) as u64
}

struct Run<'d, 's, 'c, 'r> {
    def: &'d Definition,
    state: &'s mut InstanceState,
    ctx: &'c mut Context<'r>,
    decision: Decision,
    changed: BTreeSet<usize>,
}

impl Run<'_, '_, '_, '_> {
    fn record(
        &mut self,
        kind: &'static str,
        step: Option<usize>,
        attempt: Option<u32>,
        data: Value,
    ) {
        let step_id = step.map(|i| self.def.steps[i].id.clone());
        self.decision.history.push(HistoryEntry {
            kind,
            step_id,
            attempt,
            data,
        });
    }

    fn apply(&mut self, event: &Event) {
        match event {
            Event::Start => {
                if self.state.status == InstanceStatus::Pending {
                    self.state.status = InstanceStatus::Running;
                    let input = self.state.input.clone();
                    self.record("instance_started", None, None, json!({ "input": input }));
                }
            }
            Event::TaskFinished {
                step,
                attempt,
                result,
                started_at,
                worker,
            } => self.apply_task_result(*step, *attempt, result, *started_at, worker.as_deref()),
        }
    }

    fn apply_task_result(
        &mut self,
        index: usize,
        attempt: u32,
        result: &TaskResult,
        started_at: Option<DateTime<Utc>>,
        worker: Option<&str>,
    ) {
        if self.state.status != InstanceStatus::Running || index >= self.state.steps.len() {
            return;
        }
        let step_state = &self.state.steps[index];
        // A result for an attempt the engine no longer waits for is stale:
        // it was recorded already or superseded. Recording it again would
        // break "each step's result is recorded exactly once".
        if !step_state.status.is_active() || step_state.attempt != attempt {
            return;
        }
        let now = self.ctx.now;
        let step_def = &self.def.steps[index];
        self.changed.insert(index);
        match result {
            TaskResult::Completed(output) => {
                let s = &mut self.state.steps[index];
                s.status = StepStatus::Completed;
                s.output = Some(output.clone());
                s.error = None;
                s.started_at = started_at.or(s.started_at);
                s.ended_at = Some(now);
                self.record(
                    "step_completed",
                    Some(index),
                    Some(attempt),
                    json!({ "output": output, "worker": worker, "started_at": started_at }),
                );
            }
            TaskResult::Failed {
                message,
                retryable,
                details,
            } => {
                let mut error =
                    json!({ "message": message, "retryable": retryable, "attempt": attempt });
                if let Some(details) = details {
                    error["details"] = details.clone();
                }
                let policy = step_def.retry;
                if *retryable && attempt < policy.max_attempts {
                    let delay_ms = backoff_ms(&policy, attempt, (self.ctx.random)());
                    let s = &mut self.state.steps[index];
                    s.error = Some(error.clone());
                    s.attempt = attempt + 1;
                    s.status = StepStatus::Scheduled;
                    s.started_at = None;
                    self.record(
                        "step_attempt_failed",
                        Some(index),
                        Some(attempt),
                        json!({ "error": error, "retry_in_ms": delay_ms, "worker": worker }),
                    );
                    let input = self.state.steps[index].input.clone().unwrap_or(Value::Null);
                    self.enqueue(index, attempt + 1, input, delay_ms);
                } else {
                    self.fail_step(index, attempt, error, started_at);
                }
            }
        }
    }

    /// A step failed for good: the workflow goes on (`on_failure:
    /// continue`) with the error as the step's output, or the instance fails.
    fn fail_step(
        &mut self,
        index: usize,
        attempt: u32,
        error: Value,
        started_at: Option<DateTime<Utc>>,
    ) {
        let now = self.ctx.now;
        let step_def = &self.def.steps[index];
        let continue_on_failure = step_def.on_failure == OnFailure::Continue;
        let s = &mut self.state.steps[index];
        s.status = StepStatus::Failed;
        s.error = Some(error.clone());
        s.started_at = started_at.or(s.started_at);
        s.ended_at = Some(now);
        if continue_on_failure {
            s.output = Some(error.clone());
        }
        self.changed.insert(index);
        self.record(
            "step_failed",
            Some(index),
            Some(attempt),
            json!({ "error": error, "continue": continue_on_failure }),
        );
        if !continue_on_failure {
            let step_id = step_def.id.clone();
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("step failed")
                .to_string();
            self.fail_instance(json!({
                "message": format!("step {step_id} failed: {message}"),
                "step": step_id,
                "error": error,
            }));
        }
    }

    fn fail_instance(&mut self, error: Value) {
        // Parallel branches still in flight will never report: their tasks
        // are withdrawn below, so their steps end `cancelled`.
        let now = self.ctx.now;
        for i in 0..self.state.steps.len() {
            if self.state.steps[i].status.is_active() {
                let s = &mut self.state.steps[i];
                s.status = StepStatus::Cancelled;
                s.ended_at = Some(now);
                self.changed.insert(i);
            }
        }
        self.state.status = InstanceStatus::Failed;
        self.state.error = Some(error.clone());
        self.record("instance_failed", None, None, json!({ "error": error }));
        self.decision.commands.push(Command::WithdrawTasks);
    }

    /// A step has finished when a dependent may run.
    fn finished(&self, index: usize) -> bool {
        let s = &self.state.steps[index];
        match s.status {
            StepStatus::Completed | StepStatus::Skipped => true,
            StepStatus::Failed => self.def.steps[index].on_failure == OnFailure::Continue,
            _ => false,
        }
    }

    /// Starts every step whose needs are met, repeatedly, because inline
    /// steps (`value`, skipped ones) can unblock others in the same decision.
    fn advance(&mut self) {
        loop {
            let mut progressed = false;
            for index in 0..self.def.steps.len() {
                if self.state.status != InstanceStatus::Running {
                    return;
                }
                if self.state.steps[index].status != StepStatus::Pending {
                    continue;
                }
                if !self.def.steps[index]
                    .needs
                    .iter()
                    .all(|&n| self.finished(n))
                {
                    continue;
                }
                self.start_step(index);
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        if self.state.status == InstanceStatus::Running
            && (0..self.def.steps.len()).all(|i| self.finished(i))
        {
            self.complete_instance();
        }
    }

    fn outputs(&self) -> HashMap<String, Value> {
        self.def
            .steps
            .iter()
            .zip(&self.state.steps)
            .filter(|(_, s)| {
                matches!(
                    s.status,
                    StepStatus::Completed | StepStatus::Skipped | StepStatus::Failed
                )
            })
            .map(|(d, s)| (d.id.clone(), s.output.clone().unwrap_or(Value::Null)))
            .collect()
    }

    fn render(&self, template: &Value, outputs: &HashMap<String, Value>) -> Value {
        let lookup = |id: &str| outputs.get(id);
        let scope = Scope {
            input: &self.state.input,
            instance_id: &self.state.id,
            step_outputs: &lookup,
            item: None,
            index: None,
        };
        template::render(template, &scope)
    }

    fn start_step(&mut self, index: usize) {
        let now = self.ctx.now;
        let step_def = &self.def.steps[index];
        let outputs = self.outputs();
        self.changed.insert(index);
        if let Some(when) = &step_def.when {
            let verdict = self.render(when, &outputs);
            if template::is_falsy(&verdict) {
                let s = &mut self.state.steps[index];
                s.status = StepStatus::Skipped;
                s.output = Some(Value::Null);
                s.ended_at = Some(now);
                self.record(
                    "step_skipped",
                    Some(index),
                    None,
                    json!({ "when": verdict }),
                );
                return;
            }
        }
        if step_def.for_each.is_some() {
            self.unsupported(index, "for_each");
            return;
        }
        match &step_def.kind {
            StepKind::Value(template) => {
                let output = self.render(template, &outputs);
                let s = &mut self.state.steps[index];
                s.status = StepStatus::Completed;
                s.attempt = 1;
                s.output = Some(output.clone());
                s.scheduled_at = Some(now);
                s.started_at = Some(now);
                s.ended_at = Some(now);
                self.record(
                    "step_completed",
                    Some(index),
                    Some(1),
                    json!({ "output": output }),
                );
            }
            StepKind::Task { input, .. } => {
                let input = input
                    .as_ref()
                    .map(|t| self.render(t, &outputs))
                    .unwrap_or(Value::Null);
                self.schedule(index, input);
            }
            StepKind::Http(call) => {
                let mut headers = Map::new();
                for (name, value) in &call.headers {
                    let rendered = self.render(value, &outputs);
                    headers.insert(name.clone(), Value::String(as_text(&rendered)));
                }
                let input = json!({
                    "method": call.method,
                    "url": as_text(&self.render(&call.url, &outputs)),
                    "headers": headers,
                    "body": call.body.as_ref().map(|b| self.render(b, &outputs)),
                });
                self.schedule(index, input);
            }
            StepKind::Sleep(_) => self.unsupported(index, "sleep"),
            StepKind::Signal { .. } => self.unsupported(index, "signal"),
            StepKind::Workflow { .. } => self.unsupported(index, "workflow"),
        }
    }

    /// Step kinds the engine does not execute yet fail clearly rather than
    /// hang forever.
    fn unsupported(&mut self, index: usize, what: &str) {
        let error = json!({
            "message": format!("{what} steps are not supported by this version of stead"),
            "retryable": false,
        });
        self.fail_step(index, 0, error, None);
    }

    fn schedule(&mut self, index: usize, input: Value) {
        let now = self.ctx.now;
        let s = &mut self.state.steps[index];
        s.status = StepStatus::Scheduled;
        s.attempt = 1;
        s.input = Some(input.clone());
        s.scheduled_at = Some(now);
        self.record(
            "step_scheduled",
            Some(index),
            Some(1),
            json!({ "input": input }),
        );
        self.enqueue(index, 1, input, 0);
    }

    fn enqueue(&mut self, index: usize, attempt: u32, input: Value, delay_ms: u64) {
        let step_def = &self.def.steps[index];
        let (kind, queue) = match &step_def.kind {
            StepKind::Task { queue, .. } => (TaskKind::Task, queue.clone()),
            _ => (TaskKind::Http, HTTP_QUEUE.to_string()),
        };
        self.decision.commands.push(Command::EnqueueTask {
            step: index,
            attempt,
            kind,
            queue,
            input,
            delay_ms,
            timeout_ms: step_def.timeout_ms,
            idempotency_key: format!("{}:{}", self.state.id, step_def.id),
        });
    }

    fn complete_instance(&mut self) {
        let outputs = self.outputs();
        let output = match &self.def.output {
            Some(template) => self.render(template, &outputs),
            None => Value::Object(outputs.into_iter().collect()),
        };
        self.state.status = InstanceStatus::Completed;
        self.state.output = Some(output.clone());
        // Every step has finished, so the instance has nothing left in the
        // queue to withdraw.
        self.record(
            "instance_completed",
            None,
            None,
            json!({ "output": output }),
        );
    }
}

/// Text form of a rendered template value (for URLs and headers).
fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests;
