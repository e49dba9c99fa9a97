//! One shape for every background loop. A service says what one run does
//! (`run_once`, returning what it did) and whether to go again at once;
//! `run` owns the rest: cancellation, wake-ups, the jittered interval, and
//! backing off after failures. The supervisor in `node.rs` spawns each
//! `run` and cancels them together.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;

use crate::error::Chain;
use crate::store::StoreError;

/// What to do after a run that succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// More work is waiting (a full batch): run again at once.
    Now,
    /// Wait for a wake-up or the interval.
    Wait,
    /// More work is waiting, but pace it: run again after this pause (or a
    /// wake-up).
    After(Duration),
}

impl Next {
    /// `Now` if `more` (say, the run filled its batch), else `Wait`.
    pub(crate) fn now_if(more: bool) -> Self {
        if more {
            Next::Now
        } else {
            Next::Wait
        }
    }
}

/// A background loop's behaviour; `run` drives it.
pub(crate) trait Service: Send + 'static {
    /// What one run did, for `next` and for tests.
    type Outcome: Send;

    /// The name in log lines.
    const NAME: &'static str;

    /// One unit of work (a batch, a heartbeat, a listening session).
    fn run_once(&mut self) -> impl Future<Output = Result<Self::Outcome, StoreError>> + Send;

    /// After a successful run: again at once, or wait.
    fn next(&self, _outcome: &Self::Outcome) -> Next {
        Next::Wait
    }

    /// A run failed: log and count it, and drop what the failure
    /// invalidated. `run` then backs off.
    fn failed(&mut self, _error: &StoreError) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// The loop is stopping: release what the service holds.
    fn stop(self) -> impl Future<Output = ()> + Send
    where
        Self: Sized,
    {
        async {}
    }
}

/// How often a service runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pacing {
    /// The pause between runs when there is nothing more to do (jittered by
    /// ±10%); `None` waits for a wake-up alone.
    pub interval_ms: Option<u64>,
    /// A pause after every run, before waiting: wake-ups in this window fold
    /// into the next run (the notifier's coalescing).
    pub settle_ms: u64,
    /// The pause after the first failure in a row; it doubles with each
    /// further one, up to `backoff_max_ms`.
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
}

impl Pacing {
    /// Every `interval_ms`, with a fixed pause of `backoff_ms` after a failure.
    pub(crate) fn every(interval_ms: u64, backoff_ms: u64) -> Self {
        Pacing {
            interval_ms: Some(interval_ms),
            settle_ms: 0,
            backoff_min_ms: backoff_ms,
            backoff_max_ms: backoff_ms,
        }
    }

    /// The pause after `failures` failures in a row (at least one).
    pub(crate) fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(20);
        let ms = self
            .backoff_min_ms
            .saturating_mul(1 << doublings)
            .min(self.backoff_max_ms.max(self.backoff_min_ms));
        jittered(ms)
    }
}

/// `ms` spread by ±10% so that many workers do not poll in lockstep.
pub(crate) fn jittered(ms: u64) -> Duration {
    let factor = rand::thread_rng().gen_range(0.9..1.1);
    Duration::from_millis(((ms as f64) * factor) as u64)
}

/// Where a service's wake-ups come from.
pub(crate) trait Wake: Send {
    /// Forgets wake-ups that arrived before the run about to start.
    fn drain(&mut self) {}
    /// Resolves at the next wake-up.
    fn wait(&mut self) -> impl Future<Output = ()> + Send;
}

/// No wake-ups: the interval alone.
pub(crate) struct Never;

impl Wake for Never {
    async fn wait(&mut self) {
        std::future::pending::<()>().await
    }
}

impl<T: Clone + Send> Wake for broadcast::Receiver<T> {
    fn drain(&mut self) {
        crate::wakeups::drain(self);
    }

