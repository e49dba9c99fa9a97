//! Running attempts inline: inside the advance transaction, on the member
//! that owns the instance, without a task row (Temporal's "local
//! activities"). When a decision asks only for `task` or `http` attempts
//! whose queue has a handler in this process (and no delay), the advancer runs them at
//! once, feeds their results straight back to the engine and decides again,
//! so a workflow of such steps can finish in the transaction that started
//! it: one instance update, one step row per step and one history row.
//!
//! Guarantees stay as they were: the instances are row-locked until the
//! commit, the commit is fenced by their state version, and a crash or a
//! failed commit loses the attempts' results, so the next owner runs them
//! again with the same idempotency key (at least once).
//!
//! Bounds: attempts take the member's concurrency permits (an instance runs
//! inline only if all of its attempts get one), and the whole run has a time
//! budget. An attempt still running when the budget ends is promoted: its
//! task row is inserted leased to this member as part of the commit, and the
//! executor heartbeats it and records its result like a claimed attempt's.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskCx, Poll};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::task::{JoinError, JoinHandle};

use super::plan::{Inline, InlineAttempt};
use crate::definition::Definition;
use crate::engine::{
    self, Command, Context, Decision, EngineLimits, Event, InstanceState, PendingSignal,
};
use crate::handlers::TaskContext;
use crate::membership::Ownership;
use crate::model::{StepStatus, TaskKind, TaskResult};
use crate::store::{ClaimedTask, DueInstance, Lease};
use crate::worker::executor::{panicked, LocalExecution};

/// Most decisions one instance takes inline in one transaction.
pub(super) const MAX_ROUNDS: usize = 100;

/// One locked instance as the advancer works on it: its state, the decision
/// so far (merged over the inline rounds) and what running inline added.
pub(super) struct Working {
    pub def: Arc<Definition>,
    /// Index into the batch's instances.
    pub due: usize,
    pub state: InstanceState,
    /// Step statuses before the first decision.
    pub steps_before: Vec<StepStatus>,
    pub decision: Decision,
    pub inline: Inline,
    /// Promoted attempts, handed to the executor once the batch commits.
    pub handovers: Vec<Handover>,
    /// Where the last decision's commands begin in `decision.commands`.
    fresh: usize,
    /// Attempts running inline now.
    outstanding: usize,
    /// Results of this round's attempts so far, with when each began.
    finished: Vec<(Command, DateTime<Utc>, TaskResult)>,
    rounds: usize,
}

/// A promoted attempt: its task row's lease token, the attempt as a claimed
/// task (its id is known after the commit) and the running attempt.
pub(crate) struct Handover {
    pub task: ClaimedTask,
    pub attempt: JoinHandle<TaskResult>,
}

impl Working {
    pub(super) fn new(
        def: Arc<Definition>,
        due: usize,
        state: InstanceState,
        steps_before: Vec<StepStatus>,
        decision: Decision,
    ) -> Self {
        let inline = Inline {
            history_at: vec![None; decision.history.len()],
            ..Inline::default()
        };
        Working {
            def,
            due,
            state,
            steps_before,
            decision,
            inline,
            handovers: Vec::new(),
            fresh: 0,
            outstanding: 0,
            finished: Vec::new(),
            rounds: 0,
        }
    }

    /// Folds a later decision (taken at `at`) into the merged one.
    fn merge(&mut self, later: Decision, at: DateTime<Utc>) {
        self.fresh = self.decision.commands.len();
        self.decision.commands.extend(later.commands);
        self.inline
            .history_at
            .extend(std::iter::repeat(Some(at)).take(later.history.len()));
        self.decision.history.extend(later.history);
        for step in later.changed_steps {
            if !self.decision.changed_steps.contains(&step) {
                self.decision.changed_steps.push(step);
            }
        }
        self.decision.wake_at = later.wake_at;
        self.decision.added_bytes += later.added_bytes;
        self.decision.paused = later.paused;
        self.inline.decided_at = Some(at);
    }

    /// The last decision's commands.
    fn fresh_commands(&self) -> &[Command] {
        &self.decision.commands[self.fresh..]
    }
}

