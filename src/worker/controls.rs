//! What this process knows of the cluster's flow controls: the queues with
//! limits and the paused workflows, refreshed every `refresh_ms` (and at
//! once after this node's API changes them). The limits themselves are
//! enforced in the database (a claim on a limited queue locks its row; the
//! unlimited claim passes over any queue that has one), so a process that
//! has not heard of a change yet claims less, never more. Inline execution
//! is the exception that this knowledge guards: an attempt of a limited
//! queue never runs inline, and until the first load none does.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use crate::error::Chain;
use crate::metrics::{Component, Metrics};
use crate::service::Service;
use crate::store::{ControlNames, Store, StoreError};

#[derive(Default)]
struct Known {
    loaded: bool,
    queues: BTreeSet<String>,
    paused_workflows: BTreeSet<String>,
}

/// Shared by the API, the executors and the advancers of a process.
#[derive(Clone)]
pub(crate) struct Controls {
    known: Arc<RwLock<Known>>,
    metrics: Arc<Metrics>,
}

impl Controls {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        Controls {
            known: Arc::default(),
            metrics,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Known> {
        self.known.read().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, names: ControlNames) {
        let m = &self.metrics;
        for g in [&m.queue_controlled, &m.queue_paused, &m.workflow_paused] {
            g.reset();
        }
        for (queue, paused) in &names.queues {
            m.queue_controlled.with_label_values(&[queue]).set(1);
            m.queue_paused
                .with_label_values(&[queue])
                .set(i64::from(*paused));
        }
        for workflow in &names.paused_workflows {
            m.workflow_paused.with_label_values(&[workflow]).set(1);
        }
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        known.loaded = true;
        known.queues = names.queues.into_iter().map(|(q, _)| q).collect();
        known.paused_workflows = names.paused_workflows.into_iter().collect();
    }

    /// Whether `queue` has limits (claims take the limited path).
    pub(crate) fn is_limited(&self, queue: &str) -> bool {
        self.read().queues.contains(queue)
    }

    /// Whether an attempt of `queue` may run inline: the controls are known
    /// and the queue has no limits.
    pub(crate) fn runs_inline(&self, queue: &str) -> bool {
        let known = self.read();
        known.loaded && !known.queues.contains(queue)
    }

    /// Whether new instances of `workflow` are held.
    pub(crate) fn workflow_paused(&self, workflow: &str) -> bool {
        self.read().paused_workflows.contains(workflow)
    }

    /// Reloads from the database.
    pub(crate) async fn reload(&self, store: &Store) -> Result<(), StoreError> {
        self.set(store.control_names().await?);
        Ok(())
    }
}

/// Reloads the controls every interval.
pub(crate) struct ControlsRefresher {
    pub controls: Controls,
    pub store: Store,
}

impl Service for ControlsRefresher {
    type Outcome = ();
    const NAME: &'static str = "controls";

    async fn run_once(&mut self) -> Result<(), StoreError> {
        self.controls.reload(&self.store).await
    }

    async fn failed(&mut self, error: &StoreError) {
        tracing::warn!(error = %Chain(error), "reading the flow controls failed");
        self.controls.metrics.db_error(Component::Controls);
    }
}
