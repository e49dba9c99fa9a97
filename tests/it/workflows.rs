//! Workflow shape: DAG order, parallel branches, `when` skips, templates,
//! the `output` template and `value` steps.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use stead::{Handlers, TaskContext, TaskError};
use tokio::sync::Barrier;

use crate::support::{step, time};
use crate::{pretty, TestDb, TestNode};

/// How long a barrier handler waits for its partner before declaring that
/// the two tasks did not run at the same time.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(8);

/// Sequence number of the single event of `kind` for `step_id`.
fn seq_of(history: &[Value], kind: &str, step_id: &str) -> i64 {
    let found: Vec<&Value> = history
        .iter()
        .filter(|e| e["type"] == kind && e["step_id"] == step_id)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} event for {step_id}; history: {}",
        pretty(&Value::Array(history.to_vec()))
    );
    found[0]["seq"].as_i64().unwrap()
}

/// A handler for a queue whose tasks only succeed if two of them are in the
/// handler at the same time.
fn barrier_handler(handlers: &mut Handlers, queue: &str) {
    let barrier = Arc::new(Barrier::new(2));
    handlers.register(queue, move |task: TaskContext| {
        let barrier = barrier.clone();
        async move {
            match tokio::time::timeout(BARRIER_TIMEOUT, barrier.wait()).await {
                Ok(_) => Ok(json!({ "step": task.step_id, "met": true })),
                Err(_) => Err(TaskError::permanent(format!(
                    "step {} ran alone: no other task reached the barrier within {:?}",
                    task.step_id, BARRIER_TIMEOUT
                ))),
            }
        }
    });
}

/// a → (b ∥ c) → d: b and c start after a ended, run at the same time, and d
/// starts only after both ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dag_runs_in_dependency_order_with_parallel_branches() {
    let db = TestDb::new().await;
    let mut handlers = Handlers::default();
    handlers.register("wf.plain", |task: TaskContext| async move {
        Ok(json!({ "step": task.step_id }))
    });
    barrier_handler(&mut handlers, "wf.branch");
    let node = TestNode::start_with_handlers(&db, handlers).await;
    let once = json!({"max_attempts": 1});
    node.put_workflow(
        "diamond",
        json!({
            "steps": [
                {"id": "a", "task": {"queue": "wf.plain"}},
                {"id": "b", "task": {"queue": "wf.branch"}, "needs": ["a"], "retry": once},
                {"id": "c", "task": {"queue": "wf.branch"}, "needs": ["a"], "retry": once},
                {"id": "d", "task": {"queue": "wf.plain"}, "needs": ["b", "c"]}
            ]
        }),
    )
    .await;
    let id = node.start_instance("diamond", json!({})).await;
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    for s in ["b", "c"] {
        assert_eq!(
            step(&done, s)["output"],
            json!({"step": s, "met": true}),
            "{}",
            pretty(&done)
        );
    }

    // Times: b and c started after a ended; d after both ended; b and c
    // overlapped.
    let started = |s: &str| time(&step(&done, s)["started_at"], &format!("{s}.started_at"));
    let ended = |s: &str| time(&step(&done, s)["ended_at"], &format!("{s}.ended_at"));
    for s in ["b", "c"] {
        assert!(
            started(s) >= ended("a"),
            "{s} started before a ended: {}",
            pretty(&done)
        );
        assert!(
            started("d") >= ended(s),
            "d started before {s} ended: {}",
            pretty(&done)
        );
    }
    assert!(
        started("b") < ended("c") && started("c") < ended("b"),
        "b and c did not overlap: {}",
        pretty(&done)
    );

    // History order says the same.
    let history = node.history(&id).await;
    let a_done = seq_of(&history, "step_completed", "a");
    for s in ["b", "c"] {
        assert!(seq_of(&history, "step_scheduled", s) > a_done);
        assert!(seq_of(&history, "step_scheduled", "d") > seq_of(&history, "step_completed", s));
    }
    assert!(seq_of(&history, "step_scheduled", "a") < a_done);
    node.shutdown().await;
}

