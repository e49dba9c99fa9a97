//! Runs claimed tasks in this process: `task` steps whose queue has a
//! registered handler, and `http` steps (the `stead.http` queue). A run
//! claims a batch (never more than there is room for) and starts each
//! attempt; attempts heartbeat their lease while they run, and one completer
//! task records their results in batches.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::controls::Controls;
use super::notifier::AdvanceNotifier;
use crate::error::Chain;
use crate::handlers::{Handlers, TaskContext};
use crate::metrics::{Component, Metrics};
use crate::model::{TaskFailure, TaskResult};
use crate::service::{Next, Pacing, Service};
use crate::store::{ClaimedTask, Store, StoreError, TaskOutcome};

/// Attempts heartbeat every third of their lease, but not more often than this.
const MIN_HEARTBEAT_MS: u64 = 50;

/// Results are kept and retried through short database outages (leases
/// outlive them): this many retries, backing off from 100 ms to 6.4 s.
const RECORD_RETRIES: u32 = 7;
const RECORD_BACKOFF: Pacing = Pacing {
    interval_ms: None,
    settle_ms: 0,
    backoff_min_ms: 100,
    backoff_max_ms: 6_400,
};

#[derive(Debug, Clone)]
pub(crate) struct ExecutorConfig {
    pub worker_name: String,
    /// Most tasks one claim takes.
    pub claim_batch_size: usize,
    /// Attempts run at once.
    pub concurrency: usize,
    /// Lease of each attempt, heartbeated while it runs.
    pub lease_ms: u64,
    /// Most results recorded in one statement.
    pub completion_batch_size: usize,
    /// How long in-flight attempts may take to finish at shutdown.
    pub shutdown_timeout_ms: u64,
}

pub(crate) struct Executor {
    config: ExecutorConfig,
    store: Store,
    queues: Vec<String>,
    runner: Arc<Runner>,
    metrics: Arc<Metrics>,
    /// One permit per attempt that may run at once.
    room: Arc<Semaphore>,
    results: mpsc::Sender<TaskOutcome>,
    completer: JoinHandle<()>,
    /// Stops waiting for room when the node stops.
    cancel: CancellationToken,
}

/// The member's in-process execution, as its advancer uses it to run
/// attempts inline: the same handlers, the same concurrency permits, and,
/// for an attempt that outlasts the inline budget and is promoted to a
/// leased task row, the same heartbeats and result recording as a claimed
/// attempt.
#[derive(Clone)]
pub(crate) struct LocalExecution {
    runner: Arc<Runner>,
    room: Arc<Semaphore>,
    results: mpsc::Sender<TaskOutcome>,
    worker_name: String,
}

/// What a running attempt needs, shared by all of them.
struct Runner {
    store: Store,
    handlers: Handlers,
    /// Which queues have limits (their attempts never run inline).
    controls: Controls,
    lease_ms: u64,
    metrics: Arc<Metrics>,
}

impl Executor {
    /// An executor of `handlers`' queues; starts its completer task.
    pub(crate) fn new(
        config: ExecutorConfig,
        store: Store,
        handlers: Handlers,
        notifier: AdvanceNotifier,
        controls: Controls,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> Self {
        let capacity = config.concurrency.max(1);
        let (results, received) = mpsc::channel(capacity * 2);
        let completer = tokio::spawn(record_results(
            store.clone(),
            notifier,
            received,
            config.completion_batch_size.max(1),
            metrics.clone(),
        ));
        Executor {
            queues: handlers.queues(),
            runner: Arc::new(Runner {
                store: store.clone(),
                handlers,
                controls,
                lease_ms: config.lease_ms,
                metrics: metrics.clone(),
            }),
            room: Arc::new(Semaphore::new(capacity)),
            config,
            store,
            metrics,
            results,
            completer,
            cancel,
        }
    }
}

impl Executor {
    /// The handle the member's advancer runs inline attempts with.
    pub(crate) fn local(&self) -> LocalExecution {
        LocalExecution {
            runner: self.runner.clone(),
            room: self.room.clone(),
            results: self.results.clone(),
            worker_name: self.config.worker_name.clone(),
        }
    }
}

impl LocalExecution {
    /// Whether this process has a handler for `queue`.
    pub(crate) fn has_handler(&self, queue: &str) -> bool {
        self.runner.handlers.get(queue).is_some() && self.runner.controls.runs_inline(queue)
    }

    /// The member's worker name (holder of promoted attempts' leases).
    pub(crate) fn worker_name(&self) -> &str {
        &self.worker_name
    }

    /// The lease a promoted attempt gets (heartbeated like a claimed one).
    pub(crate) fn lease_ms(&self) -> u64 {
        self.runner.lease_ms
    }

