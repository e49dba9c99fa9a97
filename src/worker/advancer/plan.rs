//! The advancer's pure half: rows → engine inputs (`engine_inputs`), and a
//! decision → the rows to write and what to count (`Plan::record`). No IO:
//! both are unit-tested without a database.

use chrono::{DateTime, Utc};

use super::observations::{
    Attempt, InlineOutcome, InstanceEnded, Observations, StepEnded, StepLabels,
};
use crate::definition::{Definition, StepKind};
#[cfg(test)]
use crate::engine::{self, Context};
use crate::engine::{
    Command, Decision, Event, HistoryEntry, InstanceState, PendingSignal, HTTP_QUEUE,
};
use crate::model::{InstanceStatus, StepStatus, TaskPurpose, TaskResult};
use crate::store::{
    AdvanceWrites, DueInstance, FinishedTask, InstanceUpdate, Lease, NewChild, NewEvent, NewTask,
    StepWrite,
};

/// What `engine::decide` reads about a locked instance: its state,
/// index-aligned with the definition (steps without a row are pending), and
/// the events since the last decision, in the order they apply.
/// The instance's input and steps are moved out of `due`, not copied: they
/// are the largest part of a batch's memory.
pub(super) fn engine_inputs(
    def: &Definition,
    due: &mut DueInstance,
) -> (InstanceState, Vec<Event>) {
    let input = std::mem::take(&mut due.input);
    let mut state = InstanceState::new(&due.id, input, def.steps.len());
    state.status = due.status;
    state.output = due.output.clone();
    state.error = due.error.clone();
    state.ending = due.ending;
    state.deadline_at = due.deadline_at;
    state.recorded_events = due.event_seq.max(0) as u32;
    for row in std::mem::take(&mut due.steps) {
        if let Some(i) = def.step_index(&row.step_id) {
            state.steps[i] = row.state;
        }
    }
    // Rows from before schema version 14 start at 0: count them once.
    let stepped = state.steps.iter().any(|s| s.status != StepStatus::Pending);
    state.stored_bytes = match due.stored_bytes {
        0 if stepped => crate::engine::stored_bytes(&state),
        n => n.max(0) as u64,
    };
    let mut events = Vec::with_capacity(due.results.len() + due.signals.len() + 3);
    if due.status == InstanceStatus::Pending {
        events.push(Event::Start);
    }
    for r in &due.results {
        if let Some(step) = def.step_index(&r.step_id) {
            events.push(Event::TaskFinished {
                step,
                item: r.item,
                purpose: r.purpose,
                attempt: r.attempt,
                result: r.result.clone(),
                started_at: r.leased_at,
                worker: r.leased_by.clone(),
            });
        }
    }
    events.extend(due.signals.iter().map(|s| {
        Event::Signal(PendingSignal {
            id: s.id,
            name: s.name.clone(),
            payload: s.payload.clone(),
        })
    }));
    if let Some(reason) = &due.cancel_requested {
        events.push(Event::CancelRequested {
            reason: reason.clone(),
        });
    }
    if due.retry_requested {
        events.push(Event::RetryRequested);
    }
    (state, events)
}

/// The `kind` label of an attempt: the step's kind, or `compensation`.
fn attempt_kind(def: &Definition, step: usize, purpose: TaskPurpose) -> &'static str {
    match purpose {
        TaskPurpose::Compensate => "compensation",
        TaskPurpose::Run => def.steps[step].kind.name(),
    }
}

/// The queue label of a step kind: where its attempts run, or `none` for
/// steps that run no task (sleep, signal, value).
fn step_queue(kind: &StepKind) -> &str {
    match kind {
        StepKind::Task { queue, .. } => queue,
        StepKind::Http(_) => HTTP_QUEUE,
        StepKind::Workflow { .. } => "stead.workflow",
        StepKind::Sleep(_) | StepKind::Signal { .. } | StepKind::Value(_) => "none",
    }
}

fn labels(due: &DueInstance, kind: &'static str, queue: &str) -> StepLabels {
    StepLabels {
        workflow: due.workflow_name.clone(),
        kind,
        queue: queue.to_string(),
    }
}

fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_milliseconds().max(0) as f64 / 1000.0
}

/// What running attempts inline adds to an instance's decision.
#[derive(Debug, Default)]
pub(super) struct Inline {
    /// Per history entry of the decision, when it happened if after the
    /// batch's clock (entries of later rounds).
    pub history_at: Vec<Option<DateTime<Utc>>>,
    /// When the decision's last round was taken.
    pub decided_at: Option<DateTime<Utc>>,
    /// The attempts that ran inline and finished.
    pub attempts: Vec<InlineAttempt>,
    /// Attempts still running when the inline budget ran out: queued as
    /// task rows leased to this member (`EnqueueTask` commands).
    pub promoted: Vec<(Command, Lease)>,
}

