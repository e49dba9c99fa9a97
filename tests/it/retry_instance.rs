//! `POST /v1/instances/{id}/retry`: a failed instance runs again from its
//! failed step only; running, completed and unknown instances are refused.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use stead::{Handlers, TaskContext, TaskError};

use crate::support::{show, step};
use crate::{pretty, wait_until, TestDb, TestNode};

fn count(history: &[Value], kind: &str, step_id: &str) -> usize {
    history
        .iter()
        .filter(|e| e["type"] == kind && e["step_id"] == step_id)
        .count()
}

/// A failed instance retried: only the failed step runs again (the step
/// before it ran exactly once), the workflow completes, and the history
/// tells the story.
#[tokio::test]
async fn retry_reruns_only_the_failed_step_then_completes() {
    let db = TestDb::new().await;
    let prepared = Arc::new(AtomicU32::new(0));
    let flaky = Arc::new(AtomicU32::new(0));
    let mut handlers = Handlers::default();
    {
        let prepared = prepared.clone();
        handlers.register("prepare", move |task: TaskContext| {
            let n = prepared.fetch_add(1, Ordering::SeqCst) + 1;
            async move { Ok(json!({"prepared": task.input, "call": n})) }
        });
    }
    {
        let flaky = flaky.clone();
        handlers.register("flaky", move |task: TaskContext| {
            let n = flaky.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if n == 1 {
                    Err(TaskError::permanent("downstream said no"))
                } else {
                    Ok(json!({"call": n, "got": task.input}))
                }
            }
        });
    }
    let node = TestNode::start_with_handlers(&db, handlers).await;
    node.put_workflow(
        "retry_me",
        json!({
            "steps": [
                {"id": "prepare", "task": {"queue": "prepare", "input": "${input.order}"}},
                {"id": "submit", "task": {"queue": "flaky", "input": "${steps.prepare.output}"}},
                {"id": "finish", "value": {"submitted": "${steps.submit.output}"}}
            ],
            "output": "${steps.finish.output}"
        }),
    )
    .await;
    let id = node.start_instance("retry_me", json!({"order": 7})).await;
    let failed = node.wait_ended(&id).await;
    assert_eq!(failed["status"], "failed", "{}", pretty(&failed));
    assert_eq!(step(&failed, "submit")["status"], "failed");
    assert_eq!(prepared.load(Ordering::SeqCst), 1);
    assert_eq!(flaky.load(Ordering::SeqCst), 1);

    let (status, body) = node
        .call("POST", &format!("/v1/instances/{id}/retry"), None)
        .await;
    assert_eq!(status, 202, "{body}");
    let node_ref = &node;
    let id_ref = id.as_str();
    wait_until(
        "the retry is taken up",
        Duration::from_secs(10),
        || async move {
            let history = node_ref.history(id_ref).await;
            history.iter().any(|e| e["type"] == "instance_retried")
        },
    )
    .await;
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(done["error"], Value::Null, "{}", pretty(&done));
    assert_eq!(
        done["output"],
        json!({"submitted": {"call": 2, "got": {"prepared": 7, "call": 1}}})
    );
    assert_eq!(prepared.load(Ordering::SeqCst), 1, "prepare ran again");
    assert_eq!(flaky.load(Ordering::SeqCst), 2);
    assert_eq!(step(&done, "prepare")["status"], "completed");
    assert_eq!(step(&done, "submit")["status"], "completed");
    assert_eq!(step(&done, "finish")["status"], "completed");

    let history = node.history(&id).await;
    assert_eq!(
        count(&history, "step_completed", "prepare"),
        1,
        "{}",
        show(&history)
    );
    assert_eq!(
        count(&history, "step_scheduled", "prepare"),
        1,
        "{}",
        show(&history)
    );
    assert_eq!(
        count(&history, "step_failed", "submit"),
        1,
        "{}",
        show(&history)
    );
    assert_eq!(
        count(&history, "step_completed", "submit"),
        1,
        "{}",
        show(&history)
    );
    let types: Vec<&str> = history.iter().filter_map(|e| e["type"].as_str()).collect();
    let failed_at = types.iter().position(|t| *t == "instance_failed").unwrap();
    let retried_at = types.iter().position(|t| *t == "instance_retried").unwrap();
    assert!(failed_at < retried_at, "{}", show(&history));
    assert_eq!(*types.last().unwrap(), "instance_completed");

    // Completed now: a second retry is a conflict.
    let (status, body) = node
        .call("POST", &format!("/v1/instances/{id}/retry"), None)
        .await;
    assert_eq!(status, 409, "retry of a completed instance: {body}");
    assert_eq!(body["status"], 409, "problem document: {}", pretty(&body));
    node.shutdown().await;
}

