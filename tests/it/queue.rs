//! The external worker protocol over HTTP: claim, heartbeat, complete, fail;
//! lease expiry and redelivery, stale tokens, long-polls, batches and
//! request validation.

use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{json, Value};

use crate::support::{claim, events, show, step, task_call, time, wait_parked};
use crate::{pretty, wait_until, TestDb, TestNode};

/// Claims exactly one task, long-polling up to `wait`.
async fn claim_one(node: &TestNode, queue: &str, worker: &str, lease: &str, wait: &str) -> Value {
    let tasks = claim(
        node,
        queue,
        json!({"worker": worker, "max": 1, "wait": wait, "lease": lease}),
    )
    .await;
    assert_eq!(
        tasks.len(),
        1,
        "claim by {worker}: {}",
        pretty(&json!(tasks))
    );
    tasks[0].clone()
}

/// A one-task workflow on `queue` whose output is the task's output.
async fn put_single_task(node: &TestNode, name: &str, queue: &str, retry: Value) {
    node.put_workflow(
        name,
        json!({
            "steps": [
                {"id": "work", "task": {"queue": queue, "input": {"n": "${input.n}"}},
                 "retry": retry}
            ],
            "output": "${steps.work.output}"
        }),
    )
    .await;
}

/// A lease that expires without a result is handed to another claimant as
/// attempt 2; the first claimant's late completion is refused with 409 and
/// changes nothing.
#[tokio::test]
async fn expired_lease_is_redelivered_and_the_stale_completion_is_refused() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    put_single_task(
        &node,
        "lease",
        "ext.lease",
        json!({"max_attempts": 3, "initial_interval": "100ms"}),
    )
    .await;
    let id = node.start_instance("lease", json!({"n": 7})).await;

    let first = claim_one(&node, "ext.lease", "worker-a", "500ms", "10s").await;
    assert_eq!(first["instance_id"], id.as_str());
    assert_eq!(first["step_id"], "work");
    assert_eq!(first["attempt"], 1);
    assert_eq!(first["input"], json!({"n": 7}));
    let lease_ms =
        (time(&first["lease_expires_at"], "lease_expires_at") - Utc::now()).num_milliseconds();
    assert!(lease_ms <= 600, "a 500ms lease expires in {lease_ms}ms");

    // Worker a goes quiet; worker b gets the task again once the lease ran out.
    let started = Instant::now();
    let second = claim_one(&node, "ext.lease", "worker-b", "30s", "15s").await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "redelivered before the lease could expire"
    );
    assert_eq!(second["instance_id"], id.as_str());
    assert_eq!(second["step_id"], "work");
    assert_eq!(second["attempt"], 2);
    assert_eq!(second["idempotency_key"], first["idempotency_key"]);
    assert_ne!(second["lease_token"], first["lease_token"]);

    // Worker a wakes up: its heartbeat and completion are refused.
    let (status, body) = task_call(
        &node,
        &first,
        "heartbeat",
        json!({"lease_token": first["lease_token"]}),
    )
    .await;
    assert_eq!(status, 409, "stale heartbeat: {body}");
    let (status, body) = task_call(
        &node,
        &first,
        "complete",
        json!({"lease_token": first["lease_token"], "output": {"by": "a"}}),
    )
    .await;
    assert_eq!(status, 409, "stale completion: {body}");
    assert_eq!(body["status"], 409, "problem document: {body}");

    let (status, body) = task_call(
        &node,
        &second,
        "complete",
        json!({"lease_token": second["lease_token"], "output": {"by": "b"}}),
    )
    .await;
    assert_eq!(status, 200, "completion by b: {body}");

    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(done["output"], json!({"by": "b"}));
    assert_eq!(step(&done, "work")["attempt"], 2);
    let history = node.history(&id).await;
    let completed: Vec<_> = events(&history, "step_completed")
        .into_iter()
        .filter(|e| e["step_id"] == "work")
        .collect();
    assert_eq!(completed.len(), 1, "{}", show(&history));
    assert_eq!(completed[0]["attempt"], 2);
    assert_eq!(completed[0]["data"]["output"], json!({"by": "b"}));
    assert_eq!(completed[0]["data"]["worker"], "worker-b");
    let expired = events(&history, "step_attempt_failed");
    assert_eq!(expired.len(), 1, "{}", show(&history));
    assert_eq!(expired[0]["attempt"], 1);
    assert!(
        expired[0]["data"]["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("lease expired"),
        "{}",
        show(&history)
    );
    node.shutdown().await;
}

