//! `/metrics` tells the truth: after a known workload, driven by an external
//! worker over the API, every counter says exactly what happened.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{claim, metric_key, scrape, task_call};
use crate::{pretty, wait_until, TestDb, TestNode};

const QUEUE: &str = "obs.q";

/// The value of one sample; 0 when the series does not exist.
fn sample(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    m.get(&metric_key(key)).copied().unwrap_or(0.0)
}

/// Claims up to 50 tasks of the test queue, long-polling up to 2 s.
async fn claim_obs(node: &TestNode, lease: &str) -> Vec<Value> {
    let body = json!({"worker": "obs-worker", "max": 50, "lease": lease, "wait": "2s"});
    claim(node, QUEUE, body).await
}

/// Completes or fails a task; 200, or 409 for a lost lease.
async fn finish(node: &TestNode, task: &Value, action: &str, body: Value) -> u16 {
    let (status, resp) = task_call(node, task, action, body).await;
    assert!(
        status == 200 || status == 409,
        "{action}: {status} {}",
        pretty(&resp)
    );
    status
}

/// 26 instances succeed at once, 3 after one failed attempt, 5 fail for
/// good, 1 succeeds after its first lease expired (whose late completion is
/// refused), and 2 waiting instances of another workflow are cancelled.
#[tokio::test]
async fn counters_match_a_known_workload_exactly() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "obs",
        json!({
            "steps": [{"id": "work", "task": {"queue": QUEUE, "input": {"plan": "${input.plan}"}},
                       "retry": {"max_attempts": 2, "initial_interval": "10ms"}}]
        }),
    )
    .await;
    node.put_workflow(
        "obs-wait",
        json!({"steps": [{"id": "wait", "signal": {"name": "never"}}]}),
    )
    .await;

    let mut plans = Vec::new();
    plans.extend(std::iter::repeat_n("ok", 26));
    plans.extend(std::iter::repeat_n("retry", 3));
    plans.extend(std::iter::repeat_n("fail", 5));
    let mut ids = Vec::new();
    for plan in &plans {
        ids.push(node.start_instance("obs", json!({"plan": plan})).await);
    }
    let waiting = [
        node.start_instance("obs-wait", json!({})).await,
        node.start_instance("obs-wait", json!({})).await,
    ];

    // Nobody has claimed yet: the duty holder's gauges show the backlog.
    let ready = format!("stead_queue_tasks{{queue=\"{QUEUE}\",state=\"ready\"}}");
    let gauges = wait_until(
        "the queue gauges to show 34 ready tasks",
        Duration::from_secs(20),
        || async {
            let m = scrape(&node).await;
            (sample(&m, &ready) == 34.0).then_some(m)
        },
    )
    .await;
    assert_eq!(sample(&gauges, "stead_members_alive"), 1.0);
    assert_eq!(sample(&gauges, "stead_slots"), 256.0);
    assert_eq!(sample(&gauges, "stead_slots_unowned"), 0.0);
    assert_eq!(sample(&gauges, "stead_maintenance_duty"), 1.0);
    let age = format!("stead_queue_oldest_ready_age_seconds{{queue=\"{QUEUE}\"}}");
    assert!(sample(&gauges, &age) > 0.0, "oldest ready age: {gauges:?}");

    for id in &waiting {
        wait_until(
            "the signal step to wait",
            Duration::from_secs(20),
            || async {
                let (_, body) = node.call("GET", &format!("/v1/instances/{id}"), None).await;
                body["steps"][0]["status"] == "waiting"
            },
        )
        .await;
        let (status, body) = node
            .call("POST", &format!("/v1/instances/{id}/cancel"), None)
            .await;
        assert!(status < 300, "cancel: {status} {body}");
    }

    // The external worker plays each task's plan until every instance ended.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut unfinished: Vec<&String> = ids.iter().collect();
    while !unfinished.is_empty() {
        assert!(
            Instant::now() < deadline,
            "instances still running: {unfinished:?}"
        );
        for task in claim_obs(&node, "30s").await {
            let plan = task["input"]["plan"].as_str().unwrap().to_string();
            let attempt = task["attempt"].as_i64().unwrap();
            let token = task["lease_token"].clone();
            let (action, body) = match (plan.as_str(), attempt) {
                ("retry", 1) => (
                    "fail",
                    json!({"lease_token": token, "error": {"message": "again", "retryable": true}}),
                ),
                ("fail", _) => (
                    "fail",
                    json!({"lease_token": token, "error": {"message": "no", "retryable": false}}),
                ),
                _ => (
                    "complete",
                    json!({"lease_token": token, "output": {"ok": true}}),
                ),
            };
            assert_eq!(
                finish(&node, &task, action, body).await,
                200,
                "{plan} {attempt}"
            );
        }
        let mut still = Vec::new();
        for id in unfinished {
            let (_, body) = node.call("GET", &format!("/v1/instances/{id}"), None).await;
            if !body["ended_at"].is_string() {
                still.push(id);
            }
        }
        unfinished = still;
    }

    // One more instance: its first lease expires, attempt 2 completes, and
    // the first claimant's late completion is refused.
    let expiring = node.start_instance("obs", json!({"plan": "expire"})).await;
    let first = wait_until(
        "the expire task to be claimed",
        Duration::from_secs(20),
        || async { claim_obs(&node, "300ms").await.pop() },
    )
    .await;
    let second = wait_until(
        "the expired task to come back",
        Duration::from_secs(20),
        || async { claim_obs(&node, "30s").await.pop() },
    )
    .await;
    assert_eq!(second["attempt"], 2, "{}", pretty(&second));
    let late = json!({"lease_token": first["lease_token"], "output": {"late": true}});
    assert_eq!(finish(&node, &first, "complete", late).await, 409);
    let done = json!({"lease_token": second["lease_token"], "output": {"ok": true}});
    assert_eq!(finish(&node, &second, "complete", done).await, 200);
    node.wait_ended(&expiring).await;
    for id in &waiting {
        node.wait_ended(id).await;
    }

    // A made-up HTTP method is counted, under a bounded label.
    let (status, _) = node.call("BREW", "/v1/workflows", None).await;
    assert_eq!(status, 405);

    let m = scrape(&node).await;
    let expect = |key: &str, value: f64| {
        assert_eq!(sample(&m, key), value, "{key}\n{}", metrics_dump(&m));
    };
    let obs = |rest: &str| format!("{{workflow=\"obs\"{rest}}}");
    let task = |rest: &str| format!("{{workflow=\"obs\",kind=\"task\",queue=\"{QUEUE}\"{rest}}}");
    expect(&format!("stead_instances_started_total{}", obs("")), 35.0);
    expect(
        &format!(
            "stead_instances_ended_total{}",
            obs(",status=\"completed\"")
        ),
        30.0,
    );
    expect(
        &format!("stead_instances_ended_total{}", obs(",status=\"failed\"")),
        5.0,
    );
    expect(
        &format!(
            "stead_instances_ended_total{}",
            obs(",status=\"cancelled\"")
        ),
        0.0,
    );
    expect("stead_instances_started_total{workflow=\"obs-wait\"}", 2.0);
    expect(
        "stead_instances_ended_total{workflow=\"obs-wait\",status=\"cancelled\"}",
        2.0,
    );
    expect(
        &format!(
            "stead_instance_duration_seconds_count{}",
            obs(",status=\"completed\"")
        ),
        30.0,
    );
    expect(
        &format!(
            "stead_instance_duration_seconds_count{}",
            obs(",status=\"failed\"")
        ),
        5.0,
    );
    // Attempts: 30 completed; 3 retried + 5 permanent failures; 1 expired lease.
    expect(
        &format!(
            "stead_step_attempts_total{}",
            task(",outcome=\"completed\"")
        ),
        30.0,
    );
    expect(
        &format!("stead_step_attempts_total{}", task(",outcome=\"failed\"")),
        8.0,
    );
    expect(
        &format!("stead_step_attempts_total{}", task(",outcome=\"expired\"")),
        1.0,
    );
    expect(&format!("stead_step_retries_total{}", task("")), 4.0);
    expect(
        &format!(
            "stead_step_duration_seconds_count{}",
            task(",status=\"completed\"")
        ),
        30.0,
    );
    expect(
        &format!(
            "stead_step_duration_seconds_count{}",
            task(",status=\"failed\"")
        ),
        5.0,
    );
    expect(
        &format!("stead_tasks_claimed_total{{queue=\"{QUEUE}\"}}"),
        39.0,
    );
    expect(
        &format!("stead_queue_wait_seconds_count{{queue=\"{QUEUE}\"}}"),
        39.0,
    );
    expect("stead_leases_expired_total", 1.0);
    expect("stead_stale_completions_total", 1.0);
    expect(
        "stead_http_requests_total{method=\"POST\",route=\"/v1/workflows/{name}/instances\",status=\"201\"}",
        37.0,
    );
    expect(
        "stead_http_requests_total{method=\"OTHER\",route=\"/v1/workflows\",status=\"405\"}",
        1.0,
    );
    assert!(
        !m.keys().any(|k| k.contains("BREW")),
        "raw method in labels"
    );
    expect("stead_db_errors_total{component=\"api\"}", 0.0);
    expect("stead_db_errors_total{component=\"advancer\"}", 0.0);
    expect("stead_members_removed_total", 0.0);
    expect("stead_heartbeat_failures_total", 0.0);
    expect(
        &format!("stead_slots_owned{{member=\"test-{}\"}}", db.name),
        256.0,
    );
    expect("stead_db_pool_max_connections", 8.0);
    assert!(sample(&m, "stead_db_pool_connections") >= 1.0);
    node.shutdown().await;
}

fn metrics_dump(m: &BTreeMap<String, f64>) -> String {
    m.iter()
        .filter(|(k, _)| !k.contains("_bucket"))
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}
