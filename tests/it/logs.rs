//! `--log-format json`: one JSON object per line on stderr, with the
//! instance and step ids as fields of the events about them.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::{wait_until, ServeProcess, TestDb};

#[tokio::test]
async fn json_logs_carry_instance_and_step_ids_as_fields() {
    let db = TestDb::new().await;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stead"));
    cmd.args([
        "serve",
        "--database-url",
        &db.url,
        "--listen",
        "127.0.0.1:0",
        "--auth",
        "none",
    ])
    .args(["--name", "json-logs", "--log-format", "json"])
    .env("STEAD_LOG", "info,stead=debug");
    let node = ServeProcess::spawn_command(cmd, "json-logs").await;
    let http = reqwest::Client::new();
    let put = http
        .put(format!("{}/v1/workflows/logged", node.base_url))
        .json(&json!({"steps": [
            {"id": "flaky", "task": {"queue": "logs.q"},
             "retry": {"max_attempts": 2, "initial_interval": "10ms"}}
        ]}))
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());
    let started: Value = http
        .post(format!("{}/v1/workflows/logged/instances", node.base_url))
        .json(&json!({"input": {}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = started["id"].as_str().unwrap().to_string();
    // An external worker fails attempt 1 and completes attempt 2.
    for action in ["fail", "complete"] {
        let task = wait_until("a task on logs.q", Duration::from_secs(20), || async {
            let body: Value = http
                .post(format!("{}/v1/queues/logs.q/claim", node.base_url))
                .json(&json!({"worker": "w", "wait": "1s"}))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            body["tasks"].as_array()?.first().cloned()
        })
        .await;
        let body = match action {
            "fail" => json!({"lease_token": task["lease_token"], "error": {"message": "boom"}}),
            _ => json!({"lease_token": task["lease_token"], "output": {}}),
        };
        let resp = http
            .post(format!(
                "{}/v1/tasks/{}/{action}",
                node.base_url, task["task_id"]
            ))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{action}");
    }

    let lines = wait_until(
        "the instance-ended log line",
        Duration::from_secs(20),
        || async {
            let lines: Vec<Value> = node
                .output()
                .lines()
                .filter(|l| l.starts_with('{'))
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
                .collect();
            lines
                .iter()
                .any(|l| l["fields"]["message"] == "instance ended")
                .then_some(lines)
        },
    )
    .await;
    let find = |message: &str| {
        lines
            .iter()
            .find(|l| l["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line in {lines:#?}"))
            .clone()
    };
    let failed = find("step attempt failed");
    assert_eq!(failed["fields"]["instance"], id.as_str());
    assert_eq!(failed["fields"]["step"], "flaky");
    assert_eq!(failed["fields"]["attempt"], 1);
    assert!(failed["level"].is_string() && failed["timestamp"].is_string());
    let ended = find("instance ended");
    assert_eq!(ended["fields"]["instance"], id.as_str());
    assert_eq!(ended["fields"]["workflow"], "logged");
    assert_eq!(ended["fields"]["status"], "completed");
    let joined = find("joined the cluster");
    assert_eq!(joined["fields"]["member"], "json-logs");
}