/// Retrying a running instance is 409, an unknown one 404; neither changes
/// anything.
#[tokio::test]
async fn retry_of_running_or_unknown_instance_is_refused() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "waits",
        json!({"steps": [{"id": "wait", "signal": {"name": "go"}}], "output": "${steps.wait.output}"}),
    )
    .await;
    let id = node.start_instance("waits", json!({})).await;
    let client = db.client().await;
    let c = &client;
    let id_ref = id.as_str();
    wait_until(
        "the instance waits",
        Duration::from_secs(10),
        || async move {
            c.query_opt(
                "SELECT 1 FROM stead.waiting_steps WHERE instance_id = $1",
                &[&id_ref],
            )
            .await
            .unwrap()
            .is_some()
        },
    )
    .await;
    let (status, body) = node
        .call("POST", &format!("/v1/instances/{id}/retry"), None)
        .await;
    assert_eq!(status, 409, "retry of a running instance: {body}");
    assert_eq!(body["status"], 409, "problem document: {}", pretty(&body));

    let (status, body) = node
        .call("POST", "/v1/instances/retry-nobody/retry", None)
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["status"], 404, "problem document: {}", pretty(&body));

    let (status, body) = node
        .call(
            "POST",
            &format!("/v1/instances/{id}/signals/go"),
            Some(json!("ok")),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(done["output"], "ok");
    let history = node.history(&id).await;
    assert!(
        !history.iter().any(|e| e["type"] == "instance_retried"),
        "{}",
        show(&history)
    );
    node.shutdown().await;
}

/// Retrying a parent whose `workflow` step failed because its child failed
/// runs that step again, which means the child runs again (its failed step;
/// the child keeps its id `<parent>:<step>`), and the parent completes with
/// the child's new output.
#[tokio::test]
async fn retry_of_a_parent_reruns_its_failed_child() {
    let db = TestDb::new().await;
    let calls = Arc::new(AtomicU32::new(0));
    let mut handlers = Handlers::default();
    {
        let calls = calls.clone();
        handlers.register("once", move |_task: TaskContext| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if n == 1 {
                    Err(TaskError::permanent("first call fails"))
                } else {
                    Ok(json!({"call": n}))
                }
            }
        });
    }
    let node = TestNode::start_with_handlers(&db, handlers).await;
    node.put_workflow(
        "retry_kid",
        json!({"steps": [{"id": "work", "task": {"queue": "once"}}],
               "output": "${steps.work.output}"}),
    )
    .await;
    node.put_workflow(
        "retry_dad",
        json!({"steps": [{"id": "sub", "workflow": {"name": "retry_kid"}}],
               "output": "${steps.sub.output}"}),
    )
    .await;
    let (status, body) = node
        .call(
            "POST",
            "/v1/workflows/retry_dad/instances",
            Some(json!({"id": "dad-1", "input": {}})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let failed = node.wait_ended("dad-1").await;
    assert_eq!(failed["status"], "failed", "{}", pretty(&failed));
    let child = node.wait_ended("dad-1:sub").await;
    assert_eq!(child["status"], "failed", "{}", pretty(&child));

    let (status, body) = node.call("POST", "/v1/instances/dad-1/retry", None).await;
    assert_eq!(status, 202, "{body}");
    let node_ref = &node;
    wait_until(
        "the retry is taken up",
        Duration::from_secs(10),
        || async move {
            let history = node_ref.history("dad-1").await;
            history.iter().any(|e| e["type"] == "instance_retried")
        },
    )
    .await;
    let done = node.wait_ended("dad-1").await;
    let (_, child) = node.call("GET", "/v1/instances/dad-1:sub", None).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the child's failed step must run again; parent: {}\nchild: {}",
        pretty(&done),
        pretty(&child)
    );
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(done["output"], json!({"call": 2}));
    assert_eq!(child["status"], "completed", "{}", pretty(&child));
    node.shutdown().await;
}
