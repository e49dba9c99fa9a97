//! Crash safety with real processes: `kill -9` a `stead serve` in the middle
//! of a run, with attempts in flight, start another on the same database,
//! and check that every instance completes with each step recorded exactly
//! once and a gapless history, and that the attempts that were in flight ran
//! again, as attempt 2, with the same idempotency key.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fault_harness::Probe;
use crate::harness::SANITY_LIMIT;
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

/// Registers the `crash` workflow on the node at `base_url`.
async fn put_workflow(base_url: &str, server: &HoldServer) {
    let resp = reqwest::Client::new()
        .put(format!("{base_url}/v1/workflows/crash"))
        .json(&workflow(server))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201, "{:?}", resp.text().await);
}

/// Releases the held calls and starts a second process, `b`; returns it
/// once all `instances` have completed.
async fn recover(db: &TestDb, server: &HoldServer, instances: i64) -> ServeProcess {
    server.release();
    let second = ServeProcess::spawn(&db.url, "b", FAST_RECOVERY).await;
    let client = db.client().await;
    let c = &client;
    wait_until(
        "every instance completes on the second process",
        Duration::from_secs(120),
        || async move { completed(c).await == instances },
    )
    .await;
    second
}

/// Waits until the first process has completed `KILL_AFTER` instances.
async fn wait_some_completed(client: &tokio_postgres::Client) {
    wait_until(
        "some instances complete on the first process",
        SANITY_LIMIT,
        || async move { completed(client).await >= KILL_AFTER },
    )
    .await;
}

/// Waits until `held` calls are held in flight at the server.
async fn wait_held(server: &HoldServer, held: usize) {
    wait_until(
        "the held calls are in flight",
        SANITY_LIMIT,
        || async move { server.waiting() == held },
    )
    .await;
}

/// Waits until at least `n` `http` attempts are leased task rows.
async fn wait_leased(client: &tokio_postgres::Client, n: i64) {
    wait_until(
        "the held calls are leased task rows",
        SANITY_LIMIT,
        || async move { http_leased(client).await >= n },
    )
    .await;
}

async fn http_leased(client: &tokio_postgres::Client) -> i64 {
    count(
        client,
        "SELECT count(*) FROM stead.tasks WHERE status = 'leased' AND queue = 'stead.http'",
    )
    .await
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

    put_workflow(&first.base_url, &server).await;

    // All starts commit at once, straight from SQL.
    let client = db.client().await;
    start_wave(&client, 1, INSTANCES).await;

    wait_some_completed(&client).await;
    wait_held(&server, HELD.count()).await;
    // A held call starts inline, inside its advance batch; the batch hands
    // it to the queue as a leased task row when its inline budget ends.
    wait_leased(&client, HELD.count() as i64).await;
    tokio::task::block_in_place(|| first.kill9());
    let t_kill = t0.elapsed();
    // The process is gone: nothing changes any more until the next starts.
    let at_kill = completed(&client).await;
    let leased = http_leased(&client).await;
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

    let second = recover(&db, &server, INSTANCES).await;
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

/// Instances of the second wave whose `one` calls are held: the first
/// process has them running inline, with nothing of them committed, at the
/// kill.
const HELD_INLINE: std::ops::RangeInclusive<i64> = 1_300..=1_303;

/// A budget far longer than the test needs to kill the process, so the held
/// attempts are still inline (not handed over as task rows) when it dies.
const LONG_INLINE: &[&str] = &[
    "--inline-budget-ms",
    "30000",
    "--idle-in-transaction-timeout-ms",
    "60000",
];

async fn start_wave(client: &tokio_postgres::Client, from: i64, count: i64) {
    let started = client
        .query(
            "SELECT stead.start_workflow('crash', jsonb_build_object('n', g), 'crash-' || g) \
             FROM generate_series($1::int, $2::int) g",
            &[&(from as i32), &((from + count - 1) as i32)],
        )
        .await
        .unwrap();
    assert_eq!(started.len() as i64, count);
}

/// `kill -9` a process while in-process attempts run inline (their results
/// live only in its open advance transaction) under load: every instance
/// completes on the next process, the attempts lost with the transaction
/// run again with the same idempotency key, and no step result is recorded
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_inline_execution_loses_nothing_and_records_each_step_once() {
    let db = TestDb::new().await;
    let server = HoldServer::start().await;
    server.hold_where(|body| body["n"].as_i64().is_some_and(|n| HELD_INLINE.contains(&n)));
    let args: Vec<&str> = FAST_RECOVERY.iter().chain(LONG_INLINE).copied().collect();
    let mut first = ServeProcess::spawn(&db.url, "a", &args).await;
    put_workflow(&first.base_url, &server).await;

    // A first wave runs while the second, with the held calls, arrives.
    let client = db.client().await;
    start_wave(&client, 1, 400).await;
    wait_some_completed(&client).await;
    start_wave(&client, 1_001, 400).await;
    wait_held(&server, HELD_INLINE.count()).await;
    // Inline: the held attempts have no task row and their instances no
    // committed step.
    let held_ids: Vec<String> = HELD_INLINE.map(|n| format!("crash-{n}")).collect();
    let durable: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM stead.tasks WHERE instance_id = ANY($1)) \
                  + (SELECT count(*) FROM stead.steps WHERE instance_id = ANY($1))",
            &[&held_ids],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        durable, 0,
        "the held attempts run inline, nothing of them committed"
    );
    tokio::task::block_in_place(|| first.kill9());
    let at_kill = completed(&client).await;
    eprintln!("killed the first process with {at_kill}/800 completed");
    assert!(
        (KILL_AFTER..800).contains(&at_kill),
        "the kill must land mid-run: {at_kill}/800 were completed"
    );

    let second = recover(&db, &server, 800).await;

    // The held attempts, and the others of their batch, ran again with the
    // same key.
    let mut calls: BTreeMap<i64, Vec<Option<String>>> = BTreeMap::new();
    for seen in server.seen() {
        let n = seen.body["n"].as_i64().unwrap();
        calls.entry(n).or_default().push(seen.key);
    }
    for (n, keys) in &calls {
        let expected = Some(format!("crash-{n}:one"));
        assert!(keys.iter().all(|k| *k == expected), "crash-{n}: {keys:?}");
    }
    let again: Vec<i64> = calls
        .iter()
        .filter(|(_, keys)| keys.len() >= 2)
        .map(|(n, _)| *n)
        .collect();
    for n in HELD_INLINE {
        assert!(again.contains(&n), "crash-{n} ran again after the kill");
    }
    assert!(
        again.len() > HELD_INLINE.count(),
        "the batch lost with the kill ran its other attempts again too: {again:?}"
    );
    let wrong = client
        .query(
            "SELECT id FROM stead.instances \
             WHERE output IS DISTINCT FROM jsonb_build_object('n', input->'n', 'at', 3)",
            &[],
        )
        .await
        .unwrap();
    assert!(
        wrong.is_empty(),
        "{} instances with a wrong output",
        wrong.len()
    );
    check_histories(&Probe::new(&db.url), 3).await;
    drop(second);
}

