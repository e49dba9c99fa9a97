//! How an instance ends: completing, winding down (withdraw what is in
//! flight, then compensate the completed steps one at a time, newest
//! first), and being retried after a failure.

use serde_json::{json, Value};

use super::steps::Counted;
use super::{json_len, ms, Command, Run};
use crate::definition::{CompensationAction, StepKind};
use crate::model::{
    CompensationState, Ending, EventType, InstanceStatus, StepState, StepStatus, TaskPurpose,
};

impl Run<'_, '_, '_, '_> {
    /// Stops everything in flight and starts compensating; the instance ends
    /// `failed` or `cancelled` when the compensations are done.
    pub(super) fn begin_ending(&mut self, ending: Ending, error: Value) {
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
    pub(super) fn drive_compensation(&mut self) {
        let in_flight = self.state.steps.iter().any(|s| {
            s.compensation
                .as_ref()
                .is_some_and(|c| c.status == StepStatus::Scheduled)
        });
        if in_flight {
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
        match next {
            Some(index) => self.schedule_compensation(index),
            None => self.finish_ending(),
        }
    }

    fn schedule_compensation(&mut self, index: usize) {
        let comp = self.def.steps[index]
            .compensate
            .as_ref()
            .expect("compensation");
        let input = match &comp.action {
            CompensationAction::Http(call) => self.render_http(call, None),
            CompensationAction::Task { input, .. } => self.render_optional(input.as_ref(), None),
        };
        self.state.steps[index].compensation = Some(CompensationState {
            status: StepStatus::Scheduled,
            attempt: 1,
            input: input.clone(),
            output: None,
            error: None,
        });
        self.changed.insert(index);
        self.queue_first_attempt(index, TaskPurpose::Compensate, input);
    }

    /// Every compensation has run: the instance takes the status it was
    /// heading for.
    fn finish_ending(&mut self) {
        let ending = self.state.ending.take().expect("ending");
        let error = self.state.error.clone().unwrap_or(Value::Null);
        self.state.status = ending.status();
        let kind = match ending {
            Ending::Failed => EventType::InstanceFailed,
            Ending::Cancelled => EventType::InstanceCancelled,
        };
        self.record(kind, None, None, json!({ "error": error }));
    }

    pub(super) fn complete_instance(&mut self) {
        let output = match &self.def.output {
            Some(template) => self.render(template, None),
            None => Value::Object(self.outputs()),
        };
        if let Err(error) = self.admit_bytes(Counted::InstanceOutput, json_len(&output)) {
            self.begin_ending(Ending::Failed, error);
            return;
        }
        self.state.status = InstanceStatus::Completed;
        self.state.output = Some(output.clone());
        // Every step has finished, so the instance has nothing left in the
        // queue to withdraw.
        self.record(
            EventType::InstanceCompleted,
            None,
            None,
            json!({ "output": output }),
        );
    }

    /// Runs a failed (or cancelled) instance again from its failed,
    /// cancelled and compensated steps; completed steps keep their outputs.
    pub(super) fn retry_instance(&mut self) {
        let now = self.ctx.now;
        let mut restarted = Vec::new();
        for (i, s) in self.state.steps.iter_mut().enumerate() {
            match s.status {
                // A compensated step's effect was undone: run it again too.
                StepStatus::Failed | StepStatus::Cancelled | StepStatus::Compensated => {
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
        self.state.stored_bytes = super::stored_bytes(self.state);
        self.state.ending = None;
        self.state.deadline_at = self.def.timeout_ms.map(|t| now + ms(t));
        self.record(
            EventType::InstanceRetried,
            None,
            None,
            json!({ "steps": restarted }),
        );
    }
}
