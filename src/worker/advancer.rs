//! The engine driver: locks instances that need a decision, runs the pure
//! engine on each, and persists all the results of a batch in one
//! transaction (fenced by each instance's state version).

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{drain, jittered, DefinitionCache, Wakeups};
use crate::definition::{Definition, StepKind};
use crate::engine::{
    self, Command, CompensationState, Context, Ending, Event, InstanceState, InstanceStatus,
    ItemState, PendingSignal, StepState, StepStatus, TaskPurpose, TaskResult,
};
use crate::membership::Ownership;
use crate::metrics::{Component, Metrics};
use crate::store::{
    AdvanceWrites, DueInstance, FinishedTask, InstanceUpdate, NewChild, NewEvent, NewTask,
    SignalRow, StepRow, Store, StoreError,
};

#[derive(Debug, Clone)]
pub struct AdvancerConfig {
    pub batch_size: usize,
    pub poll_interval_ms: u64,
    pub error_backoff_ms: u64,
}

pub struct Advancer {
    pub config: AdvancerConfig,
    pub store: Store,
    pub definitions: DefinitionCache,
    pub wakeups: Wakeups,
    pub ownership: Ownership,
    pub metrics: Arc<Metrics>,
}

impl Advancer {
    pub async fn run(self, cancel: CancellationToken) {
        let mut wake = self.wakeups.advance.subscribe();
        loop {
            if cancel.is_cancelled() {
                return;
            }
            drain(&mut wake);
            match self.run_once().await {
                // A full batch: more may be waiting, go again at once.
                Ok(n) if n >= self.config.batch_size => continue,
                Ok(_) => {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = wake.recv() => {}
                        _ = tokio::time::sleep(jittered(self.config.poll_interval_ms)) => {}
                    }
                }
                Err(StoreError::Fenced(reason)) => {
                    tracing::debug!(%reason, "advance batch fenced; retrying");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "advancing instances failed");
                    self.metrics.db_error(Component::Advancer);
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(jittered(self.config.error_backoff_ms)) => {}
                    }
                }
            }
        }
    }

    /// Moves one batch of instances on; returns how many it looked at.
    pub async fn run_once(&self) -> Result<usize, StoreError> {
        // Held for the whole batch: the member does not hand these slots
        // over while the batch is in flight.
        let owned = self.ownership.read().await;
        if owned.slots().is_empty() {
            return Ok(0);
        }
        let started = std::time::Instant::now();
        let tx = self.store.begin_advance().await?;
        let (due, now) = tx
            .lock_due(self.config.batch_size as i64, owned.slots())
            .await?;
        if due.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        let ids: Vec<String> = due.iter().map(|d| d.id.clone()).collect();
        let loaded = tx.load(&ids).await?;
        let mut steps_by_instance: HashMap<&str, Vec<&StepRow>> = HashMap::new();
        for s in &loaded.steps {
            steps_by_instance.entry(&s.instance_id).or_default().push(s);
        }
        let mut results_by_instance: HashMap<&str, Vec<&FinishedTask>> = HashMap::new();
        for t in &loaded.finished {
            results_by_instance
                .entry(&t.instance_id)
                .or_default()
                .push(t);
        }
        let mut signals_by_instance: HashMap<&str, Vec<&SignalRow>> = HashMap::new();
        for sig in &loaded.signals {
            signals_by_instance
                .entry(&sig.instance_id)
                .or_default()
                .push(sig);
        }

        let mut writes = AdvanceWrites {
            now,
            ..AdvanceWrites::default()
        };
        let mut observed = Observations::default();
        // StdRng rather than thread_rng: the future must stay Send.
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_entropy();
        let mut random = || rand::Rng::gen::<f64>(&mut rng);
        for instance in &due {
            let def = match self
                .definitions
                .get_in(&tx, &instance.workflow_name, instance.workflow_version)
                .await?
            {
                Some(def) => def,
                None => {
                    tracing::error!(instance = %instance.id, "instance refers to a missing or invalid definition");
                    continue;
                }
            };
            let id = instance.id.as_str();
            let steps = steps_by_instance.remove(id).unwrap_or_default();
            let results = results_by_instance.remove(id).unwrap_or_default();
            let signals = signals_by_instance.remove(id).unwrap_or_default();
            let mut ctx = Context {
                now,
                random: &mut random,
            };
            let inputs = Inputs {
                steps: &steps,
                results: &results,
                signals: &signals,
            };
            self.decide_one(&def, instance, inputs, &mut ctx, &mut writes, &mut observed);
        }
        writes.notify_queues.sort();
        writes.notify_queues.dedup();
        let n = due.len();
        tx.commit(&writes).await?;
        self.metrics
            .advance_batch_seconds
            .observe(started.elapsed().as_secs_f64());
        // Counted only now: a batch that did not commit changed nothing.
        observed.apply(&self.metrics);
        Ok(n)
    }

    fn decide_one(
        &self,
        def: &Definition,
        instance: &DueInstance,
        inputs: Inputs<'_>,
        ctx: &mut Context<'_>,
        writes: &mut AdvanceWrites,
        observed: &mut Observations,
    ) {
        let workflow = instance.workflow_name.as_str();
        let mut state = InstanceState::new(&instance.id, instance.input.clone(), def.steps.len());
        state.status = InstanceStatus::parse(&instance.status).unwrap_or(InstanceStatus::Failed);
        state.output = instance.output.clone();
        state.error = instance.error.clone();
        state.ending = instance.ending.as_deref().and_then(Ending::parse);
        state.deadline_at = instance.deadline_at;
        for row in inputs.steps {
            if let Some(i) = def.step_index(&row.step_id) {
                state.steps[i] = step_state(row);
            }
        }
        let mut events = Vec::with_capacity(inputs.results.len() + 3);
        if state.status == InstanceStatus::Pending {
            events.push(Event::Start);
        }
        for r in inputs.results {
            // Every result row is consumed, including stale ones the engine
            // ignores, so the queue never keeps them.
            writes.consumed_tasks.push(r.task_id);
            let Some(step) = def.step_index(&r.step_id) else {
                continue;
            };
            let purpose = TaskPurpose::parse(&r.purpose).unwrap_or(TaskPurpose::Run);
            let kind = attempt_kind(def, step, purpose);
            let outcome = match (r.status.as_str(), &r.error) {
                ("completed", _) => "completed",
                (_, Some(e)) if e.get("expired") == Some(&Value::Bool(true)) => "expired",
                _ => "failed",
            };
            if outcome != "completed" {
                tracing::debug!(
                    instance = %instance.id,
                    step = %r.step_id,
                    attempt = r.attempt,
                    outcome,
                    error = %r.error.as_ref().unwrap_or(&serde_json::Value::Null),
                    "step attempt failed"
                );
            }
            observed
                .attempts
                .push((workflow.to_string(), kind, r.queue.clone(), outcome));
            events.push(Event::TaskFinished {
                step,
                item: r.item.and_then(|k| u32::try_from(k).ok()),
                purpose,
                attempt: r.attempt.max(0) as u32,
                result: task_result(r),
                started_at: r.leased_at,
                worker: r.leased_by.clone(),
            });
        }
        for sig in inputs.signals {
            events.push(Event::Signal(PendingSignal {
                id: sig.id,
                name: sig.name.clone(),
                payload: sig.payload.clone(),
            }));
        }
        if instance.cancel_requested {
            events.push(Event::CancelRequested {
                reason: instance.cancel_reason.clone(),
            });
        }
        if instance.retry_requested {
            events.push(Event::RetryRequested);
        }

        let before = state.status;
        let steps_before: Vec<StepStatus> = state.steps.iter().map(|s| s.status).collect();
        let decision = engine::decide(def, &mut state, &events, ctx);

        for &i in &decision.changed_steps {
            let s = &state.steps[i];
            let ended = matches!(s.status, StepStatus::Completed | StepStatus::Failed);
            if ended && steps_before[i] != s.status {
                let began = s.scheduled_at.or(s.started_at);
                let seconds = match (began, s.ended_at) {
                    (Some(b), Some(e)) => (e - b).num_milliseconds().max(0) as f64 / 1000.0,
                    _ => 0.0,
                };
                let kind = &def.steps[i].kind;
                observed.steps_ended.push((
                    workflow.to_string(),
                    kind.name(),
                    step_queue(kind).to_string(),
                    s.status.as_str(),
                    seconds,
                ));
            }
            writes.steps.push(StepRow {
                instance_id: instance.id.clone(),
                step_id: def.steps[i].id.clone(),
                position: i as i32,
                kind: def.steps[i].kind.name().to_string(),
                status: s.status.as_str().to_string(),
                attempt: s.attempt as i32,
                input: s.input.clone(),
                output: s.output.clone(),
                error: s.error.clone(),
                scheduled_at: s.scheduled_at,
                started_at: s.started_at,
                ended_at: s.ended_at,
                wake_at: s.wake_at,
                completion_order: s.completion_order.map(|o| o as i32),
                items: s
                    .items
                    .as_ref()
                    .map(|items| serde_json::to_value(items).unwrap_or_default()),
                compensation: s
                    .compensation
                    .as_ref()
                    .map(|c| serde_json::to_value(c).unwrap_or_default()),
            });
        }
        for command in decision.commands {
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
                        observed
                            .retries
                            .push((workflow.to_string(), kind, queue.clone()));
                    }
                    writes.notify_queues.push(queue.clone());
                    writes.tasks.push(NewTask {
                        queue,
                        kind: kind.as_str().to_string(),
                        instance_id: instance.id.clone(),
                        step_id: def.steps[step].id.clone(),
                        slot: instance.slot,
                        attempt: attempt as i32,
                        input,
                        idempotency_key,
                        delay_ms,
                        timeout_ms,
                        item: item.map(|k| k as i32),
                        purpose: purpose.as_str(),
                    });
                }
                Command::StartChild {
                    step,
                    item,
                    child_id,
                    workflow,
                    version,
                    input,
                } => writes.children.push(NewChild {
                    parent_id: instance.id.clone(),
                    parent_slot: instance.slot,
                    step_id: def.steps[step].id.clone(),
                    item: item.map(|k| k as i32),
                    child_id,
                    workflow,
                    version,
                    input,
                }),
                Command::WithdrawTasks => writes.withdraw_instances.push(instance.id.clone()),
                Command::CancelChildren => writes.cancel_children_of.push(instance.id.clone()),
                Command::ConsumeSignal { id, step } => writes
                    .consumed_signals
                    .push((id, def.steps[step].id.clone())),
            }
        }
        let mut seq = instance.event_seq;
        for h in decision.history {
            seq += 1;
            writes.events.push(NewEvent {
                instance_id: instance.id.clone(),
                seq,
                kind: h.kind,
                step_id: h.step_id,
                attempt: h.attempt.map(|a| a as i32),
                data: h.data,
            });
        }
        if state.status.is_terminal() && !before.is_terminal() {
            writes.ended_instances.push(instance.id.clone());
            let seconds = (ctx.now - instance.created_at).num_milliseconds().max(0) as f64;
            observed.ended.push((
                instance.id.clone(),
                workflow.to_string(),
                state.status.as_str(),
                seconds / 1000.0,
            ));
        }
        if before == InstanceStatus::Pending && state.status != InstanceStatus::Pending {
            observed.started.push(workflow.to_string());
        }
        writes.instances.push(InstanceUpdate {
            id: instance.id.clone(),
            expected_version: instance.state_version,
            status: state.status.as_str(),
            output: state.output,
            error: state.error,
            event_seq: seq,
            wake_at: decision.wake_at,
            ending: state.ending.map(Ending::as_str),
            deadline_at: state.deadline_at,
        });
    }
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
        StepKind::Http(_) => engine::HTTP_QUEUE,
        StepKind::Workflow { .. } => "stead.workflow",
        StepKind::Sleep(_) | StepKind::Signal { .. } | StepKind::Value(_) => "none",
    }
}

