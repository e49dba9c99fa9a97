//! Durable timers: `sleep` steps fire no earlier than asked (in database
//! time), survive a `kill -9` of the only process, take `{"until": ...}`,
//! and show up in `stead.waiting_steps` while they wait.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::support::{step, time};
use crate::{pretty, wait_until, ServeProcess, TestDb, TestNode};

fn event<'a>(history: &'a [Value], kind: &str, step_id: &str) -> &'a Value {
    history
        .iter()
        .find(|e| e["type"] == kind && e["step_id"] == step_id)
        .unwrap_or_else(|| {
            panic!(
                "no {kind} event for {step_id}: {}",
                pretty(&Value::Array(history.to_vec()))
            )
        })
}

/// The `stead.waiting_steps` row of a step, once there is one.
async fn waiting_row(
    client: &tokio_postgres::Client,
    instance: &str,
    step_id: &str,
) -> Option<(String, DateTime<Utc>, DateTime<Utc>)> {
    client
        .query_opt(
            "SELECT kind, wake_at, waiting_since FROM stead.waiting_steps
             WHERE instance_id = $1 AND step_id = $2",
            &[&instance, &step_id],
        )
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
}

/// Checks in database time (the step row, the API and the history) that
/// the sleep `step_id` of the ended instance `done` lasted at least `min`.
async fn assert_slept_at_least(
    client: &tokio_postgres::Client,
    done: &Value,
    history: &[Value],
    step_id: &str,
    min: chrono::Duration,
) {
    let id = done["id"].as_str().unwrap();
    let s = step(done, step_id);
    assert_eq!(s["status"], "completed", "{}", pretty(done));
    let started = time(&s["started_at"], "started_at");
    let ended = time(&s["ended_at"], "ended_at");
    assert!(
        ended - started >= min,
        "sleep {step_id} ended {}ms after it started, asked for {}ms: {}",
        (ended - started).num_milliseconds(),
        min.num_milliseconds(),
        pretty(done)
    );

    let waiting_at = time(&event(history, "step_waiting", step_id)["at"], "event at");
    let completed_at = time(&event(history, "step_completed", step_id)["at"], "event at");
    assert!(
        completed_at - waiting_at >= min,
        "history: step_completed {}ms after step_waiting, asked for {}ms",
        (completed_at - waiting_at).num_milliseconds(),
        min.num_milliseconds()
    );

    let min_ms = min.num_milliseconds() as f64;
    let ok: bool = client
        .query_one(
            "SELECT ended_at - started_at >= $3::float8 * interval '1 millisecond'
             FROM stead.steps WHERE instance_id = $1 AND step_id = $2",
            &[&id, &step_id, &min_ms],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        ok,
        "stead.steps: {step_id} ended less than {min_ms}ms after it started"
    );
}

