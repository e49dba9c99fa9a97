//! The LISTEN session: one per process, dedicated (not pooled), feeding
//! `Wakeups`. A run is one session: it lasts until the connection breaks
//! (an error, so `service::run` reconnects with backoff) or the node stops.
//! Every new session wakes all consumers, because notifications may have
//! been missed meanwhile.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::error::Chain;
use crate::metrics::{Component, Metrics};
use crate::service::Service;
use crate::store::{ended_ids, Cause, Channel, Store, StoreError};
use crate::wakeups::Wakeups;

pub(crate) struct Listener {
    pub store: Store,
    pub wakeups: Wakeups,
    pub metrics: Arc<Metrics>,
    /// Ends the session when the node stops.
    pub cancel: CancellationToken,
}

impl Service for Listener {
    type Outcome = ();
    const NAME: &'static str = "listener";

    /// Listens until the node stops (Ok) or the connection breaks (Err).
    async fn run_once(&mut self) -> Result<(), StoreError> {
        let mut session = self.store.listen().await?;
        self.wakeups.wake_all();
        loop {
            let notification = tokio::select! {
                _ = self.cancel.cancelled() => return Ok(()),
                n = session.recv() => n,
            };
            let Some(n) = notification else {
                return Err(StoreError::Transient(Cause::Closed("LISTEN")));
            };
            match n.channel {
                // This process's own requests woke its advancers already.
                Channel::Advance if n.payload == self.store.origin() => {}
                Channel::Advance => {
                    let _ = self.wakeups.advance.send(());
                }
                Channel::Tasks => {
                    let _ = self.wakeups.tasks.send(Arc::from(n.payload));
                }
                Channel::Ended => {
                    for id in ended_ids(&n.payload) {
                        let _ = self.wakeups.ended.send(Arc::from(id));
                    }
                }
            }
        }
    }

    async fn failed(&mut self, error: &StoreError) {
        tracing::warn!(error = %Chain(error), "notification listener lost its connection; reconnecting");
        self.metrics.db_error(Component::Listener);
    }
}