/// Whether one command can run inline here: a `task` or `http` attempt
/// without delay whose queue has a handler in this process.
pub(super) fn runs_inline(command: &Command, has_handler: impl Fn(&str) -> bool) -> bool {
    matches!(
        command,
        Command::EnqueueTask { kind: TaskKind::Task | TaskKind::Http, delay_ms: 0, queue, .. }
            if has_handler(queue)
    )
}

/// Whether a decision's commands can all be carried out inline: attempts
/// that run inline, and signal consumptions (order-free writes). Anything
/// else (a delayed retry, a child, withdrawing tasks) is written as usual,
/// and the instance takes no further inline round, so the writes of one
/// transaction never depend on an order the pipeline does not keep.
pub(super) fn decision_runs_inline(
    commands: &[Command],
    has_handler: impl Fn(&str) -> bool + Copy,
) -> bool {
    let attempts = commands
        .iter()
        .filter(|c| matches!(c, Command::EnqueueTask { .. }))
        .count();
    attempts > 0
        && commands
            .iter()
            .all(|c| runs_inline(c, has_handler) || matches!(c, Command::ConsumeSignal { .. }))
}

/// A running inline attempt, polled through its handle so that the handle
/// can be taken back if the budget runs out.
struct Running {
    slot: usize,
    handle: JoinHandle<TaskResult>,
}

impl Future for Running {
    type Output = (usize, Result<TaskResult, JoinError>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<Self::Output> {
        let slot = self.slot;
        Pin::new(&mut self.handle).poll(cx).map(|r| (slot, r))
    }
}

/// What is known of a running attempt besides its handle.
struct Meta {
    working: usize,
    command: Command,
    started_at: DateTime<Utc>,
}

/// The inline run of one batch.
pub(super) struct InlineRun<'a> {
    pub local: &'a LocalExecution,
    pub batch: &'a [DueInstance],
    /// The batch's database clock, and when (here) it was read.
    pub now: DateTime<Utc>,
    pub clock_start: Instant,
    pub budget: Duration,
    pub random: &'a mut (dyn FnMut() -> f64 + Send),
    /// The slots whose attempts may run inline (not quarantined).
    pub ownership: &'a Ownership,
    pub limits: EngineLimits,
    /// Most bytes each later round may add to what its instance stores.
    pub budget_bytes: u64,
}

