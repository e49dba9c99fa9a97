//! Flow control at an instance's first decision: a pending instance of a
//! paused workflow is held; one of a workflow with a concurrency limit runs
//! only if its key has a place, in start order. The keys of every
//! instance of such a workflow in the batch are locked before anything is
//! read about them (in one order, so two batches never deadlock), and the
//! instances that end in the batch wake as many waiters of their key at
//! commit, under the same locks. `admit` is the pure rule.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::Advancer;
use crate::definition::Definition;
use crate::model::{HeldReason, InstanceStatus};
use crate::store::{AdvanceTx, DueBatch, Hold, StoreError};

/// Who of a key's candidates runs now.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Admission {
    pub admitted: Vec<String>,
    pub held: Vec<String>,
    /// Waiters outside the batch whose turn it is: woken to take it.
    pub wake: Vec<String>,
}

/// The key's free places (`limit - running`) go in start order
/// (`(created_at, id)`) over its waiters and this batch's candidates (a
/// woken waiter is both): a candidate whose turn it is runs, a waiter
/// outside the batch keeps its place and is woken, and everyone after the
/// places ran out waits.
pub(super) fn admit(
    limit: u32,
    running: i64,
    waiters: &[(DateTime<Utc>, String)],
    candidates: &[(DateTime<Utc>, String)],
) -> Admission {
    let mine: HashSet<&str> = candidates.iter().map(|(_, id)| id.as_str()).collect();
    let mut queue: Vec<&(DateTime<Utc>, String)> = waiters.iter().chain(candidates).collect();
    queue.sort();
    queue.dedup_by(|a, b| a.1 == b.1);
    let mut places = (i64::from(limit) - running).max(0);
    let mut out = Admission::default();
    for (_, id) in queue {
        let candidate = mine.contains(id.as_str());
        match (places > 0, candidate) {
            (true, true) => out.admitted.push(id.clone()),
            (true, false) => out.wake.push(id.clone()),
            (false, true) => out.held.push(id.clone()),
            (false, false) => continue,
        }
        places -= 1;
    }
    out
}

/// A key's limit, and its candidates in the batch: (created_at, id, index).
type KeyCandidates = (u32, Vec<(DateTime<Utc>, String, usize)>);

/// What flow control decided for a batch, before the engine runs.
#[derive(Debug, Default)]
pub(super) struct Gate {
    /// Batch indexes the engine does not decide (held).
    pub skip: HashSet<usize>,
    pub holds: Vec<Hold>,
    pub admitted: Vec<(String, String)>,
    pub wake: Vec<String>,
    /// Each instance of a limited workflow: its (workflow, key).
    pub keyed: HashMap<String, (String, String)>,
}

impl Gate {
    /// How many instances of each key ended, of those `ended`.
    pub(super) fn released<'a>(
        &self,
        ended: impl Iterator<Item = &'a str>,
    ) -> Vec<(String, String, i32)> {
        let mut n: BTreeMap<&(String, String), i32> = BTreeMap::new();
        for id in ended {
            if let Some(key) = self.keyed.get(id) {
                *n.entry(key).or_default() += 1;
            }
        }
        n.into_iter()
            .map(|((w, k), n)| (w.clone(), k.clone(), n))
            .collect()
    }
}

impl Advancer {
    /// Holds and admits the batch's pending instances (see the module).
    pub(super) async fn gate(
        &self,
        tx: &AdvanceTx,
        batch: &DueBatch,
        defs: &[Option<Arc<Definition>>],
    ) -> Result<Gate, StoreError> {
        let mut gate = Gate::default();
        // Per key: its limit and the candidates in it.
        let mut keys: BTreeMap<(String, String), KeyCandidates> = BTreeMap::new();
        for (i, due) in batch.instances.iter().enumerate() {
            let asked = due.cancel_requested.is_none();
            let first = due.status == InstanceStatus::Pending;
            if asked && first && self.controls.workflow_paused(&due.workflow_name) {
                gate.skip.insert(i);
                gate.holds.push(Hold {
                    id: due.id.clone(),
                    reason: HeldReason::Paused,
                    key: None,
                });
                continue;
            }
            let name = &due.workflow_name;
            let Some(limit) = defs[i].as_ref().and_then(|d| d.concurrency.as_ref()) else {
                continue;
            };
            let key = due
                .concurrency_key
                .clone()
                .unwrap_or_else(|| limit.key_of(&due.input, &due.id));
            let entry = keys
                .entry((name.clone(), key.clone()))
                .or_insert((limit.limit, Vec::new()));
            gate.keyed.insert(due.id.clone(), (name.clone(), key));
            let retried = due.status == InstanceStatus::Failed && due.retry_requested;
            if asked && (first || retried) {
                entry.1.push((due.created_at, due.id.clone(), i));
            }
        }
        if keys.is_empty() {
            return Ok(gate);
        }
        let names: Vec<(String, String)> = keys.keys().cloned().collect();
        tx.lock_keys(&names).await?;
        let states = tx.key_states(&names, self.config.batch_size as i64).await?;
        for state in states {
            let Some((limit, candidates)) = keys.get(&(state.workflow.clone(), state.key.clone()))
            else {
                continue;
            };
            if candidates.is_empty() {
                continue;
            }
            let ids: Vec<(DateTime<Utc>, String)> = candidates
                .iter()
                .map(|(t, id, _)| (*t, id.clone()))
                .collect();
            let admission = admit(*limit, state.running, &state.waiters, &ids);
            let index: HashMap<&str, usize> = candidates
                .iter()
                .map(|(_, id, i)| (id.as_str(), *i))
                .collect();
            for id in admission.held {
                gate.skip.insert(index[id.as_str()]);
                gate.holds.push(Hold {
                    id,
                    reason: HeldReason::Concurrency,
                    key: Some(state.key.clone()),
                });
            }
            for id in admission.admitted {
                gate.admitted.push((id, state.key.clone()));
            }
            gate.wake.extend(admission.wake);
        }
        Ok(gate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u32, id: &str) -> (DateTime<Utc>, String) {
        (
            DateTime::from_timestamp(1_700_000_000 + i64::from(s), 0).unwrap(),
            id.to_string(),
        )
    }

    #[test]
    fn candidates_take_free_places_in_start_order() {
        let a = admit(2, 0, &[], &[at(3, "c"), at(1, "a"), at(2, "b")]);
        assert_eq!(a.admitted, ["a", "b"]);
        assert_eq!(a.held, ["c"]);
        assert!(a.wake.is_empty());
    }

    #[test]
    fn an_older_waiter_outside_the_batch_keeps_its_place_and_is_woken() {
        let a = admit(2, 1, &[at(1, "old")], &[at(5, "new")]);
        assert_eq!(a.wake, ["old"]);
        assert!(a.admitted.is_empty());
        assert_eq!(a.held, ["new"]);
    }

    #[test]
    fn a_woken_waiter_in_the_batch_is_admitted_once() {
        let a = admit(1, 0, &[at(1, "w"), at(2, "x")], &[at(1, "w"), at(9, "n")]);
        assert_eq!(a.admitted, ["w"]);
        assert_eq!(a.held, ["n"]);
        assert!(a.wake.is_empty(), "x waits: no place is left for it");
    }

    #[test]
    fn a_full_key_admits_nobody() {
        let a = admit(2, 2, &[], &[at(1, "a")]);
        assert!(a.admitted.is_empty());
        assert_eq!(a.held, ["a"]);
        let over = admit(2, 3, &[], &[at(1, "b")]);
        assert_eq!(over.held, ["b"]);
    }
}
