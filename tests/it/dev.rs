//! `stead dev`: the embedded default, as a newcomer runs it.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::ClusterDir;
use crate::support::greet_workflow;
use crate::{wait_until, ServeProcess};

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = http.request(method, url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn dev_command(data_dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stead"));
    cmd.args(["dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir);
    cmd
}

/// Stops `stead dev` as Ctrl-C would and checks it exits cleanly.
async fn interrupt(dev: &ServeProcess) {
    dev.signal(libc::SIGINT);
    let status = dev
        .wait_exit_async(Duration::from_secs(60))
        .await
        .expect("stead dev exits after Ctrl-C");
    assert!(
        status.success(),
        "stead dev exited with {status:?}:\n{}",
        dev.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_the_quickstart_and_keeps_its_data() {
    // Stops the PostgreSQL that `stead dev` starts even if this test fails.
    let cluster_dir = ClusterDir::new("dev");
    let data_dir = cluster_dir.path.clone();
    let http = reqwest::Client::new();

    let dev = ServeProcess::spawn_command(dev_command(&data_dir), "dev").await;
    let api = dev.base_url.clone();
    let (status, body) = call(
        &http,
        reqwest::Method::PUT,
        format!("{api}/v1/workflows/greet"),
        Some(greet_workflow()),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = call(
        &http,
        reqwest::Method::POST,
        format!("{api}/v1/workflows/greet/instances"),
        Some(json!({"id": "greet-1", "input": {"name": "world"}})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, done) = call(
        &http,
        reqwest::Method::GET,
        format!("{api}/v1/instances/greet-1?wait=30s"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["output"], json!({"message": "hello world!"}));

    // The printed console opens directly (no key on loopback) and shows it.
    let console = format!("{api}/instances/greet-1");
    let page = http.get(&console).send().await.expect("the console");
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(
        html.contains("data-step=\"shout\" data-status=\"completed\""),
        "{html}"
    );
    assert!(
        dev.output().contains(&format!("console:  {api}/")),
        "{}",
        dev.output()
    );

    // The printed psql command opens the database with the instance in it.
    let psql_line = wait_until(
        "stead dev prints the psql command",
        Duration::from_secs(10),
        || {
            let out = dev.output();
            async move {
                out.lines()
                    .find(|l| l.contains("psql "))
                    .map(str::to_string)
            }
        },
    )
    .await;
    let url = psql_line
        .split_whitespace()
        .find(|w| w.starts_with("postgresql://"))
        .unwrap_or_else(|| panic!("no URL in {psql_line:?}"))
        .to_string();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("the printed database URL works");
    tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT status FROM stead.instance_overview WHERE id = 'greet-1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "completed");
    drop(client);

    // Ctrl-C stops stead and its PostgreSQL.
    interrupt(&dev).await;
    assert!(
        tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .is_err(),
        "PostgreSQL still accepts connections after stead dev stopped"
    );

    // A second `stead dev` reuses the data.
    let dev = ServeProcess::spawn_command(dev_command(&data_dir), "dev-again").await;
    let (status, again) = call(
        &http,
        reqwest::Method::GET,
        format!("{}/v1/instances/greet-1", dev.base_url),
        None,
    )
    .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["status"], "completed");
    interrupt(&dev).await;
}