/// A 2 s sleep: the step waits (visible in the API and in
/// `stead.waiting_steps` with its wake-up time), then completes no earlier
/// than 2 s after it started, and the next step runs.
#[tokio::test]
async fn sleep_fires_no_earlier_than_asked_and_is_visible_while_waiting() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "nap",
        json!({
            "steps": [
                {"id": "nap", "sleep": "2s"},
                {"id": "after", "value": {"woke": true}}
            ],
            "output": "${steps.after.output}"
        }),
    )
    .await;
    let t0 = Instant::now();
    let id = node.start_instance("nap", json!({})).await;

    let client = db.client().await;
    let c = &client;
    let id_ref = id.as_str();
    let (kind, wake_at, since) = wait_until(
        "the sleep appears in stead.waiting_steps",
        Duration::from_secs(10),
        || async move { waiting_row(c, id_ref, "nap").await },
    )
    .await;
    assert_eq!(kind, "sleep");
    assert!(
        wake_at - since >= chrono::Duration::milliseconds(2000),
        "waiting_steps: wake_at {wake_at} is less than 2s after {since}"
    );
    let (status, body) = node.call("GET", &format!("/v1/instances/{id}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "running", "{}", pretty(&body));
    let s = step(&body, "nap");
    assert_eq!(s["status"], "waiting", "{}", pretty(&body));
    assert_eq!(time(&s["wake_at"], "wake_at"), wake_at, "{}", pretty(&body));
    assert_eq!(step(&body, "after")["status"], "pending");

    let done = node.wait_ended(&id).await;
    let elapsed = t0.elapsed();
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(done["output"], json!({"woke": true}));
    assert!(
        elapsed >= Duration::from_secs(2),
        "a 2s sleep ended after {elapsed:?}"
    );
    let history = node.history(&id).await;
    assert_slept_at_least(
        &client,
        &done,
        &history,
        "nap",
        chrono::Duration::milliseconds(2000),
    )
    .await;
    assert!(
        time(&step(&done, "nap")["ended_at"], "ended_at") >= wake_at,
        "the sleep ended before its wake_at {wake_at}: {}",
        pretty(&done)
    );
    // Nothing waits any more.
    assert!(waiting_row(&client, &id, "nap").await.is_none());
    node.shutdown().await;
}

/// `{"until": timestamp}` (here from the input, 1.5 s ahead in database
/// time): the step wakes no earlier than that instant.
#[tokio::test]
async fn sleep_until_a_timestamp_fires_no_earlier_than_it() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "nap_until",
        json!({
            "steps": [
                {"id": "nap", "sleep": {"until": "${input.at}"}},
                {"id": "after", "value": "${input.at}"}
            ],
            "output": "${steps.after.output}"
        }),
    )
    .await;
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT to_json(now() + interval '1500 milliseconds') #>> '{}', \
                    now() + interval '1500 milliseconds'",
            &[],
        )
        .await
        .unwrap();
    let at_text: String = row.get(0);
    let at: DateTime<Utc> = row.get(1);
    let id = node
        .start_instance("nap_until", json!({"at": at_text}))
        .await;

    let c = &client;
    let id_ref = id.as_str();
    let (kind, wake_at, _) = wait_until(
        "the sleep appears in stead.waiting_steps",
        Duration::from_secs(10),
        || async move { waiting_row(c, id_ref, "nap").await },
    )
    .await;
    assert_eq!(kind, "sleep");
    assert_eq!(wake_at, at, "wake_at is the requested instant");

    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(done["output"], json!(at_text));
    let s = step(&done, "nap");
    let ended = time(&s["ended_at"], "ended_at");
    assert!(
        ended >= at,
        "sleep until {at} ended at {ended}: {}",
        pretty(&done)
    );
    let history = node.history(&id).await;
    let completed_at = time(&event(&history, "step_completed", "nap")["at"], "event at");
    assert!(
        completed_at >= at,
        "history: completed at {completed_at}, until {at}"
    );
    let (sql_ended, woke_late): (DateTime<Utc>, bool) = {
        let r = client
            .query_one(
                "SELECT ended_at, ended_at >= $2 FROM stead.steps
                 WHERE instance_id = $1 AND step_id = 'nap'",
                &[&id, &at],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(
        woke_late,
        "stead.steps: ended_at {sql_ended} is before {at}"
    );
    node.shutdown().await;
}

/// The only `stead serve` process is killed (-9) while an instance sleeps;
/// a new process on the same database wakes it, still no earlier than
/// asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleep_survives_kill_9_and_restart() {
    let db = TestDb::new().await;
    let args = ["--poll-interval-ms", "100", "--reap-interval-ms", "200"];
    let mut first = ServeProcess::spawn(&db.url, "timers-a", &args).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let resp = http
        .put(format!("{}/v1/workflows/durable_nap", first.base_url))
        .json(&json!({
            "steps": [
                {"id": "nap", "sleep": "3s"},
                {"id": "after", "value": "${instance.id}"}
            ],
            "output": "${steps.after.output}"
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201, "{:?}", resp.text().await);
    let resp = http
        .post(format!(
            "{}/v1/workflows/durable_nap/instances",
            first.base_url
        ))
        .json(&json!({"id": "nap-1", "input": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201, "{:?}", resp.text().await);

    let client = db.client().await;
    let c = &client;
    let (_, wake_at, since) = wait_until(
        "the sleep appears in stead.waiting_steps",
        Duration::from_secs(10),
        || async move { waiting_row(c, "nap-1", "nap").await },
    )
    .await;
    assert!(wake_at - since >= chrono::Duration::milliseconds(3000));
    tokio::task::block_in_place(|| first.kill9());
    let still_asleep: bool = client
        .query_one("SELECT now() < $1", &[&wake_at])
        .await
        .unwrap()
        .get(0);
    assert!(
        still_asleep,
        "the process must be killed before the timer is due for this test to mean anything"
    );

    let second = ServeProcess::spawn(&db.url, "timers-b", &args).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let done = loop {
        let body: Value = http
            .get(format!("{}/v1/instances/nap-1?wait=5s", second.base_url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if body["ended_at"].is_string() {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "nap-1 did not end after the restart: {}",
            pretty(&body)
        );
    };
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(done["output"], json!("nap-1"));
    let history: Value = http
        .get(format!("{}/v1/instances/nap-1/history", second.base_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let history = history["events"].as_array().unwrap().clone();
    assert_slept_at_least(
        &client,
        &done,
        &history,
        "nap",
        chrono::Duration::milliseconds(3000),
    )
    .await;
    assert!(time(&step(&done, "nap")["ended_at"], "ended_at") >= wake_at);
    // The timer fired once.
    let fired = history
        .iter()
        .filter(|e| e["type"] == "step_completed" && e["step_id"] == "nap")
        .count();
    assert_eq!(fired, 1, "{}", pretty(&Value::Array(history.clone())));
    drop(second);
}
