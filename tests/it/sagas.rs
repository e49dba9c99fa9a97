//! Sagas: a permanent step failure runs the compensations of the completed
//! steps in reverse completion order, then fails the instance;
//! `on_failure: "continue"` goes on instead; a failing compensation is
//! recorded and the others still run.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use stead::{Handlers, TaskContext, TaskError};
use tokio::sync::Semaphore;

use crate::support::{compensation_events, pairs, show, step};
use crate::{pretty, wait_until, TestDb, TestNode};

/// What the handlers saw, in call order: ("work", step) and ("undo", step).
type Calls = Arc<Mutex<Vec<(String, String)>>>;

/// `work` records the call and returns {"did": input}; `boom` fails
/// permanently; `undo` records the `undo` field of its input and fails
/// permanently for the steps listed in `failing_undos`.
fn handlers(calls: &Calls, failing_undos: &'static [&'static str]) -> Handlers {
    let mut h = Handlers::default();
    {
        let calls = calls.clone();
        h.register("work", move |task: TaskContext| {
            calls
                .lock()
                .unwrap()
                .push(("work".into(), task.step_id.clone()));
            async move { Ok(json!({"did": task.input})) }
        });
    }
    {
        let calls = calls.clone();
        h.register("boom", move |task: TaskContext| {
            calls
                .lock()
                .unwrap()
                .push(("boom".into(), task.step_id.clone()));
            async move { Err::<Value, _>(TaskError::permanent("card declined")) }
        });
    }
    {
        let calls = calls.clone();
        h.register("undo", move |task: TaskContext| {
            let what = task.input["undo"].as_str().unwrap_or("?").to_string();
            calls.lock().unwrap().push(("undo".into(), what.clone()));
            async move {
                if failing_undos.contains(&what.as_str()) {
                    Err(TaskError::permanent(format!("cannot undo {what}")))
                } else {
                    Ok(json!({"undone": what, "had": task.input["had"]}))
                }
            }
        });
    }
    h
}

fn undoable(id: &str, queue: &str, extra: Value) -> Value {
    let mut s = json!({
        "id": id,
        "task": {"queue": queue, "input": id},
        "compensate": {"task": {"queue": "undo",
                                "input": {"undo": id, "had": format!("${{steps.{id}.output}}")}}}
    });
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            s[k] = v;
        }
    }
    s
}

fn undo_calls(calls: &Calls) -> Vec<String> {
    calls
        .lock()
        .unwrap()
        .iter()
        .filter(|(kind, _)| kind == "undo")
        .map(|(_, s)| s.clone())
        .collect()
}

