//! The engine's decision core: `decide(definition, state, events)` returns the
//! new state and the commands to carry out. It does no IO and reads no clock
//! or random source of its own: time and jitter come in through `Context`, so
//! every decision is reproducible in a unit test.

mod state;

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Duration, Utc};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::definition::duration::format_duration_ms;
use crate::definition::template::{self, Scope};
use crate::definition::{
    CompensationAction, Definition, HttpCall, OnFailure, RetryPolicy, SleepSpec, StepKind,
};

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
        signals: Vec::new(),
    };
    if run.state.steps.len() != def.steps.len() {
        run.state
            .steps
            .resize(def.steps.len(), StepState::default());
    }
    for event in events {
        run.apply(event);
    }
    run.tick();
    let wake_at = run.next_wake();
    let mut decision = run.decision;
    decision.changed_steps = run.changed.into_iter().collect();
    decision.wake_at = wake_at;
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

/// The id of the child instance a `workflow` step starts: readable when it
/// fits the id limit, a digest otherwise. Stable, so a repeated start finds
/// the same child.
pub fn child_id(parent: &str, step_id: &str, item: Option<u32>) -> String {
    let readable = match item {
        Some(k) => format!("{parent}:{step_id}:{k}"),
        None => format!("{parent}:{step_id}"),
    };
    if readable.len() <= 200 {
        return readable;
    }
    let digest = Sha256::digest(readable.as_bytes());
    let hex: String = digest.iter().take(20).map(|b| format!("{b:02x}")).collect();
    format!("child-{hex}")
}

fn ms(d: u64) -> Duration {
    Duration::milliseconds(d.min(i64::MAX as u64) as i64)
}

struct Run<'d, 's, 'c, 'r> {
    def: &'d Definition,
    state: &'s mut InstanceState,
    ctx: &'c mut Context<'r>,
    decision: Decision,
    changed: BTreeSet<usize>,
    /// Signals available to this decision, oldest first.
    signals: Vec<PendingSignal>,
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

    /// Running normally: not pending, not ended, not winding down.
    fn live(&self) -> bool {
        self.state.status == InstanceStatus::Running && self.state.ending.is_none()
    }

    // ---- events ------------------------------------------------------------

    fn apply(&mut self, event: &Event) {
        match event {
            Event::Start => {
                if self.state.status == InstanceStatus::Pending {
                    self.state.status = InstanceStatus::Running;
                    self.state.deadline_at = self.def.timeout_ms.map(|t| self.ctx.now + ms(t));
                    let input = self.state.input.clone();
                    self.record("instance_started", None, None, json!({ "input": input }));
                }
            }
            Event::TaskFinished {
                step,
                item,
                purpose,
                attempt,
                result,
                started_at,
                worker,
            } => {
                if *step >= self.state.steps.len() {
                    return;
                }
                match purpose {
                    TaskPurpose::Run => self.apply_run_result(
                        *step,
                        *item,
                        *attempt,
                        result,
                        *started_at,
                        worker.as_deref(),
                    ),
                    TaskPurpose::Compensate => {
                        self.apply_compensation_result(*step, *attempt, result)
                    }
                }
            }
            Event::Signal(signal) => self.signals.push(signal.clone()),
            Event::CancelRequested { reason } => {
                if self.live() {
                    self.record(
                        "instance_cancel_requested",
                        None,
                        None,
                        json!({ "reason": reason }),
                    );
                    self.begin_ending(
                        Ending::Cancelled,
                        json!({ "message": format!("cancelled: {reason}"), "reason": reason }),
                    );
                }
            }
            Event::RetryRequested => {
                // The API only asks failed instances; a retried parent also
                // revives its cancelled children.
                if matches!(
                    self.state.status,
                    InstanceStatus::Failed | InstanceStatus::Cancelled
                ) {
                    self.retry_instance();
                }
            }
        }
    }

