//! Starting steps by kind, filling `for_each` steps, queueing attempts, and
//! the two ways a step ends (`complete_step`, `fail_step`).

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::{child_id, json_len, limit_error, ms, Command, ItemScope, Run, HTTP_QUEUE};
use crate::definition::template::{self, type_name};
use crate::definition::{CompensationAction, Definition, OnFailure, SleepSpec, StepKind};
use crate::model::{
    Doc, Ending, EventType, ItemState, StepState, StepStatus, TaskKind, TaskPurpose,
};

impl Run<'_, '_, '_, '_> {
    /// Starts a step whose needs are met: skips it (`when`), fans it out
    /// (`for_each`), or starts it by kind.
    pub(super) fn start_step(&mut self, index: usize) {
        let step_def = &self.def.steps[index];
        self.changed.insert(index);
        if let Some(when) = &step_def.when {
            let verdict = self.render(when, None);
            if template::is_falsy(&verdict) {
                self.skip_step(index, verdict);
                return;
            }
        }
        if let Some(for_each) = &step_def.for_each {
            let items = self.render(&for_each.items, None);
            self.start_for_each(index, items);
            return;
        }
        match &step_def.kind {
            StepKind::Value(template) => {
                let output = self.render(template, None);
                let now = self.ctx.now;
                let s = &mut self.state.steps[index];
                s.attempt = 1;
                s.scheduled_at = Some(now);
                s.started_at = Some(now);
                self.complete_step(index, output, json!({}));
            }
            StepKind::Task { input, .. } => {
                let input = self.render_optional(input.as_ref(), None);
                self.schedule(index, input);
            }
            StepKind::Http(call) => {
                let input = self.render_http(call, None);
                self.schedule(index, input);
            }
            StepKind::Sleep(spec) => self.start_sleep(index, spec),
            StepKind::Signal { name, timeout_ms } => {
                let wake_at = timeout_ms.map(|t| self.ctx.now + ms(t));
                self.begin(index, StepStatus::Waiting).wake_at = wake_at;
                self.record(
                    EventType::StepWaiting,
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
                let input = self.render_optional(input.as_ref(), None);
                self.start_child(index, name, *version, input);
            }
        }
    }

    fn skip_step(&mut self, index: usize, verdict: Value) {
        let now = self.ctx.now;
        let s = &mut self.state.steps[index];
        s.status = StepStatus::Skipped;
        s.output = Some(Doc::null());
        s.ended_at = Some(now);
        self.record(
            EventType::StepSkipped,
            Some(index),
            None,
            json!({ "when": verdict }),
        );
    }

    fn start_for_each(&mut self, index: usize, items: Value) {
        let Value::Array(items) = items else {
            let error = json!({
                "message": format!("for_each needs an array, got {}", type_name(&items)),
                "retryable": false,
            });
            self.fail_step(index, 0, error);
            return;
        };
        let count = items.len();
        let max = self.ctx.limits.max_for_each_items;
        if count > max {
            let message = format!(
                "for_each of step {} has {count} elements, over the limit of {max} (--max-for-each-items)",
                self.def.steps[index].id
            );
            self.fail_step(index, 0, limit_error("max_for_each_items", message));
            return;
        }
        let len = items.iter().map(json_len).sum();
        if let Err(error) = self.admit_bytes(Counted::Elements(index), len) {
            self.fail_step(index, 0, error);
            return;
        }
        self.begin(index, StepStatus::Running).items =
            Some(items.into_iter().map(ItemState::pending).collect());
        self.record(
            EventType::StepStarted,
            Some(index),
            Some(1),
            json!({ "items": count }),
        );
        self.fill_items(index);
    }

    fn start_sleep(&mut self, index: usize, spec: &SleepSpec) {
        let until = match spec {
            SleepSpec::Duration { ms: d } => Ok(self.ctx.now + ms(*d)),
            SleepSpec::Until(t) => {
                let rendered = self.render(t, None);
                rendered
                    .as_str()
                    .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                    .map(|t| t.with_timezone(&Utc))
                    .ok_or(rendered)
            }
        };
        match until {
            Ok(until) => {
                self.begin(index, StepStatus::Waiting).wake_at = Some(until);
                self.record(
                    EventType::StepWaiting,
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

    fn start_child(&mut self, index: usize, name: &str, version: Option<i32>, input: Value) {
        let doc = Doc::of(&input);
        if let Err(error) = self.admit_input(index, None, doc.len()) {
            self.fail_step(index, 0, error);
            return;
        }
        self.begin(index, StepStatus::Running).input = Some(doc);
        let child = child_id(&self.state.id, &self.def.steps[index].id, None);
        self.record(
            EventType::ChildStarted,
            Some(index),
            Some(1),
            json!({ "child_id": child, "workflow": name }),
        );
        self.decision.commands.push(Command::StartChild {
            step: index,
            item: None,
            child_id: child,
            workflow: name.to_string(),
            version,
            input,
        });
    }

    /// Starts pending items of a `for_each` step up to `max_parallel`, and
    /// completes the step once every item finished. True if anything moved.
    pub(super) fn fill_items(&mut self, index: usize) -> bool {
        let limit = self.def.steps[index]
            .for_each
            .as_ref()
            .and_then(|f| f.max_parallel)
            .map_or(usize::MAX, |m| m as usize);
        let mut progressed = false;
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
            let item_value = items[k].input.clone();
            if self.out_of_budget() {
                return progressed;
            }
            progressed = true;
            self.changed.insert(index);
            if !self.start_item(index, k, Some((&item_value, k))) {
                return true;
            }
        }
        progressed | self.finish_items(index)
    }

    /// Starts element `k`; false if that failed the whole step.
    fn start_item(&mut self, index: usize, k: usize, scope: ItemScope) -> bool {
        let now = self.ctx.now;
        let step_def = &self.def.steps[index];
        match &step_def.kind {
            StepKind::Value(template) => {
                let output = self.render(template, scope);
                if let Err(error) = self.admit_output(index, Some(k), json_len(&output)) {
                    self.fail_step(index, 1, error);
                    return false;
                }
                let it = &mut self.state.steps[index].items.as_mut().expect("items")[k];
                it.status = StepStatus::Completed;
                it.attempt = 1;
                it.output = Some(output);
                it.started_at = Some(now);
                it.ended_at = Some(now);
            }
            StepKind::Task { input, .. } => {
                let input = self.render_optional(input.as_ref(), scope);
                return self.schedule_item(index, k, input);
            }
            StepKind::Http(call) => {
                let input = self.render_http(call, scope);
                return self.schedule_item(index, k, input);
            }
            StepKind::Workflow {
                name,
                version,
                input,
            } => {
                // The child stores its input (and holds it to its own
                // limit); the element stays as it was counted.
                let input = self.render_optional(input.as_ref(), scope);
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
                return false;
            }
        }
        true
    }

    /// Completes a running `for_each` step once every element finished
    /// (failed ones count with `on_failure: continue`); true if it did.
    fn finish_items(&mut self, index: usize) -> bool {
        let continue_on_failure = self.def.steps[index].on_failure == OnFailure::Continue;
        let items = self.state.steps[index].items.as_ref().expect("items");
        let done = items.iter().all(|i| {
            i.status == StepStatus::Completed
                || (i.status == StepStatus::Failed && continue_on_failure)
        });
        if !done || self.state.steps[index].status != StepStatus::Running {
            return false;
        }
        let output: Vec<Value> = items
            .iter()
            .map(|i| i.output.clone().unwrap_or(Value::Null))
            .collect();
        self.changed.insert(index);
        self.complete_step(index, Value::Array(output), json!({}));
        true
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
        let doc = Doc::of(&input);
        if let Err(error) = self.admit_input(index, None, doc.len()) {
            self.fail_step(index, 0, error);
            return;
        }
        let now = self.ctx.now;
        let s = &mut self.state.steps[index];
        s.status = StepStatus::Scheduled;
        s.attempt = 1;
        s.input = Some(doc);
        s.scheduled_at = Some(now);
        self.queue_first_attempt(index, TaskPurpose::Run, input);
    }

    /// Records that attempt 1 of step `index` (or of its compensation) is
    /// scheduled with `input`, and queues it.
    pub(super) fn queue_first_attempt(&mut self, index: usize, purpose: TaskPurpose, input: Value) {
        let kind = match purpose {
            TaskPurpose::Run => EventType::StepScheduled,
            TaskPurpose::Compensate => EventType::CompensationScheduled,
        };
        self.record(kind, Some(index), Some(1), json!({ "input": input }));
        self.enqueue(index, None, purpose, 1, input, 0);
    }

    /// Queues element `k`; false if its input failed the whole step.
    fn schedule_item(&mut self, index: usize, k: usize, input: Value) -> bool {
        // The rendered input replaces the element, which is counted already.
        let element = &self.state.steps[index].items.as_ref().expect("items")[k].input;
        let added = json_len(&input).saturating_sub(json_len(element));
        if let Err(error) = self.admit_bytes(Counted::Input(index, Some(k)), added) {
            self.fail_step(index, 1, error);
            return false;
        }
        let it = &mut self.state.steps[index].items.as_mut().expect("items")[k];
        it.status = StepStatus::Scheduled;
        it.attempt = 1;
        it.input = input.clone();
        self.enqueue(index, Some(k as u32), TaskPurpose::Run, 1, input, 0);
        true
    }

    /// Where an attempt of step `index` runs: kind, queue and timeout.
    fn target(&self, index: usize, purpose: TaskPurpose) -> (TaskKind, String, Option<u64>) {
        let step_def = &self.def.steps[index];
        match purpose {
            TaskPurpose::Run => match &step_def.kind {
                StepKind::Task { queue, .. } => {
                    (TaskKind::Task, queue.clone(), step_def.timeout_ms)
                }
                _ => (TaskKind::Http, HTTP_QUEUE.to_string(), step_def.timeout_ms),
            },
            TaskPurpose::Compensate => {
                let comp = step_def.compensate.as_ref().expect("compensation");
                match &comp.action {
                    CompensationAction::Task { queue, .. } => {
                        (TaskKind::Task, queue.clone(), comp.timeout_ms)
                    }
                    CompensationAction::Http(_) => {
                        (TaskKind::Http, HTTP_QUEUE.to_string(), comp.timeout_ms)
                    }
                }
            }
        }
    }

    pub(super) fn enqueue(
        &mut self,
        index: usize,
        item: Option<u32>,
        purpose: TaskPurpose,
        attempt: u32,
        input: Value,
        delay_ms: u64,
    ) {
        let (kind, queue, timeout_ms) = self.target(index, purpose);
        let (id, step) = (&self.state.id, &self.def.steps[index].id);
        let idempotency_key = match (purpose, item) {
            (TaskPurpose::Compensate, _) => format!("{id}:{step}:compensate"),
            (TaskPurpose::Run, Some(k)) => format!("{id}:{step}:{k}"),
            (TaskPurpose::Run, None) => format!("{id}:{step}"),
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

    /// Admits an output of step `index` (element `item`): the `limit`
    /// error if it is longer than `max_step_output_bytes` or would take
    /// what the instance stores past `max_instance_bytes`.
    pub(super) fn admit_output(
        &mut self,
        index: usize,
        item: Option<usize>,
        len: usize,
    ) -> Result<(), Value> {
        let max = self.ctx.limits.max_step_output_bytes;
        let what = Counted::Output(index, item);
        if len > max {
            return Err(limit_error(
                "max_step_output_bytes",
                format!(
                    "{} is {len} bytes, over the limit of {max} (--max-step-output-bytes)",
                    what.describe(self.def)
                ),
            ));
        }
        self.admit_bytes(what, len)
    }

    /// Counts `len` more bytes (of `what`) in what the instance stores: the
    /// `limit` error if they would take it past `max_instance_bytes`.
    pub(super) fn admit_bytes(&mut self, what: Counted, len: usize) -> Result<(), Value> {
        let max = self.ctx.limits.max_instance_bytes;
        let total = self.state.stored_bytes.saturating_add(len as u64);
        if total > max {
            return Err(limit_error(
                "max_instance_bytes",
                format!(
                    "{} ({len} bytes) would bring what the instance stores to {total} bytes, over the limit of {max} (--max-instance-bytes)",
                    what.describe(self.def)
                ),
            ));
        }
        self.state.stored_bytes = total;
        self.added_bytes += len as u64;
        Ok(())
    }

    /// Admits the input of step `index` (element `item`), like an output.
    fn admit_input(&mut self, index: usize, item: Option<usize>, len: usize) -> Result<(), Value> {
        self.admit_bytes(Counted::Input(index, item), len)
    }

    fn next_completion_order(&self) -> u32 {
        self.state
            .steps
            .iter()
            .filter_map(|s| s.completion_order)
            .max()
            .map_or(1, |m| m + 1)
    }

    pub(super) fn complete_step(&mut self, index: usize, output: Value, mut data: Value) {
        let doc = Doc::of(&output);
        if let Err(error) = self.admit_output(index, None, doc.len()) {
            let attempt = self.state.steps[index].attempt.max(1);
            self.fail_step(index, attempt, error);
            return;
        }
        let order = self.next_completion_order();
        let now = self.ctx.now;
        let s = &mut self.state.steps[index];
        s.status = StepStatus::Completed;
        s.output = Some(doc);
        s.error = None;
        s.ended_at = Some(now);
        s.completion_order = Some(order);
        let attempt = s.attempt.max(1);
        self.changed.insert(index);
        data["output"] = output;
        self.record(EventType::StepCompleted, Some(index), Some(attempt), data);
    }

    /// A step failed for good: the workflow goes on (`on_failure:
    /// continue`) with the error as the step's output, or the instance winds
    /// down to `failed`.
    pub(super) fn fail_step(&mut self, index: usize, attempt: u32, error: Value) {
        let now = self.ctx.now;
        let step_def = &self.def.steps[index];
        let continue_on_failure = step_def.on_failure == OnFailure::Continue;
        let s = &mut self.state.steps[index];
        s.status = StepStatus::Failed;
        s.error = Some(error.clone());
        s.wake_at = None;
        s.ended_at = Some(now);
        if continue_on_failure {
            s.output = Some(Doc::of(&error));
        }
        self.changed.insert(index);
        self.record(
            EventType::StepFailed,
            Some(index),
            Some(attempt),
            json!({ "error": error, "continue": continue_on_failure }),
        );
        if continue_on_failure {
            return;
        }
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("step failed")
            .to_string();
        self.begin_ending(
            Ending::Failed,
            json!({
                "message": format!("step {} failed: {message}", step_def.id),
                "step": step_def.id,
                "error": error,
            }),
        );
    }
}

/// What a count of stored bytes is of: named in the limit error only, so
/// that a value within the limits costs no text.
#[derive(Clone, Copy)]
pub(super) enum Counted {
    /// The output of step `.0` (element `.1`).
    Output(usize, Option<usize>),
    /// The input of step `.0` (element `.1`).
    Input(usize, Option<usize>),
    /// The elements of `for_each` step `.0`.
    Elements(usize),
    /// The instance's own output.
    InstanceOutput,
}

impl Counted {
    fn describe(self, def: &Definition) -> String {
        let step = |i: usize| &def.steps[i].id;
        match self {
            Counted::Output(i, Some(k)) => format!("the output of element {k} of step {}", step(i)),
            Counted::Output(i, None) => format!("the output of step {}", step(i)),
            Counted::Input(i, Some(k)) => format!("the input of element {k} of step {}", step(i)),
            Counted::Input(i, None) => format!("the input of step {}", step(i)),
            Counted::Elements(i) => format!("the elements of step {}", step(i)),
            Counted::InstanceOutput => "the instance's output".to_string(),
        }
    }
}