/// Step 3 of 4 fails permanently: the compensations of steps 2 and 1 run,
/// in that order (each sees its step's output), step 3's is not run (it
/// never completed), step 4 never runs, and the instance fails with
/// step 3's error.
#[tokio::test]
async fn permanent_failure_compensates_completed_steps_in_reverse_order() {
    let db = TestDb::new().await;
    let calls: Calls = Arc::default();
    let node = TestNode::start_with_handlers(&db, handlers(&calls, &[])).await;
    node.put_workflow(
        "saga",
        json!({
            "steps": [
                undoable("reserve", "work", json!({})),
                undoable("charge", "work", json!({})),
                undoable("ship", "boom", json!({"retry": {"max_attempts": 5}})),
                undoable("notify", "work", json!({}))
            ]
        }),
    )
    .await;
    let id = node.start_instance("saga", json!({})).await;
    let done = node.wait_ended(&id).await;

    assert_eq!(done["status"], "failed", "{}", pretty(&done));
    assert_eq!(done["error"]["step"], "ship", "{}", pretty(&done));
    assert!(
        done["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("card declined"),
        "{}",
        pretty(&done)
    );
    assert_eq!(
        *calls.lock().unwrap(),
        pairs(&[
            ("work", "reserve"),
            ("work", "charge"),
            ("boom", "ship"),
            ("undo", "charge"),
            ("undo", "reserve"),
        ]),
        "handler calls"
    );
    assert_eq!(
        step(&done, "reserve")["status"],
        "compensated",
        "{}",
        pretty(&done)
    );
    assert_eq!(
        step(&done, "charge")["status"],
        "compensated",
        "{}",
        pretty(&done)
    );
    assert_eq!(step(&done, "ship")["status"], "failed", "{}", pretty(&done));
    assert_eq!(step(&done, "ship")["error"]["message"], "card declined");
    assert_eq!(
        step(&done, "notify")["status"],
        "pending",
        "{}",
        pretty(&done)
    );
    assert_eq!(
        step(&done, "charge")["compensation"]["output"],
        json!({"undone": "charge", "had": {"did": "charge"}}),
        "the compensation sees its step's output: {}",
        pretty(&done)
    );

    let history = node.history(&id).await;
    assert_eq!(
        compensation_events(&history),
        pairs(&[
            ("compensation_scheduled", "charge"),
            ("compensation_completed", "charge"),
            ("compensation_scheduled", "reserve"),
            ("compensation_completed", "reserve"),
        ]),
        "{}",
        show(&history)
    );
    let types: Vec<&str> = history.iter().filter_map(|e| e["type"].as_str()).collect();
    let failed_at = types.iter().position(|t| *t == "step_failed").unwrap();
    let first_comp = types
        .iter()
        .position(|t| *t == "compensation_scheduled")
        .unwrap();
    assert!(failed_at < first_comp, "{}", show(&history));
    assert_eq!(history.last().unwrap()["type"], "instance_failed");
    assert_eq!(
        history.last().unwrap()["data"]["error"]["step"],
        "ship",
        "{}",
        show(&history)
    );
    assert!(
        !history.iter().any(|e| e["step_id"] == "notify"),
        "{}",
        show(&history)
    );
    node.shutdown().await;
}

/// Reverse *completion* order, not definition order: `first` and `second`
/// run in parallel and `second` completes first, so `first` is compensated
/// first.
#[tokio::test]
async fn compensations_follow_completion_order_not_definition_order() {
    let db = TestDb::new().await;
    let calls: Calls = Arc::default();
    let mut h = handlers(&calls, &[]);
    let hold = Arc::new(Semaphore::new(0));
    let held = Arc::new(AtomicU32::new(0));
    {
        let hold = hold.clone();
        let held = held.clone();
        let calls = calls.clone();
        h.register("slow", move |task: TaskContext| {
            let hold = hold.clone();
            let held = held.clone();
            let calls = calls.clone();
            async move {
                held.fetch_add(1, Ordering::SeqCst);
                hold.acquire().await.expect("open").forget();
                calls
                    .lock()
                    .unwrap()
                    .push(("slow".into(), task.step_id.clone()));
                Ok(json!({"did": task.input}))
            }
        });
    }
    let node = TestNode::start_with_handlers(&db, h).await;
    node.put_workflow(
        "saga_order",
        json!({
            "steps": [
                undoable("first", "slow", json!({"needs": []})),
                undoable("second", "work", json!({"needs": []})),
                undoable("fail", "boom", json!({"needs": ["first", "second"]}))
            ]
        }),
    )
    .await;
    let id = node.start_instance("saga_order", json!({})).await;
    let node_ref = &node;
    let id_ref = id.as_str();
    let held_ref = &held;
    // Both run at once: wait until first's handler holds and second is done.
    wait_until(
        "second completes while first is held",
        Duration::from_secs(60),
        || async move {
            let (_, body) = node_ref
                .call("GET", &format!("/v1/instances/{id_ref}"), None)
                .await;
            step(&body, "second")["status"] == "completed" && held_ref.load(Ordering::SeqCst) == 1
        },
    )
    .await;
    assert_eq!(held.load(Ordering::SeqCst), 1);
    hold.add_permits(10);

    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "failed", "{}", pretty(&done));
    assert_eq!(undo_calls(&calls), vec!["first", "second"]);
    let history = node.history(&id).await;
    assert_eq!(
        compensation_events(&history),
        pairs(&[
            ("compensation_scheduled", "first"),
            ("compensation_completed", "first"),
            ("compensation_scheduled", "second"),
            ("compensation_completed", "second"),
        ]),
        "{}",
        show(&history)
    );
    assert_eq!(step(&done, "first")["status"], "compensated");
    assert_eq!(step(&done, "second")["status"], "compensated");
    node.shutdown().await;
}