    fn apply_run_result(
        &mut self,
        index: usize,
        item: Option<u32>,
        attempt: u32,
        result: &TaskResult,
        started_at: Option<DateTime<Utc>>,
        worker: Option<&str>,
    ) {
        // Results that arrive while the instance winds down or after it
        // ended are for attempts that were withdrawn: ignore them.
        if !self.live() {
            return;
        }
        if let Some(k) = item {
            self.apply_item_result(index, k as usize, attempt, result, started_at, worker);
            return;
        }
        // Only queue-backed kinds have results; a timer or signal step is
        // never completed by one.
        if !matches!(
            self.def.steps[index].kind,
            StepKind::Task { .. } | StepKind::Http(_) | StepKind::Workflow { .. }
        ) {
            return;
        }
        let step_state = &self.state.steps[index];
        // A result for an attempt the engine no longer waits for is stale:
        // it was recorded already or superseded. Recording it again would
        // break "each step's result is recorded exactly once".
        if !step_state.status.is_active()
            || step_state.attempt != attempt
            || step_state.items.is_some()
        {
            return;
        }
        let step_def = &self.def.steps[index];
        self.changed.insert(index);
        match result {
            TaskResult::Completed(output) => {
                let s = &mut self.state.steps[index];
                s.started_at = started_at.or(s.started_at);
                self.complete_step(
                    index,
                    output.clone(),
                    json!({ "worker": worker, "started_at": started_at }),
                );
            }
            TaskResult::Failed {
                message,
                retryable,
                details,
            } => {
                let error = error_json(message, *retryable, attempt, details.as_ref());
                let policy = step_def.retry;
                let is_child = matches!(step_def.kind, StepKind::Workflow { .. });
                if *retryable && !is_child && attempt < policy.max_attempts {
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
                    self.enqueue(index, None, TaskPurpose::Run, attempt + 1, input, delay_ms);
                } else {
                    let s = &mut self.state.steps[index];
                    s.started_at = started_at.or(s.started_at);
                    self.fail_step(index, attempt, error);
                }
            }
        }
    }

    fn apply_item_result(
        &mut self,
        index: usize,
        k: usize,
        attempt: u32,
        result: &TaskResult,
        started_at: Option<DateTime<Utc>>,
        worker: Option<&str>,
    ) {
        let now = self.ctx.now;
        let step_def = &self.def.steps[index];
        let Some(item) = self.state.steps[index]
            .items
            .as_ref()
            .and_then(|items| items.get(k))
        else {
            return;
        };
        if !self.state.steps[index].status.is_active()
            || !item.status.is_active()
            || item.attempt != attempt
        {
            return;
        }
        self.changed.insert(index);
        let is_child = matches!(step_def.kind, StepKind::Workflow { .. });
        match result {
            TaskResult::Completed(output) => {
                let it = &mut self.state.steps[index].items.as_mut().expect("items")[k];
                it.status = StepStatus::Completed;
                it.output = Some(output.clone());
                it.error = None;
                it.started_at = started_at.or(it.started_at);
                it.ended_at = Some(now);
                self.record(
                    "item_completed",
                    Some(index),
                    Some(attempt),
                    json!({ "item": k, "output": output, "worker": worker, "started_at": started_at }),
                );
            }
            TaskResult::Failed {
                message,
                retryable,
                details,
            } => {
                let error = error_json(message, *retryable, attempt, details.as_ref());
                let policy = step_def.retry;
                if *retryable && !is_child && attempt < policy.max_attempts {
                    let delay_ms = backoff_ms(&policy, attempt, (self.ctx.random)());
                    let it = &mut self.state.steps[index].items.as_mut().expect("items")[k];
                    it.error = Some(error.clone());
                    it.attempt = attempt + 1;
                    it.status = StepStatus::Scheduled;
                    it.started_at = None;
                    let input = it.input.clone();
                    self.record(
                        "item_attempt_failed",
                        Some(index),
                        Some(attempt),
                        json!({ "item": k, "error": error, "retry_in_ms": delay_ms, "worker": worker }),
                    );
                    self.enqueue(
                        index,
                        Some(k as u32),
                        TaskPurpose::Run,
                        attempt + 1,
                        input,
                        delay_ms,
                    );
                } else {
                    let continue_on_failure = step_def.on_failure == OnFailure::Continue;
                    let it = &mut self.state.steps[index].items.as_mut().expect("items")[k];
                    it.status = StepStatus::Failed;
                    it.error = Some(error.clone());
                    it.started_at = started_at.or(it.started_at);
                    it.ended_at = Some(now);
                    if continue_on_failure {
                        it.output = Some(error.clone());
                    }
                    self.record(
                        "item_failed",
                        Some(index),
                        Some(attempt),
                        json!({ "item": k, "error": error }),
                    );
                    if !continue_on_failure {
                        let message = format!("item {k} failed: {message}");
                        let step_error = json!({
                            "message": message,
                            "retryable": false,
                            "item": k,
                            "error": error,
                        });
                        self.fail_step(index, attempt, step_error);
                    }
                }
            }
        }
    }

