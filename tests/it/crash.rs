//! Crash safety with real processes: `kill -9` a `stead serve` in the middle
//! of a run, start another on the same database, and check that every
//! instance completes with each step recorded exactly once and a gapless
//! history.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::fault_harness::Probe;
use crate::support::{check_histories, echo_chain_workflow};
use crate::{wait_until, ServeProcess, TestDb};

/// Instances started before the crash. Enough that the first process is
/// still busy for about a second after its first completions: with every
/// start committed at once the instances advance in lockstep, so completions
/// come in a burst at the end of the run.
const INSTANCES: i64 = 800;
/// Completed instances at which the first process is killed.
const KILL_AFTER: i64 = 20;

const FAST_RECOVERY: &[&str] = &[
    "--lease-ms",
    "1000",
    "--reap-interval-ms",
    "200",
    "--poll-interval-ms",
    "100",
];

async fn completed(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM stead.instances WHERE status = 'completed'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_loses_nothing_and_records_each_step_once() {
    let db = TestDb::new().await;
    let t0 = Instant::now();
    // The first process works slowly (two attempts at a time), so that the
    // kill lands in the middle of the run.
    let mut slow: Vec<&str> = FAST_RECOVERY.to_vec();
    slow.extend(["--worker-concurrency", "2"]);
    let mut first = ServeProcess::spawn(&db.url, "a", &slow).await;

    let http = reqwest::Client::new();
    let resp = http
        .put(format!("{}/v1/workflows/crash", first.base_url))
        .json(&echo_chain_workflow())
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
        Duration::from_secs(30),
        || async move { completed(c).await >= KILL_AFTER },
    )
    .await;
    tokio::task::block_in_place(|| first.kill9());
    let t_kill = t0.elapsed();
    // The process is gone: nothing changes any more until the next starts.
    let at_kill = completed(&client).await;
    let in_flight: i64 = client
        .query_one(
            "SELECT count(*) FROM stead.tasks WHERE status = 'leased'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    eprintln!(
        "killed the first process after {t_kill:?} with {at_kill}/{INSTANCES} completed, \
         {in_flight} tasks leased"
    );
    assert!(
        (KILL_AFTER..INSTANCES).contains(&at_kill),
        "the kill must land mid-run: {at_kill}/{INSTANCES} were completed"
    );

    let second = ServeProcess::spawn(&db.url, "b", FAST_RECOVERY).await;
    wait_until(
        "every instance completes on the second process",
        Duration::from_secs(60),
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

    // Each step's result was recorded exactly once, every instance has
    // three step completions and one instance completion, every history is
    // numbered 1..n with no gap or duplicate (and the instance row agrees
    // with it), and no work is left behind.
    check_histories(&Probe::new(&db.url), 3).await;

    // The second process stops cleanly.
    second.signal(libc::SIGTERM);
    let status = second.wait_exit_async(Duration::from_secs(15)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "the second process stops on SIGTERM: {status:?}"
    );
}
