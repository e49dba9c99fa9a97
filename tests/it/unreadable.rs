//! A row this version of stead cannot read (an unknown status, say after a
//! downgrade or a manual edit) is a permanent error naming the column, never
//! a default, and it stops only its own instance: that one is left exactly
//! as it is, and the others advance.

use std::time::Duration;

use serde_json::json;

use crate::support::{claim, scrape, start_with_id, task_call};
use crate::{wait_until, TestDb, TestNode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_with_an_unknown_step_status_is_left_alone_and_the_others_advance() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    let held = json!({"steps": [{"id": "work", "task": {"queue": "held"}}]});
    node.put_workflow("held", held).await;
    start_with_id(&node, "held", "bad", json!(1)).await;
    start_with_id(&node, "held", "good", json!(2)).await;
    let client = db.client().await;
    wait_until(
        "both steps are scheduled",
        Duration::from_secs(30),
        || async {
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM stead.steps WHERE status = 'scheduled'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            n == 2
        },
    )
    .await;
    client
        .batch_execute(
            "ALTER TABLE stead.steps DROP CONSTRAINT steps_status_check; \
             UPDATE stead.steps SET status = 'paused' WHERE instance_id = 'bad'",
        )
        .await
        .unwrap();

    // Both results arrive together, so every batch meets both instances.
    let tasks = claim(&node, "held", json!({"worker": "w", "max": 10})).await;
    assert_eq!(tasks.len(), 2, "{tasks:?}");
    for t in &tasks {
        let body = json!({"lease_token": t["lease_token"], "output": "done"});
        let (status, answer) = task_call(&node, t, "complete", body).await;
        assert_eq!(status, 200, "{answer}");
    }
    assert_eq!(node.wait_ended("good").await["status"], "completed");

    // The advancer met the unreadable instance, counted it, and left it: still
    // running, its result still waiting in the queue.
    wait_until(
        "the advancer reports the unreadable row",
        Duration::from_secs(30),
        || async {
            scrape(&node)
                .await
                .get("stead_db_errors_total{component=\"advancer\"}")
                .is_some_and(|n| *n >= 1.0)
        },
    )
    .await;
    let row = client
        .query_one(
            "SELECT i.status, (SELECT count(*) FROM stead.tasks t \
                               WHERE t.instance_id = i.id AND t.status = 'completed') \
             FROM stead.instances i WHERE i.id = 'bad'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "running");
    assert_eq!(row.get::<_, i64>(1), 1);
    // Over the API it is a server fault, never a made-up status.
    let (status, body) = node.call("GET", "/v1/instances/bad", None).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["type"], "urn:stead:problem:internal");
    node.shutdown().await;
}