    fn apply_compensation_result(&mut self, index: usize, attempt: u32, result: &TaskResult) {
        if self.state.status != InstanceStatus::Running || self.state.ending.is_none() {
            return;
        }
        let Some(comp) = self.state.steps[index].compensation.clone() else {
            return;
        };
        if comp.status != StepStatus::Scheduled || comp.attempt != attempt {
            return;
        }
        let Some(comp_def) = self.def.steps[index].compensate.clone() else {
            return;
        };
        self.changed.insert(index);
        match result {
            TaskResult::Completed(output) => {
                let s = &mut self.state.steps[index];
                s.status = StepStatus::Compensated;
                let c = s.compensation.as_mut().expect("compensation");
                c.status = StepStatus::Completed;
                c.output = Some(output.clone());
                self.record(
                    "compensation_completed",
                    Some(index),
                    Some(attempt),
                    json!({ "output": output }),
                );
            }
            TaskResult::Failed {
                message,
                retryable,
                details,
            } => {
                let error = error_json(message, *retryable, attempt, details.as_ref());
                if *retryable && attempt < comp_def.retry.max_attempts {
                    let delay_ms = backoff_ms(&comp_def.retry, attempt, (self.ctx.random)());
                    let c = self.state.steps[index]
                        .compensation
                        .as_mut()
                        .expect("compensation");
                    c.attempt = attempt + 1;
                    c.error = Some(error.clone());
                    let input = c.input.clone();
                    self.record(
                        "compensation_attempt_failed",
                        Some(index),
                        Some(attempt),
                        json!({ "error": error, "retry_in_ms": delay_ms }),
                    );
                    self.enqueue(
                        index,
                        None,
                        TaskPurpose::Compensate,
                        attempt + 1,
                        input,
                        delay_ms,
                    );
                } else {
                    let c = self.state.steps[index]
                        .compensation
                        .as_mut()
                        .expect("compensation");
                    c.status = StepStatus::Failed;
                    c.error = Some(error.clone());
                    self.record(
                        "compensation_failed",
                        Some(index),
                        Some(attempt),
                        json!({ "error": error }),
                    );
                    // The instance error lists compensations that failed, so
                    // an operator knows what was not undone.
                    let step_id = self.def.steps[index].id.clone();
                    if let Some(Value::Object(e)) = self.state.error.as_mut() {
                        let list = e
                            .entry("compensation_failures")
                            .or_insert_with(|| Value::Array(Vec::new()));
                        if let Value::Array(list) = list {
                            list.push(json!({ "step": step_id, "error": error }));
                        }
                    }
                }
            }
        }
    }

    fn retry_instance(&mut self) {
        let now = self.ctx.now;
        let mut restarted = Vec::new();
        for (i, s) in self.state.steps.iter_mut().enumerate() {
            match s.status {
                StepStatus::Failed | StepStatus::Cancelled => {
                    *s = StepState::default();
                    restarted.push(self.def.steps[i].id.clone());
                    self.changed.insert(i);
                }
                StepStatus::Compensated => {
                    // Its effect was undone; run it again too.
                    *s = StepState::default();
                    restarted.push(self.def.steps[i].id.clone());
                    self.changed.insert(i);
                }
                StepStatus::Completed if s.compensation.is_some() => {
                    // Its compensation failed; if the instance fails again,
                    // undoing it is attempted again.
                    s.compensation = None;
                    self.changed.insert(i);
                }
                _ => {}
            }
        }
        self.state.status = InstanceStatus::Running;
        self.state.error = None;
        self.state.output = None;
        self.state.ending = None;
        self.state.deadline_at = self.def.timeout_ms.map(|t| now + ms(t));
        self.record(
            "instance_retried",
            None,
            None,
            json!({ "steps": restarted }),
        );
    }

