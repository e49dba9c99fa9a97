//! Which slots a member may work, shared by its membership service (which
//! takes and releases them) and its advancer and reaper (which read them).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The slots a member holds, shared with its advancer and reaper.
#[derive(Clone, Default)]
pub(crate) struct Ownership {
    inner: Arc<OwnershipInner>,
}

#[derive(Default)]
struct OwnershipInner {
    slots: RwLock<Vec<i32>>,
    /// Until when the last heartbeat vouches for our membership.
    healthy_until: Mutex<Option<Instant>>,
    /// Slots taken from a member that died holding them, and until when
    /// their attempts must not run inline (the poison-pill guard).
    quarantined_until: Mutex<HashMap<i32, Instant>>,
}

/// A read guard on the owned slots: while it is held, the member does not
/// release any of them (so a batch in flight finishes before a handover).
pub(crate) struct OwnedSlots<'a> {
    guard: RwLockReadGuard<'a, Vec<i32>>,
    healthy: bool,
}

impl OwnedSlots<'_> {
    /// The slots to work now; empty while the member cannot vouch for its
    /// membership.
    pub(crate) fn slots(&self) -> &[i32] {
        if self.healthy {
            &self.guard
        } else {
            &[]
        }
    }
}

impl Ownership {
    pub(crate) async fn read(&self) -> OwnedSlots<'_> {
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
    pub(crate) async fn held(&self) -> Vec<i32> {
        self.inner.slots.read().await.clone()
    }

    /// Exclusive access, to change the held slots; waits for batches in
    /// flight on them to finish.
    pub(super) async fn write(&self) -> RwLockWriteGuard<'_, Vec<i32>> {
        self.inner.slots.write().await
    }

    /// Attempts of these slots run through task rows until `until`: their
    /// previous holder died holding them, perhaps killed by an attempt it
    /// ran inline, which must now be counted before it runs again.
    pub(super) fn quarantine(&self, slots: impl IntoIterator<Item = i32>, until: Instant) {
        let mut q = self.inner.quarantined_until.lock().expect("ownership lock");
        q.retain(|_, t| Instant::now() < *t);
        q.extend(slots.into_iter().map(|s| (s, until)));
    }

    /// The slots whose attempts may not run inline now (usually none).
    pub(crate) fn quarantined(&self) -> Vec<i32> {
        let q = self.inner.quarantined_until.lock().expect("ownership lock");
        let now = Instant::now();
        q.iter()
            .filter(|(_, t)| now < **t)
            .map(|(s, _)| *s)
            .collect()
    }

    pub(super) fn vouch(&self, until: Instant) {
        *self.inner.healthy_until.lock().expect("ownership lock") = Some(until);
    }

    pub(super) async fn clear(&self) {
        *self.inner.healthy_until.lock().expect("ownership lock") = None;
        self.inner.slots.write().await.clear();
    }
}
