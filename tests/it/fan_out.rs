//! `for_each` fan-out: at most `max_parallel` items in flight, outputs in
//! input order, and item failures (fatal, or carried on with
//! `on_failure: "continue"`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stead::{Handlers, TaskContext, TaskError};

use crate::support::step;
use crate::{pretty, TestDb, TestNode};

/// (item, started, finished) of every handler call.
type Intervals = Arc<Mutex<Vec<(i64, Instant, Instant)>>>;

/// `double`: sleeps 3 ms and returns input * 2, recording when it ran;
/// fails permanently for the item values in `failing`.
fn handlers(intervals: &Intervals, failing: &'static [i64]) -> Handlers {
    let mut h = Handlers::default();
    let intervals = intervals.clone();
    h.register("double", move |task: TaskContext| {
        let intervals = intervals.clone();
        async move {
            let started = Instant::now();
            let n = task.input.as_i64().unwrap_or(-1);
            tokio::time::sleep(Duration::from_millis(3)).await;
            let finished = Instant::now();
            intervals.lock().unwrap().push((n, started, finished));
            if failing.contains(&n) {
                Err(TaskError::permanent(format!("cannot double {n}")))
            } else {
                Ok(json!(n * 2))
            }
        }
    });
    h
}

/// The most handler calls that overlapped at any moment.
fn max_in_flight(intervals: &[(i64, Instant, Instant)]) -> usize {
    let mut edges: Vec<(Instant, i32)> = Vec::new();
    for (_, s, f) in intervals {
        edges.push((*s, 1));
        edges.push((*f, -1));
    }
    // At equal instants, count the end before the start.
    edges.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut now = 0i32;
    let mut max = 0i32;
    for (_, d) in edges {
        now += d;
        max = max.max(now);
    }
    max as usize
}

fn fan_out_def(extra: Value) -> Value {
    let mut s = json!({
        "id": "doubled",
        "for_each": "${input.items}",
        "max_parallel": 5,
        "task": {"queue": "double", "input": "${item}"}
    });
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            s[k] = v;
        }
    }
    json!({
        "steps": [s, {"id": "after", "value": {"all": "${steps.doubled.output}"}}],
        "output": "${steps.after.output}"
    })
}

/// 200 items with `max_parallel: 5`: never more than 5 handler calls at
/// once, at least 2 at once, every item exactly once, and the output is the
/// array of outputs in input order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn for_each_respects_max_parallel_and_keeps_input_order() {
    let db = TestDb::new().await;
    let intervals: Intervals = Arc::default();
    let node = TestNode::start_with_handlers(&db, handlers(&intervals, &[])).await;
    node.put_workflow("fan", fan_out_def(json!({}))).await;
    let items: Vec<i64> = (0..200).map(|i| (i * 7919) % 1000).collect();
    let t0 = Instant::now();
    let id = node.start_instance("fan", json!({"items": items})).await;
    let done = node.wait_ended(&id).await;
    eprintln!("200 items with max_parallel 5 took {:?}", t0.elapsed());
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    let expected: Vec<i64> = items.iter().map(|n| n * 2).collect();
    assert_eq!(done["output"], json!({"all": expected}));
    assert_eq!(step(&done, "doubled")["output"], json!(expected));

    let intervals = intervals.lock().unwrap().clone();
    assert_eq!(intervals.len(), 200, "each item runs exactly once");
    let mut seen: Vec<i64> = intervals.iter().map(|i| i.0).collect();
    seen.sort();
    let mut want = items.clone();
    want.sort();
    assert_eq!(seen, want);
    let max = max_in_flight(&intervals);
    eprintln!("at most {max} items were in flight at once");
    assert!(max <= 5, "{max} items ran at once with max_parallel 5");
    assert!(max >= 2, "items never overlapped (max {max}): no fan-out");
    node.shutdown().await;
}

/// One item failing permanently fails the step, and the instance, with an
/// error naming the item.
#[tokio::test]
async fn a_failing_item_fails_the_step() {
    let db = TestDb::new().await;
    let intervals: Intervals = Arc::default();
    let node = TestNode::start_with_handlers(&db, handlers(&intervals, &[107])).await;
    node.put_workflow("fan_fail", fan_out_def(json!({}))).await;
    let items: Vec<i64> = (100..120).collect();
    let id = node
        .start_instance("fan_fail", json!({"items": items}))
        .await;
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "failed", "{}", pretty(&done));
    let s = step(&done, "doubled");
    assert_eq!(s["status"], "failed", "{}", pretty(&done));
    let error = s["error"].to_string();
    assert!(error.contains("cannot double 107"), "{}", pretty(&done));
    assert_eq!(done["error"]["step"], "doubled", "{}", pretty(&done));
    assert!(
        done["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot double 107"),
        "{}",
        pretty(&done)
    );
    assert_eq!(step(&done, "after")["status"], "pending");
    assert!(max_in_flight(&intervals.lock().unwrap()) <= 5);
    node.shutdown().await;
}

/// With `on_failure: "continue"` a failing item does not stop the step: its
/// slot in the output holds the error, the others their outputs, and the
/// workflow completes.
#[tokio::test]
async fn a_failing_item_with_on_failure_continue_carries_on() {
    let db = TestDb::new().await;
    let intervals: Intervals = Arc::default();
    let node = TestNode::start_with_handlers(&db, handlers(&intervals, &[107])).await;
    node.put_workflow(
        "fan_continue",
        fan_out_def(json!({"on_failure": "continue"})),
    )
    .await;
    let items: Vec<i64> = (100..120).collect();
    let id = node
        .start_instance("fan_continue", json!({"items": items}))
        .await;
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    let all = done["output"]["all"]
        .as_array()
        .unwrap_or_else(|| panic!("{}", pretty(&done)))
        .clone();
    assert_eq!(all.len(), 20, "{}", pretty(&done));
    for (k, n) in items.iter().enumerate() {
        if *n == 107 {
            assert!(
                all[k].to_string().contains("cannot double 107"),
                "item {k}: {}",
                pretty(&done)
            );
        } else {
            assert_eq!(all[k], json!(n * 2), "item {k}: {}", pretty(&done));
        }
    }
    assert_eq!(intervals.lock().unwrap().len(), 20);
    node.shutdown().await;
}
