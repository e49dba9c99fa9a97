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