/// An attempt that ran inside the advance transaction.
#[derive(Debug, Clone)]
pub(super) struct InlineAttempt {
    pub step: usize,
    pub purpose: TaskPurpose,
    pub queue: String,
    pub attempt: u32,
    pub result: TaskResult,
}

/// The writes and observations of one batch, instance by instance.
pub(super) struct Plan {
    pub writes: AdvanceWrites,
    pub observed: Observations,
}

impl Plan {
    /// A plan of `member`'s batch, decided at `now`.
    pub(super) fn new(now: DateTime<Utc>, member: &str) -> Self {
        Plan {
            writes: AdvanceWrites {
                now,
                member: member.to_string(),
                ..AdvanceWrites::default()
            },
            observed: Observations::default(),
        }
    }

    /// Rows → engine inputs → decision → writes, for one instance (the
    /// advancer does this in steps, running attempts inline between them).
    #[cfg(test)]
    pub(super) fn decide(&mut self, def: &Definition, due: &DueInstance, ctx: &mut Context<'_>) {
        let (mut state, events) = engine_inputs(def, &mut due.clone());
        let steps_before: Vec<StepStatus> = state.steps.iter().map(|s| s.status).collect();
        let decision = engine::decide(def, &mut state, &events, ctx);
        self.record(def, due, &steps_before, state, decision, Inline::default());
    }

    /// The writes and observations of one decision. `steps_before` are the
    /// step statuses the decision started from; `inline` what running its
    /// attempts inline added (nothing, for a decision that ran none).
    pub(super) fn record(
        &mut self,
        def: &Definition,
        due: &DueInstance,
        steps_before: &[StepStatus],
        state: InstanceState,
        decision: Decision,
        inline: Inline,
    ) {
        for r in &due.results {
            self.consume_result(def, due, r);
        }
        for a in &inline.attempts {
            self.observe_inline(def, due, a);
        }
        for &i in &decision.changed_steps {
            self.write_step(def, due, i, steps_before[i], &state);
        }
        for command in decision.commands {
            self.write_command(def, due, command, None);
        }
        for (command, lease) in inline.promoted {
            self.write_command(def, due, command, Some(lease));
        }
        let seq = self.write_history(due, decision.history, &inline.history_at);
        let decided_at = inline.decided_at.unwrap_or(self.writes.now);
        self.write_instance(due, state, decision.wake_at, seq, decided_at);
    }

    /// Counts an inline attempt like one whose result came from the queue.
    fn observe_inline(&mut self, def: &Definition, due: &DueInstance, a: &InlineAttempt) {
        let kind = attempt_kind(def, a.step, a.purpose);
        if a.attempt > 1 {
            self.observed.retries.push(labels(due, kind, &a.queue));
        }
        let failure = match &a.result {
            TaskResult::Failed(f) => Some((
                due.id.clone(),
                def.steps[a.step].id.clone(),
                a.attempt,
                f.to_json(),
            )),
            TaskResult::Completed(_) => None,
        };
        self.observed
            .inline
            .push((labels(due, kind, &a.queue), InlineOutcome::Recorded));
        self.observed.attempts.push(Attempt {
            labels: labels(due, kind, &a.queue),
            outcome: a.result.outcome(),
            failure,
        });
    }

    /// The writes of the whole batch.
    pub(super) fn finish(&mut self) -> &AdvanceWrites {
        self.writes.notify_queues.sort();
        self.writes.notify_queues.dedup();
        &self.writes
    }

    /// Every result row is consumed, including stale ones the engine
    /// ignores, so the queue never keeps them; those of known steps count.
    fn consume_result(&mut self, def: &Definition, due: &DueInstance, r: &FinishedTask) {
        self.writes.consumed_tasks.push(r.task_id);
        let Some(step) = def.step_index(&r.step_id) else {
            return;
        };
        let outcome = r.result.outcome();
        let failure = match &r.result {
            TaskResult::Failed(f) => {
                Some((due.id.clone(), r.step_id.clone(), r.attempt, f.to_json()))
            }
            TaskResult::Completed(_) => None,
        };
        self.observed.attempts.push(Attempt {
            labels: labels(due, attempt_kind(def, step, r.purpose), &r.queue),
            outcome,
            failure,
        });
    }

