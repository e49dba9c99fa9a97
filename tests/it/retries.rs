//! Retries: backoff between retryable failures, exhausted retries,
//! permanent failures, and `on_failure: "continue"`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stead::{Handlers, TaskContext, TaskError};

use crate::support::{events, show, step, time};
use crate::{pretty, TestDb, TestNode};

/// A step that fails twice (retryable) and then succeeds completes on
/// attempt 3; the attempts are spaced by the policy's backoff (200ms, then
/// 400ms, ±20% jitter).
#[tokio::test]
async fn retryable_failures_are_retried_with_backoff_then_succeed() {
    let db = TestDb::new().await;
    let calls = Arc::new(AtomicU32::new(0));
    let seen: Arc<Mutex<Vec<(u32, Instant, String)>>> = Arc::default();
    let mut handlers = Handlers::default();
    {
        let calls = calls.clone();
        let seen = seen.clone();
        handlers.register("flaky", move |task: TaskContext| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            seen.lock()
                .unwrap()
                .push((task.attempt, Instant::now(), task.idempotency_key.clone()));
            async move {
                if n <= 2 {
                    Err(TaskError::retryable(format!("transient #{n}")))
                } else {
                    Ok(json!({"succeeded_on": task.attempt, "input": task.input}))
                }
            }
        });
    }
    let node = TestNode::start_with_handlers(&db, handlers).await;
    node.put_workflow(
        "retry_ok",
        json!({
            "steps": [
                {"id": "flaky", "task": {"queue": "flaky", "input": {"k": "${input.k}"}},
                 "retry": {"max_attempts": 5, "initial_interval": "200ms", "multiplier": 2}}
            ],
            "output": "${steps.flaky.output}"
        }),
    )
    .await;
    let id = node.start_instance("retry_ok", json!({"k": "v"})).await;
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(
        done["output"],
        json!({"succeeded_on": 3, "input": {"k": "v"}})
    );
    let s = step(&done, "flaky");
    assert_eq!(s["status"], "completed");
    assert_eq!(s["attempt"], 3, "{}", pretty(&done));
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // The handler saw attempts 1, 2, 3 with one idempotency key.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(seen.iter().all(|s| s.2 == seen[0].2 && !s.2.is_empty()));

    // History: two failed attempts with the backoff they scheduled.
    let history = node.history(&id).await;
    let failed = events(&history, "step_attempt_failed");
    assert_eq!(failed.len(), 2, "{}", show(&history));
    let mut delays = Vec::new();
    for (i, (e, base)) in failed.iter().zip([200.0, 400.0]).enumerate() {
        assert_eq!(e["step_id"], "flaky");
        assert_eq!(e["attempt"], i as i64 + 1);
        assert_eq!(
            e["data"]["error"]["message"],
            format!("transient #{}", i + 1)
        );
        assert_eq!(e["data"]["error"]["retryable"], true);
        let d = e["data"]["retry_in_ms"]
            .as_f64()
            .unwrap_or_else(|| panic!("retry_in_ms missing: {}", show(&history)));
        assert!(
            d >= 0.8 * base - 1.0 && d <= 1.2 * base + 1.0,
            "attempt {} backoff {d}ms is not {base}ms ±20%: {}",
            i + 1,
            show(&history)
        );
        delays.push(d);
    }
    assert_eq!(events(&history, "step_completed").len(), 1);
    assert_eq!(events(&history, "step_completed")[0]["attempt"], 3);

    // Measured spacing between the handler calls covers the backoff.
    for i in 0..2 {
        let gap = seen[i + 1].1.duration_since(seen[i].1);
        let want = Duration::from_millis((delays[i] * 0.8) as u64);
        assert!(
            gap >= want,
            "attempt {} ran {gap:?} after attempt {}, expected at least {want:?}",
            i + 2,
            i + 1
        );
    }
    // And in database time: attempt 3 was leased no earlier than the second
    // failure was recorded plus its backoff.
    let second_failed_at = time(&failed[1]["at"], "event at");
    let completed = events(&history, "step_completed")[0];
    let third_started = time(&completed["data"]["started_at"], "started_at");
    let spacing = (third_started - second_failed_at).num_milliseconds() as f64;
    assert!(
        spacing >= 0.8 * delays[1],
        "attempt 3 started {spacing}ms after attempt 2 failed; backoff was {}ms: {}",
        delays[1],
        show(&history)
    );
    node.shutdown().await;
}

