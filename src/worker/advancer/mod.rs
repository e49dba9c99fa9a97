//! The engine driver, as lock → load → decide → write: lock a batch of
//! instances that need a decision and load their rows (the store), turn each
//! into engine inputs, decide, and turn the decisions into writes
//! (`plan.rs`, pure), then commit them all in one transaction fenced by each
//! instance's state version. Metrics count the batch only once it commits
//! (`observations.rs`).

mod gate;
mod inline;
mod observations;
mod plan;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use super::DefinitionCache;
use crate::definition::Definition;
use crate::engine::{self, Context, EngineLimits};
use crate::error::Chain;
use crate::membership::Ownership;
use crate::metrics::{Component, Metrics};
use crate::service::{Next, Service};
use crate::store::{DueBatch, Store, StoreError};
use crate::wakeups::Wakeups;
use crate::worker::controls::Controls;
use crate::worker::executor::LocalExecution;
use inline::{Handover, InlineRun, Working};
use plan::Plan;

#[derive(Debug, Clone)]
pub(crate) struct AdvancerConfig {
    /// The member whose slots this advancer works (kept on its events).
    pub member: String,
    /// Most instances one transaction locks and advances.
    pub batch_size: usize,
    /// Most bytes of stored state (`instances.stored_bytes`) one batch loads;
    /// an instance larger than this is advanced alone.
    pub batch_max_bytes: u64,
    /// How long a batch may run attempts inline (0: never).
    pub inline_budget_ms: u64,
    /// What one instance may hold.
    pub limits: EngineLimits,
}

pub(crate) struct Advancer {
    pub config: AdvancerConfig,
    pub store: Store,
    pub definitions: DefinitionCache,
    pub ownership: Ownership,
    pub metrics: Arc<Metrics>,
    /// The member's in-process execution, for running attempts inline.
    pub local: Option<LocalExecution>,
    /// This process's waiters on ended instances are told at once; other
    /// processes hear of it from the batch's NOTIFY.
    pub wakeups: Wakeups,
    /// Paused workflows, as this process knows them.
    pub controls: Controls,
}

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Advanced {
    /// Instances decided.
    pub instances: usize,
    /// Instances left as they were: their rows hold what this version
    /// cannot read.
    pub unreadable: usize,
    /// Instances locked but left for the next batch (past its byte bound).
    pub deferred: usize,
    /// Decided instances that spent their byte budget with steps to start.
    pub paused: usize,
}

impl Advancer {
    /// Each locked instance's definition, looked up once for the batch (the
    /// gate and the engine both read it).
    async fn definitions_of(
        &self,
        tx: &crate::store::AdvanceTx,
        batch: &DueBatch,
    ) -> Result<Vec<Option<Arc<Definition>>>, StoreError> {
        let mut defs = Vec::with_capacity(batch.instances.len());
        for due in &batch.instances {
            let def = self
                .definitions
                .get_in(tx, &due.workflow_name, due.workflow_version)
                .await?;
            if def.is_none() {
                tracing::error!(instance = %due.id, "instance refers to a missing or invalid definition");
            }
            defs.push(def);
        }
        Ok(defs)
    }

    /// The engine's first decision for every locked instance the gate let
    /// through.
    fn decide(
        &self,
        batch: &mut DueBatch,
        defs: &[Option<Arc<Definition>>],
        skip: &std::collections::HashSet<usize>,
        random: &mut (dyn FnMut() -> f64 + Send),
    ) -> Vec<Working> {
        let mut work = Vec::with_capacity(batch.instances.len());
        let mut added = 0u64;
        let now = batch.now;
        for (i, due) in batch.instances.iter_mut().enumerate() {
            if skip.contains(&i) {
                continue;
            }
            let Some(def) = defs[i].clone() else {
                continue;
            };
            let (mut state, events) = plan::engine_inputs(&def, due);
            let steps_before = state.steps.iter().map(|s| s.status).collect();
            let mut ctx = Context {
                now,
                random: &mut *random,
                limits: self.config.limits,
                budget_bytes: self.budget_after(added),
            };
            let decision = engine::decide(&def, &mut state, &events, &mut ctx);
            added += decision.added_bytes;
            work.push(Working::new(def, i, state, steps_before, decision));
        }
        work
    }

    /// The byte budget of a decision after the batch's earlier ones added
    /// `added`: what is left of `batch_max_bytes`, but never less than an
    /// even share of it, so that every instance of a batch moves on. A
    /// batch adds at most about twice `batch_max_bytes`.
    fn budget_after(&self, added: u64) -> u64 {
        let max = self.config.batch_max_bytes;
        max.saturating_sub(added).max(self.share())
    }

