//! Background loops of a worker: the engine driver (`advancer`), the
//! in-process task executor, the lease reaper and the notification listener.
//!
//! Every loop has the same shape: a config struct, `run(cancel)` that selects
//! on the cancellation token, a wake-up and a jittered interval, and a
//! `run_once()` that tests can call directly.

pub mod advancer;
pub mod builtin;
pub mod executor;
pub mod listener;
pub mod notifier;
pub mod reaper;
mod wakeups;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;

use crate::definition::{self, Definition, Limits};
use crate::store::{AdvanceTx, Store, StoreError};

pub use wakeups::{drain, Wakeups};

/// `ms` spread by ±10% so that many workers do not poll in lockstep.
pub fn jittered(ms: u64) -> Duration {
    let factor = rand::thread_rng().gen_range(0.9..1.1);
    Duration::from_millis(((ms as f64) * factor) as u64)
}

type DefinitionMap = HashMap<(String, i32), Arc<Definition>>;

/// Parsed definitions by (name, version). Versions are immutable, so entries
/// never go stale.
#[derive(Clone, Default)]
pub struct DefinitionCache {
    inner: Arc<Mutex<DefinitionMap>>,
}

/// How many parsed definitions the cache keeps before it starts over.
const DEFINITION_CACHE_CAPACITY: usize = 10_000;

impl DefinitionCache {
    fn lookup(&self, name: &str, version: i32) -> Option<Arc<Definition>> {
        self.inner
            .lock()
            .expect("cache lock")
            .get(&(name.to_string(), version))
            .cloned()
    }

    pub fn insert(&self, name: &str, version: i32, def: Arc<Definition>) {
        let mut map = self.inner.lock().expect("cache lock");
        if map.len() >= DEFINITION_CACHE_CAPACITY {
            map.clear();
        }
        map.insert((name.to_string(), version), def);
    }

    fn parse(name: &str, doc: &serde_json::Value) -> Option<Arc<Definition>> {
        // Stored definitions passed validation when registered; the limits
        // are the most generous ones so a lowered limit never strands them.
        let limits = Limits {
            max_steps: usize::MAX,
        };
        definition::parse(name, doc, &limits).ok().map(Arc::new)
    }

    /// The definition, loaded inside an advance transaction if not cached.
    pub async fn get_in(
        &self,
        tx: &AdvanceTx,
        name: &str,
        version: i32,
    ) -> Result<Option<Arc<Definition>>, StoreError> {
        if let Some(d) = self.lookup(name, version) {
            return Ok(Some(d));
        }
        let Some(doc) = tx.get_workflow(name, version).await? else {
            return Ok(None);
        };
        let def = Self::parse(name, &doc);
        if let Some(d) = &def {
            self.insert(name, version, d.clone());
        }
        Ok(def)
    }

    /// The definition, loaded through the pool if not cached.
    pub async fn get(
        &self,
        store: &Store,
        name: &str,
        version: i32,
    ) -> Result<Option<Arc<Definition>>, StoreError> {
        if let Some(d) = self.lookup(name, version) {
            return Ok(Some(d));
        }
        let Some(record) = store.get_workflow(name, Some(version)).await? else {
            return Ok(None);
        };
        let def = Self::parse(name, &record.definition);
        if let Some(d) = &def {
            self.insert(name, version, d.clone());
        }
        Ok(def)
    }
}
