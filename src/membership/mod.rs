//! Membership and slot ownership. Each worker member keeps a dedicated
//! session: it registers in `members`, heartbeats every `heartbeat_ms`,
//! removes members past their TTL (or whose session is gone) and terminates
//! their sessions (every member does: so a frozen holder of the maintenance
//! duty is removed too), computes the slot assignment from the live members with
//! `ring::owned_by`, releases slots it no longer owns and takes newly owned
//! ones with `pg_try_advisory_lock` as they free up.
//!
//! The rest of the worker asks `Ownership` which slots it may work. A member
//! that has not heartbeaten for half its TTL reports no slots at all
//! (self-fencing) until it is a member again; correctness does not depend on
//! this (every transition is fenced in the database), it only avoids waste.

mod ownership;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) use ownership::Ownership;

use crate::error::Chain;
use crate::metrics::{Metrics, ProcessDuty};
use crate::service::Service;
use crate::store::{MemberSession, Store, StoreError};
use crate::wakeups::Wakeups;

#[derive(Debug, Clone)]
pub(crate) struct MembershipConfig {
    pub name: String,
    /// Silence (database time) after which the others remove this member.
    pub ttl_ms: u64,
    /// Advertised in `members` for operators.
    pub api_url: Option<String>,
    /// How long attempts of a slot taken from a member that died holding
    /// it run through task rows instead of inline.
    pub inline_quarantine_ms: u64,
}

/// The advisory-lock key of the maintenance duty (slots use 0..slot_count).
const MAINTENANCE_DUTY: i32 = -1;

pub(crate) struct Membership {
    pub config: MembershipConfig,
    pub store: Store,
    pub ownership: Ownership,
    pub wakeups: Wakeups,
    pub metrics: Arc<Metrics>,
    /// Set while a member of this process holds the maintenance duty.
    pub process_duty: ProcessDuty,
    session: Option<MemberSession>,
    /// Since when (the dead member's last heartbeat) a takeover is pending.
    failover_since: Option<Instant>,
    /// Whether this member's current session holds the maintenance duty.
    holds_maintenance: bool,
}

/// What one heartbeat did.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Heartbeat {
    /// Dead members this heartbeat removed (as the duty holder).
    pub removed: Vec<String>,
    /// Slots held afterwards.
    pub slots: usize,
}

impl Membership {
    pub(crate) fn new(
        config: MembershipConfig,
        store: Store,
        ownership: Ownership,
        wakeups: Wakeups,
        metrics: Arc<Metrics>,
        process_duty: ProcessDuty,
    ) -> Self {
        Membership {
            config,
            store,
            ownership,
            wakeups,
            metrics,
            process_duty,
            session: None,
            failover_since: None,
            holds_maintenance: false,
        }
    }
}

impl Service for Membership {
    type Outcome = Heartbeat;
    const NAME: &'static str = "membership";

    /// Joins if there is no session, then heartbeats once.
    async fn run_once(&mut self) -> Result<Heartbeat, StoreError> {
        if self.session.as_ref().is_some_and(MemberSession::is_closed) {
            tracing::warn!(member = %self.config.name, "membership session closed; rejoining");
            self.lose_session().await;
        }
        let session = match self.session.take() {
            Some(s) => s,
            None => {
                let s = self.join().await?;
                tracing::info!(member = %self.config.name, "joined the cluster");
                s
            }
        };
        let result = self.heartbeat(&session).await;
        self.session = Some(session);
        result
    }

    /// The session, and with it every slot lock, is gone or unusable.
    async fn failed(&mut self, error: &StoreError) {
        let member = &self.config.name;
        if self.session.is_some() {
            tracing::warn!(member = %member, error = %Chain(error), "membership session failed; rejoining");
        } else {
            tracing::warn!(member = %member, error = %Chain(error), "cannot join the cluster; retrying");
        }
        self.metrics.heartbeat_failures.inc();
        self.lose_session().await;
    }

    async fn stop(mut self) {
        self.ownership.clear().await;
        self.drop_duty();
        if let Some(session) = self.session.take() {
            session.leave(&self.config.name).await;
        }
    }
}

impl Membership {
    async fn join(&self) -> Result<MemberSession, StoreError> {
        let session = self
            .store
            .connect_member(&self.config.name, self.config.ttl_ms)
            .await?;
        session
            .register(
                &self.config.name,
                self.config.ttl_ms,
                self.config.api_url.as_deref(),
            )
            .await?;
        Ok(session)
    }

    async fn lose_session(&mut self) {
        self.session = None;
        self.ownership.clear().await;
        self.drop_duty();
        self.metrics
            .slots_owned
            .with_label_values(&[&self.config.name])
            .set(0);
    }

    /// The session that held the duty is gone (or going).
    fn drop_duty(&mut self) {
        if self.holds_maintenance {
            self.process_duty.store(false, Ordering::SeqCst);
        }
        self.holds_maintenance = false;
    }

