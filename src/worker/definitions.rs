//! Parsed definitions by (name, version), shared by the API and the
//! advancers. Versions are immutable, so entries never go stale.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use crate::definition::{self, Definition, Limits};
use crate::store::{AdvanceTx, Store, StoreError};

type DefinitionMap = HashMap<(String, i32), Arc<Definition>>;

/// How many parsed definitions the cache keeps before it starts over.
const DEFINITION_CACHE_CAPACITY: usize = 10_000;

#[derive(Clone, Default)]
pub(crate) struct DefinitionCache {
    inner: Arc<Mutex<DefinitionMap>>,
}

impl DefinitionCache {
    fn lookup(&self, name: &str, version: i32) -> Option<Arc<Definition>> {
        self.inner
            .lock()
            .expect("cache lock")
            .get(&(name.to_string(), version))
            .cloned()
    }

    pub(crate) fn insert(&self, name: &str, version: i32, def: Arc<Definition>) {
        let mut map = self.inner.lock().expect("cache lock");
        if map.len() >= DEFINITION_CACHE_CAPACITY {
            map.clear();
        }
        map.insert((name.to_string(), version), def);
    }

    /// Parses a stored document and keeps it; `None` if it no longer
    /// parses (the caller says so in the log).
    fn parse_and_keep(
        &self,
        name: &str,
        version: i32,
        doc: &serde_json::Value,
    ) -> Option<Arc<Definition>> {
        // Stored definitions passed validation when registered; the limits
        // are the most generous ones so a lowered limit never strands them.
        let limits = Limits {
            max_steps: usize::MAX,
        };
        let def = Arc::new(definition::parse(name, doc, &limits).ok()?);
        self.insert(name, version, def.clone());
        Some(def)
    }

    /// The definition, loaded inside an advance transaction if not cached.
    pub(crate) async fn get_in(
        &self,
        tx: &AdvanceTx,
        name: &str,
        version: i32,
    ) -> Result<Option<Arc<Definition>>, StoreError> {
        self.get_or_load(name, version, tx.get_workflow(name, version))
            .await
    }

    /// The definition, loaded through the pool if not cached.
    pub(crate) async fn get(
        &self,
        store: &Store,
        name: &str,
        version: i32,
    ) -> Result<Option<Arc<Definition>>, StoreError> {
        let load = async {
            let record = store.get_workflow(name, Some(version)).await?;
            Ok(record.map(|r| r.definition))
        };
        self.get_or_load(name, version, load).await
    }

    /// The cached definition, or the one `load` reads (awaited only on a miss).
    async fn get_or_load(
        &self,
        name: &str,
        version: i32,
        load: impl Future<Output = Result<Option<serde_json::Value>, StoreError>>,
    ) -> Result<Option<Arc<Definition>>, StoreError> {
        if let Some(d) = self.lookup(name, version) {
            return Ok(Some(d));
        }
        let doc = load.await?;
        Ok(doc.and_then(|doc| self.parse_and_keep(name, version, &doc)))
    }
}
