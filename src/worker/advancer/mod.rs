//! The engine driver, as lock → load → decide → write: lock a batch of
//! instances that need a decision and load their rows (the store), turn each
//! into engine inputs, decide, and turn the decisions into writes
//! (`plan.rs`, pure), then commit them all in one transaction fenced by each
//! instance's state version. Metrics count the batch only once it commits
//! (`observations.rs`).

mod observations;
mod plan;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, SeedableRng};

use super::DefinitionCache;
use crate::engine::Context;
use crate::error::Chain;
use crate::membership::Ownership;
use crate::metrics::{Component, Metrics};
use crate::service::{Next, Service};
use crate::store::{Store, StoreError};
use plan::Plan;

#[derive(Debug, Clone)]
pub(crate) struct AdvancerConfig {
    /// The member whose slots this advancer works (kept on its events).
    pub member: String,
    /// Most instances one transaction locks and advances.
    pub batch_size: usize,
}

pub(crate) struct Advancer {
    pub config: AdvancerConfig,
    pub store: Store,
    pub definitions: DefinitionCache,
    pub ownership: Ownership,
    pub metrics: Arc<Metrics>,
}

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Advanced {
    /// Instances decided.
    pub instances: usize,
    /// Instances left as they were: their rows hold what this version
    /// cannot read.
    pub unreadable: usize,
}

impl Service for Advancer {
    type Outcome = Advanced;
    const NAME: &'static str = "advancer";

    /// Moves one batch of the owned slots' instances on.
    async fn run_once(&mut self) -> Result<Advanced, StoreError> {
        // Held for the whole batch: the member does not hand these slots
        // over while the batch is in flight.
        let owned = self.ownership.read().await;
        if owned.slots().is_empty() {
            return Ok(Advanced::default());
        }
        let started = Instant::now();
        let tx = self.store.begin_advance().await?;
        let batch = tx.lock_due(self.config.batch_size, owned.slots()).await?;
        for (id, e) in &batch.unreadable {
            tracing::error!(instance = %id, error = %Chain(e), "instance left as it is: it holds what this version of stead cannot read");
            self.metrics.db_error(Component::Advancer);
        }
        let unreadable = batch.unreadable.len();
        if batch.instances.is_empty() {
            tx.rollback().await?;
            return Ok(Advanced {
                instances: 0,
                unreadable,
            });
        }
        let mut plan = Plan::new(batch.now, &self.config.member);
        // StdRng rather than thread_rng: the future must stay Send.
        let mut rng = rand::rngs::StdRng::from_entropy();
        let mut random = || rng.gen::<f64>();
        for due in &batch.instances {
            let (name, version) = (&due.workflow_name, due.workflow_version);
            let Some(def) = self.definitions.get_in(&tx, name, version).await? else {
                tracing::error!(instance = %due.id, "instance refers to a missing or invalid definition");
                continue;
            };
            let mut ctx = Context {
                now: batch.now,
                random: &mut random,
            };
            plan.decide(&def, due, &mut ctx);
        }
        tx.commit(plan.finish()).await?;
        self.metrics
            .advance_batch_seconds
            .observe(started.elapsed().as_secs_f64());
        plan.observed.apply(&self.metrics);
        Ok(Advanced {
            instances: batch.instances.len(),
            unreadable,
        })
    }

    /// A full batch: more may be waiting, go again at once. (Unreadable
    /// instances do not count: a slot full of them must not spin.)
    fn next(&self, outcome: &Advanced) -> Next {
        Next::now_if(outcome.instances >= self.config.batch_size)
    }

    async fn failed(&mut self, error: &StoreError) {
        tracing::warn!(error = %Chain(error), "advancing instances failed");
        self.metrics.db_error(Component::Advancer);
    }
}