    // ---- the decision loop -------------------------------------------------

    fn tick(&mut self) {
        if self.state.status != InstanceStatus::Running {
            return;
        }
        if self.live() {
            if let Some(deadline) = self.state.deadline_at {
                if deadline <= self.ctx.now {
                    let timeout = format_duration_ms(self.def.timeout_ms.unwrap_or(0));
                    self.record(
                        "instance_timed_out",
                        None,
                        None,
                        json!({ "deadline": deadline }),
                    );
                    self.begin_ending(
                        Ending::Failed,
                        json!({
                            "message": format!("workflow timed out after {timeout}"),
                            "timeout": true,
                        }),
                    );
                }
            }
        }
        if self.live() {
            self.advance();
        }
        if self.state.status == InstanceStatus::Running && self.state.ending.is_some() {
            self.drive_compensation();
        }
    }

    /// A step has finished when a dependent may run.
    fn finished(&self, index: usize) -> bool {
        let s = &self.state.steps[index];
        match s.status {
            StepStatus::Completed | StepStatus::Skipped | StepStatus::Compensated => true,
            StepStatus::Failed => self.def.steps[index].on_failure == OnFailure::Continue,
            _ => false,
        }
    }

    /// Fires timers, hands signals to waiting steps, starts every step whose
    /// needs are met and fills `for_each` steps, repeatedly, because inline
    /// steps (`value`, skipped ones, zero sleeps) unblock others in the same
    /// decision.
    fn advance(&mut self) {
        loop {
            let mut progressed = self.fire_timers();
            progressed |= self.match_signals();
            for index in 0..self.def.steps.len() {
                if !self.live() {
                    return;
                }
                let status = self.state.steps[index].status;
                if status == StepStatus::Pending
                    && self.def.steps[index]
                        .needs
                        .iter()
                        .all(|&n| self.finished(n))
                {
                    self.start_step(index);
                    progressed = true;
                } else if status == StepStatus::Running && self.state.steps[index].items.is_some() {
                    progressed |= self.fill_items(index);
                }
            }
            if !self.live() {
                return;
            }
            if !progressed {
                break;
            }
        }
        if (0..self.def.steps.len()).all(|i| self.finished(i)) {
            self.complete_instance();
        }
    }

    fn fire_timers(&mut self) -> bool {
        let now = self.ctx.now;
        let mut fired = false;
        for index in 0..self.def.steps.len() {
            let s = &self.state.steps[index];
            if s.status != StepStatus::Waiting || !s.wake_at.is_some_and(|w| w <= now) {
                continue;
            }
            fired = true;
            self.changed.insert(index);
            match &self.def.steps[index].kind {
                StepKind::Signal { name, timeout_ms } => {
                    let waited = format_duration_ms(timeout_ms.unwrap_or(0));
                    let error = json!({
                        "message": format!("timed out after {waited} waiting for signal {name:?}"),
                        "retryable": false,
                        "timeout": true,
                    });
                    self.fail_step(index, 1, error);
                    if !self.live() {
                        return true;
                    }
                }
                _ => {
                    let woke = self.state.steps[index].wake_at;
                    self.state.steps[index].wake_at = None;
                    self.complete_step(index, Value::Null, json!({ "slept_until": woke }));
                }
            }
        }
        fired
    }

    fn match_signals(&mut self) -> bool {
        let mut matched = false;
        for index in 0..self.def.steps.len() {
            if self.state.steps[index].status != StepStatus::Waiting {
                continue;
            }
            let StepKind::Signal { name, .. } = &self.def.steps[index].kind else {
                continue;
            };
            let Some(pos) = self.signals.iter().position(|s| &s.name == name) else {
                continue;
            };
            let signal = self.signals.remove(pos);
            matched = true;
            self.changed.insert(index);
            self.decision.commands.push(Command::ConsumeSignal {
                id: signal.id,
                step: index,
            });
            self.state.steps[index].wake_at = None;
            self.complete_step(
                index,
                signal.payload.clone(),
                json!({ "signal": signal.name, "signal_id": signal.id }),
            );
        }
        matched
    }

