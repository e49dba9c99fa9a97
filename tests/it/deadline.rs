//! Workflow-level `timeout` (deadline): an instance still running when it
//! expires ends `failed` with a timeout error, not before the deadline.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::time;
use crate::{pretty, TestDb, TestNode};

/// A 1 s workflow timeout on an instance waiting for a signal that never
/// comes: it ends `failed` with a timeout error (long before the minute a
/// stuck timer would take), and no earlier than 1 s after it started.
#[tokio::test]
async fn workflow_timeout_fails_a_waiting_instance() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "deadline",
        json!({
            "timeout": "1s",
            "steps": [
                {"id": "wait", "signal": {"name": "never_sent"}},
                {"id": "after", "value": 1}
            ]
        }),
    )
    .await;
    let t0 = Instant::now();
    let id = node.start_instance("deadline", json!({})).await;
    let done = node.wait_ended(&id).await;
    let elapsed = t0.elapsed();
    assert_eq!(done["status"], "failed", "{}", pretty(&done));
    let error = &done["error"];
    let says_timeout = error["timeout"] == true
        || error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("timed out");
    assert!(says_timeout, "not a timeout error: {}", pretty(&done));
    assert!(
        elapsed < Duration::from_secs(60),
        "a 1s deadline took {elapsed:?} to end the instance"
    );
    let lasted = time(&done["ended_at"], "ended_at") - time(&done["started_at"], "started_at");
    assert!(
        lasted >= chrono::Duration::milliseconds(1000),
        "ended {}ms after it started, before its 1s deadline: {}",
        lasted.num_milliseconds(),
        pretty(&done)
    );
    assert!(elapsed >= Duration::from_secs(1));

    let steps = done["steps"].as_array().unwrap();
    let wait = steps.iter().find(|s| s["id"] == "wait").unwrap();
    assert_ne!(wait["status"], "completed", "{}", pretty(&done));
    assert_ne!(wait["status"], "waiting", "{}", pretty(&done));
    let after = steps.iter().find(|s| s["id"] == "after").unwrap();
    assert_eq!(after["status"], "pending", "{}", pretty(&done));

    let history = node.history(&id).await;
    assert_eq!(
        history.last().unwrap()["type"],
        "instance_failed",
        "{}",
        pretty(&Value::Array(history.clone()))
    );
    // Nothing is left waiting: a late signal is refused.
    let client = db.client().await;
    let waiting: i64 = client
        .query_one(
            "SELECT count(*) FROM stead.waiting_steps WHERE instance_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(waiting, 0);
    let (status, body) = node
        .call(
            "POST",
            &format!("/v1/instances/{id}/signals/never_sent"),
            Some(json!(1)),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    node.shutdown().await;
}