/// What a batch did, for the metrics; counted only once the batch commits.
#[derive(Default)]
struct Observations {
    /// Workflow of each instance that began.
    started: Vec<String>,
    /// Id, workflow, final status and seconds since submission of each
    /// ended instance.
    ended: Vec<(String, String, &'static str, f64)>,
    /// Workflow, kind, queue and outcome of each finished attempt.
    attempts: Vec<(String, &'static str, String, &'static str)>,
    /// Workflow, kind and queue of each retry scheduled.
    retries: Vec<(String, &'static str, String)>,
    /// Workflow, kind, queue, final status and seconds of each ended step.
    steps_ended: Vec<(String, &'static str, String, &'static str, f64)>,
}

impl Observations {
    fn apply(self, m: &Metrics) {
        for workflow in &self.started {
            m.instance_started(workflow);
        }
        for (id, workflow, status, seconds) in &self.ended {
            tracing::debug!(instance = %id, workflow = %workflow, status, seconds, "instance ended");
            m.instances_ended
                .with_label_values(&[workflow.as_str(), status])
                .inc();
            m.instance_duration
                .with_label_values(&[workflow.as_str(), status])
                .observe(*seconds);
        }
        for (workflow, kind, queue, outcome) in &self.attempts {
            m.step_attempts
                .with_label_values(&[workflow.as_str(), kind, queue, outcome])
                .inc();
        }
        for (workflow, kind, queue) in &self.retries {
            m.step_retries
                .with_label_values(&[workflow.as_str(), kind, queue])
                .inc();
        }
        for (workflow, kind, queue, status, seconds) in &self.steps_ended {
            m.step_duration
                .with_label_values(&[workflow.as_str(), kind, queue, status])
                .observe(*seconds);
        }
    }
}

/// What one instance's decision reads besides the instance row.
struct Inputs<'a> {
    steps: &'a [&'a StepRow],
    results: &'a [&'a FinishedTask],
    signals: &'a [&'a SignalRow],
}

fn task_result(r: &FinishedTask) -> TaskResult {
    if r.status == "completed" {
        return TaskResult::Completed(r.output.clone().unwrap_or(Value::Null));
    }
    let error = r.error.clone().unwrap_or(Value::Null);
    TaskResult::Failed {
        message: error
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("task failed")
            .to_string(),
        retryable: error
            .get("retryable")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        details: error.get("details").cloned(),
    }
}

fn step_state(row: &StepRow) -> StepState {
    StepState {
        status: StepStatus::parse(&row.status).unwrap_or(StepStatus::Pending),
        attempt: row.attempt.max(0) as u32,
        input: row.input.clone(),
        output: row.output.clone(),
        error: row.error.clone(),
        scheduled_at: row.scheduled_at,
        started_at: row.started_at,
        ended_at: row.ended_at,
        wake_at: row.wake_at,
        completion_order: row.completion_order.map(|o| o.max(0) as u32),
        items: row
            .items
            .clone()
            .and_then(|v| serde_json::from_value::<Vec<ItemState>>(v).ok()),
        compensation: row
            .compensation
            .clone()
            .and_then(|v| serde_json::from_value::<CompensationState>(v).ok()),
    }
}