    /// `n` concurrency permits, or none if fewer are free: inline attempts
    /// share the member's `worker_concurrency` with claimed ones.
    pub(crate) fn try_permits(&self, n: usize) -> Option<Vec<OwnedSemaphorePermit>> {
        let mut all = self.room.clone().try_acquire_many_owned(n as u32).ok()?;
        let mut permits: Vec<OwnedSemaphorePermit> = (1..n).filter_map(|_| all.split(1)).collect();
        permits.push(all);
        Some(permits)
    }

    /// Whether any concurrency permit is free.
    pub(crate) fn has_room(&self) -> bool {
        self.room.available_permits() > 0
    }

    /// Starts one attempt in the background; it holds `permit` until it ends.
    pub(crate) fn spawn(
        &self,
        permit: OwnedSemaphorePermit,
        ctx: TaskContext,
        timeout_ms: Option<u64>,
    ) -> JoinHandle<TaskResult> {
        let runner = self.runner.clone();
        tokio::spawn(async move {
            let result = runner.run_handler(ctx, timeout_ms).await;
            drop(permit);
            result
        })
    }

    /// Takes over a promoted attempt whose leased task row has committed:
    /// heartbeats its lease while it runs, then records its result like a
    /// claimed attempt's.
    pub(crate) fn adopt(&self, task: ClaimedTask, attempt: JoinHandle<TaskResult>) {
        let runner = self.runner.clone();
        let results = self.results.clone();
        tokio::spawn(async move {
            let Some(ended) = runner.heartbeating(&task, attempt).await else {
                return;
            };
            let result = ended.unwrap_or_else(|e| TaskResult::Failed(panicked(&e)));
            let outcome = TaskOutcome {
                task_id: task.task_id,
                lease_token: task.lease_token,
                result,
            };
            let _ = results.send(outcome).await;
        });
    }
}

/// The failure of an attempt whose handler panicked (or was aborted).
pub(crate) fn panicked(e: &tokio::task::JoinError) -> TaskFailure {
    TaskFailure::new(format!("the handler did not finish: {e}"), true, None)
}

impl Service for Executor {
    /// Tasks claimed.
    type Outcome = usize;
    const NAME: &'static str = "executor";

    /// Claims as many tasks as there is room for and starts them; returns
    /// how many it claimed.
    async fn run_once(&mut self) -> Result<usize, StoreError> {
        // Wait for room before claiming, so a claimed task never waits for
        // capacity while its lease runs.
        let first = tokio::select! {
            _ = self.cancel.cancelled() => return Ok(0),
            p = self.room.clone().acquire_owned() => p.expect("semaphore open"),
        };
        let room = self.room.available_permits() + 1;
        let claimed = self
            .store
            .claim_tasks(
                &self.queues,
                &self.config.worker_name,
                room.min(self.config.claim_batch_size) as i64,
                self.config.lease_ms,
                |q| self.runner.controls.is_limited(q),
            )
            .await?;
        let n = claimed.len();
        let mut first = Some(first);
        for task in claimed {
            self.metrics
                .task_claimed(&task.queue, task.queue_wait_seconds);
            let permit = match first.take() {
                Some(p) => p,
                None => self
                    .room
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore open"),
            };
            let runner = self.runner.clone();
            let results = self.results.clone();
            tokio::spawn(async move {
                if let Some(outcome) = runner.execute(task).await {
                    let _ = results.send(outcome).await;
                }
                drop(permit);
            });
        }
        Ok(n)
    }

    /// Claimed some: there may be more, claim again as soon as there is room.
    fn next(&self, claimed: &usize) -> Next {
        Next::now_if(*claimed > 0)
    }

    async fn failed(&mut self, error: &StoreError) {
        tracing::warn!(error = %Chain(error), "claiming tasks failed");
        self.metrics.db_error(Component::Executor);
    }

    /// Lets in-flight attempts finish (bounded), then flushes their results.
    async fn stop(self) {
        let all = self.config.concurrency.max(1) as u32;
        let timeout = Duration::from_millis(self.config.shutdown_timeout_ms);
        let _ = tokio::time::timeout(timeout, self.room.acquire_many(all)).await;
        drop(self.results);
        let _ = tokio::time::timeout(timeout, self.completer).await;
    }
}

impl Runner {
    /// Runs one attempt, heartbeating its lease. `None` if the lease was
    /// lost (someone else owns the task now; reporting would be refused).
    async fn execute(&self, task: ClaimedTask) -> Option<TaskOutcome> {
        self.handlers.get(&task.queue)?;
        let ctx = TaskContext {
            task_id: task.task_id,
            queue: task.queue.clone(),
            instance_id: task.instance_id.clone(),
            step_id: task.step_id.clone(),
            attempt: task.attempt.max(0) as u32,
            idempotency_key: task.idempotency_key.clone(),
            input: task.input.clone(),
        };
        let timeout_ms = task.timeout_ms.map(|ms| ms.max(0) as u64);
        let result = self
            .heartbeating(&task, self.run_handler(ctx, timeout_ms))
            .await?;
        Some(TaskOutcome {
            task_id: task.task_id,
            lease_token: task.lease_token,
            result,
        })
    }