impl InlineRun<'_> {
    /// The database clock now, as far as this process can tell.
    fn now(&self) -> DateTime<Utc> {
        let elapsed = chrono::Duration::from_std(self.clock_start.elapsed()).unwrap_or_default();
        self.now + elapsed
    }

    fn has_handler(&self) -> impl Fn(&str) -> bool + Copy + '_ {
        |queue: &str| self.local.has_handler(queue)
    }

    /// Runs inline what can be, until nothing can or the budget is spent.
    pub(super) async fn run(&mut self, work: &mut [Working]) {
        let deadline = tokio::time::Instant::now() + self.budget;
        let quarantined = self.ownership.quarantined();
        let mut waiting: VecDeque<usize> = (0..work.len())
            .filter(|&i| !quarantined.contains(&self.batch[work[i].due].slot))
            .filter(|&i| decision_runs_inline(work[i].fresh_commands(), self.has_handler()))
            .collect();
        let mut running = FuturesUnordered::new();
        let mut meta: Vec<Option<Meta>> = Vec::new();
        loop {
            // Start whatever fits in the free permits (an instance needing
            // more than are free waits for attempts to end).
            for _ in 0..waiting.len() {
                if !self.local.has_room() {
                    break;
                }
                let i = waiting.pop_front().expect("counted");
                if !self.start(&mut work[i], i, &mut running, &mut meta) {
                    waiting.push_back(i);
                }
            }
            if running.is_empty() {
                break;
            }
            let next = tokio::select! {
                next = running.next() => next,
                _ = tokio::time::sleep_until(deadline) => None,
            };
            let Some((slot, result)) = next else { break };
            let m = meta[slot].take().expect("a running attempt's record");
            let result = result.unwrap_or_else(|e| TaskResult::Failed(panicked(&e)));
            let w = &mut work[m.working];
            w.finished.push((m.command, m.started_at, result));
            w.outstanding -= 1;
            if w.outstanding == 0 && self.decide_again(w) {
                waiting.push_back(m.working);
            }
        }
        self.promote(work, running, meta);
    }

    /// Starts every attempt of the instance's last decision, if permits
    /// for all of them are free; false if not (it waits for some to end).
    fn start(
        &self,
        w: &mut Working,
        index: usize,
        running: &mut FuturesUnordered<Running>,
        meta: &mut Vec<Option<Meta>>,
    ) -> bool {
        let is_attempt = |c: &Command| matches!(c, Command::EnqueueTask { .. });
        let count = w.fresh_commands().iter().filter(|c| is_attempt(c)).count();
        let Some(permits) = self.local.try_permits(count) else {
            return false;
        };
        let attempts: Vec<usize> = (w.fresh..w.decision.commands.len())
            .filter(|&c| is_attempt(&w.decision.commands[c]))
            .collect();
        let due = &self.batch[w.due];
        let started_at = self.now();
        // Take the attempts out of the decision (the rest stays to be written).
        let mut taken = Vec::with_capacity(attempts.len());
        for &c in attempts.iter().rev() {
            taken.push(w.decision.commands.remove(c));
        }
        taken.reverse();
        for (command, permit) in taken.into_iter().zip(permits) {
            let (ctx, timeout_ms) = task_context(&w.def, due, &command);
            let handle = self.local.spawn(permit, ctx, timeout_ms);
            running.push(Running {
                slot: meta.len(),
                handle,
            });
            meta.push(Some(Meta {
                working: index,
                command,
                started_at,
            }));
            w.outstanding += 1;
        }
        w.rounds += 1;
        true
    }

    /// Feeds the finished attempts back to the engine; true if the new
    /// decision can run inline too.
    fn decide_again(&mut self, w: &mut Working) -> bool {
        let at = self.now();
        let mut events = Vec::with_capacity(w.finished.len());
        for (command, started_at, result) in std::mem::take(&mut w.finished) {
            if let Command::EnqueueTask {
                step,
                item,
                purpose,
                attempt,
                ref queue,
                ..
            } = command
            {
                w.inline.attempts.push(InlineAttempt {
                    step,
                    purpose,
                    queue: queue.clone(),
                    attempt,
                    result: result.clone(),
                });
                events.push(Event::TaskFinished {
                    step,
                    item,
                    purpose,
                    attempt,
                    result,
                    started_at: Some(started_at),
                    worker: Some(self.local.worker_name().to_string()),
                });
            }
        }
        // Signals delivered before the batch and not consumed yet are there
        // for a step that starts waiting now, as they would be in the next
        // batch.
        let due = &self.batch[w.due];
        for signal in &due.signals {
            let consumed = w
                .decision
                .commands
                .iter()
                .any(|c| matches!(c, Command::ConsumeSignal { id, .. } if *id == signal.id));
            if !consumed {
                events.push(Event::Signal(PendingSignal {
                    id: signal.id,
                    name: signal.name.clone(),
                    payload: signal.payload.clone(),
                }));
            }
        }
        let mut ctx = Context {
            now: at,
            random: &mut *self.random,
            limits: self.limits,
            budget_bytes: self.budget_bytes,
        };
        let later = engine::decide(&w.def, &mut w.state, &events, &mut ctx);
        w.merge(later, at);
        w.rounds < MAX_ROUNDS && decision_runs_inline(w.fresh_commands(), self.has_handler())
    }

    /// The budget ran out: attempts still running are promoted to task rows
    /// leased to this member; finished ones of the same instances are fed to
    /// the engine first.
    fn promote(
        &mut self,
        work: &mut [Working],
        running: FuturesUnordered<Running>,
        mut meta: Vec<Option<Meta>>,
    ) {
        let mut late: Vec<usize> = Vec::new();
        for r in running {
            let m = meta[r.slot].take().expect("a running attempt's record");
            let w = &mut work[m.working];
            let lease = Lease {
                token: uuid::Uuid::new_v4(),
                started_at: m.started_at,
                lease_ms: self.local.lease_ms(),
            };
            let task = claimed(&w.def, &self.batch[w.due], &m.command, &lease, self.local);
            w.inline.promoted.push((m.command, lease));
            w.handovers.push(Handover {
                task,
                attempt: r.handle,
            });
            if !late.contains(&m.working) {
                late.push(m.working);
            }
        }
        for i in late {
            let w = &mut work[i];
            if !w.finished.is_empty() {
                self.decide_again(w);
            }
            // A decision that withdraws the instance's tasks withdraws its
            // promoted attempts too: they are not queued, and stop.
            if w.fresh_commands().contains(&Command::WithdrawTasks) {
                for h in w.handovers.drain(..) {
                    h.attempt.abort();
                }
                w.inline.promoted.clear();
            }
        }
    }
}