    /// One heartbeat: vouch, clean up the dead, rebalance.
    async fn heartbeat(&mut self, session: &MemberSession) -> Result<Heartbeat, StoreError> {
        let name = &self.config.name;
        let sent = Instant::now();
        if !session.heartbeat(name).await? {
            // Others judged us dead (e.g. we were frozen): rejoin.
            tracing::warn!(member = %name, "this member had been removed; rejoining");
            let api_url = self.config.api_url.as_deref();
            session.register(name, self.config.ttl_ms, api_url).await?;
        }
        // Measured from when the heartbeat was sent: the database may have
        // seen it as late as now, never earlier.
        self.ownership
            .vouch(sent + Duration::from_millis(self.config.ttl_ms / 2));
        let removed = self.maintain(session).await?;
        let slots = self.rebalance(session).await?;
        self.metrics
            .slots_owned
            .with_label_values(&[&self.config.name])
            .set(slots as i64);
        Ok(Heartbeat { removed, slots })
    }

    /// Takes the maintenance duty if it is free (one member at a time holds
    /// it, by the same kind of lock as the slots; it runs the cluster
    /// gauges), and removes dead members, terminating their sessions.
    /// Every member removes the dead, not only the duty's holder: a frozen
    /// or partitioned holder must be removed too, and its session ended, or
    /// neither its slots nor the duty would ever move. Returns the members
    /// this member removed.
    async fn maintain(&mut self, session: &MemberSession) -> Result<Vec<String>, StoreError> {
        let name = &self.config.name;
        if !self.holds_maintenance {
            self.holds_maintenance = session.try_lock_duty(MAINTENANCE_DUTY).await?;
            if self.holds_maintenance {
                self.process_duty.store(true, Ordering::SeqCst);
                tracing::info!(member = %name, "holds the maintenance duty");
            }
        }
        let reaped = session.reap_members(name).await?;
        for (dead, silent_s) in &reaped {
            tracing::warn!(member = %name, dead = %dead, silent_s, "removed a dead member");
            self.metrics.members_removed.inc();
            // A failover is timed from the dead member's last heartbeat.
            let since = Instant::now()
                .checked_sub(Duration::from_secs_f64(silent_s.max(0.0)))
                .unwrap_or_else(Instant::now);
            self.failover_since = Some(self.failover_since.map_or(since, |f| f.min(since)));
        }
        Ok(reaped.into_iter().map(|(dead, _)| dead).collect())
    }

    /// Releases the slots the ring no longer gives this member and takes
    /// the ones it does, as their locks free up; returns the slots held.
    async fn rebalance(&mut self, session: &MemberSession) -> Result<usize, StoreError> {
        let name = &self.config.name;
        let live = session.live_members().await?;
        let desired = crate::ring::owned_by(&live, session.slot_count.max(1) as u32, name);
        let held = self.ownership.held().await;
        let release = missing_from(&held, &desired);
        if !release.is_empty() {
            // Waits for batches in flight on these slots to finish.
            let mut slots = self.ownership.write().await;
            session.unlock_slots(name, &release).await?;
            slots.retain(|s| !release.contains(s));
            self.metrics.slot_rebalances.inc();
            tracing::info!(member = %name, released = release.len(), "released slots");
        }
        let wanted = missing_from(&desired, &held);
        if !wanted.is_empty() {
            self.acquire(session, &wanted).await?;
        }
        Ok(self.ownership.held().await.len())
    }

    async fn acquire(&mut self, session: &MemberSession, wanted: &[i32]) -> Result<(), StoreError> {
        let name = &self.config.name;
        let taken = session.try_lock_slots(name, wanted).await?;
        if taken.is_empty() {
            return Ok(());
        }
        let inherited: Vec<i32> = taken
            .iter()
            .filter(|t| t.holder_died)
            .map(|t| t.slot)
            .collect();
        if !inherited.is_empty() {
            let quarantine = Duration::from_millis(self.config.inline_quarantine_ms);
            self.ownership
                .quarantine(inherited.iter().copied(), Instant::now() + quarantine);
            tracing::info!(member = %name, slots = inherited.len(), quarantine_ms = self.config.inline_quarantine_ms, "took slots whose holder died: their attempts run through task rows for a while");
        }
        let got: Vec<i32> = taken.iter().map(|t| t.slot).collect();
        {
            let mut slots = self.ownership.write().await;
            slots.extend(&got);
            slots.sort_unstable();
            slots.dedup();
        }
        self.metrics.slot_rebalances.inc();
        tracing::info!(member = %name, acquired = got.len(), waiting = wanted.len() - got.len(), "acquired slots");
        if got.len() == wanted.len() {
            if let Some(since) = self.failover_since.take() {
                let seconds = since.elapsed().as_secs_f64();
                self.metrics.failover_seconds.observe(seconds);
                tracing::info!(member = %name, seconds, "took over a dead member's slots");
            }
        }
        // Work may be waiting in the new slots.
        let _ = self.wakeups.advance.send(());
        Ok(())
    }
}

/// The slots of `these` that are not in `those`.
fn missing_from(these: &[i32], those: &[i32]) -> Vec<i32> {
    these
        .iter()
        .copied()
        .filter(|s| !those.contains(s))
        .collect()
}
