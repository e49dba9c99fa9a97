//! `stead bench` against a running node reports what it measured.

use crate::{TestDb, TestNode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_throughput_and_latency() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    let url = node.url.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_stead"))
            .args([
                "bench",
                "--server",
                &url,
                "--instances",
                "40",
                "--steps",
                "2",
            ])
            .args(["--concurrency", "8"])
            .output()
            .expect("running stead bench")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "stead bench failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for needle in [
        "40 instances x 2 steps",
        "concurrency 8",
        "submitted",
        "completed",
        "40 completed, 0 failed",
        "steps",
        "p50",
        "p90",
        "p99",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    // The instances it reports are really there, completed.
    let n: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM stead.instances WHERE workflow_name LIKE 'bench_2_%' AND status = 'completed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 40);
    node.shutdown().await;
}

/// `stead bench --prefill` reports the side-by-side figures of every run
/// (warm: after a first drained round), and the idle latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_bench_reports_drain_rates_per_step_costs_and_idle_latency() {
    let db = TestDb::new().await;
    let url = db.url.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_stead"))
            .args(["bench", "--prefill", "--database-url", &url, "--warm"])
            .args(["--instances", "50", "--steps", "2", "--runs", "2"])
            .args(["--latency-samples", "5", "--enqueue", "http"])
            .output()
            .expect("running stead bench --prefill")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "stead bench --prefill failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for needle in [
        "50 instances x 2 no-op steps, warm, enqueue by Http",
        "  run 1: enqueue",
        "  run 2: enqueue",
        "median of 2",
        "RESULT stead steps=2 n=50 mode=warm external_workers=0 wf_per_s=",
        "row_writes_per_step=",
        "idle latency over 5 samples",
        "RESULT stead latency start_p50_ms=",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    // It cleans up after itself.
    let schemas: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'stead_bench'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(schemas, 0);
}

/// `stead bench --prefill --external-workers N` runs the steps through N
/// workers over HTTP (no node handles their queue): the drain ends only if
/// they claim and complete every task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_bench_drains_through_external_http_workers() {
    let db = TestDb::new().await;
    let url = db.url.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_stead"))
            .args(["bench", "--prefill", "--database-url", &url])
            .args([
                "--instances",
                "60",
                "--steps",
                "2",
                "--latency-samples",
                "0",
            ])
            .args(["--external-workers", "3", "--claim-max", "7"])
            .output()
            .expect("running stead bench --prefill --external-workers")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "stead bench --prefill --external-workers failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let needle = "RESULT stead steps=2 n=60 mode=cold external_workers=3 wf_per_s=";
    assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
}
