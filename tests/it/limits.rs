//! Limits on what one instance may cost, each at and one past its edge: an
//! instance's input and a signal's payload (413 naming the limit), a step's
//! output from an in-process handler or a `value` step (the step fails with
//! a permanent `limit` error) and from an external worker (413), and the
//! element count of a `for_each`.

use serde_json::{json, Value};
use stead::{Handlers, TaskContext};

use crate::support::{claim, step};
use crate::{pretty, TestDb, TestNode};

/// 100 bytes of JSON: a string of 98 characters.
fn text_of_json_len(len: usize) -> Value {
    json!("x".repeat(len - 2))
}

async fn small_limits_node(db: &TestDb) -> TestNode {
    let mut config = TestNode::config(db);
    config.limits.max_input_bytes = 100;
    config.limits.max_signal_payload_bytes = 100;
    config.limits.max_step_output_bytes = 100;
    config.limits.max_for_each_items = 3;
    let mut handlers = Handlers::default();
    // Returns its input as its output.
    handlers.register(
        "limits.echo",
        |task: TaskContext| async move { Ok(task.input) },
    );
    config.handlers = handlers;
    TestNode::start_with(config).await
}

fn assert_too_large(status: u16, body: &Value, path: &str, flag: &str) {
    assert_eq!(status, 413, "{}", pretty(body));
    assert_eq!(body["type"], "urn:stead:problem:limit");
    assert_eq!(body["errors"][0]["path"], path, "{}", pretty(body));
    assert!(
        body["detail"].as_str().unwrap().contains(flag),
        "{}",
        pretty(body)
    );
}

#[tokio::test]
async fn inputs_and_signal_payloads_past_their_limit_are_refused_with_413() {
    let db = TestDb::new().await;
    let node = small_limits_node(&db).await;
    node.put_workflow(
        "w",
        json!({"steps": [{"id": "s", "signal": {"name": "go"}}]}),
    )
    .await;
    let at = text_of_json_len(100);
    let past = text_of_json_len(101);
    let start = |id: &str, input: &Value| json!({"id": id, "input": input});
    let path = "/v1/workflows/w/instances";
    let (status, body) = node.call("POST", path, Some(start("at", &at))).await;
    assert_eq!(status, 201, "{}", pretty(&body));
    let (status, body) = node.call("POST", path, Some(start("past", &past))).await;
    assert_too_large(status, &body, "$.input", "--max-input-bytes");
    let batch = json!({"items": [{"input": at}, {"input": past}]});
    let (status, body) = node
        .call("POST", "/v1/workflows/w/instances/batch", Some(batch))
        .await;
    assert_too_large(status, &body, "$.items[1].input", "--max-input-bytes");

    let signal = "/v1/instances/at/signals/other";
    let (status, body) = node.call("POST", signal, Some(past)).await;
    assert_too_large(status, &body, "body", "--max-signal-payload-bytes");
    let (status, body) = node.call("POST", signal, Some(at)).await;
    assert_eq!(status, 202, "{}", pretty(&body));
    let (_, listed) = node.call("GET", "/v1/instances", None).await;
    assert_eq!(
        listed["instances"].as_array().unwrap().len(),
        1,
        "nothing past a limit started"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_step_output_past_its_limit_fails_the_step_with_a_limit_error() {
    let db = TestDb::new().await;
    let node = small_limits_node(&db).await;
    node.put_workflow(
        "handled",
        json!({"steps": [{"id": "a", "task": {"queue": "limits.echo", "input": "${input}"},
                          "retry": {"max_attempts": 3}}]}),
    )
    .await;
    node.put_workflow(
        "valued",
        json!({"steps": [{"id": "a", "value": ["${input}"]}]}),
    )
    .await;
    // Both take 100 bytes of input; the value step wraps it in [...].
    let input = text_of_json_len(100);
    let at = node.start_instance("handled", input.clone()).await;
    assert_eq!(node.wait_ended(&at).await["status"], "completed");
    let id = node.start_instance("valued", input.clone()).await;
    let ended = node.wait_ended(&id).await;
    assert_eq!(ended["status"], "failed", "{}", pretty(&ended));
    let error = &step(&ended, "a")["error"];
    assert_eq!(
        error["limit"],
        "max_step_output_bytes",
        "{}",
        pretty(&ended)
    );
    assert_eq!(error["retryable"], false);
    // Past the limit from a handler: 100 bytes in, 102 bytes out.
    node.put_workflow(
        "handled_past",
        json!({"steps": [{"id": "a", "task": {"queue": "limits.echo", "input": ["${input}"]},
                          "retry": {"max_attempts": 3}}]}),
    )
    .await;
    let id = node.start_instance("handled_past", input).await;
    let ended = node.wait_ended(&id).await;
    assert_eq!(ended["status"], "failed", "{}", pretty(&ended));
    assert_eq!(step(&ended, "a")["attempt"], 1, "a limit is not retried");
    assert_eq!(step(&ended, "a")["error"]["limit"], "max_step_output_bytes");
    node.shutdown().await;
}

#[tokio::test]
async fn an_external_result_past_the_limit_is_refused_and_the_task_stays_leased() {
    let db = TestDb::new().await;
    let node = small_limits_node(&db).await;
    node.put_workflow(
        "ext",
        json!({"steps": [{"id": "a", "task": {"queue": "limits.ext"}}]}),
    )
    .await;
    let id = node.start_instance("ext", json!(null)).await;
    let tasks = claim(&node, "limits.ext", json!({"worker": "w", "wait": "10s"})).await;
    let task = &tasks[0];
    let path = format!("/v1/tasks/{}/complete", task["task_id"]);
    let body = json!({"lease_token": task["lease_token"], "output": text_of_json_len(101)});
    let (status, answer) = node.call("POST", &path, Some(body)).await;
    assert_too_large(status, &answer, "$.output", "--max-step-output-bytes");
    let results = json!({"results": [{"task_id": task["task_id"], "lease_token": task["lease_token"],
                                      "output": text_of_json_len(101)}]});
    let (status, answer) = node.call("POST", "/v1/tasks/results", Some(results)).await;
    assert_too_large(
        status,
        &answer,
        "$.results[0].output",
        "--max-step-output-bytes",
    );
    let body = json!({"lease_token": task["lease_token"], "output": text_of_json_len(100)});
    let (status, answer) = node.call("POST", &path, Some(body)).await;
    assert_eq!(status, 200, "at the limit: {}", pretty(&answer));
    assert_eq!(node.wait_ended(&id).await["status"], "completed");
    node.shutdown().await;
}

#[tokio::test]
async fn a_for_each_past_its_element_limit_fails_with_a_limit_error() {
    let db = TestDb::new().await;
    let node = small_limits_node(&db).await;
    node.put_workflow(
        "each",
        json!({"steps": [{"id": "a", "for_each": "${input}", "value": "${item}"}]}),
    )
    .await;
    let at = node.start_instance("each", json!([1, 2, 3])).await;
    assert_eq!(node.wait_ended(&at).await["status"], "completed");
    let past = node.start_instance("each", json!([1, 2, 3, 4])).await;
    let ended = node.wait_ended(&past).await;
    assert_eq!(ended["status"], "failed", "{}", pretty(&ended));
    assert_eq!(step(&ended, "a")["error"]["limit"], "max_for_each_items");
    node.shutdown().await;
}
