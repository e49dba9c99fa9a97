//! Fires due schedules (contract §9). Only the process whose member holds
//! the maintenance duty fires; it looks again at the next firing it knows
//! of, or after `interval_ms` at the latest (a schedule PUT elsewhere, or
//! the duty just taken over). Exactly-once rests on the store, not on the
//! duty: a firing's instance id is fixed by the firing, and it is started
//! in the transaction that moves the schedule on.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Chain;
use crate::metrics::{Component, Metrics, ProcessDuty};
use crate::service::{Next, Service};
use crate::store::{FiringLimits, Store, StoreError};
use crate::worker::notifier::AdvanceNotifier;

pub(crate) struct Scheduler {
    pub limits: FiringLimits,
    /// The longest pause between runs.
    pub interval_ms: u64,
    pub store: Store,
    pub process_duty: ProcessDuty,
    pub metrics: Arc<Metrics>,
    pub notifier: AdvanceNotifier,
}

/// When the next firing is, after a run.
#[derive(Debug)]
pub(crate) struct SchedulerRun {
    pub next_in: Option<Duration>,
    /// The run fired as many schedules as it may: more may be due.
    pub full: bool,
}

/// The shortest pause between runs when a schedule is due at once (one
/// another transaction holds, say).
const MIN_PAUSE_MS: u64 = 10;

impl Service for Scheduler {
    /// `None`: this process does not hold the duty.
    type Outcome = Option<SchedulerRun>;
    const NAME: &'static str = "scheduler";

    async fn run_once(&mut self) -> Result<Option<SchedulerRun>, StoreError> {
        if !self.process_duty.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let fired = self.store.fire_due_schedules(self.limits).await?;
        self.metrics.schedules_fired(&fired);
        if fired.started > 0 {
            self.notifier.request();
        }
        if fired.missed > 0 || fired.unreadable > 0 {
            tracing::warn!(
                missed = fired.missed,
                unreadable = fired.unreadable,
                "schedules left firings unstarted"
            );
        }
        let full = fired.schedules as i64 >= self.limits.schedules;
        let next_in = if full {
            None
        } else {
            self.store.next_firing_in().await?
        };
        Ok(Some(SchedulerRun { next_in, full }))
    }

    /// At the next firing (a little after: database time is read on
    /// another clock), or at the interval.
    fn next(&self, run: &Option<SchedulerRun>) -> Next {
        let longest = Duration::from_millis(self.interval_ms);
        let Some(run) = run else {
            return Next::After(longest);
        };
        if run.full {
            return Next::Now;
        }
        match run.next_in {
            Some(d) if d < longest => {
                Next::After((d + Duration::from_millis(2)).max(Duration::from_millis(MIN_PAUSE_MS)))
            }
            _ => Next::After(longest),
        }
    }

    async fn failed(&mut self, error: &StoreError) {
        tracing::warn!(error = %Chain(error), "firing schedules failed");
        self.metrics.db_error(Component::Scheduler);
    }
}
