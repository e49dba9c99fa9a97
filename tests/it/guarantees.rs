//! Guarantees that need a fault or a race of their own: work nobody
//! announces is found by polling, timers survive a PostgreSQL restart,
//! concurrent claimers never share a task, and signals sent as their step
//! starts waiting are consumed exactly once while a worker is killed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{json, Value};

use crate::fault_harness::{PrivatePg, Probe, Workers};
use crate::harness::SANITY_LIMIT;
use crate::support::{claim, task_call};
use crate::{pretty, wait_until, TestDb, TestNode};

/// A realistic poll interval (the default is 500ms), long enough that a
/// pickup by polling is told apart from one by a wake-up.
const POLL_INTERVAL_MS: u64 = 2_000;

/// The one number `sql` selects.
async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

async fn listen_sessions(client: &tokio_postgres::Client) -> Vec<i32> {
    client
        .query(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND query LIKE 'LISTEN %'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A notification that never arrives costs at most a poll interval: the
/// LISTEN session is killed, and work is then created that no NOTIFY (and
/// no in-process wake-up) announces; the advancer finds it by polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_no_notification_announces_is_found_within_a_poll_interval() {
    let db = TestDb::new().await;
    let mut config = TestNode::config(&db);
    config.tuning.poll_interval_ms = POLL_INTERVAL_MS;
    let node = TestNode::start_with(config).await;
    node.put_workflow("quiet", json!({"steps": [{"id": "a", "value": 1}]}))
        .await;
    let client = db.client().await;
    let c = &client;
    let first = wait_until("the LISTEN session is up", SANITY_LIMIT, || async move {
        listen_sessions(c).await.first().copied()
    })
    .await;
    client
        .execute("SELECT pg_terminate_backend($1)", &[&first])
        .await
        .unwrap();
    wait_until("the LISTEN session is back", SANITY_LIMIT, || async move {
        listen_sessions(c).await.iter().any(|pid| *pid != first)
    })
    .await;

    // An instance inserted as start_instance would, minus the NOTIFY.
    client
        .execute(
            "INSERT INTO stead.instances (id, workflow_name, workflow_version, slot, input, wake_at) \
             VALUES ('quiet-1', 'quiet', 1, stead.slot_for('quiet-1'), '{}', now())",
            &[],
        )
        .await
        .unwrap();
    let done = node.wait_ended("quiet-1").await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    let waited_ms: f64 = client
        .query_one(
            "SELECT extract(epoch FROM started_at - created_at)::float8 * 1000 \
             FROM stead.instances WHERE id = 'quiet-1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    println!("found by polling {waited_ms:.0}ms after it was created (poll interval {POLL_INTERVAL_MS}ms)");
    // One interval (plus its 10% jitter) is the guarantee; the slack is for
    // a loaded machine, in intervals, not seconds.
    assert!(
        waited_ms <= 3.0 * POLL_INTERVAL_MS as f64,
        "unannounced work waited {waited_ms:.0}ms, more than a poll interval of {POLL_INTERVAL_MS}ms allows"
    );
    node.shutdown().await;
}

/// A durable timer is a row: a sleep that spans a PostgreSQL restart fires
/// after it, never before its time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_survives_a_postgres_restart_and_fires_on_time() {
    let pg = PrivatePg::start().await;
    let node = TestNode::start_with(TestNode::config_for(&pg.url, "timers")).await;
    node.put_workflow(
        "nap",
        json!({"steps": [{"id": "nap", "sleep": "3s"}, {"id": "after", "value": "woke"}]}),
    )
    .await;
    let id = node.start_instance("nap", json!({})).await;
    let probe = Probe::new(&pg.url);
    let p = &probe;
    wait_until("the sleep is waiting", SANITY_LIMIT, || async move {
        p.query(
            "SELECT 1 FROM stead.steps WHERE step_id = 'nap' AND status = 'waiting'",
            &[],
        )
        .await
        .is_ok_and(|r| !r.is_empty())
    })
    .await;
    pg.restart("immediate").await;
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(done["output"]["after"], "woke");
    let slept: f64 = probe
        .query(
            "SELECT extract(epoch FROM ended_at - started_at)::float8 \
             FROM stead.steps WHERE step_id = 'nap'",
            &[],
        )
        .await
        .unwrap()[0]
        .get(0);
    assert!(
        slept >= 3.0,
        "the timer fired after {slept:.2}s of a 3s sleep"
    );
    node.shutdown().await;
}

/// Claims racing on one queue never hand out the same task: every task is
/// claimed exactly once, each attempt under one lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claimers_get_disjoint_tasks() {
    const TASKS: usize = 200;
    const CLAIMERS: usize = 8;
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "race",
        json!({"steps": [{"id": "work", "task": {"queue": "ext.race", "input": "${input}"}}]}),
    )
    .await;
    for n in 0..TASKS {
        node.start_instance("race", json!(n)).await;
    }
    let client = db.client().await;
    let c = &client;
    let ready = "SELECT count(*) FROM stead.tasks WHERE queue = 'ext.race' AND status = 'ready'";
    wait_until("every task is ready", SANITY_LIMIT, || async move {
        count(c, ready).await == TASKS as i64
    })
    .await;

    let node_ref = &node;
    let claimers = (0..CLAIMERS).map(|w| async move {
        let mut got = Vec::new();
        loop {
            let body = json!({"worker": format!("w{w}"), "max": 10, "lease": "5m"});
            let tasks = claim(node_ref, "ext.race", body).await;
            if tasks.is_empty() {
                return got;
            }
            got.extend(tasks);
        }
    });
    let claimed: Vec<Vec<Value>> = futures::future::join_all(claimers).await;
    let mut by_task: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (w, tasks) in claimed.iter().enumerate() {
        for t in tasks {
            by_task
                .entry(t["task_id"].as_i64().unwrap())
                .or_default()
                .push(w);
        }
    }
    let shared: Vec<_> = by_task.iter().filter(|(_, ws)| ws.len() > 1).collect();
    assert!(
        shared.is_empty(),
        "tasks claimed by more than one claimer: {shared:?}"
    );
    assert_eq!(by_task.len(), TASKS, "every task claimed once");
    let busy = claimed.iter().filter(|t| !t.is_empty()).count();
    assert!(busy > 1, "the claims raced: {busy} claimers got tasks");

    for t in claimed.iter().flatten() {
        let body = json!({"lease_token": t["lease_token"], "output": t["input"]});
        let (status, answer) = task_call(&node, t, "complete", body).await;
        assert_eq!(status, 200, "{answer}");
    }
    let open = "SELECT count(*) FROM stead.instances WHERE status <> 'completed'";
    wait_until("every instance completes", SANITY_LIMIT, || async move {
        count(c, open).await == 0
    })
    .await;
    node.shutdown().await;
}