/// `on_failure: "continue"`: the permanently failing step's error becomes
/// its output, the workflow goes on and completes, nothing is compensated.
#[tokio::test]
async fn on_failure_continue_goes_on_without_compensating() {
    let db = TestDb::new().await;
    let calls: Calls = Arc::default();
    let node = TestNode::start_with_handlers(&db, handlers(&calls, &[])).await;
    node.put_workflow(
        "saga_continue",
        json!({
            "steps": [
                undoable("reserve", "work", json!({})),
                undoable("charge", "boom", json!({"on_failure": "continue"})),
                {"id": "report", "value": {"charge_error": "${steps.charge.output.message}",
                                           "reserved": "${steps.reserve.output}"}}
            ],
            "output": "${steps.report.output}"
        }),
    )
    .await;
    let id = node.start_instance("saga_continue", json!({})).await;
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(
        done["output"],
        json!({"charge_error": "card declined", "reserved": {"did": "reserve"}})
    );
    let charge = step(&done, "charge");
    assert_eq!(charge["status"], "failed", "{}", pretty(&done));
    assert_eq!(charge["output"]["message"], "card declined");
    assert_eq!(step(&done, "reserve")["status"], "completed");
    assert!(undo_calls(&calls).is_empty(), "{:?}", calls.lock().unwrap());
    let history = node.history(&id).await;
    assert!(
        compensation_events(&history).is_empty(),
        "{}",
        show(&history)
    );
    assert_eq!(history.last().unwrap()["type"], "instance_completed");
    node.shutdown().await;
}

/// A compensation that fails permanently is recorded
/// (`compensation_failed`), and the compensations after it still run; the
/// instance ends `failed`.
#[tokio::test]
async fn failing_compensation_is_recorded_and_the_others_still_run() {
    let db = TestDb::new().await;
    let calls: Calls = Arc::default();
    let node = TestNode::start_with_handlers(&db, handlers(&calls, &["two"])).await;
    node.put_workflow(
        "saga_comp_fail",
        json!({
            "steps": [
                undoable("one", "work", json!({})),
                undoable("two", "work", json!({})),
                undoable("three", "work", json!({})),
                undoable("four", "boom", json!({}))
            ]
        }),
    )
    .await;
    let id = node.start_instance("saga_comp_fail", json!({})).await;
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "failed", "{}", pretty(&done));
    assert_eq!(done["error"]["step"], "four", "{}", pretty(&done));
    assert_eq!(undo_calls(&calls), vec!["three", "two", "one"]);

    let history = node.history(&id).await;
    assert_eq!(
        compensation_events(&history),
        pairs(&[
            ("compensation_scheduled", "three"),
            ("compensation_completed", "three"),
            ("compensation_scheduled", "two"),
            ("compensation_failed", "two"),
            ("compensation_scheduled", "one"),
            ("compensation_completed", "one"),
        ]),
        "{}",
        show(&history)
    );
    let failed = history
        .iter()
        .find(|e| e["type"] == "compensation_failed")
        .unwrap();
    assert!(
        failed["data"].to_string().contains("cannot undo two"),
        "{}",
        show(&history)
    );
    assert_eq!(
        step(&done, "one")["status"],
        "compensated",
        "{}",
        pretty(&done)
    );
    assert_eq!(
        step(&done, "three")["status"],
        "compensated",
        "{}",
        pretty(&done)
    );
    let two = step(&done, "two");
    assert_ne!(two["status"], "compensated", "{}", pretty(&done));
    assert_eq!(two["compensation"]["status"], "failed", "{}", pretty(&done));
    assert!(
        two["compensation"]["error"]
            .to_string()
            .contains("cannot undo two"),
        "{}",
        pretty(&done)
    );
    assert_eq!(history.last().unwrap()["type"], "instance_failed");
    node.shutdown().await;
}
