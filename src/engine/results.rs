//! Applying finished attempts: of a step, of one `for_each` element, or of
//! a compensation. A result counts only for the attempt the engine waits
//! for; anything else is stale and ignored, so each step's result is
//! recorded exactly once.

use serde_json::{json, Value};

use super::{backoff_ms, error_json, Finished, Run};
use crate::definition::{OnFailure, StepKind};
use crate::model::{
    CompensationState, Doc, EventType, InstanceStatus, StepStatus, TaskFailure, TaskPurpose,
    TaskResult,
};

impl Run<'_, '_, '_, '_> {
    /// Whether a failed attempt of step `index` gets another one: the
    /// failure is retryable, attempts are left, and it is not a child
    /// workflow (a child retries inside itself).
    fn may_retry(&self, index: usize, failure: &TaskFailure, attempt: u32) -> bool {
        let step_def = &self.def.steps[index];
        failure.retryable
            && !matches!(step_def.kind, StepKind::Workflow { .. })
            && attempt < step_def.retry.max_attempts
    }

    /// The backoff before the attempt after `attempt` of step `index`.
    fn retry_delay_ms(&mut self, index: usize, attempt: u32) -> u64 {
        backoff_ms(&self.def.steps[index].retry, attempt, (self.ctx.random)())
    }

    pub(super) fn apply_run_result(&mut self, item: Option<u32>, f: Finished<'_>) {
        // Results that arrive while the instance winds down or after it
        // ended are for attempts that were withdrawn: ignore them.
        if !self.live() {
            return;
        }
        if let Some(k) = item {
            self.apply_item_result(k as usize, f);
            return;
        }
        let index = f.index;
        // Only queue-backed kinds have results; a timer or signal step is
        // never completed by one.
        if !matches!(
            self.def.steps[index].kind,
            StepKind::Task { .. } | StepKind::Http(_) | StepKind::Workflow { .. }
        ) {
            return;
        }
        let step = &self.state.steps[index];
        // A result for an attempt the engine no longer waits for is stale:
        // it was recorded already or superseded. Recording it again would
        // break "each step's result is recorded exactly once".
        if !step.status.is_active() || step.attempt != f.attempt || step.items.is_some() {
            return;
        }
        self.changed.insert(index);
        match f.result {
            TaskResult::Completed(output) => {
                let s = &mut self.state.steps[index];
                s.started_at = f.started_at.or(s.started_at);
                self.complete_step(
                    index,
                    output.clone(),
                    json!({ "worker": f.worker, "started_at": f.started_at }),
                );
            }
            TaskResult::Failed(failure) => self.retry_or_fail_step(f, failure),
        }
    }

    fn retry_or_fail_step(&mut self, f: Finished<'_>, failure: &TaskFailure) {
        let (index, attempt) = (f.index, f.attempt);
        let error = error_json(failure, attempt);
        if !self.may_retry(index, failure, attempt) {
            let s = &mut self.state.steps[index];
            s.started_at = f.started_at.or(s.started_at);
            self.fail_step(index, attempt, error);
            return;
        }
        let delay_ms = self.retry_delay_ms(index, attempt);
        let s = &mut self.state.steps[index];
        s.error = Some(error.clone());
        s.attempt = attempt + 1;
        s.status = StepStatus::Scheduled;
        s.started_at = None;
        self.record(
            EventType::StepAttemptFailed,
            Some(index),
            Some(attempt),
            json!({ "error": error, "retry_in_ms": delay_ms, "worker": f.worker }),
        );
        let input = self.state.steps[index]
            .input
            .as_ref()
            .map_or(Value::Null, Doc::to_value);
        self.enqueue(index, None, TaskPurpose::Run, attempt + 1, input, delay_ms);
    }

    fn apply_item_result(&mut self, k: usize, f: Finished<'_>) {
        let (index, attempt) = (f.index, f.attempt);
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
        let failure = match f.result {
            TaskResult::Failed(failure) => failure,
            TaskResult::Completed(output) => {
                if let Err(error) = self.admit_output(index, Some(k), super::json_len(output)) {
                    let failure = TaskFailure::new(
                        error["message"].as_str().unwrap_or("limit").to_string(),
                        false,
                        Some(error),
                    );
                    self.fail_item(k, f, &failure);
                    return;
                }
                let now = self.ctx.now;
                let it = &mut self.state.steps[index].items.as_mut().expect("items")[k];
                it.status = StepStatus::Completed;
                it.output = Some(output.clone());
                it.error = None;
                it.started_at = f.started_at.or(it.started_at);
                it.ended_at = Some(now);
                self.record(
                    EventType::ItemCompleted,
                    Some(index),
                    Some(attempt),
                    json!({ "item": k, "output": output, "worker": f.worker, "started_at": f.started_at }),
                );
                return;
            }
        };
        if self.may_retry(index, failure, attempt) {
            self.retry_item(k, f, failure);
        } else {
            self.fail_item(k, f, failure);
        }
    }