/// Two steps with `needs: []` are both runnable at start and are leased at
/// the same time (each handler waits for the other at a barrier).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_without_needs_run_concurrently() {
    let db = TestDb::new().await;
    let mut handlers = Handlers::default();
    barrier_handler(&mut handlers, "wf.roots");
    let node = TestNode::start_with_handlers(&db, handlers).await;
    let once = json!({"max_attempts": 1});
    node.put_workflow(
        "two_roots",
        json!({
            "steps": [
                {"id": "left", "task": {"queue": "wf.roots"}, "retry": once},
                {"id": "right", "task": {"queue": "wf.roots"}, "needs": [], "retry": once},
                {"id": "join", "value": ["${steps.left.output.met}", "${steps.right.output.met}"],
                 "needs": ["left", "right"]}
            ],
            "output": "${steps.join.output}"
        }),
    )
    .await;
    let id = node.start_instance("two_roots", json!(null)).await;
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(done["output"], json!([true, true]));

    // Both were scheduled by the first decision, before either finished.
    let history = node.history(&id).await;
    let first_done =
        seq_of(&history, "step_completed", "left").min(seq_of(&history, "step_completed", "right"));
    assert!(seq_of(&history, "step_scheduled", "left") < first_done);
    assert!(seq_of(&history, "step_scheduled", "right") < first_done);
    node.shutdown().await;
}

/// A falsy `when` skips the step (status skipped, output null, never
/// queued) and its dependents still run; a truthy one runs the step.
#[tokio::test]
async fn when_false_skips_the_step_and_dependents_run() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "maybe",
        json!({
            "steps": [
                {"id": "optional", "task": {"queue": "stead.echo", "input": {"x": 1}},
                 "when": "${input.enabled}"},
                {"id": "missing_flag", "value": "ran", "when": "${input.nope}", "needs": []},
                {"id": "wanted", "task": {"queue": "stead.echo", "input": {"y": 2}},
                 "when": "${input.also}", "needs": []},
                {"id": "after", "value": {"optional": "${steps.optional.output}",
                                          "missing_flag": "${steps.missing_flag.output}",
                                          "wanted": "${steps.wanted.output}",
                                          "ran": true},
                 "needs": ["optional", "missing_flag", "wanted"]}
            ],
            "output": "${steps.after.output}"
        }),
    )
    .await;
    let id = node
        .start_instance("maybe", json!({"enabled": false, "also": true}))
        .await;
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    for s in ["optional", "missing_flag"] {
        assert_eq!(step(&done, s)["status"], "skipped", "{}", pretty(&done));
        assert_eq!(step(&done, s)["output"], Value::Null, "{}", pretty(&done));
    }
    assert_eq!(step(&done, "wanted")["status"], "completed");
    assert_eq!(step(&done, "after")["status"], "completed");
    assert_eq!(
        done["output"],
        json!({"optional": null, "missing_flag": null, "wanted": {"y": 2}, "ran": true})
    );

    let history = node.history(&id).await;
    seq_of(&history, "step_skipped", "optional");
    seq_of(&history, "step_skipped", "missing_flag");
    assert!(
        !history
            .iter()
            .any(|e| e["step_id"] == "optional" && e["type"] != "step_skipped"),
        "a skipped step must not be scheduled: {}",
        pretty(&Value::Array(history.clone()))
    );

    // SQL shows the skip too, and the skipped steps count as done.
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT status, output FROM stead.steps WHERE instance_id = $1 AND step_id = 'optional'",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "skipped");
    assert!(matches!(
        row.get::<_, Option<Value>>(1),
        None | Some(Value::Null)
    ));
    let done_steps: i64 = client
        .query_one(
            "SELECT steps_done FROM stead.instance_overview WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(done_steps, 4);
    node.shutdown().await;
}

