//! The engine's decision core: `decide(definition, state, events)` returns the
//! new state and the commands to carry out. It does no IO and reads no clock
//! or random source of its own: time and jitter come in through `Context`, so
//! every decision is reproducible in a unit test.
//!
//! `decide` applies the events (`results.rs` for task results), then ticks:
//! the deadline, timers, signals, and every step whose needs are met
//! (`steps.rs`), and, once the instance winds down, its compensations
//! (`ending.rs`).

mod ending;
mod results;
mod state;
mod steps;

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, Utc};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::definition::duration::format_duration_ms;
use crate::definition::template::{self, as_text, Scope};
use crate::definition::{Definition, HttpCall, OnFailure, RetryPolicy, StepKind};

#[cfg(test)]
use crate::model::{CompensationState, TaskKind};
pub(crate) use crate::model::{
    Doc, Ending, EventType, InstanceStatus, StepState, StepStatus, TaskFailure, TaskPurpose,
    TaskResult,
};
pub(crate) use state::*;

/// The internal queue that holds `http` steps, executed by stead itself.
pub(crate) const HTTP_QUEUE: &str = "stead.http";

/// What the engine needs from the outside world for one decision.
pub(crate) struct Context<'a> {
    pub now: DateTime<Utc>,
    /// Returns a uniformly distributed number in [0, 1) for retry jitter.
    pub random: &'a mut dyn FnMut() -> f64,
    pub limits: EngineLimits,
    /// Most bytes this decision may add to what the instance stores: once
    /// it has added as much, it starts no more steps and asks to be woken
    /// at once to go on (`Decision::wake_at`), so that one large instance
    /// cannot hold its batch (and the node's memory) for long.
    pub budget_bytes: u64,
}

/// Bounds on what one instance may hold, so that no legal definition can
/// take a node's memory: past one, the step fails with a permanent `limit`
/// error that names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EngineLimits {
    /// Largest output of one step or `for_each` element, as JSON text.
    pub max_step_output_bytes: usize,
    /// Most elements one `for_each` step may have.
    pub max_for_each_items: usize,
    /// Most bytes (as JSON text) one instance may store: the inputs and
    /// outputs of its steps and elements, and its own output.
    pub max_instance_bytes: u64,
    /// Most history events one instance may record (its whole history,
    /// retries included): at its next decision past it, the instance fails
    /// (its compensations still run and are recorded).
    pub max_history_events: u32,
}

impl Default for EngineLimits {
    fn default() -> Self {
        EngineLimits {
            max_step_output_bytes: 1024 * 1024,
            max_for_each_items: 10_000,
            max_instance_bytes: 32 * 1024 * 1024,
            max_history_events: 50_000,
        }
    }
}

