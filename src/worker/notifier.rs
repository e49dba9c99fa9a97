//! Coalesced wake-ups of the engine. A NOTIFY takes a database-wide lock from
//! its commit until the commit is durable, so one per API request would
//! serialise every start and completion behind a WAL flush. Instead callers
//! `request()` a wake-up: local advancers are woken at once, and this service
//! sends at most one NOTIFY per coalescing window for the other processes.

use std::sync::Arc;

use tokio::sync::Notify;

use crate::error::Chain;
use crate::metrics::{Component, Metrics};
use crate::service::Service;
use crate::store::{Channel, Store, StoreError};
use crate::wakeups::Wakeups;

/// The handle callers use; cheap to clone.
#[derive(Clone)]
pub(crate) struct AdvanceNotifier {
    pending: Arc<Notify>,
    wakeups: Wakeups,
}

impl AdvanceNotifier {
    pub(crate) fn new(wakeups: Wakeups) -> Self {
        AdvanceNotifier {
            pending: Arc::new(Notify::new()),
            wakeups,
        }
    }

    /// Something needs the engine: wake local advancers now and the other
    /// processes' soon.
    pub(crate) fn request(&self) {
        let _ = self.wakeups.advance.send(());
        self.pending.notify_one();
    }

    /// What the notifier service waits on (its wake-up).
    pub(crate) fn requests(&self) -> Arc<Notify> {
        self.pending.clone()
    }
}

/// Sends one NOTIFY per run; `service::run` runs it on each request, at
/// most once per `settle_ms` (the coalescing window).
pub(crate) struct Notifier {
    pub store: Store,
    pub metrics: Arc<Metrics>,
}

impl Service for Notifier {
    type Outcome = ();
    const NAME: &'static str = "notifier";

    /// A NOTIFY that fails loses only a latency hint (the advancers poll
    /// as well): it is counted, not retried.
    async fn run_once(&mut self) -> Result<(), StoreError> {
        if let Err(e) = self.store.notify(Channel::Advance).await {
            tracing::debug!(error = %Chain(&e), "sending the advance notification failed");
            self.metrics.db_error(Component::Notifier);
        }
        Ok(())
    }
}
