//! Membership and slot ownership. Each worker member keeps a dedicated
//! session: it registers in `members`, heartbeats every `heartbeat_ms`,
//! removes members past their TTL (or whose session is gone) and terminates
//! their sessions, computes the slot assignment from the live members with
//! `ring::owned_by`, releases slots it no longer owns and takes newly owned
//! ones with `pg_try_advisory_lock` as they free up.
//!
//! The rest of the worker asks `Ownership` which slots it may work. A member
//! that has not heartbeaten for half its TTL reports no slots at all
//! (self-fencing) until it is a member again; correctness does not depend on
//! this (every transition is fenced in the database), it only avoids waste.

mod gauges;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::{RwLock, RwLockReadGuard};
use tokio_util::sync::CancellationToken;

pub use gauges::{ClusterGaugesConfig, ClusterGaugesLoop};

use crate::metrics::Metrics;
use crate::store::{MemberSession, Store, StoreError};
use crate::worker::{jittered, Wakeups};

#[derive(Debug, Error)]
pub enum MembershipError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone)]
pub struct MembershipConfig {
    pub name: String,
    pub heartbeat_ms: u64,
    pub ttl_ms: u64,
    pub api_url: Option<String>,
    pub reconnect_max_ms: u64,
}

/// Whether a member of this process holds the maintenance duty (at most one
/// member in the cluster does), shared with `ClusterGaugesLoop`.
pub type ProcessDuty = Arc<AtomicBool>;

/// The slots a member holds, shared with its advancer and reaper.
#[derive(Clone, Default)]
pub struct Ownership {
    inner: Arc<OwnershipInner>,
}

#[derive(Default)]
struct OwnershipInner {
    slots: RwLock<Vec<i32>>,
    /// Until when the last heartbeat vouches for our membership.
    healthy_until: Mutex<Option<Instant>>,
}

/// A read guard on the owned slots: while it is held, the member does not
/// release any of them (so a batch in flight finishes before a handover).
pub struct OwnedSlots<'a> {
    guard: RwLockReadGuard<'a, Vec<i32>>,
    healthy: bool,
}

impl OwnedSlots<'_> {
    /// The slots to work now; empty while the member cannot vouch for its
    /// membership.
    pub fn slots(&self) -> &[i32] {
        if self.healthy {
            &self.guard
        } else {
            &[]
        }
    }
}

impl Ownership {
    pub async fn read(&self) -> OwnedSlots<'_> {
        let guard = self.inner.slots.read().await;
        let healthy = self
            .inner
            .healthy_until
            .lock()
            .expect("ownership lock")
            .is_some_and(|t| Instant::now() < t);
        OwnedSlots { guard, healthy }
    }

    /// The slots held (whatever the health), for reporting.
    pub async fn held(&self) -> Vec<i32> {
        self.inner.slots.read().await.clone()
    }

    fn vouch(&self, until: Instant) {
        *self.inner.healthy_until.lock().expect("ownership lock") = Some(until);
    }

    async fn clear(&self) {
        *self.inner.healthy_until.lock().expect("ownership lock") = None;
        self.inner.slots.write().await.clear();
    }
}

pub struct Membership {
    pub config: MembershipConfig,
    pub store: Store,
    pub ownership: Ownership,
    pub wakeups: Wakeups,
    pub metrics: Arc<Metrics>,
    /// Since when (the dead member's last heartbeat) a takeover is pending.
    pub failover_since: Mutex<Option<Instant>>,
    /// Whether this member's current session holds the maintenance duty.
    pub holds_maintenance: Mutex<bool>,
    pub process_duty: ProcessDuty,
}

/// The advisory-lock key of the maintenance duty (slots use 0..slot_count).
const MAINTENANCE_DUTY: i32 = -1;