    async fn wait(&mut self) {
        match self.recv().await {
            // A lagging receiver missed some: that is a wake-up too.
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

impl Wake for Arc<Notify> {
    async fn wait(&mut self) {
        self.notified().await
    }
}

/// Runs `service` until `cancel` fires, then stops it.
pub(crate) async fn run<S: Service>(
    mut service: S,
    pacing: Pacing,
    mut wake: impl Wake,
    cancel: CancellationToken,
) {
    let mut failures = 0u32;
    while !cancel.is_cancelled() {
        wake.drain();
        let pause = match service.run_once().await {
            Ok(outcome) => {
                failures = 0;
                match service.next(&outcome) {
                    Next::Now => continue,
                    Next::Wait => pacing.interval_ms.map(jittered),
                    Next::After(pause) => Some(pause),
                }
            }
            // The batch lost a race with another worker: recompute at once.
            Err(StoreError::Fenced { moved, batch }) => {
                tracing::debug!(service = S::NAME, moved, batch, "run fenced; retrying");
                continue;
            }
            Err(e) => {
                failures += 1;
                service.failed(&e).await;
                let backoff = pacing.backoff(failures);
                tracing::debug!(service = S::NAME, error = %Chain(&e), failures, ?backoff, "run failed; backing off");
                // After a failure only the backoff ends the pause.
                pause_until_cancelled(&cancel, backoff).await;
                continue;
            }
        };
        if pacing.settle_ms > 0 {
            pause_until_cancelled(&cancel, Duration::from_millis(pacing.settle_ms)).await;
        }
        let interval = async {
            match pause {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = wake.wait() => {}
            _ = interval => {}
        }
    }
    service.stop().await;
}

async fn pause_until_cancelled(cancel: &CancellationToken, pause: Duration) {
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = tokio::time::sleep(pause) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use crate::store::Cause;

    /// Plays a script of outcomes; records what the loop asked of it.
    struct Scripted {
        script: Vec<Result<usize, ()>>,
        log: Arc<Mutex<Vec<String>>>,
        cancel: CancellationToken,
    }

    impl Service for Scripted {
        type Outcome = usize;
        const NAME: &'static str = "scripted";

        async fn run_once(&mut self) -> Result<usize, StoreError> {
            let step = if self.script.is_empty() {
                self.cancel.cancel();
                Ok(0)
            } else {
                self.script.remove(0)
            };
            self.log.lock().unwrap().push(format!("run {step:?}"));
            step.map_err(|()| StoreError::Transient(Cause::Closed("test")))
        }

        fn next(&self, outcome: &usize) -> Next {
            Next::now_if(*outcome >= 10)
        }

        async fn failed(&mut self, _error: &StoreError) {
            self.log.lock().unwrap().push("failed".into());
        }

        async fn stop(self) {
            self.log.lock().unwrap().push("stopped".into());
        }
    }

    fn scripted(script: Vec<Result<usize, ()>>) -> (Scripted, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let service = Scripted {
            script,
            log: log.clone(),
            cancel: CancellationToken::new(),
        };
        (service, log)
    }

    #[tokio::test(start_paused = true)]
    async fn full_batches_run_again_at_once_and_failures_back_off_then_stop() {
        let (service, log) = scripted(vec![Ok(10), Ok(3), Err(()), Err(()), Ok(1)]);
        let cancel = service.cancel.clone();
        let pacing = Pacing {
            interval_ms: Some(1_000),
            settle_ms: 0,
            backoff_min_ms: 100,
            backoff_max_ms: 150,
        };
        let started = tokio::time::Instant::now();
        run(service, pacing, Never, cancel).await;
        let log = log.lock().unwrap().clone();
        assert_eq!(
            log,
            [
                "run Ok(10)",
                "run Ok(3)",
                "run Err(())",
                "failed",
                "run Err(())",
                "failed",
                "run Ok(1)",
                "run Ok(0)",
                "stopped"
            ]
        );
        // Two waits of the interval and backoffs of ~100 then ~150 (capped).
        let waited = started.elapsed().as_millis();
        assert!((2_000..2_500).contains(&waited), "waited {waited} ms");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wake_up_ends_the_wait_and_cancel_stops_the_service() {
        let (service, log) = scripted(vec![Ok(1), Ok(2), Ok(3)]);
        let cancel = CancellationToken::new();
        let notify = Arc::new(Notify::new());
        let pacing = Pacing {
            interval_ms: None,
            settle_ms: 0,
            backoff_min_ms: 100,
            backoff_max_ms: 100,
        };
        let task = tokio::spawn(run(service, pacing, notify.clone(), cancel.clone()));
        // Without an interval only a wake-up starts the next run.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(log.lock().unwrap().len(), 1);
        notify.notify_one();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(log.lock().unwrap().len(), 2);
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(log.lock().unwrap().last().unwrap(), "stopped");
    }

    #[test]
    fn backoff_doubles_up_to_its_maximum() {
        let pacing = Pacing {
            interval_ms: None,
            settle_ms: 0,
            backoff_min_ms: 100,
            backoff_max_ms: 5_000,
        };
        let ms = |n| pacing.backoff(n).as_millis();
        assert!((90..=110).contains(&ms(1)));
        assert!((180..=220).contains(&ms(2)));
        assert!((4_500..=5_500).contains(&ms(10)));
        assert!((4_500..=5_500).contains(&ms(u32::MAX)));
    }
}