/// Signals sent around the moment their step starts waiting (before, at,
/// after), while the worker running the instances is killed, are each
/// consumed exactly once, by the step that waits for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_sent_as_their_step_starts_waiting_survive_a_kill() {
    const INSTANCES: usize = 120;
    let db = TestDb::new().await;
    let mut workers = Workers::start(&[("g1", db.url.as_str()), ("g2", db.url.as_str())]).await;
    let (_, api) = workers.targets.up()[0].clone();
    let http = reqwest::Client::new();
    let workflow = json!({"steps": [
        {"id": "work", "task": {"queue": "stead.echo", "input": "${input}"}},
        {"id": "wait", "signal": {"name": "go"}}
    ], "output": "${steps.wait.output}"});
    let put = http.put(format!("{api}/v1/workflows/signalled"));
    assert!(put
        .json(&workflow)
        .send()
        .await
        .unwrap()
        .status()
        .is_success());

    // Start them all, and signal each after a delay of its own: the first
    // ones before their step waits, later ones as it starts, the last after.
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..INSTANCES {
        let id = format!("sig-{i}");
        let start = http
            .post(format!("{api}/v1/workflows/signalled/instances"))
            .json(&json!({"id": id, "input": i}))
            .send()
            .await
            .unwrap();
        assert_eq!(start.status().as_u16(), 201);
        let (http, api) = (http.clone(), api.clone());
        sends.spawn(async move {
            tokio::time::sleep(Duration::from_millis(10 * i as u64)).await;
            let url = format!("{api}/v1/instances/{id}/signals/go");
            let sent = http.post(url).json(&json!({"for": i})).send().await;
            sent.map(|r| r.status().as_u16()).unwrap_or(0)
        });
    }
    // Kill the worker the requests do not go to, half-way through.
    tokio::time::sleep(Duration::from_millis(5 * INSTANCES as u64)).await;
    workers.kill9("g2");
    let mut statuses = BTreeSet::new();
    while let Some(status) = sends.join_next().await {
        statuses.insert(status.unwrap());
    }
    assert_eq!(statuses, BTreeSet::from([202]), "every signal was accepted");

    let probe = Probe::new(&db.url);
    let p = &probe;
    wait_until("every instance completes", SANITY_LIMIT, || async move {
        let rows = p
            .query(
                "SELECT count(*) FROM stead.instances WHERE status <> 'completed'",
                &[],
            )
            .await?;
        (rows[0].get::<_, i64>(0) == 0)
            .then_some(())
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    let wrong = probe
        .query(
            "SELECT id FROM stead.instances \
             WHERE output IS DISTINCT FROM jsonb_build_object('for', input)",
            &[],
        )
        .await
        .unwrap();
    assert!(
        wrong.is_empty(),
        "{} instances got another payload",
        wrong.len()
    );
    let signals = &probe
        .query(
            "SELECT count(*), count(*) FILTER (WHERE consumed_at IS NOT NULL AND consumed_by = 'wait'), \
                    count(DISTINCT instance_id) FROM stead.signals",
            &[],
        )
        .await
        .unwrap()[0];
    let (sent, consumed, instances): (i64, i64, i64) =
        (signals.get(0), signals.get(1), signals.get(2));
    assert_eq!(
        (sent, consumed, instances),
        (INSTANCES as i64, INSTANCES as i64, INSTANCES as i64),
        "one signal per instance, each consumed once by its waiting step"
    );
    let client = db.client().await;
    let completions = "SELECT count(*) FROM stead.events \
                       WHERE type = 'step_completed' AND step_id = 'wait'";
    let taken = count(&client, completions).await;
    assert_eq!(taken, INSTANCES as i64, "each waiting step completed once");
    drop(workers);
}
