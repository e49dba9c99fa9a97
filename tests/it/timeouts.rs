//! The per-attempt `timeout` of a step.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::{TestDb, TestNode};

/// An in-process attempt that outlives its timeout fails (retryably) and the
/// next attempt runs.
#[tokio::test]
async fn in_process_attempt_times_out_and_is_retried() {
    let db = TestDb::new().await;
    let calls = Arc::new(AtomicU32::new(0));
    let mut handlers = stead::Handlers::default();
    let seen = calls.clone();
    handlers.register("slow", move |task: stead::TaskContext| {
        let seen = seen.clone();
        async move {
            seen.fetch_add(1, Ordering::SeqCst);
            if task.attempt == 1 {
                // Far longer than the step's timeout: only the timeout ends it.
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Ok(json!({"attempt": task.attempt}))
        }
    });
    let node = TestNode::start_with_handlers(&db, handlers).await;
    node.put_workflow(
        "slow",
        json!({"steps": [{"id": "s", "task": {"queue": "slow"}, "timeout": "300ms",
                          "retry": {"initial_interval": "50ms"}}]}),
    )
    .await;
    let id = node.start_instance("slow", json!(null)).await;
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "completed", "{}", crate::pretty(&done));
    assert_eq!(done["output"]["s"], json!({"attempt": 2}));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let history = node.history(&id).await;
    let failed: Vec<_> = history
        .iter()
        .filter(|e| e["type"] == "step_attempt_failed")
        .collect();
    assert_eq!(failed.len(), 1, "{history:?}");
    let message = failed[0]["data"]["error"]["message"].as_str().unwrap();
    assert!(message.contains("timed out"), "{message}");
    node.shutdown().await;
}

/// An external worker's lease never outlasts the attempt's timeout: the
/// attempt fails as timed out and is offered again.
#[tokio::test]
async fn external_attempt_times_out_even_with_a_long_lease() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "ext",
        json!({"steps": [{"id": "s", "task": {"queue": "ext-q"}, "timeout": "400ms",
                          "retry": {"initial_interval": "50ms"}}]}),
    )
    .await;
    let id = node.start_instance("ext", json!(null)).await;
    let claim = json!({"worker": "w1", "wait": "10s", "lease": "60s"});
    let (status, first) = node
        .call("POST", "/v1/queues/ext-q/claim", Some(claim.clone()))
        .await;
    assert_eq!(status, 200, "{first}");
    let task = &first["tasks"][0];
    assert_eq!(task["attempt"], 1);
    let expires: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(task["lease_expires_at"].clone()).unwrap();
    assert!(
        expires - chrono::Utc::now() < chrono::Duration::seconds(5),
        "the 60s lease was not capped by the 400ms timeout: {expires}"
    );
    // Not completed: the second claim (long-poll) gets attempt 2.
    let (status, second) = node
        .call("POST", "/v1/queues/ext-q/claim", Some(claim))
        .await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["tasks"][0]["attempt"], 2, "{second}");
    let history = node.history(&id).await;
    let failed = history
        .iter()
        .find(|e| e["type"] == "step_attempt_failed")
        .expect("the timed-out attempt is in the history");
    let message = failed["data"]["error"]["message"].as_str().unwrap();
    assert!(message.contains("timed out"), "{message}");
    // The first worker's late completion is refused.
    let (status, _) = node
        .call(
            "POST",
            &format!("/v1/tasks/{}/complete", task["task_id"]),
            Some(json!({"lease_token": task["lease_token"], "output": 1})),
        )
        .await;
    assert_eq!(status, 409);
    node.shutdown().await;
}