    fn write_step(
        &mut self,
        def: &Definition,
        due: &DueInstance,
        i: usize,
        before: StepStatus,
        state: &InstanceState,
    ) {
        let s = &state.steps[i];
        let step_def = &def.steps[i];
        if s.status.is_ended() && before != s.status {
            let began = s.scheduled_at.or(s.started_at);
            let seconds = match (began, s.ended_at) {
                (Some(b), Some(e)) => seconds_between(b, e),
                _ => 0.0,
            };
            let kind = step_def.kind.name();
            self.observed.steps_ended.push(StepEnded {
                labels: labels(due, kind, step_queue(&step_def.kind)),
                status: s.status,
                seconds,
            });
        }
        self.writes.steps.push(StepWrite {
            instance_id: due.id.clone(),
            step_id: step_def.id.clone(),
            position: i as i32,
            kind: step_def.kind.kind_name(),
            state: s.clone(),
        });
    }

    /// Carries out one command; an `EnqueueTask` with a `lease` is a
    /// promoted inline attempt (a row leased to this member, no wake-up).
    fn write_command(
        &mut self,
        def: &Definition,
        due: &DueInstance,
        command: Command,
        lease: Option<Lease>,
    ) {
        let w = &mut self.writes;
        match command {
            Command::EnqueueTask {
                step,
                item,
                purpose,
                attempt,
                kind,
                queue,
                input,
                delay_ms,
                timeout_ms,
                idempotency_key,
            } => {
                if attempt > 1 {
                    let kind = attempt_kind(def, step, purpose);
                    self.observed.retries.push(labels(due, kind, &queue));
                }
                if lease.is_none() {
                    w.notify_queues.push(queue.clone());
                } else {
                    let kind = attempt_kind(def, step, purpose);
                    let labels = labels(due, kind, &queue);
                    self.observed
                        .inline
                        .push((labels, InlineOutcome::HandedOver));
                }
                let task = NewTask {
                    queue,
                    kind,
                    instance_id: due.id.clone(),
                    step_id: def.steps[step].id.clone(),
                    slot: due.slot,
                    attempt: attempt as i32,
                    input,
                    idempotency_key,
                    delay_ms,
                    timeout_ms,
                    item: item.map(|k| k as i32),
                    purpose,
                    priority: due.priority,
                    lease,
                };
                match task.lease {
                    Some(_) => w.leased_tasks.push(task),
                    None => w.tasks.push(task),
                }
            }
            Command::StartChild {
                step,
                item,
                child_id,
                workflow,
                version,
                input,
            } => w.children.push(NewChild {
                parent_id: due.id.clone(),
                parent_slot: due.slot,
                step_id: def.steps[step].id.clone(),
                item: item.map(|k| k as i32),
                child_id,
                workflow,
                version,
                input,
            }),
            Command::WithdrawTasks => w.withdraw_instances.push(due.id.clone()),
            Command::CancelChildren => w.cancel_children_of.push(due.id.clone()),
            Command::ConsumeSignal { id, step } => {
                w.consumed_signals.push((id, def.steps[step].id.clone()))
            }
        }
    }

    /// Appends the decision's history after the instance's last event;
    /// returns the new last sequence number.
    fn write_history(
        &mut self,
        due: &DueInstance,
        history: Vec<HistoryEntry>,
        at: &[Option<DateTime<Utc>>],
    ) -> i32 {
        let mut seq = due.event_seq;
        for (i, h) in history.into_iter().enumerate() {
            seq += 1;
            self.writes.events.push(NewEvent {
                instance_id: due.id.clone(),
                seq,
                kind: h.kind,
                step_id: h.step_id,
                attempt: h.attempt.map(|a| a as i32),
                data: h.data,
                at: at.get(i).copied().flatten(),
            });
        }
        seq
    }

    fn write_instance(
        &mut self,
        due: &DueInstance,
        state: InstanceState,
        wake_at: Option<DateTime<Utc>>,
        event_seq: i32,
        decided_at: DateTime<Utc>,
    ) {
        // Ended now: it had not ended, or it ran again on a retry (which,
        // with its steps run inline, can end in the same transaction).
        let ran = !due.status.is_terminal() || due.retry_requested;
        if state.status.is_terminal() && ran {
            self.writes.ended_instances.push(due.id.clone());
            if due.is_child {
                self.writes.ended_children.push(due.id.clone());
            }
            self.observed.ended.push(InstanceEnded {
                id: due.id.clone(),
                workflow: due.workflow_name.clone(),
                status: state.status,
                seconds: seconds_between(due.created_at, decided_at),
            });
        }
        if due.status == InstanceStatus::Pending && state.status != InstanceStatus::Pending {
            self.observed.started.push(due.workflow_name.clone());
        }
        self.writes.instances.push(InstanceUpdate {
            id: due.id.clone(),
            row_at: due.row_at.clone(),
            expected_version: due.state_version,
            status: state.status,
            output: state.output,
            error: state.error,
            event_seq,
            wake_at,
            ending: state.ending,
            deadline_at: state.deadline_at,
            stored_bytes: i64::try_from(state.stored_bytes).unwrap_or(i64::MAX),
            decided_at,
        });
    }
}

#[cfg(test)]
mod tests;