/// A heartbeat extends the lease: a task heartbeated past its original
/// lease is not redelivered, and its holder can still complete it.
#[tokio::test]
async fn heartbeat_extends_the_lease() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    put_single_task(
        &node,
        "beat",
        "ext.beat",
        json!({"max_attempts": 3, "initial_interval": "100ms"}),
    )
    .await;
    let id = node.start_instance("beat", json!({"n": 1})).await;
    let task = claim_one(&node, "ext.beat", "worker-a", "500ms", "10s").await;
    let original = time(&task["lease_expires_at"], "lease_expires_at");

    let (status, body) = task_call(
        &node,
        &task,
        "heartbeat",
        json!({"lease_token": task["lease_token"], "lease": "10s"}),
    )
    .await;
    assert_eq!(status, 200, "heartbeat: {body}");
    let extended = time(&body["lease_expires_at"], "heartbeat lease_expires_at");
    assert!(
        extended - original >= chrono::Duration::seconds(8),
        "heartbeat did not extend the lease: {original} -> {extended}"
    );

    // Well past the original lease (500ms, reaped every 100ms, retried after
    // ~100ms), nobody else gets the task.
    let started = Instant::now();
    let other = claim(
        &node,
        "ext.beat",
        json!({"worker": "worker-b", "max": 1, "wait": "1500ms", "lease": "30s"}),
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(1_400));
    assert!(
        other.is_empty(),
        "the heartbeated task was redelivered: {}",
        pretty(&json!(other))
    );

    let (status, body) = task_call(
        &node,
        &task,
        "heartbeat",
        json!({"lease_token": task["lease_token"]}),
    )
    .await;
    assert_eq!(status, 200, "second heartbeat: {body}");
    let (status, body) = task_call(
        &node,
        &task,
        "complete",
        json!({"lease_token": task["lease_token"], "output": "from a"}),
    )
    .await;
    assert_eq!(status, 200, "completion after the original lease: {body}");
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(done["output"], "from a");
    assert_eq!(step(&done, "work")["attempt"], 1);
    let history = node.history(&id).await;
    assert!(
        events(&history, "step_attempt_failed").is_empty(),
        "{}",
        show(&history)
    );
    node.shutdown().await;
}