impl Membership {
    pub async fn run(self, cancel: CancellationToken) {
        let mut backoff_ms = 100;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            let session = match self.join().await {
                Ok(s) => {
                    backoff_ms = 100;
                    s
                }
                Err(e) => {
                    tracing::warn!(member = %self.config.name, error = %e, "cannot join the cluster; retrying");
                    self.metrics.heartbeat_failures.inc();
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(jittered(backoff_ms)) => {}
                    }
                    backoff_ms = (backoff_ms * 2).min(self.config.reconnect_max_ms);
                    continue;
                }
            };
            tracing::info!(member = %self.config.name, "joined the cluster");
            loop {
                if let Err(e) = self.run_once(&session).await {
                    tracing::warn!(member = %self.config.name, error = %e, "membership session failed; rejoining");
                    self.metrics.heartbeat_failures.inc();
                    break;
                }
                tokio::select! {
                    _ = cancel.cancelled() => {
                        self.ownership.clear().await;
                        self.drop_duty();
                        session.leave(&self.config.name).await;
                        return;
                    }
                    _ = tokio::time::sleep(jittered(self.config.heartbeat_ms)) => {}
                }
                if session.is_closed() {
                    tracing::warn!(member = %self.config.name, "membership session closed; rejoining");
                    break;
                }
            }
            // The session (and with it every slot lock) is gone.
            self.ownership.clear().await;
            self.drop_duty();
            self.metrics
                .slots_owned
                .with_label_values(&[&self.config.name])
                .set(0);
        }
    }

    /// The session that held the duty is gone (or going).
    fn drop_duty(&self) {
        let mut held = self.holds_maintenance.lock().expect("duty lock");
        if *held {
            self.process_duty.store(false, Ordering::SeqCst);
        }
        *held = false;
    }

    async fn join(&self) -> Result<MemberSession, MembershipError> {
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

    /// One heartbeat: vouch, clean up the dead, rebalance.
    pub async fn run_once(&self, session: &MemberSession) -> Result<(), MembershipError> {
        let name = &self.config.name;
        let sent = Instant::now();
        if !session.heartbeat(name).await? {
            // Others judged us dead (e.g. we were frozen): rejoin.
            tracing::warn!(member = %name, "this member had been removed; rejoining");
            session
                .register(name, self.config.ttl_ms, self.config.api_url.as_deref())
                .await?;
        }
        // Measured from when the heartbeat was sent: the database may have
        // seen it as late as now, never earlier.
        self.ownership
            .vouch(sent + Duration::from_millis(self.config.ttl_ms / 2));

        // Removing dead members (and terminating their sessions) is a
        // singleton duty: one member at a time, by the same kind of lock.
        let mut maintenance = self.holds_maintenance.lock().expect("duty lock").to_owned();
        if !maintenance {
            maintenance = session.try_lock_duty(MAINTENANCE_DUTY).await?;
            *self.holds_maintenance.lock().expect("duty lock") = maintenance;
            if maintenance {
                self.process_duty.store(true, Ordering::SeqCst);
                tracing::info!(member = %name, "holds the maintenance duty");
            }
        }
        let reaped = if maintenance {
            session.reap_members(name).await?
        } else {
            Vec::new()
        };
        for (dead, silent_s) in &reaped {
            tracing::warn!(member = %name, dead = %dead, silent_s, "removed a dead member");
            self.metrics.members_removed.inc();
            // A failover is timed from the dead member's last heartbeat.
            let since = Instant::now()
                .checked_sub(Duration::from_secs_f64(silent_s.max(0.0)))
                .unwrap_or_else(Instant::now);
            let mut failover = self.failover_since.lock().expect("failover lock");
            *failover = Some(failover.map_or(since, |f: Instant| f.min(since)));
        }
        let live = session.live_members().await?;
        let desired = crate::ring::owned_by(&live, session.slot_count.max(1) as u32, name);

        let held = self.ownership.held().await;
        let release: Vec<i32> = held
            .iter()
            .copied()
            .filter(|s| !desired.contains(s))
            .collect();
        if !release.is_empty() {
            // Waits for batches in flight on these slots to finish.
            let mut slots = self.ownership.inner.slots.write().await;
            session.unlock_slots(&release).await?;
            slots.retain(|s| !release.contains(s));
            self.metrics.slot_rebalances.inc();
            tracing::info!(member = %name, released = release.len(), "released slots");
        }
        let wanted: Vec<i32> = desired
            .iter()
            .copied()
            .filter(|s| !held.contains(s))
            .collect();
        if !wanted.is_empty() {
            let got = session.try_lock_slots(&wanted).await?;
            if !got.is_empty() {
                let mut slots = self.ownership.inner.slots.write().await;
                slots.extend(&got);
                slots.sort_unstable();
                slots.dedup();
                self.metrics.slot_rebalances.inc();
                tracing::info!(member = %name, acquired = got.len(), waiting = wanted.len() - got.len(), "acquired slots");
                if got.len() == wanted.len() {
                    if let Some(since) = self.failover_since.lock().expect("failover lock").take() {
                        let seconds = since.elapsed().as_secs_f64();
                        self.metrics.failover_seconds.observe(seconds);
                        tracing::info!(member = %name, seconds, "took over a dead member's slots");
                    }
                }
                // Work may be waiting in the new slots.
                let _ = self.wakeups.advance.send(());
            }
        }
        self.metrics
            .slots_owned
            .with_label_values(&[name])
            .set(self.ownership.inner.slots.read().await.len() as i64);
        Ok(())
    }
}
