//! Cancellation: over HTTP and from SQL, during a running task (in-process
//! or claimed by an external worker), with compensations of the completed
//! steps in reverse completion order; double cancels, ended and unknown
//! instances.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use stead::{Handlers, TaskContext};

use crate::support::{compensation_events, pairs, show, start_with_id, step, Gate};
use crate::{pretty, wait_until, TestDb, TestNode};

/// Handlers: `work` echoes its input, `undo` records the `undo` field of its
/// input (after passing `undo_gate`, if given), `block` waits on `block`.
fn handlers(
    undos: &Arc<Mutex<Vec<String>>>,
    block: &Arc<Gate>,
    undo_gate: Option<&Arc<Gate>>,
) -> Handlers {
    let mut h = Handlers::default();
    h.register("work", |task: TaskContext| async move {
        Ok(json!({"did": task.input}))
    });
    {
        let undos = undos.clone();
        let undo_gate = undo_gate.cloned();
        h.register("undo", move |task: TaskContext| {
            let undos = undos.clone();
            let undo_gate = undo_gate.clone();
            async move {
                if let Some(g) = undo_gate {
                    g.pass().await;
                }
                let what = task.input["undo"].as_str().unwrap_or("?").to_string();
                undos.lock().unwrap().push(what);
                Ok(json!({"undone": task.input["undo"]}))
            }
        });
    }
    {
        let block = block.clone();
        h.register("block", move |task: TaskContext| {
            let block = block.clone();
            async move {
                block.pass().await;
                Ok(task.input)
            }
        });
    }
    h
}

fn undoable(id: &str, queue: &str) -> Value {
    json!({
        "id": id,
        "task": {"queue": queue, "input": id},
        "compensate": {"task": {"queue": "undo",
                                "input": {"undo": id, "output": format!("${{steps.{id}.output}}")}}}
    })
}

/// Cancelling during a running in-process task: 202 (twice, the second
/// without a body, is harmless), the completed steps' compensations run in
/// reverse completion order (b, then a; the running step c and the
/// never-started d are not compensated), the instance ends `cancelled` with
/// the reason, the compensated steps are `compensated`. A cancel of the
/// ended instance is 409, of an unknown one 404.
#[tokio::test]
async fn cancel_during_a_running_task_compensates_in_reverse_order() {
    let db = TestDb::new().await;
    let undos: Arc<Mutex<Vec<String>>> = Arc::default();
    let block = Arc::new(Gate::default());
    let undo_gate = Arc::new(Gate::default());
    let node = TestNode::start_with_handlers(&db, handlers(&undos, &block, Some(&undo_gate))).await;
    node.put_workflow(
        "cancel_inproc",
        json!({
            "steps": [
                undoable("a", "work"),
                undoable("b", "work"),
                undoable("c", "block"),
                undoable("d", "work")
            ]
        }),
    )
    .await;
    start_with_id(&node, "cancel_inproc", "cx-1", json!({})).await;
    block.wait_entered(1).await;
    let running = node.wait_step("cx-1", "c", "running").await;
    assert_eq!(running["status"], "running", "{}", pretty(&running));
    assert_eq!(
        step(&running, "c")["status"],
        "running",
        "{}",
        pretty(&running)
    );

    let (status, body) = node
        .call(
            "POST",
            "/v1/instances/cx-1/cancel",
            Some(json!({"reason": "customer asked"})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    // Compensations are held by undo_gate, so the instance is still
    // winding down: a second cancel is accepted and changes nothing.
    let (status, body) = node.call("POST", "/v1/instances/cx-1/cancel", None).await;
    assert_eq!(status, 202, "second cancel: {body}");
    undo_gate.open();

    let done = node.wait_ended("cx-1").await;
    assert_eq!(done["status"], "cancelled", "{}", pretty(&done));
    let error = done["error"].to_string();
    assert!(error.contains("customer asked"), "{}", pretty(&done));
    assert_eq!(*undos.lock().unwrap(), vec!["b", "a"]);
    assert_eq!(
        step(&done, "a")["status"],
        "compensated",
        "{}",
        pretty(&done)
    );
    assert_eq!(
        step(&done, "b")["status"],
        "compensated",
        "{}",
        pretty(&done)
    );
    assert_eq!(step(&done, "c")["status"], "cancelled", "{}", pretty(&done));
    assert_eq!(step(&done, "d")["status"], "pending", "{}", pretty(&done));
    assert_eq!(
        step(&done, "b")["compensation"]["output"],
        json!({"undone": "b"}),
        "{}",
        pretty(&done)
    );

    let history = node.history("cx-1").await;
    assert_eq!(
        compensation_events(&history),
        pairs(&[
            ("compensation_scheduled", "b"),
            ("compensation_completed", "b"),
            ("compensation_scheduled", "a"),
            ("compensation_completed", "a"),
        ]),
        "{}",
        show(&history)
    );
    let requested: Vec<&Value> = history
        .iter()
        .filter(|e| e["type"] == "instance_cancel_requested")
        .collect();
    assert_eq!(requested.len(), 1, "{}", show(&history));
    assert_eq!(requested[0]["data"]["reason"], "customer asked");
    assert_eq!(history.last().unwrap()["type"], "instance_cancelled");
    assert!(!history.iter().any(|e| e["type"] == "instance_completed"));
    assert!(
        !history
            .iter()
            .any(|e| e["type"] == "step_completed" && e["step_id"] == "c"),
        "{}",
        show(&history)
    );

    // Ended: cancelling again is a conflict; an unknown id is not found.
    let (status, body) = node.call("POST", "/v1/instances/cx-1/cancel", None).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["status"], 409, "problem document: {}", pretty(&body));
    let (status, body) = node
        .call("POST", "/v1/instances/cx-nobody/cancel", None)
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["status"], 404, "problem document: {}", pretty(&body));

    block.open();
    node.shutdown().await;
}

