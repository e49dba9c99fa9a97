//! Fencing, against a real PostgreSQL: a transition computed from a state
//! that is no longer current is refused with nothing written, however it
//! came to be computed ("correctness never depends on holding a lock").

use serde_json::{json, Value};

use super::plan::Plan;
use crate::definition::{self, Definition, Limits};
use crate::engine::Context;
use crate::store::{AdvanceWrites, Store, StoreError};
use crate::testing::{fresh_database, SLOTS};

fn workflow() -> (Value, Definition) {
    let doc = json!({"name": "w", "steps": [{"id": "a", "task": {"queue": "q"}}]});
    let def = definition::parse("w", &doc, &Limits::default()).unwrap();
    (doc, def)
}

/// A database with workflow `w` and one started (pending) instance `i-1`.
async fn one_instance() -> (Store, tokio_postgres::Client, Definition) {
    let (store, client) = fresh_database().await;
    let (doc, def) = workflow();
    store
        .register_workflow("w", &doc, "hash", None)
        .await
        .unwrap();
    store
        .start_instance("w", None, &json!({"n": 1}), Some("i-1"), 0)
        .await
        .unwrap();
    (store, client, def)
}

/// What an advancer would write after reading the instance now: locks it,
/// decides, and lets go of the lock without writing.
async fn decide_now(store: &Store, def: &Definition) -> AdvanceWrites {
    let slots: Vec<i32> = (0..SLOTS as i32).collect();
    let tx = store.begin_advance().await.unwrap();
    let batch = tx.lock_due(10, &slots).await.unwrap();
    assert_eq!(batch.instances.len(), 1, "the instance is due");
    let mut plan = Plan::new(batch.now, "m-1");
    let mut random = || 0.5;
    let mut ctx = Context {
        now: batch.now,
        random: &mut random,
        limits: Default::default(),
        budget_bytes: u64::MAX,
    };
    plan.decide(def, &batch.instances[0], &mut ctx);
    tx.rollback().await.unwrap();
    plan.finish();
    plan.writes
}

/// Everything a transition of `i-1` could have written.
async fn footprint(client: &tokio_postgres::Client) -> (String, i64, i32, i64, i64, i64) {
    let row = client
        .query_one(
            "SELECT i.status, i.state_version, i.event_seq,
                    (SELECT count(*) FROM stead.events),
                    (SELECT count(*) FROM stead.tasks),
                    (SELECT count(*) FROM stead.steps)
             FROM stead.instances i WHERE i.id = 'i-1'",
            &[],
        )
        .await
        .unwrap();
    (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_from_a_stale_read_is_refused_with_nothing_written() {
    let (store, client, def) = one_instance().await;
    let writes = decide_now(&store, &def).await;
    assert!(!writes.tasks.is_empty() && !writes.events.is_empty());
    // Someone else moves the instance on meanwhile.
    client
        .execute(
            "UPDATE stead.instances SET state_version = state_version + 1 WHERE id = 'i-1'",
            &[],
        )
        .await
        .unwrap();
    let before = footprint(&client).await;

    let tx = store.begin_advance().await.unwrap();
    let refused = tx.commit(&writes).await;
    assert!(
        matches!(refused, Err(StoreError::Fenced { moved: 1, batch: 1 })),
        "{refused:?}"
    );
    let after = footprint(&client).await;
    assert_eq!(after, before, "a fenced batch writes nothing");
    assert_eq!(
        (after.0.as_str(), after.2, after.3, after.4, after.5),
        ("pending", 0, 0, 0, 0),
        "no event, task or step, and the instance is as it was"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_advancers_deciding_the_same_instance_commit_exactly_one_transition() {
    let (store, client, def) = one_instance().await;
    // Both decide from the same state, as two advancers would if the lock
    // did not keep them apart.
    let first = decide_now(&store, &def).await;
    let mut second = decide_now(&store, &def).await;
    // Taken a moment apart, so their clocks differ; otherwise the same.
    second.instances[0].decided_at = first.instances[0].decided_at;
    assert_eq!(first.instances, second.instances, "the same decision");

    let (tx1, tx2) = (
        store.begin_advance().await.unwrap(),
        store.begin_advance().await.unwrap(),
    );
    let (r1, r2) = tokio::join!(tx1.commit(&first), tx2.commit(&second));
    let fenced = |r: &Result<_, StoreError>| matches!(r, Err(StoreError::Fenced { .. }));
    assert!(
        (r1.is_ok() && fenced(&r2)) || (fenced(&r1) && r2.is_ok()),
        "exactly one commits, the other is fenced: {r1:?}, {r2:?}"
    );
    let (status, version, seq, events, tasks, steps) = footprint(&client).await;
    assert_eq!(status, "running");
    assert_eq!(version, 1, "one transition");
    assert_eq!(
        (seq, events),
        (2, 2),
        "one instance_started, one step_scheduled"
    );
    assert_eq!((tasks, steps), (1, 1), "one task, one step row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_advancer_locks_only_instances_of_the_slots_it_names() {
    let (store, client, _) = one_instance().await;
    let slot: i32 = client
        .query_one("SELECT slot FROM instances WHERE id = 'i-1'", &[])
        .await
        .unwrap()
        .get(0);
    let others: Vec<i32> = (0..SLOTS as i32).filter(|s| *s != slot).collect();
    // Slot 0 alone makes a one-byte bitmap: the instance's slot may lie past
    // its end, which must read as not owned (not as an error).
    for slots in [others, vec![0].into_iter().filter(|s| *s != slot).collect()] {
        let tx = store.begin_advance().await.unwrap();
        let batch = tx.lock_due(10, &slots).await.unwrap();
        assert!(
            batch.instances.is_empty(),
            "slot {slot} is not in {slots:?}"
        );
        tx.rollback().await.unwrap();
    }
    let tx = store.begin_advance().await.unwrap();
    let batch = tx.lock_due(10, &[slot]).await.unwrap();
    assert_eq!(
        batch.instances.len(),
        1,
        "its own slot's instance is locked"
    );
}