    fn retry_item(&mut self, k: usize, f: Finished<'_>, failure: &TaskFailure) {
        let (index, attempt) = (f.index, f.attempt);
        let error = error_json(failure, attempt);
        let delay_ms = self.retry_delay_ms(index, attempt);
        let it = &mut self.state.steps[index].items.as_mut().expect("items")[k];
        it.error = Some(error.clone());
        it.attempt = attempt + 1;
        it.status = StepStatus::Scheduled;
        it.started_at = None;
        let input = it.input.clone();
        self.record(
            EventType::ItemAttemptFailed,
            Some(index),
            Some(attempt),
            json!({ "item": k, "error": error, "retry_in_ms": delay_ms, "worker": f.worker }),
        );
        let item = Some(k as u32);
        self.enqueue(index, item, TaskPurpose::Run, attempt + 1, input, delay_ms);
    }

    /// An element failed for good: its error becomes its output
    /// (`on_failure: continue`), or the whole step fails.
    fn fail_item(&mut self, k: usize, f: Finished<'_>, failure: &TaskFailure) {
        let (index, attempt) = (f.index, f.attempt);
        let now = self.ctx.now;
        let error = error_json(failure, attempt);
        let continue_on_failure = self.def.steps[index].on_failure == OnFailure::Continue;
        let it = &mut self.state.steps[index].items.as_mut().expect("items")[k];
        it.status = StepStatus::Failed;
        it.error = Some(error.clone());
        it.started_at = f.started_at.or(it.started_at);
        it.ended_at = Some(now);
        if continue_on_failure {
            it.output = Some(error.clone());
        }
        self.record(
            EventType::ItemFailed,
            Some(index),
            Some(attempt),
            json!({ "item": k, "error": error }),
        );
        if !continue_on_failure {
            let step_error = json!({
                "message": format!("item {k} failed: {}", failure.message),
                "retryable": false,
                "item": k,
                "error": error,
            });
            self.fail_step(index, attempt, step_error);
        }
    }

    /// The compensation of step `index`, which has begun.
    fn compensation_mut(&mut self, index: usize) -> &mut CompensationState {
        self.state.steps[index]
            .compensation
            .as_mut()
            .expect("compensation")
    }

    /// Ends step `index`'s compensation `Completed` or `Failed`, in the
    /// history too.
    fn end_compensation(&mut self, index: usize, attempt: u32, status: StepStatus, data: Value) {
        self.compensation_mut(index).status = status;
        let kind = match status {
            StepStatus::Completed => EventType::CompensationCompleted,
            _ => EventType::CompensationFailed,
        };
        self.record(kind, Some(index), Some(attempt), data);
    }

    pub(super) fn apply_compensation_result(&mut self, f: Finished<'_>) {
        let (index, attempt) = (f.index, f.attempt);
        if self.state.status != InstanceStatus::Running || self.state.ending.is_none() {
            return;
        }
        let Some(comp) = &self.state.steps[index].compensation else {
            return;
        };
        if comp.status != StepStatus::Scheduled || comp.attempt != attempt {
            return;
        }
        if self.def.steps[index].compensate.is_none() {
            return;
        }
        self.changed.insert(index);
        match f.result {
            TaskResult::Completed(output) => {
                self.state.steps[index].status = StepStatus::Compensated;
                self.compensation_mut(index).output = Some(output.clone());
                let data = json!({ "output": output });
                self.end_compensation(index, attempt, StepStatus::Completed, data);
            }
            TaskResult::Failed(failure) => self.retry_or_fail_compensation(index, attempt, failure),
        }
    }

    fn retry_or_fail_compensation(&mut self, index: usize, attempt: u32, failure: &TaskFailure) {
        let policy = self.def.steps[index]
            .compensate
            .as_ref()
            .expect("compensation")
            .retry;
        let error = error_json(failure, attempt);
        if !(failure.retryable && attempt < policy.max_attempts) {
            self.fail_compensation(index, attempt, error);
            return;
        }
        let delay_ms = backoff_ms(&policy, attempt, (self.ctx.random)());
        let c = self.compensation_mut(index);
        c.attempt = attempt + 1;
        c.error = Some(error.clone());
        let input = c.input.clone();
        self.record(
            EventType::CompensationAttemptFailed,
            Some(index),
            Some(attempt),
            json!({ "error": error, "retry_in_ms": delay_ms }),
        );
        let next = attempt + 1;
        self.enqueue(index, None, TaskPurpose::Compensate, next, input, delay_ms);
    }

    /// A compensation that failed for good is recorded, and listed in the
    /// instance error so that an operator knows what was not undone.
    fn fail_compensation(&mut self, index: usize, attempt: u32, error: Value) {
        self.compensation_mut(index).error = Some(error.clone());
        let data = json!({ "error": error });
        self.end_compensation(index, attempt, StepStatus::Failed, data);
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
