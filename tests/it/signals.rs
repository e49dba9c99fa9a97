//! Signals: buffered until a step waits for them, consumed by `signal`
//! steps (output = payload), timeouts, delivery over HTTP and from SQL
//! (inside the caller's transaction), and the errors for unknown and ended
//! instances.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use stead::Handlers;

use crate::support::{start_with_id, step, time, Gate};
use crate::{pretty, wait_until, TestDb, TestNode};

/// POST with a raw body; returns (status, content type, JSON body).
async fn post_raw(node: &TestNode, path: &str, body: &str) -> (u16, String, Value) {
    let resp = node
        .http
        .post(format!("{}{path}", node.url))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let text = resp.text().await.unwrap();
    (
        status,
        ctype,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn signal_rows(
    client: &tokio_postgres::Client,
    id: &str,
) -> Vec<(String, Value, Option<String>)> {
    client
        .query(
            "SELECT name, payload, consumed_by FROM stead.signals WHERE instance_id = $1 ORDER BY id",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// A workflow whose `approval` signal step comes after a task held by a
/// gate.
async fn put_gated_approval(node: &TestNode, name: &str, signal: &str) {
    node.put_workflow(
        name,
        json!({
            "steps": [
                {"id": "hold", "task": {"queue": "hold", "input": "held"}},
                {"id": "approval", "signal": {"name": signal}}
            ],
            "output": "${steps.approval.output}"
        }),
    )
    .await;
}

/// A signal sent over HTTP while the instance is still busy with an earlier
/// step is buffered (202), and consumed by the `signal` step once it is
/// reached: the step's output is the payload. A signal of another name is
/// left alone.
#[tokio::test]
async fn signal_sent_before_the_step_waits_is_buffered_then_consumed() {
    let db = TestDb::new().await;
    let gate = Arc::new(Gate::default());
    let mut handlers = Handlers::default();
    gate.register(&mut handlers, "hold");
    let node = TestNode::start_with_handlers(&db, handlers).await;
    put_gated_approval(&node, "approve_http", "approved").await;
    start_with_id(&node, "approve_http", "sig-early", json!({})).await;
    gate.wait_entered(1).await;
    node.wait_step("sig-early", "hold", "running").await;

    let payload = json!({"approved_by": "alice", "amount": 42});
    let (status, ctype, body) = post_raw(
        &node,
        "/v1/instances/sig-early/signals/approved",
        &payload.to_string(),
    )
    .await;
    assert_eq!(status, 202, "{ctype} {body}");
    let (status, _, body) = post_raw(
        &node,
        "/v1/instances/sig-early/signals/unrelated",
        r#"{"x": 1}"#,
    )
    .await;
    assert_eq!(status, 202, "{body}");

    // Buffered: stored, not consumed, and the signal step has not run.
    let client = db.client().await;
    assert_eq!(
        signal_rows(&client, "sig-early").await,
        vec![
            ("approved".to_string(), payload.clone(), None),
            ("unrelated".to_string(), json!({"x": 1}), None)
        ]
    );
    let (_, now) = node.call("GET", "/v1/instances/sig-early", None).await;
    assert_eq!(
        step(&now, "approval")["status"],
        "pending",
        "{}",
        pretty(&now)
    );
    assert_eq!(now["status"], "running", "{}", pretty(&now));

    gate.open();
    let done = node.wait_ended("sig-early").await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(done["output"], payload);
    let s = step(&done, "approval");
    assert_eq!(s["status"], "completed");
    assert_eq!(s["output"], payload);
    assert_eq!(
        signal_rows(&client, "sig-early").await,
        vec![
            (
                "approved".to_string(),
                payload.clone(),
                Some("approval".to_string())
            ),
            ("unrelated".to_string(), json!({"x": 1}), None)
        ]
    );
    let history = node.history("sig-early").await;
    let completed: Vec<&Value> = history
        .iter()
        .filter(|e| e["type"] == "step_completed" && e["step_id"] == "approval")
        .collect();
    assert_eq!(
        completed.len(),
        1,
        "{}",
        pretty(&Value::Array(history.clone()))
    );
    assert_eq!(completed[0]["data"]["signal"], "approved");
    assert_eq!(completed[0]["data"]["output"], payload);
    node.shutdown().await;
}

/// `stead.signal(id, name, payload)` from SQL: inside a transaction that
/// rolls back it has no effect (neither before the step waits nor while
/// it waits); committed, it is consumed by the waiting step.
#[tokio::test]
async fn sql_signal_works_and_a_rolled_back_one_never_existed() {
    let db = TestDb::new().await;
    let gate = Arc::new(Gate::default());
    let mut handlers = Handlers::default();
    gate.register(&mut handlers, "hold");
    let node = TestNode::start_with_handlers(&db, handlers).await;
    put_gated_approval(&node, "approve_sql", "go").await;
    start_with_id(&node, "approve_sql", "sig-sql", json!({})).await;
    gate.wait_entered(1).await;

    let mut client = db.client().await;
    // Rolled back while the instance is busy with the earlier step.
    {
        let tx = client.transaction().await.unwrap();
        tx.execute(
            "SELECT stead.signal($1, 'go', $2::jsonb)",
            &[&"sig-sql", &json!({"n": "rolled back before"})],
        )
        .await
        .unwrap();
        let seen: i64 = tx
            .query_one(
                "SELECT count(*) FROM stead.signals WHERE instance_id = 'sig-sql'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(seen, 1, "the signal is visible inside its transaction");
        tx.rollback().await.unwrap();
    }
    assert!(signal_rows(&client, "sig-sql").await.is_empty());

    gate.open();
    let c = &client;
    wait_until(
        "the signal step waits",
        Duration::from_secs(10),
        || async move {
            c.query_opt(
                "SELECT 1 FROM stead.waiting_steps WHERE instance_id = 'sig-sql' AND step_id = 'approval'",
                &[],
            )
            .await
            .unwrap()
            .is_some()
        },
    )
    .await;

    // Rolled back while the step waits.
    {
        let tx = client.transaction().await.unwrap();
        tx.execute(
            "SELECT stead.signal('sig-sql', 'go', '{\"n\": \"rolled back while waiting\"}')",
            &[],
        )
        .await
        .unwrap();
        tx.rollback().await.unwrap();
    }
    assert!(signal_rows(&client, "sig-sql").await.is_empty());
    let (_, now) = node.call("GET", "/v1/instances/sig-sql", None).await;
    assert_eq!(
        step(&now, "approval")["status"],
        "waiting",
        "{}",
        pretty(&now)
    );

    // Committed (inside a transaction that does other work too).
    {
        let tx = client.transaction().await.unwrap();
        tx.execute(
            "SELECT stead.signal($1, 'go', $2::jsonb)",
            &[&"sig-sql", &json!({"n": "committed"})],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
    let done = node.wait_ended("sig-sql").await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(done["output"], json!({"n": "committed"}));
    assert_eq!(
        signal_rows(&client, "sig-sql").await,
        vec![(
            "go".to_string(),
            json!({"n": "committed"}),
            Some("approval".to_string())
        )]
    );
    node.shutdown().await;
}

/// A signal step with a 1 s timeout and no signal fails (not before 1 s),
/// and so does the instance, with an error that says it timed out.
#[tokio::test]
async fn signal_timeout_fails_the_step_and_the_instance() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "impatient",
        json!({
            "steps": [
                {"id": "wait", "signal": {"name": "never_sent", "timeout": "1s"}},
                {"id": "after", "value": 1}
            ]
        }),
    )
    .await;
    let id = node.start_instance("impatient", json!({})).await;
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "failed", "{}", pretty(&done));
    let s = step(&done, "wait");
    assert_eq!(s["status"], "failed", "{}", pretty(&done));
    let step_message = s["error"]["message"].as_str().unwrap_or_default();
    assert!(
        step_message.contains("timed out"),
        "step error: {}",
        pretty(&done)
    );
    let message = done["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("timed out"),
        "instance error: {}",
        pretty(&done)
    );
    assert_eq!(done["error"]["step"], "wait", "{}", pretty(&done));
    assert_eq!(step(&done, "after")["status"], "pending");
    let waited = time(&s["ended_at"], "ended_at") - time(&s["started_at"], "started_at");
    assert!(
        waited >= chrono::Duration::milliseconds(1000),
        "timed out after {}ms",
        waited.num_milliseconds()
    );
    let history = node.history(&id).await;
    assert!(
        history
            .iter()
            .any(|e| e["type"] == "step_failed" && e["step_id"] == "wait"),
        "{}",
        pretty(&Value::Array(history.clone()))
    );
    assert_eq!(history.last().unwrap()["type"], "instance_failed");
    node.shutdown().await;
}

/// Signals to an unknown instance are 404 problems, to an ended one 409
/// problems, over HTTP; from SQL they raise ST404 / ST409. Nothing is
/// stored.
#[tokio::test]
async fn signal_to_unknown_or_ended_instance_is_refused() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow("quick", json!({"steps": [{"id": "a", "value": 1}]}))
        .await;
    start_with_id(&node, "quick", "sig-ended", json!({})).await;
    let done = node.wait_ended("sig-ended").await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));

    let (status, ctype, body) = post_raw(&node, "/v1/instances/sig-nobody/signals/go", "{}").await;
    assert_eq!(status, 404, "{body}");
    assert!(ctype.starts_with("application/problem+json"), "{ctype}");
    assert_eq!(body["status"], 404, "{}", pretty(&body));

    let (status, ctype, body) = post_raw(
        &node,
        "/v1/instances/sig-ended/signals/go",
        r#"{"late": true}"#,
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(ctype.starts_with("application/problem+json"), "{ctype}");
    assert_eq!(body["status"], 409, "{}", pretty(&body));

    let client = db.client().await;
    for (id, code) in [("sig-nobody", "ST404"), ("sig-ended", "ST409")] {
        let err = client
            .execute("SELECT stead.signal($1, 'go', '{}'::jsonb)", &[&id])
            .await
            .expect_err("stead.signal must refuse");
        assert_eq!(
            err.code().map(|c| c.code()),
            Some(code),
            "stead.signal({id}): {err:?}"
        );
    }
    let stored: i64 = client
        .query_one("SELECT count(*) FROM stead.signals", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0);
    let after = node.wait_ended("sig-ended").await;
    assert_eq!(after["status"], "completed");
    node.shutdown().await;
}

/// A signal sent from SQL in the very transaction that starts the instance
/// (so before the engine ever saw it) is buffered and consumed.
#[tokio::test]
async fn signal_in_the_starting_transaction_is_not_lost() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "approve_at_once",
        json!({
            "steps": [{"id": "approval", "signal": {"name": "approved", "timeout": "30s"}}],
            "output": "${steps.approval.output}"
        }),
    )
    .await;
    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    let id: String = tx
        .query_one(
            "SELECT stead.start_workflow('approve_at_once', '{}'::jsonb, 'sig-same-tx')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(id, "sig-same-tx");
    tx.execute(
        "SELECT stead.signal('sig-same-tx', 'approved', '{\"by\": \"sql\"}'::jsonb)",
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let done = node.wait_ended("sig-same-tx").await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(done["output"], json!({"by": "sql"}));
    node.shutdown().await;
}
