//! Deletes ended instances once their retention has passed (contract §8),
//! and, as a safety net of the concurrency limits, wakes the first waiter
//! of each key that no running instance holds.
//! Only the process whose member holds the maintenance duty deletes, in
//! batches of at most `batch_size` trees, pausing `pause_ms` between full
//! batches, so that it never holds locks long nor writes WAL in one burst.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Chain;
use crate::metrics::{Component, Metrics, ProcessDuty};
use crate::service::{Next, Service};
use crate::store::{Purged, Store, StoreError};

#[derive(Debug, Clone)]
pub(crate) struct RetentionConfig {
    /// How long ended instances of a workflow version that sets no
    /// `retention` are kept; 0 keeps them.
    pub default_ms: u64,
    /// Most root instances (each with its children) one batch deletes.
    pub batch_size: usize,
    /// The pause after a full batch.
    pub pause_ms: u64,
}

pub(crate) struct Retention {
    pub config: RetentionConfig,
    pub store: Store,
    pub process_duty: ProcessDuty,
    pub metrics: Arc<Metrics>,
}

impl Service for Retention {
    /// What the run deleted (`None`: this process does not hold the duty).
    type Outcome = Option<Purged>;
    const NAME: &'static str = "retention";

    async fn run_once(&mut self) -> Result<Option<Purged>, StoreError> {
        if !self.process_duty.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let woken = self.store.wake_stranded_waiters().await?;
        if woken > 0 {
            tracing::info!(
                woken,
                "woke instances waiting for a concurrency key none held"
            );
        }
        let purged = self
            .store
            .purge_ended(self.config.default_ms, self.config.batch_size as i64)
            .await?;
        self.metrics.retention_deleted(&purged);
        if purged.instances > 0 {
            tracing::info!(
                instances = purged.instances,
                history_rows = purged.history,
                "retention deleted ended instances"
            );
        }
        Ok(Some(purged))
    }

    /// A full batch: more may be due, after the pause.
    fn next(&self, purged: &Option<Purged>) -> Next {
        match purged {
            Some(p) if p.roots >= self.config.batch_size as u64 => {
                Next::After(Duration::from_millis(self.config.pause_ms))
            }
            _ => Next::Wait,
        }
    }

    async fn failed(&mut self, error: &StoreError) {
        tracing::warn!(error = %Chain(error), "deleting ended instances failed");
        self.metrics.db_error(Component::Retention);
    }
}
