//! Priorities: with a backlog, instances of a higher priority start first,
//! and their tasks are claimed first; the lower ones still run.

use serde_json::json;

use crate::harness::SANITY_LIMIT;
use crate::support::{claim, task_call};
use crate::{wait_until, TestDb, TestNode};

async fn start(node: &TestNode, workflow: &str, id: &str, priority: i64) {
    let (status, body) = node
        .call(
            "POST",
            &format!("/v1/workflows/{workflow}/instances"),
            Some(json!({"id": id, "input": null, "priority": priority})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

/// 100 tasks of priority 0 are ready before 20 of priority 10: the first
/// 20 claimed are the 20 of priority 10, then the others all come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_tasks_are_claimed_first_and_the_others_still_run() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "job",
        json!({"steps": [{"id": "a", "task": {"queue": "prio"}}]}),
    )
    .await;
    for i in 0..100 {
        start(&node, "job", &format!("low-{i}"), 0).await;
    }
    for i in 0..20 {
        start(&node, "job", &format!("high-{i}"), 10).await;
    }
    let (status, problem) = node
        .call(
            "POST",
            "/v1/workflows/job/instances",
            Some(json!({"priority": 1001})),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(problem["errors"][0]["path"], "$.priority");
    let client = db.client().await;
    let c = &client;
    wait_until("every task is ready", SANITY_LIMIT, || async move {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM stead.tasks WHERE queue = 'prio' AND status = 'ready'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n == 120).then_some(()).ok_or(format!("{n} ready"))
    })
    .await;
    let first = claim(&node, "prio", json!({"worker": "w", "max": 20})).await;
    let ids: Vec<&str> = first
        .iter()
        .map(|t| t["instance_id"].as_str().unwrap())
        .collect();
    assert!(ids.iter().all(|id| id.starts_with("high-")), "{ids:?}");
    assert_eq!(ids.len(), 20);
    let mut rest = Vec::new();
    while rest.len() < 100 {
        rest.extend(
            claim(
                &node,
                "prio",
                json!({"worker": "w", "max": 100, "wait": "5s"}),
            )
            .await,
        );
    }
    assert!(rest
        .iter()
        .all(|t| t["instance_id"].as_str().unwrap().starts_with("low-")));
    for task in first.iter().chain(&rest) {
        let done = json!({"lease_token": task["lease_token"], "output": 1});
        assert_eq!(task_call(&node, task, "complete", done).await.0, 200);
    }
    node.wait_ended("low-99").await;
    node.shutdown().await;
}

/// A backlog of held instances, released at once, is started in priority
/// order: every instance of priority 10 starts no later than the first of
/// priority 0 (in batches of 10), and all of them complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_instances_start_first_from_a_backlog() {
    let db = TestDb::new().await;
    let mut config = TestNode::config(&db);
    config.tuning.advance_batch_size = 10;
    let node = TestNode::start_with(config).await;
    node.put_workflow("quick", json!({"steps": [{"id": "a", "value": 1}]}))
        .await;
    let (status, _) = node.call("POST", "/v1/workflows/quick/pause", None).await;
    assert_eq!(status, 200);
    for i in 0..50 {
        start(&node, "quick", &format!("low-{i}"), 0).await;
    }
    for i in 0..10 {
        start(&node, "quick", &format!("high-{i}"), 10).await;
    }
    let client = db.client().await;
    let c = &client;
    wait_until("all are held", SANITY_LIMIT, || async move {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM stead.instances WHERE held = 'paused'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n == 60).then_some(()).ok_or(format!("{n} held"))
    })
    .await;
    let (status, resumed) = node.call("POST", "/v1/workflows/quick/resume", None).await;
    assert_eq!((status, resumed["released"].clone()), (200, json!(60)));
    wait_until("all complete", SANITY_LIMIT, || async move {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM stead.instances WHERE status = 'completed'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n == 60).then_some(()).ok_or(format!("{n} completed"))
    })
    .await;
    let row = client
        .query_one(
            "SELECT max(started_at) FILTER (WHERE priority = 10) <= min(started_at) FILTER (WHERE priority = 0) \
             FROM stead.instances",
            &[],
        )
        .await
        .unwrap();
    assert!(
        row.get::<_, bool>(0),
        "the priority 10 instances started first"
    );
    node.shutdown().await;
}