    fn outputs(&self) -> HashMap<String, Value> {
        self.def
            .steps
            .iter()
            .zip(&self.state.steps)
            .filter(|(_, s)| {
                matches!(
                    s.status,
                    StepStatus::Completed
                        | StepStatus::Skipped
                        | StepStatus::Failed
                        | StepStatus::Compensated
                )
            })
            .map(|(d, s)| (d.id.clone(), s.output.clone().unwrap_or(Value::Null)))
            .collect()
    }

    fn render(
        &self,
        template: &Value,
        outputs: &HashMap<String, Value>,
        item: Option<(&Value, usize)>,
    ) -> Value {
        let lookup = |id: &str| outputs.get(id);
        let scope = Scope {
            input: &self.state.input,
            instance_id: &self.state.id,
            step_outputs: &lookup,
            item: item.map(|(v, _)| v),
            index: item.map(|(_, i)| i),
        };
        template::render(template, &scope)
    }

    /// An optional template (a task's or child's `input`): absent is null.
    fn render_optional(
        &self,
        template: Option<&Value>,
        outputs: &HashMap<String, Value>,
        item: Option<(&Value, usize)>,
    ) -> Value {
        template.map_or(Value::Null, |t| self.render(t, outputs, item))
    }

    fn render_http(
        &self,
        call: &HttpCall,
        outputs: &HashMap<String, Value>,
        item: Option<(&Value, usize)>,
    ) -> Value {
        let mut headers = Map::new();
        for (name, value) in &call.headers {
            let rendered = self.render(value, outputs, item);
            headers.insert(name.clone(), Value::String(as_text(&rendered)));
        }
        json!({
            "method": call.method,
            "url": as_text(&self.render(&call.url, outputs, item)),
            "headers": headers,
            "body": call.body.as_ref().map(|b| self.render(b, outputs, item)),
        })
    }

