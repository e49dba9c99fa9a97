//! The LISTEN connection: one per process, dedicated (not pooled), feeding
//! `Wakeups`. Reconnects with backoff; after every (re)connect it wakes all
//! consumers because notifications may have been missed meanwhile.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{jittered, Wakeups};
use crate::metrics::{Component, Metrics};
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
}

pub struct Listener {
    pub config: ListenerConfig,
    pub store: Store,
    pub wakeups: Wakeups,
    pub metrics: Arc<Metrics>,
}

impl Listener {
    pub async fn run(self, cancel: CancellationToken) {
        let mut backoff_ms = self.config.reconnect_min_ms;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            match self.run_once(&cancel).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "notification listener lost its connection; reconnecting");
                    self.metrics.db_error(Component::Listener);
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(jittered(backoff_ms)) => {}
            }
            backoff_ms = (backoff_ms * 2).min(self.config.reconnect_max_ms);
        }
    }

    /// Listens until the connection breaks (Err) or cancel (Ok).
    pub async fn run_once(
        &self,
        cancel: &CancellationToken,
    ) -> Result<(), crate::store::StoreError> {
        let advance = self.store.channel("advance");
        let tasks = self.store.channel("tasks");
        let ended = self.store.channel("ended");
        let (client, mut rx, handle) = self
            .store
            .connect_listener(&[advance.clone(), tasks.clone(), ended.clone()])
            .await?;
        self.wakeups.wake_all();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    drop(client);
                    handle.abort();
                    return Ok(());
                }
                n = rx.recv() => {
                    // The connection task ends, closing the channel, when the
                    // socket breaks.
                    let Some(n) = n else {
                        return Err(crate::store::StoreError::Transient("listener connection closed".into()));
                    };
                    if n.channel() == advance {
                        let _ = self.wakeups.advance.send(());
                    } else if n.channel() == tasks {
                        let _ = self.wakeups.tasks.send(Arc::from(n.payload()));
                    } else if n.channel() == ended {
                        let _ = self.wakeups.ended.send(Arc::from(n.payload()));
                    }
                }
            }
        }
    }
}
