//! Child workflows (`workflow` steps): the child `<parent>:<step>` runs as
//! an instance of its own; its output becomes the step's output, its
//! failure fails the step and the parent, cancelling the parent cancels
//! it, and an unregistered child workflow fails the step clearly.

use std::time::Duration;

use serde_json::{json, Value};
use stead::{Handlers, TaskContext, TaskError};

use crate::support::{show, start_with_id, step};
use crate::{pretty, wait_until, TestDb, TestNode};

/// The child's output becomes the parent step's output; the child is an
/// instance `<parent>:<step>` readable over the API, linked to its parent
/// in SQL.
#[tokio::test]
async fn child_output_becomes_the_step_output() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "greeter",
        json!({
            "steps": [
                {"id": "echo", "task": {"queue": "stead.echo", "input": {"hello": "${input.name}"}}},
                {"id": "sign", "value": {"greeting": "${steps.echo.output.hello}", "by": "${instance.id}"}}
            ],
            "output": "${steps.sign.output}"
        }),
    )
    .await;
    node.put_workflow(
        "parent",
        json!({
            "steps": [
                {"id": "greet", "workflow": {"name": "greeter", "input": {"name": "${input.who}"}}},
                {"id": "after", "value": "${steps.greet.output.greeting}!"}
            ],
            "output": {"child": "${steps.greet.output}", "after": "${steps.after.output}"}
        }),
    )
    .await;
    start_with_id(&node, "parent", "par-1", json!({"who": "world"})).await;
    let done = node.wait_ended("par-1").await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    let child_output = json!({"greeting": "world", "by": "par-1:greet"});
    assert_eq!(
        done["output"],
        json!({"child": child_output, "after": "world!"})
    );
    assert_eq!(step(&done, "greet")["status"], "completed");
    assert_eq!(step(&done, "greet")["output"], child_output);

    let (status, child) = node.call("GET", "/v1/instances/par-1:greet", None).await;
    assert_eq!(status, 200, "{child}");
    assert_eq!(child["id"], "par-1:greet");
    assert_eq!(child["workflow"], "greeter");
    assert_eq!(child["status"], "completed", "{}", pretty(&child));
    assert_eq!(child["input"], json!({"name": "world"}));
    assert_eq!(child["output"], child_output);

    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT parent_id, parent_step FROM stead.instances WHERE id = 'par-1:greet'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("par-1"));
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("greet"));
    let history = node.history("par-1").await;
    let completed: Vec<&Value> = history
        .iter()
        .filter(|e| e["type"] == "step_completed" && e["step_id"] == "greet")
        .collect();
    assert_eq!(completed.len(), 1, "{}", show(&history));
    node.shutdown().await;
}

/// A child that fails fails the parent's step, and the parent, with an
/// error that names the child.
#[tokio::test]
async fn child_failure_fails_the_parent_step_and_the_parent() {
    let db = TestDb::new().await;
    let mut handlers = Handlers::default();
    handlers.register("refuse", |_task: TaskContext| async move {
        Err::<Value, _>(TaskError::permanent("no stock"))
    });
    let node = TestNode::start_with_handlers(&db, handlers).await;
    node.put_workflow(
        "failing_child",
        json!({"steps": [{"id": "reserve", "task": {"queue": "refuse"}}]}),
    )
    .await;
    node.put_workflow(
        "parent_of_failure",
        json!({
            "steps": [
                {"id": "sub", "workflow": {"name": "failing_child"}},
                {"id": "after", "value": 1}
            ]
        }),
    )
    .await;
    start_with_id(&node, "parent_of_failure", "par-2", json!({})).await;
    let done = node.wait_ended("par-2").await;
    assert_eq!(done["status"], "failed", "{}", pretty(&done));
    assert_eq!(done["error"]["step"], "sub", "{}", pretty(&done));
    let s = step(&done, "sub");
    assert_eq!(s["status"], "failed", "{}", pretty(&done));
    assert!(
        s["error"].to_string().contains("par-2:sub"),
        "the step error names the child: {}",
        pretty(&done)
    );
    assert_eq!(step(&done, "after")["status"], "pending");

    let (status, child) = node.call("GET", "/v1/instances/par-2:sub", None).await;
    assert_eq!(status, 200, "{child}");
    assert_eq!(child["status"], "failed", "{}", pretty(&child));
    assert!(child["error"].to_string().contains("no stock"));
    node.shutdown().await;
}

/// Cancelling the parent while its child waits cancels the child too.
#[tokio::test]
async fn cancelling_the_parent_cancels_the_child() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "waiting_child",
        json!({"steps": [{"id": "wait", "signal": {"name": "never"}}]}),
    )
    .await;
    node.put_workflow(
        "parent_to_cancel",
        json!({"steps": [{"id": "sub", "workflow": {"name": "waiting_child"}}]}),
    )
    .await;
    start_with_id(&node, "parent_to_cancel", "par-3", json!({})).await;
    let client = db.client().await;
    let c = &client;
    wait_until("the child waits", Duration::from_secs(10), || async move {
        c.query_opt(
            "SELECT 1 FROM stead.waiting_steps WHERE instance_id = 'par-3:sub' AND step_id = 'wait'",
            &[],
        )
        .await
        .unwrap()
        .is_some()
    })
    .await;
    let (_, running) = node.call("GET", "/v1/instances/par-3", None).await;
    assert_eq!(running["status"], "running", "{}", pretty(&running));
    assert_eq!(
        step(&running, "sub")["status"],
        "running",
        "{}",
        pretty(&running)
    );

    let (status, body) = node
        .call(
            "POST",
            "/v1/instances/par-3/cancel",
            Some(json!({"reason": "stop it all"})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let parent = node.wait_ended("par-3").await;
    assert_eq!(parent["status"], "cancelled", "{}", pretty(&parent));
    let child = node.wait_ended("par-3:sub").await;
    assert_eq!(child["status"], "cancelled", "{}", pretty(&child));
    assert_eq!(
        step(&child, "wait")["status"],
        "cancelled",
        "{}",
        pretty(&child)
    );
    node.shutdown().await;
}

/// A `workflow` step naming a workflow nobody registered fails the step
/// (and the instance) with an error saying so; no child instance appears.
#[tokio::test]
async fn unregistered_child_workflow_fails_the_step_clearly() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "orphan_parent",
        json!({"steps": [{"id": "sub", "workflow": {"name": "no_such_flow"}}]}),
    )
    .await;
    start_with_id(&node, "orphan_parent", "par-4", json!({})).await;
    let done = node.wait_ended("par-4").await;
    assert_eq!(done["status"], "failed", "{}", pretty(&done));
    let s = step(&done, "sub");
    assert_eq!(s["status"], "failed", "{}", pretty(&done));
    let message = s["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("no_such_flow") && message.contains("not registered"),
        "{}",
        pretty(&done)
    );
    assert!(
        done["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no_such_flow"),
        "{}",
        pretty(&done)
    );
    let (status, _) = node.call("GET", "/v1/instances/par-4:sub", None).await;
    assert_eq!(status, 404);
    node.shutdown().await;
}