/// What the handler of an inline attempt gets, and the attempt's timeout.
fn task_context(
    def: &Definition,
    due: &DueInstance,
    command: &Command,
) -> (TaskContext, Option<u64>) {
    let Command::EnqueueTask {
        step,
        attempt,
        queue,
        input,
        timeout_ms,
        idempotency_key,
        ..
    } = command
    else {
        unreachable!("only attempts run inline");
    };
    let ctx = TaskContext {
        task_id: 0,
        queue: queue.clone(),
        instance_id: due.id.clone(),
        step_id: def.steps[*step].id.clone(),
        attempt: *attempt,
        idempotency_key: idempotency_key.clone(),
        input: input.clone(),
    };
    (ctx, *timeout_ms)
}

/// A promoted attempt as the executor knows a claimed one (its `task_id` is
/// filled in once the row is committed).
fn claimed(
    def: &Definition,
    due: &DueInstance,
    command: &Command,
    lease: &Lease,
    local: &LocalExecution,
) -> ClaimedTask {
    let (ctx, timeout_ms) = task_context(def, due, command);
    ClaimedTask {
        task_id: 0,
        queue: ctx.queue,
        lease_token: lease.token,
        instance_id: ctx.instance_id,
        step_id: ctx.step_id,
        attempt: ctx.attempt as i32,
        idempotency_key: ctx.idempotency_key,
        input: ctx.input,
        lease_expires_at: Utc::now() + chrono::Duration::milliseconds(local.lease_ms() as i64),
        timeout_ms: timeout_ms.map(|ms| ms as i64),
        queue_wait_seconds: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::TaskPurpose;

    fn attempt(kind: TaskKind, queue: &str, delay_ms: u64) -> Command {
        Command::EnqueueTask {
            step: 0,
            item: None,
            purpose: TaskPurpose::Run,
            attempt: 1,
            kind,
            queue: queue.into(),
            input: json!(null),
            delay_ms,
            timeout_ms: None,
            idempotency_key: "i:a".into(),
        }
    }

    #[test]
    fn only_undelayed_task_and_http_attempts_of_local_queues_run_inline() {
        let local = |q: &str| q == "here";
        assert!(runs_inline(&attempt(TaskKind::Task, "here", 0), local));
        assert!(!runs_inline(
            &attempt(TaskKind::Task, "elsewhere", 0),
            local
        ));
        assert!(!runs_inline(&attempt(TaskKind::Task, "here", 10), local));
        assert!(runs_inline(&attempt(TaskKind::Http, "here", 0), local));
        assert!(!runs_inline(&attempt(TaskKind::Workflow, "here", 0), local));
    }

    #[test]
    fn a_decision_runs_inline_only_if_every_command_can() {
        let local = |q: &str| q == "here";
        let inline = attempt(TaskKind::Task, "here", 0);
        let signal = Command::ConsumeSignal { id: 1, step: 0 };
        assert!(decision_runs_inline(
            &[inline.clone(), signal.clone()],
            local
        ));
        assert!(!decision_runs_inline(&[signal], local), "nothing to run");
        assert!(!decision_runs_inline(&[], local));
        let queued = attempt(TaskKind::Task, "elsewhere", 0);
        assert!(!decision_runs_inline(&[inline.clone(), queued], local));
        assert!(!decision_runs_inline(
            &[inline, Command::WithdrawTasks],
            local
        ));
    }
}