    /// An even share of the batch's byte bound (at least a byte, so every
    /// decision may start a step).
    fn share(&self) -> u64 {
        (self.config.batch_max_bytes / self.config.batch_size.max(1) as u64).max(1)
    }

    /// Gives the executor the promoted attempts whose rows committed.
    fn hand_over(&self, handovers: Vec<Handover>, leased: &[(uuid::Uuid, i64)]) {
        let Some(local) = &self.local else { return };
        for mut h in handovers {
            match leased
                .iter()
                .find(|(token, _)| *token == h.task.lease_token)
            {
                Some((_, id)) => {
                    h.task.task_id = *id;
                    local.adopt(h.task, h.attempt);
                }
                None => h.attempt.abort(),
            }
        }
    }
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
        let (tx, mut batch) = self
            .store
            .begin_and_lock_due(
                self.config.batch_size,
                self.config.batch_max_bytes,
                owned.slots(),
            )
            .await?;
        for (id, e) in &batch.unreadable {
            tracing::error!(instance = %id, error = %Chain(e), "instance left as it is: it holds what this version of stead cannot read");
            self.metrics.db_error(Component::Advancer);
        }
        let (unreadable, deferred) = (batch.unreadable.len(), batch.deferred);
        if batch.instances.is_empty() {
            tx.rollback().await?;
            return Ok(Advanced {
                instances: 0,
                unreadable,
                deferred,
                paused: 0,
            });
        }
        let clock_start = Instant::now();
        // StdRng rather than thread_rng: the future must stay Send.
        let mut rng = rand::rngs::StdRng::from_entropy();
        let mut random = move || rng.gen::<f64>();
        let defs = self.definitions_of(&tx, &batch).await?;
        let gate = self.gate(&tx, &batch, &defs).await?;
        let mut work = self.decide(&mut batch, &defs, &gate.skip, &mut random);
        if let Some(local) = self
            .local
            .as_ref()
            .filter(|_| self.config.inline_budget_ms > 0)
        {
            let mut run = InlineRun {
                local,
                batch: &batch.instances,
                now: batch.now,
                clock_start,
                budget: Duration::from_millis(self.config.inline_budget_ms),
                random: &mut random,
                ownership: &self.ownership,
                limits: self.config.limits,
                // Later rounds get a share each, so that running attempts
                // inline cannot take a batch past its byte bound.
                budget_bytes: self.share(),
            };
            run.run(&mut work).await;
        }
        let mut plan = Plan::new(batch.now, &self.config.member);
        let mut handovers = Vec::new();
        // An instance that spent its byte budget goes on after the
        // instances that became due while this batch ran, not before them
        // (the time since the lock returned: never past the database's
        // clock at the next lock).
        let since_lock = chrono::Duration::from_std(clock_start.elapsed()).unwrap_or_default();
        let behind = batch.now + since_lock;
        let decided = work.len();
        let mut paused = 0;
        for mut w in work {
            if w.decision.paused {
                w.decision.wake_at = Some(behind);
                paused += 1;
            }
            let due = &batch.instances[w.due];
            plan.record(&w.def, due, &w.steps_before, w.state, w.decision, w.inline);
            handovers.extend(w.handovers);
        }
        plan.writes.released = gate.released(plan.observed.ended.iter().map(|e| e.id.as_str()));
        plan.writes.holds = gate.holds;
        plan.writes.admitted = gate.admitted;
        plan.writes.wake_waiters = gate.wake;
        match tx.commit(plan.finish()).await {
            Ok(leased) => self.hand_over(handovers, &leased),
            Err(e) => {
                for h in handovers {
                    h.attempt.abort();
                }
                return Err(e);
            }
        }
        self.metrics
            .advance_batch_seconds
            .observe(started.elapsed().as_secs_f64());
        if self.wakeups.ended.receiver_count() > 0 {
            for e in &plan.observed.ended {
                let _ = self.wakeups.ended.send(Arc::from(e.id.as_str()));
            }
        }
        plan.observed.apply(&self.metrics);
        Ok(Advanced {
            instances: decided,
            unreadable,
            deferred,
            paused,
        })
    }

    /// A full batch, or one that moved instances on and left some for
    /// later (deferred, or paused on their byte budget): go again at once.
    /// (Instances left as they were do not count: a slot full of them must
    /// not spin.)
    fn next(&self, outcome: &Advanced) -> Next {
        let more = outcome.deferred > 0 || outcome.paused > 0;
        Next::now_if(outcome.instances >= self.config.batch_size || (outcome.instances > 0 && more))
    }

    async fn failed(&mut self, error: &StoreError) {
        tracing::warn!(error = %Chain(error), "advancing instances failed");
        self.metrics.db_error(Component::Advancer);
    }
}
