//! Small helpers shared by the feature tests: reading instances and
//! histories, starting instances with a chosen id, a gated handler, and the
//! history invariants checked after crashes and faults.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use stead::{Handlers, TaskContext};
use tokio::sync::Semaphore;

use crate::fault_harness::Probe;
use crate::{pretty, wait_until, TestNode};

/// The step `id` of an instance as the API returns it; panics (showing the
/// instance) when there is none.
pub fn step<'a>(instance: &'a Value, id: &str) -> &'a Value {
    instance["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["id"] == id))
        .unwrap_or_else(|| panic!("no step {id} in {}", pretty(instance)))
}

/// An RFC 3339 timestamp; panics naming `what` when `v` is not one.
pub fn time(v: &Value, what: &str) -> DateTime<Utc> {
    v.as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| panic!("{what} is not a timestamp: {v}"))
}

/// The events of type `kind`, in history order.
pub fn events<'a>(history: &'a [Value], kind: &str) -> Vec<&'a Value> {
    history.iter().filter(|e| e["type"] == kind).collect()
}

/// Pretty JSON of a history, for assertion messages.
pub fn show(history: &[Value]) -> String {
    pretty(&Value::Array(history.to_vec()))
}

/// (type, step) of the compensation events, in history order.
pub fn compensation_events(history: &[Value]) -> Vec<(String, String)> {
    history
        .iter()
        .filter(|e| {
            e["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("compensation_"))
        })
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["step_id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Owned pairs, to compare with [`compensation_events`].
pub fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// The quickstart workflow: `greet` with `{"name": ...}` outputs
/// `{"message": "hello <name>!"}` by way of a value, a `stead.echo` task and
/// another value.
pub fn greet_workflow() -> Value {
    json!({
        "steps": [
            {"id": "hello", "value": {"greeting": "hello ${input.name}"}},
            {"id": "echo", "task": {"queue": "stead.echo", "input": "${steps.hello.output}"}},
            {"id": "shout", "value": "${steps.echo.output.greeting}!"}
        ],
        "output": {"message": "${steps.shout.output}"}
    })
}

/// Starts `workflow` over HTTP with the instance id `id`; asserts the 201.
pub async fn start_with_id(node: &TestNode, workflow: &str, id: &str, input: Value) {
    let (status, body) = node
        .call(
            "POST",
            &format!("/v1/workflows/{workflow}/instances"),
            Some(json!({"id": id, "input": input})),
        )
        .await;
    assert_eq!(status, 201, "start {workflow}: {body}");
}

/// A handler that holds every task until the test lets it go.
pub struct Gate {
    entered: AtomicU32,
    release: Semaphore,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            entered: AtomicU32::new(0),
            release: Semaphore::new(0),
        }
    }
}

impl Gate {
    /// Counts the call, then waits until the gate is opened.
    pub async fn pass(&self) {
        self.entered.fetch_add(1, Ordering::SeqCst);
        self.release.acquire().await.expect("gate open").forget();
    }

    /// Registers a handler for `queue` that passes the gate, then returns its
    /// input.
    pub fn register(self: &Arc<Self>, handlers: &mut Handlers, queue: &str) {
        let gate = self.clone();
        handlers.register(queue, move |task: TaskContext| {
            let gate = gate.clone();
            async move {
                gate.pass().await;
                Ok(task.input)
            }
        });
    }

    /// Waits until the gate has been reached `n` times.
    pub async fn wait_entered(&self, n: u32) {
        wait_until(
            "the gated handler to be called",
            Duration::from_secs(10),
            || async { self.entered.load(Ordering::SeqCst) >= n },
        )
        .await;
    }

    /// Lets every held task (and any later one) through.
    pub fn open(&self) {
        self.release.add_permits(1000);
    }
}

/// The workflow of the crash and fault tests: three `stead.echo` tasks in a
/// row carrying `input.n` along; the output is `{"n": <input.n>, "at": 3}`.
pub fn echo_chain_workflow() -> Value {
    json!({
        "steps": [
            {"id": "one", "task": {"queue": "stead.echo", "input": {"n": "${input.n}", "at": 1}}},
            {"id": "two", "task": {"queue": "stead.echo", "input": {"n": "${steps.one.output.n}", "at": 2}}},
            {"id": "three", "task": {"queue": "stead.echo", "input": {"n": "${steps.two.output.n}", "at": 3}}}
        ],
        "output": "${steps.three.output}"
    })
}

/// The history invariants after a run of a workflow of `steps` task steps
/// (once every instance has completed): no step result recorded twice;
/// every instance with exactly `steps` step completions and one instance
/// completion; every history numbered 1..n without gaps or duplicates (and
/// agreeing with the instance row); no task rows left.
pub async fn check_histories(probe: &Probe, steps: i64) {
    let q = |sql: &'static str| async move { probe.query(sql, &[]).await.expect(sql) };

    let dups = q("SELECT instance_id, step_id, count(*) FROM stead.events \
         WHERE type = 'step_completed' GROUP BY 1, 2 HAVING count(*) > 1")
    .await;
    let dups: Vec<(String, String, i64)> = dups
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(
        dups.is_empty(),
        "step results recorded more than once: {dups:?}"
    );

    let counts = q("SELECT i.id, \
            (SELECT count(*) FROM stead.events e \
             WHERE e.instance_id = i.id AND e.type = 'step_completed'), \
            (SELECT count(*) FROM stead.events e \
             WHERE e.instance_id = i.id AND e.type = 'instance_completed') \
         FROM stead.instances i")
    .await;
    let bad: Vec<(String, i64, i64)> = counts
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .filter(|(_, s, c)| (*s, *c) != (steps, 1))
        .collect();
    assert!(
        bad.is_empty(),
        "instances without exactly {steps} step completions and 1 instance completion: {bad:?}"
    );

    let gaps = q(
        "SELECT i.id, i.event_seq, count(e.seq), min(e.seq), max(e.seq), \
                count(DISTINCT e.seq) \
         FROM stead.instances i LEFT JOIN stead.events e ON e.instance_id = i.id \
         GROUP BY i.id, i.event_seq \
         HAVING count(e.seq) = 0 OR min(e.seq) <> 1 OR max(e.seq) <> count(e.seq) \
             OR count(DISTINCT e.seq) <> count(e.seq) OR i.event_seq <> max(e.seq)",
    )
    .await;
    let gaps: Vec<String> = gaps
        .iter()
        .map(|r| {
            format!(
                "{} event_seq={} count={} min={:?} max={:?} distinct={}",
                r.get::<_, String>(0),
                r.get::<_, i32>(1),
                r.get::<_, i64>(2),
                r.get::<_, Option<i32>>(3),
                r.get::<_, Option<i32>>(4),
                r.get::<_, i64>(5)
            )
        })
        .collect();
    assert!(
        gaps.is_empty(),
        "histories with gaps or duplicates: {gaps:#?}"
    );

    let left = q("SELECT count(*) FROM stead.tasks").await;
    assert_eq!(left[0].get::<_, i64>(0), 0, "task rows left behind");
}

/// The samples of a Prometheus text exposition, keyed by
/// `metric_key` of the sample (`name{label="value",...}`, labels sorted).
pub fn parse_metrics(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((metric_key(key), value.parse().ok()?))
        })
        .collect()
}