    fn start_step(&mut self, index: usize) {
        let now = self.ctx.now;
        let step_def = &self.def.steps[index];
        let outputs = self.outputs();
        self.changed.insert(index);
        if let Some(when) = &step_def.when {
            let verdict = self.render(when, &outputs, None);
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
        if let Some(for_each) = &step_def.for_each {
            let items = self.render(&for_each.items, &outputs, None);
            let Value::Array(items) = items else {
                let error = json!({
                    "message": format!("for_each needs an array, got {}", type_name(&items)),
                    "retryable": false,
                });
                self.fail_step(index, 0, error);
                return;
            };
            let s = self.begin(index, StepStatus::Running);
            s.items = Some(
                items
                    .into_iter()
                    .map(|input| ItemState {
                        status: StepStatus::Pending,
                        attempt: 0,
                        input,
                        output: None,
                        error: None,
                        started_at: None,
                        ended_at: None,
                    })
                    .collect(),
            );
            let count = s.items.as_ref().map_or(0, Vec::len);
            self.record(
                "step_started",
                Some(index),
                Some(1),
                json!({ "items": count }),
            );
            self.fill_items(index);
            return;
        }
        match &step_def.kind {
            StepKind::Value(template) => {
                let output = self.render(template, &outputs, None);
                let s = &mut self.state.steps[index];
                s.attempt = 1;
                s.scheduled_at = Some(now);
                s.started_at = Some(now);
                self.complete_step(index, output, json!({}));
            }
            StepKind::Task { input, .. } => {
                let input = self.render_optional(input.as_ref(), &outputs, None);
                self.schedule(index, input);
            }
            StepKind::Http(call) => {
                let input = self.render_http(call, &outputs, None);
                self.schedule(index, input);
            }
            StepKind::Sleep(spec) => {
                let until = match spec {
                    SleepSpec::Duration { ms: d } => Ok(now + ms(*d)),
                    SleepSpec::Until(t) => {
                        let rendered = self.render(t, &outputs, None);
                        rendered
                            .as_str()
                            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                            .map(|t| t.with_timezone(&Utc))
                            .ok_or(rendered)
                    }
                };
                match until {
                    Ok(until) => {
                        let s = self.begin(index, StepStatus::Waiting);
                        s.wake_at = Some(until);
                        self.record(
                            "step_waiting",
                            Some(index),
                            Some(1),
                            json!({ "until": until }),
                        );
                    }
                    Err(rendered) => {
                        let error = json!({
                            "message": format!("sleep until needs an RFC 3339 timestamp, got {rendered}"),
                            "retryable": false,
                        });
                        self.fail_step(index, 1, error);
                    }
                }
            }
            StepKind::Signal { name, timeout_ms } => {
                let s = self.begin(index, StepStatus::Waiting);
                s.wake_at = timeout_ms.map(|t| now + ms(t));
                let wake_at = s.wake_at;
                self.record(
                    "step_waiting",
                    Some(index),
                    Some(1),
                    json!({ "signal": name, "timeout_at": wake_at }),
                );
            }
            StepKind::Workflow {
                name,
                version,
                input,
            } => {
                let input = self.render_optional(input.as_ref(), &outputs, None);
                let s = self.begin(index, StepStatus::Running);
                s.input = Some(input.clone());
                let child = child_id(&self.state.id, &step_def.id, None);
                self.record(
                    "child_started",
                    Some(index),
                    Some(1),
                    json!({ "child_id": child, "workflow": name }),
                );
                self.decision.commands.push(Command::StartChild {
                    step: index,
                    item: None,
                    child_id: child,
                    workflow: name.clone(),
                    version: *version,
                    input,
                });
            }
        }
    }

    /// Starts pending items of a `for_each` step up to `max_parallel`, and
    /// completes the step once every item finished. True if anything moved.
    fn fill_items(&mut self, index: usize) -> bool {
        let now = self.ctx.now;
        let step_def = &self.def.steps[index];
        let limit = step_def
            .for_each
            .as_ref()
            .and_then(|f| f.max_parallel)
            .map_or(usize::MAX, |m| m as usize);
        let mut progressed = false;
        let outputs = self.outputs();
        let count = self.state.steps[index].items.as_ref().map_or(0, Vec::len);
        for k in 0..count {
            if !self.live() || self.state.steps[index].status != StepStatus::Running {
                return true;
            }
            let items = self.state.steps[index].items.as_ref().expect("items");
            let active = items.iter().filter(|i| i.status.is_active()).count();
            if active >= limit {
                break;
            }
            if items[k].status != StepStatus::Pending {
                continue;
            }
            progressed = true;
            self.changed.insert(index);
            let item_value = items[k].input.clone();
            let scope_item = Some((&item_value, k));
            match &step_def.kind {
                StepKind::Value(template) => {
                    let output = self.render(template, &outputs, scope_item);
                    let it = &mut self.state.steps[index].items.as_mut().expect("items")[k];
                    it.status = StepStatus::Completed;
                    it.attempt = 1;
                    it.output = Some(output);
                    it.started_at = Some(now);
                    it.ended_at = Some(now);
                }
                StepKind::Task { input, .. } => {
                    let input = self.render_optional(input.as_ref(), &outputs, scope_item);
                    self.schedule_item(index, k, input);
                }
                StepKind::Http(call) => {
                    let input = self.render_http(call, &outputs, scope_item);
                    self.schedule_item(index, k, input);
                }
                StepKind::Workflow {
                    name,
                    version,
                    input,
                } => {
                    let input = self.render_optional(input.as_ref(), &outputs, scope_item);
                    let it = &mut self.state.steps[index].items.as_mut().expect("items")[k];
                    it.status = StepStatus::Running;
                    it.attempt = 1;
                    it.started_at = Some(now);
                    let child = child_id(&self.state.id, &step_def.id, Some(k as u32));
                    self.decision.commands.push(Command::StartChild {
                        step: index,
                        item: Some(k as u32),
                        child_id: child,
                        workflow: name.clone(),
                        version: *version,
                        input,
                    });
                }
                StepKind::Sleep(_) | StepKind::Signal { .. } => {
                    // Refused at registration; fail clearly if it gets here.
                    let error = json!({
                        "message": "for_each cannot run sleep or signal steps",
                        "retryable": false,
                    });
                    self.fail_step(index, 1, error);
                    return true;
                }
            }
        }
        let items = self.state.steps[index].items.as_ref().expect("items");
        let done = items.iter().all(|i| {
            i.status == StepStatus::Completed
                || (i.status == StepStatus::Failed && step_def.on_failure == OnFailure::Continue)
        });
        if done && self.state.steps[index].status == StepStatus::Running {
            let output: Vec<Value> = items
                .iter()
                .map(|i| i.output.clone().unwrap_or(Value::Null))
                .collect();
            self.changed.insert(index);
            self.complete_step(index, Value::Array(output), json!({}));
            progressed = true;
        }
        progressed
    }

    /// Marks a step begun now, at attempt 1, with `status`.
    fn begin(&mut self, index: usize, status: StepStatus) -> &mut StepState {
        let now = self.ctx.now;
        let s = &mut self.state.steps[index];
        s.status = status;
        s.attempt = 1;
        s.scheduled_at = Some(now);
        s.started_at = Some(now);
        s
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
        self.enqueue(index, None, TaskPurpose::Run, 1, input, 0);
    }

    fn schedule_item(&mut self, index: usize, k: usize, input: Value) {
        let it = &mut self.state.steps[index].items.as_mut().expect("items")[k];
        it.status = StepStatus::Scheduled;
        it.attempt = 1;
        it.input = input.clone();
        self.enqueue(index, Some(k as u32), TaskPurpose::Run, 1, input, 0);
    }

    fn enqueue(
        &mut self,
        index: usize,
        item: Option<u32>,
        purpose: TaskPurpose,
        attempt: u32,
        input: Value,
        delay_ms: u64,
    ) {
        let step_def = &self.def.steps[index];
        let (kind, queue, timeout_ms) = match purpose {
            TaskPurpose::Run => {
                let (kind, queue) = match &step_def.kind {
                    StepKind::Task { queue, .. } => (TaskKind::Task, queue.clone()),
                    _ => (TaskKind::Http, HTTP_QUEUE.to_string()),
                };
                (kind, queue, step_def.timeout_ms)
            }
            TaskPurpose::Compensate => {
                let comp = step_def.compensate.as_ref().expect("compensation");
                let (kind, queue) = match &comp.action {
                    CompensationAction::Task { queue, .. } => (TaskKind::Task, queue.clone()),
                    CompensationAction::Http(_) => (TaskKind::Http, HTTP_QUEUE.to_string()),
                };
                (kind, queue, comp.timeout_ms)
            }
        };
        let idempotency_key = match (purpose, item) {
            (TaskPurpose::Compensate, _) => format!("{}:{}:compensate", self.state.id, step_def.id),
            (TaskPurpose::Run, Some(k)) => format!("{}:{}:{k}", self.state.id, step_def.id),
            (TaskPurpose::Run, None) => format!("{}:{}", self.state.id, step_def.id),
        };
        self.decision.commands.push(Command::EnqueueTask {
            step: index,
            item,
            purpose,
            attempt,
            kind,
            queue,
            input,
            delay_ms,
            timeout_ms,
            idempotency_key,
        });
    }

    fn next_completion_order(&self) -> u32 {
        self.state
            .steps
            .iter()
            .filter_map(|s| s.completion_order)
            .max()
            .map_or(1, |m| m + 1)
    }

    fn complete_step(&mut self, index: usize, output: Value, mut data: Value) {
        let order = self.next_completion_order();
        let now = self.ctx.now;
        let s = &mut self.state.steps[index];
        s.status = StepStatus::Completed;
        s.output = Some(output.clone());
        s.error = None;
        s.ended_at = Some(now);
        s.completion_order = Some(order);
        let attempt = s.attempt.max(1);
        self.changed.insert(index);
        data["output"] = output;
        self.record("step_completed", Some(index), Some(attempt), data);
    }

    /// A step failed for good: the workflow goes on (`on_failure:
    /// continue`) with the error as the step's output, or the instance winds
    /// down to `failed`.
    fn fail_step(&mut self, index: usize, attempt: u32, error: Value) {
        let now = self.ctx.now;
        let step_def = &self.def.steps[index];
        let continue_on_failure = step_def.on_failure == OnFailure::Continue;
        let s = &mut self.state.steps[index];
        s.status = StepStatus::Failed;
        s.error = Some(error.clone());
        s.wake_at = None;
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
            self.begin_ending(
                Ending::Failed,
                json!({
                    "message": format!("step {step_id} failed: {message}"),
                    "step": step_id,
                    "error": error,
                }),
            );
        }
    }