/// An external worker claimed a task; the instance is cancelled while it
/// works. Its later completion (and heartbeat) gets 409, the completed
/// step is compensated, and the instance ends `cancelled`.
#[tokio::test]
async fn cancel_while_an_external_worker_holds_the_task() {
    let db = TestDb::new().await;
    let undos: Arc<Mutex<Vec<String>>> = Arc::default();
    let block = Arc::new(Gate::default());
    let node = TestNode::start_with_handlers(&db, handlers(&undos, &block, None)).await;
    node.put_workflow(
        "cancel_ext",
        json!({"steps": [undoable("a", "work"), undoable("b", "ext.cancel")]}),
    )
    .await;
    start_with_id(&node, "cancel_ext", "cx-ext", json!({})).await;
    let (status, claimed) = node
        .call(
            "POST",
            "/v1/queues/ext.cancel/claim",
            Some(json!({"worker": "w1", "max": 1, "wait": "10s", "lease": "30s"})),
        )
        .await;
    assert_eq!(status, 200, "{claimed}");
    let task = claimed["tasks"][0].clone();
    assert_eq!(task["instance_id"], "cx-ext", "{}", pretty(&claimed));
    assert_eq!(task["step_id"], "b");

    let (status, body) = node
        .call(
            "POST",
            "/v1/instances/cx-ext/cancel",
            Some(json!({"reason": "out of stock"})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let done = node.wait_ended("cx-ext").await;
    assert_eq!(done["status"], "cancelled", "{}", pretty(&done));
    assert!(
        done["error"].to_string().contains("out of stock"),
        "{}",
        pretty(&done)
    );

    let (status, body) = node
        .call(
            "POST",
            &format!("/v1/tasks/{}/complete", task["task_id"]),
            Some(json!({"lease_token": task["lease_token"], "output": {"late": true}})),
        )
        .await;
    assert_eq!(status, 409, "completion after cancel: {body}");
    let (status, body) = node
        .call(
            "POST",
            &format!("/v1/tasks/{}/heartbeat", task["task_id"]),
            Some(json!({"lease_token": task["lease_token"]})),
        )
        .await;
    assert_eq!(status, 409, "heartbeat after cancel: {body}");

    let after = node.wait_ended("cx-ext").await;
    assert_eq!(after["status"], "cancelled");
    assert_eq!(
        step(&after, "a")["status"],
        "compensated",
        "{}",
        pretty(&after)
    );
    assert_eq!(
        step(&after, "b")["status"],
        "cancelled",
        "{}",
        pretty(&after)
    );
    assert_eq!(
        step(&after, "b")["output"],
        Value::Null,
        "{}",
        pretty(&after)
    );
    assert_eq!(*undos.lock().unwrap(), vec!["a"]);
    let history = node.history("cx-ext").await;
    assert_eq!(
        compensation_events(&history),
        pairs(&[
            ("compensation_scheduled", "a"),
            ("compensation_completed", "a")
        ]),
        "{}",
        show(&history)
    );
    assert!(
        !history
            .iter()
            .any(|e| e["type"] == "step_completed" && e["step_id"] == "b"),
        "{}",
        show(&history)
    );
    let client = db.client().await;
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM stead.tasks WHERE instance_id = 'cx-ext'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "no task rows left for a cancelled instance");
    node.shutdown().await;
}

/// `stead.cancel(id, reason)` from SQL: rolled back it does nothing;
/// committed it cancels (with compensation) an instance waiting for a
/// signal; on the ended instance it raises ST409.
#[tokio::test]
async fn sql_cancel_cancels_and_a_rolled_back_one_does_nothing() {
    let db = TestDb::new().await;
    let undos: Arc<Mutex<Vec<String>>> = Arc::default();
    let block = Arc::new(Gate::default());
    let node = TestNode::start_with_handlers(&db, handlers(&undos, &block, None)).await;
    node.put_workflow(
        "cancel_sql",
        json!({
            "steps": [
                undoable("a", "work"),
                {"id": "wait", "signal": {"name": "never"}}
            ]
        }),
    )
    .await;
    start_with_id(&node, "cancel_sql", "cx-sql", json!({})).await;
    let mut client = db.client().await;
    let c = &client;
    wait_until(
        "the signal step waits",
        Duration::from_secs(10),
        || async move {
            c.query_opt(
            "SELECT 1 FROM stead.waiting_steps WHERE instance_id = 'cx-sql' AND step_id = 'wait'",
            &[],
        )
        .await
        .unwrap()
        .is_some()
        },
    )
    .await;

    {
        let tx = client.transaction().await.unwrap();
        tx.execute("SELECT stead.cancel('cx-sql', 'rolled back')", &[])
            .await
            .unwrap();
        tx.rollback().await.unwrap();
    }
    let requested: bool = client
        .query_one(
            "SELECT cancel_requested_at IS NOT NULL FROM stead.instances WHERE id = 'cx-sql'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!requested, "a rolled-back cancel left a request behind");
    let (_, now) = node.call("GET", "/v1/instances/cx-sql", None).await;
    assert_eq!(now["status"], "running", "{}", pretty(&now));

    {
        let tx = client.transaction().await.unwrap();
        tx.execute("SELECT stead.cancel($1, $2)", &[&"cx-sql", &"from sql"])
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let done = node.wait_ended("cx-sql").await;
    assert_eq!(done["status"], "cancelled", "{}", pretty(&done));
    let error = done["error"].to_string();
    assert!(error.contains("from sql"), "{}", pretty(&done));
    assert!(!error.contains("rolled back"), "{}", pretty(&done));
    assert_eq!(
        step(&done, "a")["status"],
        "compensated",
        "{}",
        pretty(&done)
    );
    assert_eq!(*undos.lock().unwrap(), vec!["a"]);
    let history = node.history("cx-sql").await;
    assert_eq!(history.last().unwrap()["type"], "instance_cancelled");

    let err = client
        .execute("SELECT stead.cancel('cx-sql', 'again')", &[])
        .await
        .expect_err("cancelling an ended instance must fail");
    assert_eq!(err.code().map(|c| c.code()), Some("ST409"), "{err:?}");
    let err = client
        .execute("SELECT stead.cancel('cx-nobody')", &[])
        .await
        .expect_err("cancelling an unknown instance must fail");
    assert_eq!(err.code().map(|c| c.code()), Some("ST404"), "{err:?}");
    node.shutdown().await;
}