/// A sample's name with its labels sorted by name, so a key written in any
/// label order finds it. (Label values here never contain `",`.)
pub fn metric_key(sample: &str) -> String {
    let Some((name, labels)) = sample.split_once('{') else {
        return sample.to_string();
    };
    let labels = labels.strip_suffix('}').unwrap_or(labels);
    let mut pairs: Vec<String> = labels
        .split("\",")
        .filter(|p| !p.is_empty())
        .map(|p| format!("{}\"", p.trim_end_matches('"')))
        .collect();
    pairs.sort();
    format!("{name}{{{}}}", pairs.join(","))
}

/// GET /metrics of `node`, parsed.
pub async fn scrape(node: &TestNode) -> std::collections::BTreeMap<String, f64> {
    let text = node
        .http
        .get(format!("{}/metrics", node.url))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    parse_metrics(&text)
}

/// POST /v1/queues/{queue}/claim; asserts 200 and returns the tasks.
pub async fn claim(node: &TestNode, queue: &str, body: Value) -> Vec<Value> {
    let (status, resp) = node
        .call("POST", &format!("/v1/queues/{queue}/claim"), Some(body))
        .await;
    assert_eq!(status, 200, "claim on {queue}: {}", pretty(&resp));
    resp["tasks"]
        .as_array()
        .unwrap_or_else(|| panic!("claim answer without tasks: {}", pretty(&resp)))
        .clone()
}

/// POST /v1/tasks/{id}/{action} for a claimed task (heartbeat, complete, fail).
pub async fn task_call(node: &TestNode, task: &Value, action: &str, body: Value) -> (u16, Value) {
    node.call(
        "POST",
        &format!("/v1/tasks/{}/{action}", task["task_id"]),
        Some(body),
    )
    .await
}

/// Waits until `node` has `n` long-polls of `kind` (`claim`, `instance`)
/// parked, so that what the test does next finds them waiting.
pub async fn wait_parked(node: &TestNode, kind: &str, n: usize) {
    let key = format!("stead_http_long_polls_waiting{{kind=\"{kind}\"}}");
    let key = &key;
    wait_until(
        &format!("{n} {kind} long-poll(s) parked"),
        Duration::from_secs(60),
        || async move { scrape(node).await.get(key).copied() == Some(n as f64) },
    )
    .await;
}