    /// Runs the queue's handler on one attempt within its timeout, and
    /// counts and logs how it went.
    async fn run_handler(&self, ctx: TaskContext, timeout_ms: Option<u64>) -> TaskResult {
        let Some(handler) = self.handlers.get(&ctx.queue).cloned() else {
            return TaskResult::Failed(TaskFailure::new(
                format!("no handler for queue {} in this process", ctx.queue),
                true,
                None,
            ));
        };
        let (queue, instance, step, attempt) = (
            ctx.queue.clone(),
            ctx.instance_id.clone(),
            ctx.step_id.clone(),
            ctx.attempt,
        );
        let started = Instant::now();
        let attempt_timeout = timeout_ms.map_or(Duration::MAX, Duration::from_millis);
        let result = match tokio::time::timeout(attempt_timeout, handler(ctx)).await {
            Ok(Ok(output)) => TaskResult::Completed(output),
            Ok(Err(e)) => TaskResult::Failed(e.into_failure()),
            Err(_) => TaskResult::Failed(TaskFailure::timed_out(attempt_timeout.as_millis())),
        };
        let outcome = result.outcome().as_str();
        let elapsed = started.elapsed();
        tracing::debug!(
            instance = %instance,
            step = %step,
            attempt,
            queue = %queue,
            outcome,
            elapsed_ms = elapsed.as_millis() as u64,
            "task attempt finished"
        );
        self.metrics
            .task_duration
            .with_label_values(&[&queue, outcome])
            .observe(elapsed.as_secs_f64());
        result
    }

    /// Drives `work` to its end, extending the lease meanwhile; `None` if
    /// the lease was lost (the attempt is abandoned).
    async fn heartbeating<F: Future>(&self, task: &ClaimedTask, work: F) -> Option<F::Output> {
        tokio::pin!(work);
        let every = Duration::from_millis((self.lease_ms / 3).max(MIN_HEARTBEAT_MS));
        loop {
            tokio::select! {
                r = &mut work => return Some(r),
                _ = tokio::time::sleep(every) => {}
            }
            match self
                .store
                .heartbeat_task(task.task_id, task.lease_token, self.lease_ms)
                .await
            {
                Ok(Some(_)) => {}
                Ok(None) => {
                    tracing::warn!(
                        task_id = task.task_id,
                        instance = %task.instance_id,
                        step = %task.step_id,
                        attempt = task.attempt,
                        "lease lost while running; abandoning attempt"
                    );
                    return None;
                }
                Err(e) => tracing::warn!(
                    instance = %task.instance_id,
                    step = %task.step_id,
                    error = %Chain(&e),
                    "task heartbeat failed"
                ),
            }
        }
    }
}

/// Records results in batches: whatever has arrived, up to `batch_size`,
/// goes to the database in one statement.
async fn record_results(
    store: Store,
    notifier: AdvanceNotifier,
    mut received: mpsc::Receiver<TaskOutcome>,
    batch_size: usize,
    metrics: Arc<Metrics>,
) {
    let mut batch = Vec::with_capacity(batch_size);
    while let Some(first) = received.recv().await {
        batch.push(first);
        while batch.len() < batch_size {
            match received.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        record_batch(&store, &notifier, &metrics, &batch).await;
        batch.clear();
    }
}

async fn record_batch(
    store: &Store,
    notifier: &AdvanceNotifier,
    metrics: &Metrics,
    batch: &[TaskOutcome],
) {
    let mut failures = 0;
    loop {
        match store.finish_tasks(batch).await {
            Ok(recorded) => {
                if !recorded.is_empty() {
                    notifier.request();
                }
                let refused = batch.len() - recorded.len();
                if refused > 0 {
                    metrics.stale_completions.inc_by(refused as u64);
                }
                return;
            }
            Err(e @ StoreError::Transient(_)) if failures < RECORD_RETRIES => {
                failures += 1;
                tracing::warn!(error = %Chain(&e), "recording task results failed; retrying");
                tokio::time::sleep(RECORD_BACKOFF.backoff(failures)).await;
            }
            Err(e) => {
                metrics.db_error(Component::Executor);
                tracing::error!(error = %Chain(&e), count = batch.len(), "dropping task results; their leases will expire and the attempts retry");
                return;
            }
        }
    }
}