/// Templates resolve `input` paths (nested keys, array indexes), nested
/// `steps.X.output` paths, `instance.id`, whole values with their JSON type
/// and interpolated text; the `output` template shapes the instance output.
#[tokio::test]
async fn templates_resolve_input_step_outputs_and_instance_id() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "tmpl",
        json!({
            "steps": [
                {"id": "first", "task": {"queue": "stead.echo", "input": {
                    "who": "${input.user.name}",
                    "tag": "${input.user.tags.1}",
                    "n": "${input.n}",
                    "user": "${input.user}",
                    "id": "${instance.id}",
                    "greeting": "hi ${input.user.name} #${input.n} (${instance.id})",
                    "absent": "${input.nope.deeper}",
                    "literal": 7
                }}},
                {"id": "second", "value": {
                    "deep": "${steps.first.output.user.address.city}",
                    "tag": "${steps.first.output.tag}",
                    "text": "${steps.first.output.who} in ${steps.first.output.user.address.city}"
                }}
            ],
            "output": {
                "city": "${steps.second.output.deep}",
                "text": "${steps.second.output.text}",
                "n": "${steps.first.output.n}",
                "instance": "${instance.id}",
                "input_name": "${input.user.name}",
                "nothing": "${steps.first.output.absent}"
            }
        }),
    )
    .await;
    let input = json!({
        "user": {"name": "Ada", "tags": ["x", "y"], "address": {"city": "London"}},
        "n": 3
    });
    let (status, body) = node
        .call(
            "POST",
            "/v1/workflows/tmpl/instances",
            Some(json!({"input": input, "id": "tmpl-instance-1"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = "tmpl-instance-1";
    let done = node.wait_ended(id).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));

    assert_eq!(
        step(&done, "first")["input"],
        json!({
            "who": "Ada",
            "tag": "y",
            "n": 3,
            "user": input["user"],
            "id": id,
            "greeting": "hi Ada #3 (tmpl-instance-1)",
            "absent": null,
            "literal": 7
        }),
        "{}",
        pretty(&done)
    );
    assert_eq!(
        step(&done, "second")["output"],
        json!({"deep": "London", "tag": "y", "text": "Ada in London"})
    );
    assert_eq!(
        done["output"],
        json!({
            "city": "London",
            "text": "Ada in London",
            "n": 3,
            "instance": id,
            "input_name": "Ada",
            "nothing": null
        })
    );

    // The stored output is the same (it is what SQL users read).
    let client = db.client().await;
    let output: Value = client
        .query_one("SELECT output FROM stead.instances WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(output, done["output"]);
    node.shutdown().await;
}

/// `value` steps complete inline (no queue, attempt 1) with their rendered
/// template, any JSON type; without an `output` template the instance output
/// is every step's output by step id.
#[tokio::test]
async fn value_steps_complete_inline_and_default_output_collects_them() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "values",
        json!({
            "steps": [
                {"id": "num", "value": 42},
                {"id": "list", "value": [1, "two", "${input.three}", null]},
                {"id": "obj", "value": {"sum": "${steps.num.output}", "list": "${steps.list.output}"}},
                {"id": "text", "value": "n=${steps.num.output} l=${steps.list.output}"},
                {"id": "flag", "value": false}
            ]
        }),
    )
    .await;
    let id = node.start_instance("values", json!({"three": 3.5})).await;
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    let list = json!([1, "two", 3.5, null]);
    assert_eq!(
        done["output"],
        json!({
            "num": 42,
            "list": list,
            "obj": {"sum": 42, "list": list},
            "text": "n=42 l=[1,\"two\",3.5,null]",
            "flag": false
        }),
        "{}",
        pretty(&done)
    );
    for s in ["num", "list", "obj", "text", "flag"] {
        let st = step(&done, s);
        assert_eq!(st["kind"], "value");
        assert_eq!(st["status"], "completed");
        assert_eq!(st["attempt"], 1);
    }
    // Inline: nothing was ever queued.
    let history = node.history(&id).await;
    assert!(
        !history
            .iter()
            .any(|e| e["type"] == "step_scheduled" || e["type"] == "step_attempt_failed"),
        "value steps must not be queued: {}",
        pretty(&Value::Array(history.clone()))
    );
    assert_eq!(
        history
            .iter()
            .filter(|e| e["type"] == "step_completed")
            .count(),
        5
    );
    node.shutdown().await;
}
