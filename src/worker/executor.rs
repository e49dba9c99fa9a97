//! Runs claimed tasks in this process: `task` steps whose queue has a
//! registered handler, and `http` steps (the `stead.http` queue). Claims in
//! batches, runs up to `concurrency` attempts at once, heartbeats long ones,
//! and records results in batches through one completer task.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use super::notifier::AdvanceNotifier;
use super::{drain, jittered, Wakeups};
use crate::handlers::{Handlers, TaskContext, TaskError};
use crate::metrics::{Component, Metrics};
use crate::store::{ClaimedTask, Store, StoreError, TaskOutcome};

#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    pub worker_name: String,
    pub claim_batch_size: usize,
    pub concurrency: usize,
    pub lease_ms: u64,
    pub poll_interval_ms: u64,
    pub completion_batch_size: usize,
    pub error_backoff_ms: u64,
    /// How long in-flight attempts may take to finish at shutdown.
    pub shutdown_timeout_ms: u64,
}

pub struct Executor {
    pub config: ExecutorConfig,
    pub store: Store,
    pub handlers: Handlers,
    pub wakeups: Wakeups,
    pub notifier: AdvanceNotifier,
    pub metrics: Arc<Metrics>,
}

impl Executor {
    pub async fn run(self, cancel: CancellationToken) {
        let queues = self.handlers.queues();
        if queues.is_empty() {
            return;
        }
        let capacity = self.config.concurrency.max(1);
        let semaphore = Arc::new(Semaphore::new(capacity));
        let (done_tx, done_rx) = mpsc::channel::<TaskOutcome>(capacity * 2);
        let completer = tokio::spawn(complete_loop(
            self.store.clone(),
            self.notifier.clone(),
            done_rx,
            self.config.completion_batch_size.max(1),
            self.metrics.clone(),
        ));
        let mut wake = self.wakeups.tasks.subscribe();
        let this = Arc::new(self);

        while !cancel.is_cancelled() {
            // Wait for at least one free slot before claiming, so a claimed
            // task never waits for capacity while its lease runs.
            let first = tokio::select! {
                _ = cancel.cancelled() => break,
                p = semaphore.clone().acquire_owned() => p.expect("semaphore open"),
            };
            let free = semaphore.available_permits() + 1;
            drain(&mut wake);
            let claimed = match this
                .store
                .claim_tasks(
                    &queues,
                    &this.config.worker_name,
                    free.min(this.config.claim_batch_size) as i64,
                    this.config.lease_ms,
                )
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    drop(first);
                    this.metrics.db_error(Component::Executor);
                    tracing::warn!(error = %e, "claiming tasks failed");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(jittered(this.config.error_backoff_ms)) => {}
                    }
                    continue;
                }
            };
            if claimed.is_empty() {
                drop(first);
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = wake.recv() => {}
                    _ = tokio::time::sleep(jittered(this.config.poll_interval_ms)) => {}
                }
                continue;
            }
            let mut first = Some(first);
            for task in claimed {
                this.metrics
                    .task_claimed(&task.queue, task.queue_wait_seconds);
                let permit = match first.take() {
                    Some(p) => p,
                    None => semaphore
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("semaphore open"),
                };
                let this = this.clone();
                let done_tx = done_tx.clone();
                tokio::spawn(async move {
                    if let Some(outcome) = this.execute(task).await {
                        let _ = done_tx.send(outcome).await;
                    }
                    drop(permit);
                });
            }
        }

        // Shutdown: let in-flight attempts finish (bounded), then flush.
        let all = capacity as u32;
        let _ = tokio::time::timeout(
            Duration::from_millis(this.config.shutdown_timeout_ms),
            semaphore.acquire_many(all),
        )
        .await;
        drop(done_tx);
        let _ = tokio::time::timeout(
            Duration::from_millis(this.config.shutdown_timeout_ms),
            completer,
        )
        .await;
    }

    /// Runs one attempt, heartbeating its lease. `None` if the lease was
    /// lost (someone else owns the task now; reporting would be refused).
    async fn execute(&self, task: ClaimedTask) -> Option<TaskOutcome> {
        let handler = self.handlers.get(&task.queue)?.clone();
        let ctx = TaskContext {
            task_id: task.task_id,
            queue: task.queue.clone(),
            instance_id: task.instance_id.clone(),
            step_id: task.step_id.clone(),
            attempt: task.attempt.max(0) as u32,
            idempotency_key: task.idempotency_key.clone(),
            input: task.input.clone(),
        };
        let started = std::time::Instant::now();
        let attempt_timeout = task
            .timeout_ms
            .map(|ms| Duration::from_millis(ms.max(0) as u64))
            .unwrap_or(Duration::MAX);
        let work = tokio::time::timeout(attempt_timeout, handler(ctx));
        tokio::pin!(work);
        let heartbeat_every = Duration::from_millis((self.config.lease_ms / 3).max(50));
        let result = loop {
            tokio::select! {
                r = &mut work => break r,
                _ = tokio::time::sleep(heartbeat_every) => {
                    match self.store.heartbeat_task(task.task_id, task.lease_token, self.config.lease_ms).await {
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
                            error = %e,
                            "task heartbeat failed"
                        ),
                    }
                }
            }
        };
        let result: Result<Value, Value> = match result {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(e)) => Err(e.to_json()),
            Err(_) => Err(TaskError::retryable(format!(
                "attempt timed out after {}ms",
                attempt_timeout.as_millis()
            ))
            .to_json()),
        };
        let outcome = if result.is_ok() {
            "completed"
        } else {
            "failed"
        };
        tracing::debug!(
            instance = %task.instance_id,
            step = %task.step_id,
            attempt = task.attempt,
            queue = %task.queue,
            outcome,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "task attempt finished"
        );
        self.metrics
            .task_duration
            .with_label_values(&[&task.queue, outcome])
            .observe(started.elapsed().as_secs_f64());
        Some(TaskOutcome {
            task_id: task.task_id,
            lease_token: task.lease_token,
            result,
        })
    }
}

/// Records results in batches: whatever has arrived, up to `batch_size`,
/// goes to the database in one statement.
async fn complete_loop(
    store: Store,
    notifier: AdvanceNotifier,
    mut rx: mpsc::Receiver<TaskOutcome>,
    batch_size: usize,
    metrics: Arc<Metrics>,
) {
    let mut batch = Vec::with_capacity(batch_size);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < batch_size {
            match rx.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        let mut backoff_ms = 100;
        loop {
            match store.finish_tasks(&batch).await {
                Ok(recorded) => {
                    if !recorded.is_empty() {
                        notifier.request();
                    }
                    let refused = batch.len() - recorded.len();
                    if refused > 0 {
                        metrics.stale_completions.inc_by(refused as u64);
                    }
                    break;
                }
                Err(StoreError::Transient(e)) if backoff_ms <= 10_000 => {
                    // Leases outlive short outages: keep the results and retry.
                    tracing::warn!(error = %e, "recording task results failed; retrying");
                    tokio::time::sleep(jittered(backoff_ms)).await;
                    backoff_ms *= 2;
                }
                Err(e) => {
                    metrics.db_error(Component::Executor);
                    tracing::error!(error = %e, count = batch.len(), "dropping task results; their leases will expire and the attempts retry");
                    break;
                }
            }
        }
        batch.clear();
    }
}