    /// Stops everything in flight and starts compensating; the instance ends
    /// `failed` or `cancelled` when the compensations are done.
    fn begin_ending(&mut self, ending: Ending, error: Value) {
        let now = self.ctx.now;
        let mut children = false;
        for i in 0..self.state.steps.len() {
            let s = &mut self.state.steps[i];
            let mut touched = false;
            if let Some(items) = s.items.as_mut() {
                for it in items.iter_mut().filter(|it| it.status.is_active()) {
                    it.status = StepStatus::Cancelled;
                    it.ended_at = Some(now);
                    touched = true;
                }
            }
            if s.status.is_active() {
                // Parallel branches still in flight will never report: their
                // tasks are withdrawn, their children cancelled.
                s.status = StepStatus::Cancelled;
                s.wake_at = None;
                s.ended_at = Some(now);
                touched = true;
            }
            if touched {
                children |= matches!(self.def.steps[i].kind, StepKind::Workflow { .. });
                self.changed.insert(i);
            }
        }
        self.state.ending = Some(ending);
        self.state.error = Some(error);
        self.decision.commands.push(Command::WithdrawTasks);
        if children {
            self.decision.commands.push(Command::CancelChildren);
        }
    }

    /// Runs the compensations of completed steps one at a time, in reverse
    /// completion order, then ends the instance.
    fn drive_compensation(&mut self) {
        if self.state.steps.iter().any(|s| {
            s.compensation
                .as_ref()
                .is_some_and(|c| c.status == StepStatus::Scheduled)
        }) {
            return;
        }
        let next = (0..self.def.steps.len())
            .filter(|&i| {
                let s = &self.state.steps[i];
                s.status == StepStatus::Completed
                    && s.compensation.is_none()
                    && self.def.steps[i].compensate.is_some()
            })
            .max_by_key(|&i| self.state.steps[i].completion_order.unwrap_or(0));
        if let Some(index) = next {
            let outputs = self.outputs();
            let comp = self.def.steps[index]
                .compensate
                .clone()
                .expect("compensation");
            let input = match &comp.action {
                CompensationAction::Http(call) => self.render_http(call, &outputs, None),
                CompensationAction::Task { input, .. } => {
                    self.render_optional(input.as_ref(), &outputs, None)
                }
            };
            self.state.steps[index].compensation = Some(CompensationState {
                status: StepStatus::Scheduled,
                attempt: 1,
                input: input.clone(),
                output: None,
                error: None,
            });
            self.changed.insert(index);
            self.record(
                "compensation_scheduled",
                Some(index),
                Some(1),
                json!({ "input": input }),
            );
            self.enqueue(index, None, TaskPurpose::Compensate, 1, input, 0);
            return;
        }
        let ending = self.state.ending.take().expect("ending");
        let error = self.state.error.clone().unwrap_or(Value::Null);
        match ending {
            Ending::Failed => {
                self.state.status = InstanceStatus::Failed;
                self.record("instance_failed", None, None, json!({ "error": error }));
            }
            Ending::Cancelled => {
                self.state.status = InstanceStatus::Cancelled;
                self.record("instance_cancelled", None, None, json!({ "error": error }));
            }
        }
    }

    fn complete_instance(&mut self) {
        let outputs = self.outputs();
        let output = match &self.def.output {
            Some(template) => self.render(template, &outputs, None),
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

    /// The earliest moment the instance needs the engine without an event.
    fn next_wake(&self) -> Option<DateTime<Utc>> {
        if !self.live() {
            return None;
        }
        self.state
            .steps
            .iter()
            .filter(|s| s.status == StepStatus::Waiting)
            .filter_map(|s| s.wake_at)
            .chain(self.state.deadline_at)
            .min()
    }
}

fn error_json(message: &str, retryable: bool, attempt: u32, details: Option<&Value>) -> Value {
    let mut error = json!({ "message": message, "retryable": retryable, "attempt": attempt });
    if let Some(details) = details {
        error["details"] = details.clone();
    }
    error
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
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