/// Heartbeat, complete and fail with a token that is not the lease's are
/// refused with 409 and change nothing; the right token still works.
#[tokio::test]
async fn wrong_lease_token_is_refused() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    put_single_task(&node, "tokens", "ext.tokens", json!({"max_attempts": 3})).await;
    let id = node.start_instance("tokens", json!({"n": 2})).await;
    let task = claim_one(&node, "ext.tokens", "worker-a", "30s", "10s").await;
    let wrong = uuid::Uuid::new_v4().to_string();
    assert_ne!(task["lease_token"], wrong.as_str());

    let (status, body) = task_call(&node, &task, "heartbeat", json!({"lease_token": wrong})).await;
    assert_eq!(status, 409, "heartbeat with a wrong token: {body}");
    let (status, body) = task_call(
        &node,
        &task,
        "complete",
        json!({"lease_token": wrong, "output": "forged"}),
    )
    .await;
    assert_eq!(status, 409, "complete with a wrong token: {body}");
    let (status, body) = task_call(
        &node,
        &task,
        "fail",
        json!({"lease_token": wrong, "error": {"message": "forged", "retryable": false}}),
    )
    .await;
    assert_eq!(status, 409, "fail with a wrong token: {body}");

    // Nothing changed: the task is still leased to worker-a.
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT status, leased_by, output FROM stead.tasks WHERE id = $1",
            &[&task["task_id"].as_i64().unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "leased");
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("worker-a"));
    assert_eq!(row.get::<_, Option<Value>>(2), None);

    let (status, body) = task_call(
        &node,
        &task,
        "complete",
        json!({"lease_token": task["lease_token"], "output": "genuine"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(done["output"], "genuine");
    node.shutdown().await;
}

/// A claim with `wait` long-polls: on an empty queue it answers after the
/// wait with no tasks, and it returns as soon as a task arrives.
#[tokio::test]
async fn claim_long_poll_returns_when_a_task_arrives() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    put_single_task(&node, "poll", "ext.poll", json!({"max_attempts": 1})).await;

    // Empty queue: the claim waits the whole `wait`, then answers empty.
    let started = Instant::now();
    let none = claim(
        &node,
        "ext.poll",
        json!({"worker": "w", "max": 1, "wait": "700ms"}),
    )
    .await;
    assert!(none.is_empty());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(650) && waited < Duration::from_secs(60),
        "a 700ms long-poll took {waited:?}"
    );

    // A claim parked in its wait gets a task started meanwhile, long before
    // its wait (which outlasts every limit of this test) is over.
    let waiting = {
        let http = node.http.clone();
        let url = format!("{}/v1/queues/ext.poll/claim", node.url);
        tokio::spawn(async move {
            let started = Instant::now();
            let resp = http
                .post(url)
                .json(&json!({"worker": "w", "max": 1, "wait": "60s", "lease": "30s"}))
                .send()
                .await
                .expect("claim request");
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.expect("claim answer");
            (status, body, started.elapsed())
        })
    };
    wait_parked(&node, "claim", 1).await;
    let id = node.start_instance("poll", json!({"n": 5})).await;
    let (status, body, took) = waiting.await.unwrap();
    assert_eq!(status, 200, "{body}");
    let tasks = body["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 1, "{}", pretty(&body));
    assert_eq!(tasks[0]["instance_id"], id.as_str());
    assert!(
        took < Duration::from_secs(55),
        "the claim answered with the task, not at the end of its 60s wait: {took:?}"
    );

    let (status, body) = task_call(
        &node,
        &tasks[0],
        "complete",
        json!({"lease_token": tasks[0]["lease_token"], "output": 1}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(node.wait_ended(&id).await["status"], "completed");
    node.shutdown().await;
}

/// `max` bounds a claim's batch; a batch holds distinct tasks, each with its
/// own lease token.
#[tokio::test]
async fn claim_max_batches_tasks() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    put_single_task(&node, "batch", "ext.batch", json!({"max_attempts": 1})).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(node.start_instance("batch", json!({"n": n})).await);
    }
    let client = db.client().await;
    wait_until(
        "5 ready tasks on ext.batch",
        Duration::from_secs(10),
        || {
            let client = &client;
            async move {
                client
                    .query_opt(
                        "SELECT ready FROM stead.queue_depth WHERE queue = 'ext.batch'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .map(|r| r.get::<_, i64>(0))
                    == Some(5)
            }
        },
    )
    .await;

    let first = claim(
        &node,
        "ext.batch",
        json!({"worker": "w", "max": 3, "lease": "30s"}),
    )
    .await;
    assert_eq!(first.len(), 3, "{}", pretty(&json!(first)));
    let rest = claim(
        &node,
        "ext.batch",
        json!({"worker": "w", "max": 10, "lease": "30s"}),
    )
    .await;
    assert_eq!(rest.len(), 2, "{}", pretty(&json!(rest)));
    let empty = claim(&node, "ext.batch", json!({"worker": "w", "max": 10})).await;
    assert!(empty.is_empty(), "{}", pretty(&json!(empty)));

    let all: Vec<Value> = first.into_iter().chain(rest).collect();
    let mut task_ids: Vec<i64> = all.iter().map(|t| t["task_id"].as_i64().unwrap()).collect();
    task_ids.sort();
    task_ids.dedup();
    assert_eq!(task_ids.len(), 5);
    let mut instances: Vec<String> = all
        .iter()
        .map(|t| t["instance_id"].as_str().unwrap().to_string())
        .collect();
    instances.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(instances, expected);
    let mut tokens: Vec<&str> = all
        .iter()
        .map(|t| t["lease_token"].as_str().unwrap())
        .collect();
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 5);
    let leased: i64 = client
        .query_one(
            "SELECT leased FROM stead.queue_depth WHERE queue = 'ext.batch'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leased, 5);

    for t in &all {
        let (status, body) = task_call(
            &node,
            t,
            "complete",
            json!({"lease_token": t["lease_token"], "output": t["input"]["n"]}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    for (n, id) in ids.iter().enumerate() {
        let done = node.wait_ended(id).await;
        assert_eq!(done["status"], "completed", "{}", pretty(&done));
        assert_eq!(done["output"], json!(n));
    }
    node.shutdown().await;
}

/// `fail` with `retryable: true` schedules another attempt; with
/// `retryable: false` it fails the step (and the instance) at once.
#[tokio::test]
async fn fail_retryable_retries_and_fail_not_retryable_fails_the_step() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    put_single_task(
        &node,
        "failing",
        "ext.fail",
        json!({"max_attempts": 5, "initial_interval": "100ms"}),
    )
    .await;
    let id = node.start_instance("failing", json!({"n": 3})).await;

    let first = claim_one(&node, "ext.fail", "w", "30s", "10s").await;
    assert_eq!(first["attempt"], 1);
    let (status, body) = task_call(
        &node,
        &first,
        "fail",
        json!({"lease_token": first["lease_token"],
               "error": {"message": "try later", "retryable": true}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let second = claim_one(&node, "ext.fail", "w", "30s", "10s").await;
    assert_eq!(second["attempt"], 2);
    assert_eq!(second["instance_id"], id.as_str());
    let (status, body) = task_call(
        &node,
        &second,
        "fail",
        json!({"lease_token": second["lease_token"],
               "error": {"message": "no such customer", "retryable": false,
                         "details": {"code": 42}}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // The lease is gone with the result: a second report is refused.
    let (status, _) = task_call(
        &node,
        &second,
        "complete",
        json!({"lease_token": second["lease_token"], "output": "late"}),
    )
    .await;
    assert_eq!(status, 409);

    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "failed", "{}", pretty(&done));
    let s = step(&done, "work");
    assert_eq!(s["status"], "failed");
    assert_eq!(s["attempt"], 2);
    assert_eq!(s["error"]["message"], "no such customer");
    assert_eq!(s["error"]["retryable"], false);
    assert_eq!(s["error"]["details"], json!({"code": 42}));
    assert!(done["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("no such customer"));

    let history = node.history(&id).await;
    let attempt_failed = events(&history, "step_attempt_failed");
    assert_eq!(attempt_failed.len(), 1, "{}", show(&history));
    assert_eq!(attempt_failed[0]["data"]["error"]["message"], "try later");
    assert_eq!(events(&history, "step_failed").len(), 1);
    assert_eq!(events(&history, "instance_failed").len(), 1);

    // No third attempt is ever offered.
    let more = claim(
        &node,
        "ext.fail",
        json!({"worker": "w", "max": 1, "wait": "500ms"}),
    )
    .await;
    assert!(more.is_empty(), "{}", pretty(&json!(more)));
    node.shutdown().await;
}

/// Claim requests are validated: a missing `worker`, `max: 0`, a too short
/// lease, a too long wait and a wrongly typed `max` are 422 problem
/// documents naming the field.
#[tokio::test]
async fn claim_validation_names_the_field() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;

    let names = |body: &Value, field: &str| -> bool {
        body["errors"].as_array().is_some_and(|errs| {
            errs.iter().any(|e| {
                e["path"].as_str().unwrap_or_default().contains(field)
                    || e["message"].as_str().unwrap_or_default().contains(field)
            })
        })
    };

    let (status, body) = node
        .call(
            "POST",
            "/v1/queues/ext.valid/claim",
            Some(json!({"max": 1})),
        )
        .await;
    assert_eq!(status, 422, "missing worker: {body}");
    assert!(names(&body, "worker"), "missing worker: {}", pretty(&body));
    assert_eq!(body["status"], 422);

    let (status, body) = node
        .call(
            "POST",
            "/v1/queues/ext.valid/claim",
            Some(json!({"worker": "w", "max": 0})),
        )
        .await;
    assert_eq!(status, 422, "max 0: {body}");
    assert!(names(&body, "max"), "max 0: {}", pretty(&body));

    for (body, field) in [
        (json!({"worker": "w", "max": 1, "lease": "50ms"}), "lease"),
        (json!({"worker": "w", "max": 1, "wait": "2h"}), "wait"),
        (json!({"worker": "w", "max": "three"}), "max"),
    ] {
        let (status, resp) = node
            .call("POST", "/v1/queues/ext.valid/claim", Some(body.clone()))
            .await;
        assert_eq!(status, 422, "{body}: {resp}");
        assert!(names(&resp, field), "{body}: {}", pretty(&resp));
    }

    // A valid claim on the same queue works (the rejections were about the
    // fields, not the endpoint).
    let (status, body) = node
        .call(
            "POST",
            "/v1/queues/ext.valid/claim",
            Some(json!({"worker": "w", "max": 1})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tasks"], json!([]));
    node.shutdown().await;
}

/// POST /v1/tasks/results records many results at once, each as its own
/// complete or fail would: a completion, a permanent failure and a stale
/// token in one request give a completed instance, a failed one, and a
/// refused item that changed nothing (its task is still leased). A bad item
/// is named and records nothing.
#[tokio::test]
async fn results_of_many_tasks_are_recorded_at_once_item_by_item() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    put_single_task(&node, "many", "ext.many", json!({"max_attempts": 1})).await;
    let ids = [
        node.start_instance("many", json!({"n": 1})).await,
        node.start_instance("many", json!({"n": 2})).await,
        node.start_instance("many", json!({"n": 3})).await,
    ];
    let mut tasks = Vec::new();
    while tasks.len() < 3 {
        let body = json!({"worker": "w", "max": 3, "wait": "5s", "lease": "30s"});
        tasks.extend(claim(&node, "ext.many", body).await);
    }
    let of = |id: &str| {
        tasks
            .iter()
            .find(|t| t["instance_id"] == id)
            .unwrap()
            .clone()
    };
    let (done, failed, stale) = (of(&ids[0]), of(&ids[1]), of(&ids[2]));

    let mut results = vec![
        json!({"task_id": done["task_id"], "lease_token": done["lease_token"], "output": {"ok": 1}}),
        json!({"task_id": failed["task_id"], "lease_token": failed["lease_token"],
               "error": {"message": "no", "retryable": false}}),
        json!({"task_id": stale["task_id"], "lease_token": "00000000-0000-0000-0000-000000000000",
               "output": 3}),
    ];
    let twice =
        json!({"task_id": stale["task_id"], "lease_token": stale["lease_token"], "output": 3});
    let with_twice = [results.clone(), vec![twice]].concat();
    let post = |results: Vec<Value>| {
        node.call(
            "POST",
            "/v1/tasks/results",
            Some(json!({ "results": results })),
        )
    };
    let (status, body) = post(with_twice).await;
    assert_eq!(status, 422, "a task twice is refused whole: {body}");
    assert_eq!(body["errors"][0]["path"], "$.results[3].task_id", "{body}");

    let (status, body) = post(std::mem::take(&mut results)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["recorded"].as_i64(), body["refused"].as_i64()),
        (Some(2), Some(1)),
        "{body}"
    );
    let recorded: Vec<bool> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["recorded"].as_bool().unwrap())
        .collect();
    assert_eq!(recorded, [true, true, false]);

    let ended = node.wait_ended(&ids[0]).await;
    assert_eq!(
        (ended["status"].clone(), ended["output"].clone()),
        (json!("completed"), json!({"ok": 1}))
    );
    assert_eq!(node.wait_ended(&ids[1]).await["status"], "failed");
    let (_, third) = node
        .call("GET", &format!("/v1/instances/{}", ids[2]), None)
        .await;
    assert_eq!(
        step(&third, "work")["status"],
        "running",
        "{}",
        pretty(&third)
    );
}
