//! Crash safety with real processes: `kill -9` a `stead serve` in the middle
//! of a run, with attempts in flight, start another on the same database,
//! and check that every instance completes with each step recorded exactly
//! once and a gapless history, and that the attempts that were in flight ran
//! again, as attempt 2, with the same idempotency key.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fault_harness::Probe;
use crate::hold_server::HoldServer;
use crate::support::check_histories;
use crate::{wait_until, ServeProcess, TestDb};

/// Instances started before the crash.
const INSTANCES: i64 = 800;
/// The instances whose first step's calls are held: in flight at the kill.
const HELD: std::ops::RangeInclusive<i64> = 500..=503;
/// Completed instances at which the first process is killed (once the held
/// attempts are in flight).
const KILL_AFTER: i64 = 20;

const FAST_RECOVERY: &[&str] = &[
    "--lease-ms",
    "1000",
    "--reap-interval-ms",
    "200",
    "--poll-interval-ms",
    "100",
];

/// Three steps carrying `input.n` along, like the echo chain of the fault
/// tests, but the first is an `http` step to `server`: its attempts can be
/// held in flight. The output is `{"n": <input.n>, "at": 3}`.
fn workflow(server: &HoldServer) -> Value {
    json!({
        "steps": [
            {"id": "one", "http": {"method": "POST", "url": format!("{}/one", server.url),
                                   "body": {"n": "${input.n}", "at": 1}}},
            {"id": "two", "task": {"queue": "stead.echo", "input": {"n": "${steps.one.output.n}", "at": 2}}},
            {"id": "three", "task": {"queue": "stead.echo", "input": {"n": "${steps.two.output.n}", "at": 3}}}
        ],
        "output": "${steps.three.output}"
    })
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

async fn completed(client: &tokio_postgres::Client) -> i64 {
    count(
        client,
        "SELECT count(*) FROM stead.instances WHERE status = 'completed'",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_loses_nothing_and_records_each_step_once() {
    let db = TestDb::new().await;
    let server = HoldServer::start().await;
    // The calls of a few instances are held: the kill finds the first
    // process with them in flight, while the others go on.
    server.hold_where(|body| body["n"].as_i64().is_some_and(|n| HELD.contains(&n)));
    let t0 = Instant::now();
    let mut first = ServeProcess::spawn(&db.url, "a", FAST_RECOVERY).await;

    let http = reqwest::Client::new();
    let resp = http
        .put(format!("{}/v1/workflows/crash", first.base_url))
        .json(&workflow(&server))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201, "{:?}", resp.text().await);

    // All starts commit at once, straight from SQL.
    let client = db.client().await;
    let started = client
        .query(
            "SELECT stead.start_workflow('crash', jsonb_build_object('n', g), 'crash-' || g) \
             FROM generate_series(1, $1::int) g",
            &[&(INSTANCES as i32)],
        )
        .await
        .unwrap();
    assert_eq!(started.len() as i64, INSTANCES);

    let c = &client;
    wait_until(
        "some instances complete on the first process",
        Duration::from_secs(60),
        || async move { completed(c).await >= KILL_AFTER },
    )
    .await;
    let s = &server;
    wait_until(
        "the first process has the held attempts in flight",
        Duration::from_secs(60),
        || async move { s.waiting() == HELD.count() },
    )
    .await;
    tokio::task::block_in_place(|| first.kill9());
    let t_kill = t0.elapsed();
    // The process is gone: nothing changes any more until the next starts.
    let at_kill = completed(&client).await;
    let leased = count(
        &client,
        "SELECT count(*) FROM stead.tasks WHERE status = 'leased' AND queue = 'stead.http'",
    )
    .await;
    let mut in_flight: Vec<i64> = server
        .seen()
        .iter()
        .filter(|s| s.held)
        .map(|s| s.body["n"].as_i64().expect("n in the body"))
        .collect();
    in_flight.sort_unstable();
    eprintln!(
        "killed the first process after {t_kill:?} with {at_kill}/{INSTANCES} completed, \
         {leased} http attempts leased, {} held at the server",
        in_flight.len()
    );
    assert!(
        (KILL_AFTER..INSTANCES).contains(&at_kill),
        "the kill must land mid-run: {at_kill}/{INSTANCES} were completed"
    );
    assert_eq!(
        in_flight,
        HELD.collect::<Vec<_>>(),
        "the kill leaves the held attempts in flight"
    );
    assert!(
        leased as usize >= in_flight.len(),
        "the attempts in flight are leased: {leased} leased, {in_flight:?} held"
    );

    server.release();
    let second = ServeProcess::spawn(&db.url, "b", FAST_RECOVERY).await;
    wait_until(
        "every instance completes on the second process",
        Duration::from_secs(120),
        || async move { completed(c).await == INSTANCES },
    )
    .await;
    eprintln!("all completed after {:?}", t0.elapsed());

    // Every instance ended completed, with its own output.
    let rows = client
        .query(
            "SELECT id, status, output FROM stead.instances ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len() as i64, INSTANCES);
    for row in &rows {
        let id: String = row.get(0);
        let n: i64 = id.strip_prefix("crash-").unwrap().parse().unwrap();
        assert_eq!(row.get::<_, String>(1), "completed", "{id}");
        assert_eq!(
            row.get::<_, serde_json::Value>(2),
            json!({"n": n, "at": 3}),
            "{id}"
        );
    }

    // The attempts in flight at the kill ran again as attempt 2, with the
    // same idempotency key, and step one completed at attempt 2.
    let mut keys: BTreeMap<i64, Vec<Option<String>>> = BTreeMap::new();
    for seen in server.seen() {
        keys.entry(seen.body["n"].as_i64().unwrap())
            .or_default()
            .push(seen.key);
    }
    for n in &in_flight {
        let expected = Some(format!("crash-{n}:one"));
        let calls = &keys[n];
        assert!(
            calls.len() >= 2 && calls.iter().all(|k| *k == expected),
            "crash-{n}: its step was called again with the same key {expected:?}: {calls:?}"
        );
        let attempt: i32 = client
            .query_one(
                "SELECT attempt FROM stead.events WHERE instance_id = $1 \
                 AND step_id = 'one' AND type = 'step_completed'",
                &[&format!("crash-{n}")],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(attempt, 2, "crash-{n}: step one completed at attempt 2");
    }

    // Each step's result was recorded exactly once, every instance has
    // three step completions and one instance completion, every history is
    // numbered 1..n with no gap or duplicate (and the instance row agrees
    // with it), and no work is left behind.
    check_histories(&Probe::new(&db.url), 3).await;

    // The second process stops cleanly.
    second.signal(libc::SIGTERM);
    let status = second.wait_exit_async(Duration::from_secs(60)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "the second process stops on SIGTERM: {status:?}"
    );
}
