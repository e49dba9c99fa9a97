//! The cluster-wide gauges (queue depth, oldest ready task, members alive,
//! unowned slots) need queries, so only the process whose member holds the
//! maintenance duty runs them, every `interval_ms`, whoever scrapes how often.
//! Every other process withdraws them, so the cluster exports each once.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::ProcessDuty;
use crate::metrics::{Component, Metrics};
use crate::store::{Store, StoreError};
use crate::worker::jittered;

#[derive(Debug, Clone)]
pub struct ClusterGaugesConfig {
    pub interval_ms: u64,
}

pub struct ClusterGaugesLoop {
    pub config: ClusterGaugesConfig,
    pub store: Store,
    pub process_duty: ProcessDuty,
    pub metrics: Arc<Metrics>,
}

impl ClusterGaugesLoop {
    pub async fn run(self, cancel: CancellationToken) {
        loop {
            if let Err(e) = self.run_once().await {
                // The last values stay: an alert on them should not flap
                // because one refresh failed.
                tracing::warn!(error = %e, "refreshing the cluster gauges failed");
                self.metrics.db_error(Component::Membership);
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(jittered(self.config.interval_ms)) => {}
            }
        }
    }

    /// Refreshes (holder) or withdraws (others) the gauges; true if refreshed.
    pub async fn run_once(&self) -> Result<bool, StoreError> {
        if !self.process_duty.load(Ordering::SeqCst) {
            if self.metrics.maintenance_duty.get() != 0 {
                self.metrics.clear_cluster();
            }
            return Ok(false);
        }
        let (counts, depths) =
            futures::try_join!(self.store.cluster_counts(), self.store.queue_depth())?;
        self.metrics.set_cluster(&counts, &depths);
        Ok(true)
    }
}
