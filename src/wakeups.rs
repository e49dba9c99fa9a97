//! In-process fan-out of wake-ups: from the LISTEN session (other
//! processes' notifications) and from this process's own API and workers.
//! A wake-up is only a latency hint: every consumer also polls, so a lost
//! one costs at most one poll interval.

use std::sync::Arc;

use tokio::sync::broadcast;

/// Capacity of each broadcast channel; a lagging receiver just rechecks.
const CHANNEL_CAPACITY: usize = 1024;

#[derive(Clone)]
pub(crate) struct Wakeups {
    /// Something needs the engine (a start, a task result).
    pub(crate) advance: broadcast::Sender<()>,
    /// A queue got new tasks (payload: queue name).
    pub(crate) tasks: broadcast::Sender<Arc<str>>,
    /// An instance ended (payload: instance id).
    pub(crate) ended: broadcast::Sender<Arc<str>>,
}

impl Default for Wakeups {
    fn default() -> Self {
        Wakeups {
            advance: broadcast::channel(CHANNEL_CAPACITY).0,
            tasks: broadcast::channel(CHANNEL_CAPACITY).0,
            ended: broadcast::channel(CHANNEL_CAPACITY).0,
        }
    }
}

impl Wakeups {
    /// Wakes every consumer, e.g. after the listener reconnected and may
    /// have missed notifications.
    pub(crate) fn wake_all(&self) {
        let _ = self.advance.send(());
        let _ = self.tasks.send(Arc::from("*"));
    }
}

/// Drains whatever is pending on a receiver; true if anything was.
pub(crate) fn drain<T: Clone>(rx: &mut broadcast::Receiver<T>) -> bool {
    let mut any = false;
    loop {
        match rx.try_recv() {
            Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => any = true,
            Err(_) => return any,
        }
    }
}
