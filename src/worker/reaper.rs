//! Turns expired leases into failed, retryable attempts, so the engine
//! retries them (another worker claims the new attempt).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::jittered;
use crate::membership::Ownership;
use crate::metrics::{Component, Metrics};
use crate::store::{Store, StoreError};

#[derive(Debug, Clone)]
pub struct ReaperConfig {
    pub interval_ms: u64,
    pub batch_size: usize,
}

pub struct Reaper {
    pub config: ReaperConfig,
    pub store: Store,
    pub ownership: Ownership,
    pub metrics: Arc<Metrics>,
}

impl Reaper {
    pub async fn run(self, cancel: CancellationToken) {
        loop {
            match self.run_once().await {
                Ok(n) if n >= self.config.batch_size as u64 => continue,
                Ok(_) => {}
                Err(e) => {
                    self.metrics.db_error(Component::Reaper);
                    tracing::warn!(error = %e, "reaping expired leases failed");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(jittered(self.config.interval_ms)) => {}
            }
        }
    }

    /// Reaps the expired leases of the slots this member owns.
    pub async fn run_once(&self) -> Result<u64, StoreError> {
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
}