/// The length of `value` as JSON text.
pub(crate) fn json_len(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// The permanent error of a step past one of the limits.
pub(crate) fn limit_error(limit: &'static str, message: String) -> Value {
    serde_json::json!({ "message": format!("limit: {message}"), "retryable": false, "limit": limit })
}

/// Applies `events` to `state` and decides what happens next.
pub(crate) fn decide(
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
        added_bytes: 0,
        paused: false,
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
    decision.added_bytes = run.added_bytes;
    decision.paused = run.paused && wake_at.is_some();
    let recorded = u32::try_from(decision.history.len()).unwrap_or(u32::MAX);
    state.recorded_events = state.recorded_events.saturating_add(recorded);
    decision
}

/// What an instance stores, in bytes of JSON text: inputs and outputs of
/// its steps and elements, and its output (what `max_instance_bytes`
/// counts). The
/// engine keeps `InstanceState::stored_bytes` as it goes; this counts anew.
pub(crate) fn stored_bytes(state: &InstanceState) -> u64 {
    let opt = |v: &Option<Value>| v.as_ref().map_or(0, json_len) as u64;
    let doc = |d: &Option<Doc>| d.as_ref().map_or(0, Doc::len) as u64;
    let items = |s: &StepState| -> u64 {
        s.items
            .iter()
            .flatten()
            .map(|it| json_len(&it.input) as u64 + opt(&it.output))
            .sum()
    };
    let steps: u64 = state
        .steps
        .iter()
        .map(|s| doc(&s.input) + doc(&s.output) + items(s))
        .sum();
    steps + opt(&state.output)
}

/// The retry delay before attempt `attempt + 1`, after attempt `attempt`
/// (1-based) failed. `random` is in [0, 1); with jitter the delay is spread
/// over ±20% and never exceeds `max_interval_ms`.
pub(crate) fn backoff_ms(policy: &RetryPolicy, attempt: u32, random: f64) -> u64 {
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
pub(crate) fn child_id(parent: &str, step_id: &str, item: Option<u32>) -> String {
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

/// One decision in progress.
struct Run<'d, 's, 'c, 'r> {
    def: &'d Definition,
    state: &'s mut InstanceState,
    ctx: &'c mut Context<'r>,
    decision: Decision,
    changed: BTreeSet<usize>,
    /// Signals available to this decision, oldest first.
    signals: Vec<PendingSignal>,
    /// Bytes this decision added to what the instance stores.
    added_bytes: u64,
    /// The decision spent its byte budget and left steps for the next one.
    paused: bool,
}

/// The scope of a `for_each` element: its value and index.
type ItemScope<'v> = Option<(&'v Value, usize)>;

impl Run<'_, '_, '_, '_> {
    fn record(&mut self, kind: EventType, step: Option<usize>, attempt: Option<u32>, data: Value) {
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
            Event::Start => self.apply_start(),
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
                let finished = Finished {
                    index: *step,
                    attempt: *attempt,
                    result,
                    started_at: *started_at,
                    worker: worker.as_deref(),
                };
                match purpose {
                    TaskPurpose::Run => self.apply_run_result(*item, finished),
                    TaskPurpose::Compensate => self.apply_compensation_result(finished),
                }
            }
            Event::Signal(signal) => self.signals.push(signal.clone()),
            Event::CancelRequested { reason } => self.apply_cancel(reason),
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

    fn apply_start(&mut self) {
        if self.state.status != InstanceStatus::Pending {
            return;
        }
        self.state.status = InstanceStatus::Running;
        self.state.deadline_at = self.def.timeout_ms.map(|t| self.ctx.now + ms(t));
        let input = self.state.input.clone();
        self.record(
            EventType::InstanceStarted,
            None,
            None,
            json!({ "input": input }),
        );
    }

    fn apply_cancel(&mut self, reason: &str) {
        if !self.live() {
            return;
        }
        self.record(
            EventType::InstanceCancelRequested,
            None,
            None,
            json!({ "reason": reason }),
        );
        self.begin_ending(
            Ending::Cancelled,
            json!({ "message": format!("cancelled: {reason}"), "reason": reason }),
        );
    }

    // ---- the decision loop -------------------------------------------------

    fn tick(&mut self) {
        if self.state.status != InstanceStatus::Running {
            return;
        }
        if self.live() {
            self.check_history_limit();
        }
        if self.live() {
            self.check_deadline();
        }
        if self.live() {
            self.advance();
        }
        if self.state.status == InstanceStatus::Running && self.state.ending.is_some() {
            self.drive_compensation();
        }
    }

    /// Fails an instance that has recorded `max_history_events` events.
    fn check_history_limit(&mut self) {
        let (recorded, max) = (
            self.state.recorded_events,
            self.ctx.limits.max_history_events,
        );
        if recorded < max {
            return;
        }
        let message = format!(
            "the instance has recorded {recorded} history events, the limit is {max} (--max-history-events)"
        );
        self.begin_ending(Ending::Failed, limit_error("max_history_events", message));
    }

    fn check_deadline(&mut self) {
        let Some(deadline) = self.state.deadline_at else {
            return;
        };
        if deadline > self.ctx.now {
            return;
        }
        let timeout = format_duration_ms(self.def.timeout_ms.unwrap_or(0));
        self.record(
            EventType::InstanceTimedOut,
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
                    if self.out_of_budget() {
                        return;
                    }
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

    /// True once the decision has added its budget of bytes, asked before
    /// a step or element would start: it starts no more (and is woken at
    /// once to go on).
    fn out_of_budget(&mut self) -> bool {
        if self.added_bytes >= self.ctx.budget_bytes {
            self.paused = true;
        }
        self.paused
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

    // ---- templates ---------------------------------------------------------

    /// Whether step `index` has an output templates may read (finished,
    /// one way or another).
    fn has_output(&self, index: usize) -> bool {
        matches!(
            self.state.steps[index].status,
            StepStatus::Completed
                | StepStatus::Skipped
                | StepStatus::Failed
                | StepStatus::Compensated
        )
    }

    /// The outputs of finished steps by step id, copied (the default
    /// output of a completed instance).
    fn outputs(&self) -> Map<String, Value> {
        (0..self.def.steps.len())
            .filter(|&i| self.has_output(i))
            .map(|i| {
                let output = self.state.steps[i].output.as_ref();
                (
                    self.def.steps[i].id.clone(),
                    output.map_or(Value::Null, Doc::to_value),
                )
            })
            .collect()
    }

    /// Renders a template against the instance. Step outputs are read in
    /// place, never copied: a step whose template names none costs nothing
    /// however much the other steps hold.
    fn render(&self, template: &Value, item: ItemScope) -> Value {
        static NULL: Value = Value::Null;
        let lookup = |id: &str| {
            let index = self.def.step_index(id)?;
            self.has_output(index).then(|| {
                self.state.steps[index]
                    .output
                    .as_ref()
                    .map_or(&NULL, Doc::value)
            })
        };
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
    fn render_optional(&self, template: Option<&Value>, item: ItemScope) -> Value {
        template.map_or(Value::Null, |t| self.render(t, item))
    }

    fn render_http(&self, call: &HttpCall, item: ItemScope) -> Value {
        let mut headers = Map::new();
        for (name, value) in &call.headers {
            let rendered = self.render(value, item);
            headers.insert(name.clone(), Value::String(as_text(&rendered)));
        }
        json!({
            "method": call.method,
            "url": as_text(&self.render(&call.url, item)),
            "headers": headers,
            "body": call.body.as_ref().map(|b| self.render(b, item)),
        })
    }

    /// The earliest moment the instance needs the engine without an event.
    fn next_wake(&self) -> Option<DateTime<Utc>> {
        if !self.live() {
            return None;
        }
        if self.paused {
            return Some(self.ctx.now);
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

/// A finished attempt, as the result handlers read it.
#[derive(Clone, Copy)]
struct Finished<'e> {
    index: usize,
    attempt: u32,
    result: &'e TaskResult,
    started_at: Option<DateTime<Utc>>,
    worker: Option<&'e str>,
}

/// The error a failed attempt leaves on its step:
/// `{message, retryable, attempt, details?}`.
fn error_json(failure: &TaskFailure, attempt: u32) -> Value {
    let mut error = json!({
        "message": failure.message,
        "retryable": failure.retryable,
        "attempt": attempt,
    });
    if let Some(details) = &failure.details {
        error["details"] = details.clone();
    }
    error
}

#[cfg(test)]
mod tests;
