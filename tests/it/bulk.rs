//! Bulk actions: `POST /v1/instances/cancel` cancels exactly the instances
//! its filter matches (their compensations run), in batches, and answers
//! with how many; `POST /v1/instances/retry` retries the failed ones it
//! matches; a filter that names nothing is refused.

use serde_json::{json, Value};

use crate::harness::SANITY_LIMIT;
use crate::support::{claim, task_call};
use crate::{wait_until, TestDb, TestNode};

/// A booked step with a compensation, then a wait for a signal that never
/// comes: the instance runs until it is cancelled.
fn booked_then_waiting() -> Value {
    json!({"steps": [
        {"id": "book", "task": {"queue": "stead.echo", "input": "${input}"},
         "compensate": {"task": {"queue": "stead.echo", "input": {"undo": "${steps.book.output}"}}}},
        {"id": "wait", "needs": ["book"], "signal": {"name": "never"}}
    ]})
}

/// Instances of `workflow` whose step `step` is in `status`.
async fn steps_in(
    client: &tokio_postgres::Client,
    workflow: &str,
    step: &str,
    status: &str,
) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM stead.steps s JOIN stead.instances i ON i.id = s.instance_id \
             WHERE i.workflow_name = $1 AND s.step_id = $2 AND s.status = $3",
            &[&workflow, &step, &status],
        )
        .await
        .unwrap()
        .get(0)
}

async fn start_many(client: &tokio_postgres::Client, workflow: &str, n: i32) {
    client
        .execute(
            "SELECT count(*) FROM stead.start_workflows($1, \
             ARRAY(SELECT to_jsonb(g) FROM generate_series(1, $2) g))",
            &[&workflow, &n],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_cancel_cancels_exactly_the_matching_instances_and_runs_their_compensations() {
    let db = TestDb::new().await;
    let mut config = TestNode::config(&db);
    // Several batches per request.
    config.tuning.bulk_batch_size = 300;
    let node = TestNode::start_with(config).await;
    node.put_workflow("held", booked_then_waiting()).await;
    node.put_workflow("kept", booked_then_waiting()).await;
    let client = db.client().await;
    start_many(&client, "held", 1000).await;
    start_many(&client, "kept", 100).await;
    let c = &client;
    wait_until("every instance waits", SANITY_LIMIT, || async move {
        let waiting = steps_in(c, "held", "wait", "waiting").await
            + steps_in(c, "kept", "wait", "waiting").await;
        (waiting == 1100)
            .then_some(())
            .ok_or(format!("{waiting} waiting"))
    })
    .await;

    let (status, problem) = node
        .call("POST", "/v1/instances/cancel", Some(json!({"filter": {}})))
        .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["errors"][0]["path"], "$.filter");

    let (status, answer) = node
        .call(
            "POST",
            "/v1/instances/cancel",
            Some(json!({"filter": {"workflow": "held", "status": "running"}, "reason": "bulk"})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"requested": 1000, "more": false}));
    wait_until("the held instances are cancelled", SANITY_LIMIT, || async move {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM stead.instances WHERE workflow_name = 'held' AND status = 'cancelled'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n == 1000).then_some(()).ok_or(format!("{n} cancelled"))
    })
    .await;
    assert_eq!(steps_in(&client, "held", "book", "compensated").await, 1000);
    assert_eq!(steps_in(&client, "kept", "wait", "waiting").await, 100);
    assert_eq!(steps_in(&client, "kept", "book", "completed").await, 100);
    let reasons: i64 = client
        .query_one(
            "SELECT count(*) FROM stead.instances WHERE workflow_name = 'held' AND cancel_reason = 'bulk'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reasons, 1000);

    // Asked again, nothing is left to ask.
    let (_, again) = node
        .call(
            "POST",
            "/v1/instances/cancel",
            Some(json!({"filter": {"workflow": "held"}})),
        )
        .await;
    assert_eq!(again["requested"], 0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_retry_retries_the_failed_instances_it_matches() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    let def = json!({"steps": [{"id": "work", "task": {"queue": "bulk-q"}}]});
    node.put_workflow("flaky", def.clone()).await;
    node.put_workflow("steady", def).await;
    let mut ids = Vec::new();
    for (i, workflow) in ["flaky", "flaky", "flaky", "steady"].iter().enumerate() {
        let id = format!("retry-{i}");
        crate::support::start_with_id(&node, workflow, &id, json!(i)).await;
        ids.push(id);
    }
    let tasks = claim(
        &node,
        "bulk-q",
        json!({"worker": "w", "max": 10, "wait": "10s"}),
    )
    .await;
    let mut seen = tasks.len();
    let mut all = tasks;
    while seen < 4 {
        let more = claim(
            &node,
            "bulk-q",
            json!({"worker": "w", "max": 10, "wait": "10s"}),
        )
        .await;
        seen += more.len();
        all.extend(more);
    }
    for task in &all {
        let failure = json!({"lease_token": task["lease_token"],
                             "error": {"message": "no", "retryable": false}});
        assert_eq!(task_call(&node, task, "fail", failure).await.0, 200);
    }
    for id in &ids {
        assert_eq!(node.wait_ended(id).await["status"], "failed");
    }
    let (status, answer) = node
        .call(
            "POST",
            "/v1/instances/retry",
            Some(json!({"filter": {"workflow": "flaky"}})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["requested"], 3);
    let mut retried = Vec::new();
    while retried.len() < 3 {
        retried.extend(
            claim(
                &node,
                "bulk-q",
                json!({"worker": "w", "max": 10, "wait": "10s"}),
            )
            .await,
        );
    }
    let first: Vec<&Value> = all.iter().map(|t| &t["task_id"]).collect();
    assert!(
        retried.iter().all(|t| !first.contains(&&t["task_id"])),
        "new attempts: {retried:?}"
    );
    let mut instances: Vec<&str> = retried
        .iter()
        .map(|t| t["instance_id"].as_str().unwrap())
        .collect();
    instances.sort();
    assert_eq!(instances, ["retry-0", "retry-1", "retry-2"]);
    let (_, steady) = node.call("GET", "/v1/instances/retry-3", None).await;
    assert_eq!(
        steady["status"], "failed",
        "the other workflow's stays failed"
    );
    node.shutdown().await;
}