/// When every attempt fails, the instance fails after `max_attempts`, and
/// the error is visible in the API, the history and SQL.
#[tokio::test]
async fn exhausted_retries_fail_the_instance_with_the_error_everywhere() {
    let db = TestDb::new().await;
    let calls = Arc::new(AtomicU32::new(0));
    let mut handlers = Handlers::default();
    {
        let calls = calls.clone();
        handlers.register("doomed", move |_task: TaskContext| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { Err::<Value, _>(TaskError::retryable("disk on fire")) }
        });
    }
    let node = TestNode::start_with_handlers(&db, handlers).await;
    node.put_workflow(
        "retry_exhausted",
        json!({
            "steps": [
                {"id": "doomed", "task": {"queue": "doomed"},
                 "retry": {"max_attempts": 3, "initial_interval": "100ms"}},
                {"id": "never", "value": "should not run"}
            ]
        }),
    )
    .await;
    let id = node.start_instance("retry_exhausted", json!({})).await;
    let done = node.wait_ended(&id).await;

    // API
    assert_eq!(done["status"], "failed", "{}", pretty(&done));
    assert_eq!(done["output"], Value::Null);
    let message = done["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("disk on fire") && message.contains("doomed"),
        "instance error should name the step and its error: {}",
        pretty(&done)
    );
    assert_eq!(done["error"]["step"], "doomed", "{}", pretty(&done));
    let s = step(&done, "doomed");
    assert_eq!(s["status"], "failed");
    assert_eq!(s["attempt"], 3);
    assert_eq!(s["error"]["message"], "disk on fire", "{}", pretty(&done));
    assert_eq!(s["error"]["attempt"], 3);
    assert_eq!(step(&done, "never")["status"], "pending");
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // History
    let history = node.history(&id).await;
    assert_eq!(
        events(&history, "step_attempt_failed").len(),
        2,
        "{}",
        show(&history)
    );
    let step_failed = events(&history, "step_failed");
    assert_eq!(step_failed.len(), 1, "{}", show(&history));
    assert_eq!(step_failed[0]["step_id"], "doomed");
    assert_eq!(step_failed[0]["attempt"], 3);
    assert_eq!(step_failed[0]["data"]["error"]["message"], "disk on fire");
    let instance_failed = events(&history, "instance_failed");
    assert_eq!(instance_failed.len(), 1, "{}", show(&history));
    assert_eq!(instance_failed[0]["data"]["error"], done["error"]);
    assert!(events(&history, "instance_completed").is_empty());
    assert_eq!(history.last().unwrap()["type"], "instance_failed");

    // SQL
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT status, error, error ->> 'message' FROM stead.instances WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "failed");
    assert_eq!(row.get::<_, Value>(1), done["error"]);
    assert!(row.get::<_, String>(2).contains("disk on fire"));
    let row = client
        .query_one(
            "SELECT status, attempt, error ->> 'message' FROM stead.steps
             WHERE instance_id = $1 AND step_id = 'doomed'",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "failed");
    assert_eq!(row.get::<_, i32>(1), 3);
    assert_eq!(row.get::<_, String>(2), "disk on fire");
    let overview: Option<String> = client
        .query_one(
            "SELECT error FROM stead.instance_overview WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(overview.unwrap_or_default().contains("disk on fire"));
    // Nothing is left in the queue for a failed instance.
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM stead.tasks WHERE instance_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    node.shutdown().await;
}

/// A permanent (non-retryable) error fails the step at once, whatever the
/// retry policy allows.
#[tokio::test]
async fn permanent_failure_fails_at_once_without_retries() {
    let db = TestDb::new().await;
    let calls = Arc::new(AtomicU32::new(0));
    let mut handlers = Handlers::default();
    {
        let calls = calls.clone();
        handlers.register("strict", move |_task: TaskContext| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { Err::<Value, _>(TaskError::permanent("invalid card number")) }
        });
    }
    let node = TestNode::start_with_handlers(&db, handlers).await;
    node.put_workflow(
        "permanent",
        json!({
            "steps": [
                {"id": "charge", "task": {"queue": "strict"},
                 "retry": {"max_attempts": 10, "initial_interval": "100ms"}}
            ]
        }),
    )
    .await;
    let id = node.start_instance("permanent", json!({})).await;
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "failed", "{}", pretty(&done));
    let s = step(&done, "charge");
    assert_eq!(s["status"], "failed");
    assert_eq!(s["attempt"], 1);
    assert_eq!(s["error"]["message"], "invalid card number");
    assert_eq!(s["error"]["retryable"], false);
    assert!(done["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("invalid card number"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let history = node.history(&id).await;
    assert!(
        events(&history, "step_attempt_failed").is_empty(),
        "{}",
        show(&history)
    );
    assert_eq!(events(&history, "step_failed").len(), 1);
    assert_eq!(events(&history, "step_failed")[0]["attempt"], 1);
    assert_eq!(events(&history, "instance_failed").len(), 1);
    node.shutdown().await;
}

/// `on_failure: "continue"`: the step fails, its error becomes its output,
/// and the workflow goes on to complete.
#[tokio::test]
async fn on_failure_continue_lets_the_workflow_go_on() {
    let db = TestDb::new().await;
    let calls = Arc::new(AtomicU32::new(0));
    let mut handlers = Handlers::default();
    {
        let calls = calls.clone();
        handlers.register("optional", move |_task: TaskContext| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { Err::<Value, _>(TaskError::retryable("service down")) }
        });
    }
    let node = TestNode::start_with_handlers(&db, handlers).await;
    node.put_workflow(
        "continue",
        json!({
            "steps": [
                {"id": "notify", "task": {"queue": "optional"}, "on_failure": "continue",
                 "retry": {"max_attempts": 2, "initial_interval": "100ms"}},
                {"id": "finish", "value": {"notify_error": "${steps.notify.output.message}",
                                           "done": true}}
            ],
            "output": "${steps.finish.output}"
        }),
    )
    .await;
    let id = node.start_instance("continue", json!({})).await;
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(done["error"], Value::Null);
    assert_eq!(
        done["output"],
        json!({"notify_error": "service down", "done": true})
    );
    let s = step(&done, "notify");
    assert_eq!(s["status"], "failed");
    assert_eq!(s["attempt"], 2);
    assert_eq!(s["error"]["message"], "service down");
    assert_eq!(s["output"]["message"], "service down");
    assert_eq!(step(&done, "finish")["status"], "completed");
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    let history = node.history(&id).await;
    let failed = events(&history, "step_failed");
    assert_eq!(failed.len(), 1, "{}", show(&history));
    assert_eq!(failed[0]["data"]["continue"], true);
    assert!(events(&history, "instance_failed").is_empty());
    assert_eq!(events(&history, "instance_completed").len(), 1);
    node.shutdown().await;
}
