//! Turns expired leases into failed, retryable attempts, so the engine
//! retries them (another worker claims the new attempt).

use std::sync::Arc;

use crate::error::Chain;
use crate::membership::Ownership;
use crate::metrics::{Component, Metrics};
use crate::service::{Next, Service};
use crate::store::{Store, StoreError};

#[derive(Debug, Clone)]
pub(crate) struct ReaperConfig {
    /// Most leases one run reaps.
    pub batch_size: usize,
}

pub(crate) struct Reaper {
    pub config: ReaperConfig,
    pub store: Store,
    pub ownership: Ownership,
    pub metrics: Arc<Metrics>,
}

impl Service for Reaper {
    /// Leases reaped.
    type Outcome = u64;
    const NAME: &'static str = "reaper";

    /// Reaps the expired leases of the slots this member owns.
    async fn run_once(&mut self) -> Result<u64, StoreError> {
        let owned = self.ownership.read().await;
        if owned.slots().is_empty() {
            return Ok(0);
        }
        let n = self
            .store
            .reap_expired_leases(self.config.batch_size as i64, owned.slots())
            .await?;
        if n > 0 {
            self.metrics.leases_expired.inc_by(n);
            tracing::info!(count = n, "expired leases returned to the engine");
        }
        Ok(n)
    }

    /// A full batch: more leases may have expired.
    fn next(&self, reaped: &u64) -> Next {
        Next::now_if(*reaped >= self.config.batch_size as u64)
    }

    async fn failed(&mut self, error: &StoreError) {
        tracing::warn!(error = %Chain(error), "reaping expired leases failed");
        self.metrics.db_error(Component::Reaper);
    }
}
