//! The cluster-wide gauges (queue depth, oldest ready task, members alive,
//! unowned slots, the oldest stored ended instance) need queries, so only
//! the process whose member holds the maintenance duty runs them, every
//! `gauge_refresh_ms`, whoever scrapes how often. Every other process withdraws them, so the cluster exports each
//! once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::{Component, Metrics};
use crate::error::Chain;
use crate::service::Service;
use crate::store::{Store, StoreError};

/// Whether a member of this process holds the maintenance duty (at most one
/// member in the cluster does). Membership sets it; the gauges read it.
pub(crate) type ProcessDuty = Arc<AtomicBool>;

pub(crate) struct ClusterGauges {
    pub store: Store,
    pub process_duty: ProcessDuty,
    pub metrics: Arc<Metrics>,
}

impl Service for ClusterGauges {
    /// Whether this run refreshed the gauges (false: withdrew them).
    type Outcome = bool;
    const NAME: &'static str = "cluster gauges";

    async fn run_once(&mut self) -> Result<bool, StoreError> {
        if !self.process_duty.load(Ordering::SeqCst) {
            if self.metrics.maintenance_duty.get() != 0 {
                self.metrics.clear_cluster();
            }
            return Ok(false);
        }
        let (counts, depths, oldest_ended_s) = futures::try_join!(
            self.store.cluster_counts(),
            self.store.queue_depth(),
            self.store.oldest_ended_age_s()
        )?;
        self.metrics.set_cluster(&counts, &depths);
        self.metrics
            .oldest_ended_age
            .with_label_values(&[] as &[&str])
            .set(oldest_ended_s);
        Ok(true)
    }

    /// The last values stay: an alert on them should not flap because one
    /// refresh failed.
    async fn failed(&mut self, error: &StoreError) {
        tracing::warn!(error = %Chain(error), "refreshing the cluster gauges failed");
        self.metrics.db_error(Component::Membership);
    }
}
