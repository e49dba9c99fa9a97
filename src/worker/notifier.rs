//! Coalesced wake-ups of the engine. A NOTIFY takes a database-wide lock from
//! its commit until the commit is durable, so one per API request would
//! serialise every start and completion behind a WAL flush. Instead callers
//! `request()` a wake-up: local advancers are woken at once, and this loop
//! sends at most one NOTIFY per `coalesce_ms` for the other processes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Wakeups;
use crate::metrics::{Component, Metrics};
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct NotifierConfig {
    pub coalesce_ms: u64,
}

/// The handle callers use; cheap to clone.
#[derive(Clone)]
pub struct AdvanceNotifier {
    pending: Arc<Notify>,
    wakeups: Wakeups,
}

impl AdvanceNotifier {
    pub fn new(wakeups: Wakeups) -> Self {
        AdvanceNotifier {
            pending: Arc::new(Notify::new()),
            wakeups,
        }
    }

    /// Something needs the engine: wake local advancers now and the other
    /// processes' soon.
    pub fn request(&self) {
        let _ = self.wakeups.advance.send(());
        self.pending.notify_one();
    }
}

pub struct Notifier {
    pub config: NotifierConfig,
    pub store: Store,
    pub handle: AdvanceNotifier,
    pub metrics: Arc<Metrics>,
}

impl Notifier {
    pub async fn run(self, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.handle.pending.notified() => {}
            }
            self.run_once().await;
            // Requests during this window fold into the next NOTIFY.
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(self.config.coalesce_ms)) => {}
            }
        }
    }

    pub async fn run_once(&self) {
        if let Err(e) = self.store.notify("advance").await {
            // Only a latency hint: the advancers poll as well.
            tracing::debug!(error = %e, "sending the advance notification failed");
            self.metrics.db_error(Component::Notifier);
        }
    }
}