/// The poison-pill guard. An attempt run inline leaves no trace until its
/// batch commits, so one that kills its process would run again, uncounted,
/// on every member inheriting the slot. A member that takes a slot whose
/// holder died holding it runs the slot's attempts through task rows for a
/// while: the rerun is leased (counted) before it runs, and when it kills
/// that member too, the next one runs it as attempt 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_whose_node_dies_inline_is_counted_on_the_next_one() {
    let db = TestDb::new().await;
    let server = HoldServer::start().await;
    server.hold_where(|body| body["n"] == 1);
    let args: Vec<&str> = FAST_RECOVERY.iter().chain(LONG_INLINE).copied().collect();
    let mut first = ServeProcess::spawn(&db.url, "a", &args).await;
    put_workflow(&first.base_url, &server).await;
    let client = db.client().await;
    start_wave(&client, 1, 1).await;
    let task_rows = || async {
        client
            .query(
                "SELECT status, attempt FROM stead.tasks WHERE instance_id = 'crash-1'",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i32>(1)))
            .collect::<Vec<_>>()
    };

    // On the first member the attempt runs inline: no task row.
    let s = &server;
    let calls = |n: usize| async move { s.seen().len() == n && s.waiting() == 1 };
    wait_until("the first call is in flight", SANITY_LIMIT, || calls(1)).await;
    assert_eq!(task_rows().await, vec![], "the first run is inline");
    tokio::task::block_in_place(|| first.kill9());

    // The next member inherits the slot from a dead holder: the rerun is a
    // leased task row, attempt 1, before the call is made.
    let mut second = ServeProcess::spawn(&db.url, "b", &args).await;
    wait_until("the second call is in flight", SANITY_LIMIT, || calls(2)).await;
    assert_eq!(task_rows().await, vec![("leased".to_string(), 1)]);
    tokio::task::block_in_place(|| second.kill9());

    // Its lease expires on the third member, which runs attempt 2.
    server.release();
    let third = ServeProcess::spawn(&db.url, "c", FAST_RECOVERY).await;
    let c = &client;
    wait_until("the instance completes", SANITY_LIMIT, || async move {
        completed(c).await == 1
    })
    .await;
    let attempt: i32 = client
        .query_one(
            "SELECT attempt FROM stead.events WHERE instance_id = 'crash-1' \
             AND step_id = 'one' AND type = 'step_completed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        attempt, 2,
        "the attempt that died on the second member counted"
    );
    check_histories(&Probe::new(&db.url), 3).await;
    drop(third);
}
