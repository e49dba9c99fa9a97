//! Limits on what one instance may cost, each at and one past its edge: an
//! instance's input and a signal's payload (413 naming the limit), a step's
//! output from an in-process handler or a `value` step (the step fails with
//! a permanent `limit` error) and from an external worker (413), the
//! element count of a `for_each`, everything one instance stores and its
//! history length; and the instance of the issue (1000 steps copying 500 kB)
//! against a real process's memory.

use serde_json::{json, Value};
use stead::{Handlers, TaskContext};

use crate::harness::SANITY_LIMIT;
use crate::support::{claim, step};
use crate::{pretty, wait_until, ServeProcess, TestDb, TestNode};

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

/// 500 kB of JSON as a client would send it: an order of 2,900 lines of
/// about 200 bytes.
fn order_of_500_kb() -> Value {
    let lines: Vec<Value> = (0..2_900)
        .map(|i| {
            json!({"line": i, "sku": format!("SKU-{i:08}"), "qty": i % 7 + 1,
                   "name": format!("Replacement part number {i} for the model 7 unit"),
                   "price": format!("{}.{:02}", i % 500, i % 100),
                   "note": "ship with the rest of the order, not on its own"})
        })
        .collect();
    let order = json!({"customer": "c-42", "lines": lines});
    let len = serde_json::to_string(&order).unwrap().len();
    assert!((450_000..560_000).contains(&len), "{len}");
    order
}

/// 500 kB of JSON in the shape that costs most memory once parsed: 14,000
/// tiny objects.
fn tiny_objects_of_500_kb() -> Value {
    let lines: Vec<Value> = (0..14_000)
        .map(|i| json!({"n": i, "sku": format!("S{i:06}"), "qty": i % 7}))
        .collect();
    let order = json!({"lines": lines});
    let len = serde_json::to_string(&order).unwrap().len();
    assert!((450_000..560_000).contains(&len), "{len}");
    order
}

/// Starts an instance of `workflow` on the node at `base`.
async fn start(http: &reqwest::Client, base: &str, workflow: &str, id: String, input: Value) {
    let resp = http
        .post(format!("{base}/v1/workflows/{workflow}/instances"))
        .json(&json!({"id": id, "input": input}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
}

/// The peak resident memory of process `pid` (`VmHWM`), in MB.
fn peak_rss_mb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb / 1024
}

/// The instance of the issue: 1000 parallel `value` steps, each copying a
/// 500 kB input, once drove a node to 7.6 GB and starved every other
/// instance. It must now end `failed` on `--max-instance-bytes` (32 MiB by
/// default) while the node stays under 512 MB resident, and other
/// instances must keep completing while it runs: the advancer moves it on
/// in batches of at most `--advance-batch-max-bytes`, between theirs.
/// (An order document, and the same size of tiny objects.)
#[tokio::test]
async fn an_instance_of_1000_steps_copying_500_kb_fails_on_its_limit_while_others_complete() {
    one_big_instance_among_small_ones(order_of_500_kb()).await;
}

#[tokio::test]
async fn the_same_with_500_kb_of_tiny_objects_stays_under_512_mb_too() {
    one_big_instance_among_small_ones(tiny_objects_of_500_kb()).await;
}

async fn one_big_instance_among_small_ones(input: Value) {
    let db = TestDb::new().await;
    let node = ServeProcess::spawn(&db.url, "big", &[]).await;
    let http = reqwest::Client::new();
    let url = |path: &str| format!("{}{path}", node.base_url);
    let steps: Vec<Value> = (0..1000)
        .map(|n| json!({"id": format!("copy{n}"), "value": "${input}"}))
        .collect();
    for (name, doc) in [
        ("big", json!({"steps": steps})),
        (
            "small",
            json!({"steps": [{"id": "v", "value": "${input.n}"}]}),
        ),
    ] {
        let resp = http
            .put(url(&format!("/v1/workflows/{name}")))
            .json(&doc)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    }
    let base = node.base_url.clone();
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE FUNCTION pg_temp.ms(interval) RETURNS float8
             LANGUAGE sql AS 'SELECT extract(epoch FROM $1) * 1000'",
        )
        .await
        .unwrap();
    let count = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };

    // Small instances all along, at a steady pace.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pacer = {
        let (stop, http, base) = (stop.clone(), http.clone(), base.clone());
        async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                start(&http, &base, "small", format!("small-{n}"), json!({"n": n})).await;
                n += 1;
            }
            n
        }
    };
    let pacer = tokio::spawn(pacer);
    let done_small = "SELECT count(*) FROM stead.instances
                      WHERE workflow_name = 'small' AND status = 'completed'";
    wait_until("small instances to run", SANITY_LIMIT, || async {
        count(done_small).await >= 20
    })
    .await;

    start(&http, &base, "big", "big".into(), input).await;
    wait_until("the big instance to end", 3 * SANITY_LIMIT, || async {
        count("SELECT count(*) FROM stead.instances WHERE id = 'big' AND ended_at IS NOT NULL")
            .await
            == 1
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let started_small: i64 = pacer.await.unwrap();
    wait_until("every small instance to complete", SANITY_LIMIT, || async {
        count(done_small).await == started_small
    })
    .await;

    let big = client
        .query_one(
            "SELECT status, error, pg_temp.ms(ended_at - created_at), stored_bytes FROM stead.instances
             WHERE id = 'big'",
            &[],
        )
        .await
        .unwrap();
    let (status, error): (String, Value) = (big.get(0), big.get(1));
    assert_eq!(status, "failed", "{}", pretty(&error));
    assert_eq!(
        error["error"]["limit"],
        "max_instance_bytes",
        "{}",
        pretty(&error)
    );
    let peak_mb = peak_rss_mb(node.pid());
    // While the big one ran, small ones completed about as fast as they
    // were started: between its batches, not after all of them.
    let between = client
        .query_one(
            "SELECT count(*) FILTER (WHERE s.created_at BETWEEN b.created_at AND b.ended_at),
                    count(*) FILTER (WHERE s.ended_at BETWEEN b.created_at AND b.ended_at),
                    pg_temp.ms(percentile_disc(0.5) WITHIN GROUP (ORDER BY s.ended_at - s.created_at)
                        FILTER (WHERE s.created_at BETWEEN b.created_at AND b.ended_at))
             FROM stead.instances s, stead.instances b
             WHERE b.id = 'big' AND s.workflow_name = 'small'",
            &[],
        )
        .await
        .unwrap();
    let (started_during, completed_during): (i64, i64) = (between.get(0), between.get(1));
    let before = client
        .query_one(
            "SELECT pg_temp.ms(percentile_disc(0.5) WITHIN GROUP (ORDER BY s.ended_at - s.created_at))
             FROM stead.instances s, stead.instances b
             WHERE b.id = 'big' AND s.workflow_name = 'small' AND s.ended_at < b.created_at",
            &[],
        )
        .await
        .unwrap();
    eprintln!(
        "big: {:.0} ms, stored {} bytes; peak RSS {peak_mb} MB; small: {started_small} started, \
         {started_during} while it ran, {completed_during} completed meanwhile (p50 latency {:?} ms, \
         before it {:?} ms)",
        big.get::<_, f64>(2),
        big.get::<_, i64>(3),
        between.get::<_, Option<f64>>(2),
        before.get::<_, Option<f64>>(0),
    );
    assert!(peak_mb < 512, "peak resident memory {peak_mb} MB");
    assert!(
        completed_during * 2 >= started_during && started_during > 0,
        "small instances waited for the big one: {completed_during} of {started_during} completed"
    );
}

/// Waits until the instance `id` has recorded `events` history events.
async fn wait_events(node: &TestNode, id: &str, events: usize) {
    let path = format!("/v1/instances/{id}/history");
    wait_until("history events", SANITY_LIMIT, || async {
        let (_, body) = node.call("GET", &path, None).await;
        body["events"].as_array().map_or(0, Vec::len) == events
    })
    .await;
}

/// The instance `id` once it has ended.
async fn ended(node: &TestNode, id: &str) -> Value {
    let path = format!("/v1/instances/{id}?wait=30s");
    wait_until("the instance to end", SANITY_LIMIT, || async {
        let (_, body) = node.call("GET", &path, None).await;
        body["ended_at"].is_string().then_some(body)
    })
    .await
}

#[tokio::test]
async fn instance_bytes_and_history_events_past_their_flags_fail_the_instance_naming_them() {
    let db = TestDb::new().await;
    let mut config = TestNode::config(&db);
    // Three copies of a 100-byte input and the output `true`: 304 bytes.
    config.limits.max_instance_bytes = 304;
    config.limits.max_history_events = 3;
    let node = TestNode::start_with(config).await;
    let copies = json!({"output": true, "steps": [
        {"id": "a", "value": "${input}"}, {"id": "b", "value": "${input}", "needs": ["a"]},
        {"id": "c", "value": "${input}", "needs": ["b"]}]});
    node.put_workflow("copies", copies).await;
    let path = "/v1/workflows/copies/instances";
    for (id, len) in [("at", 100), ("past", 101), ("past-c", 102)] {
        let body = json!({"id": id, "input": text_of_json_len(len)});
        assert_eq!(node.call("POST", path, Some(body)).await.0, 201);
    }
    assert_eq!(ended(&node, "at").await["status"], "completed");
    // 3 x 101 fits; the output's 4 bytes are one too many.
    let past = ended(&node, "past").await;
    assert_eq!(past["status"], "failed", "{}", pretty(&past));
    assert_eq!(
        past["error"]["limit"],
        "max_instance_bytes",
        "{}",
        pretty(&past)
    );
    // 3 x 102 does not: step c fails.
    let past = ended(&node, "past-c").await;
    assert_eq!(step(&past, "c")["error"]["limit"], "max_instance_bytes");

    // Two events on starting (started, waiting); two more per signal.
    let one = json!({"steps": [{"id": "s1", "signal": {"name": "go"}}]});
    let two = json!({"steps": [{"id": "s1", "signal": {"name": "go"}},
                               {"id": "s2", "signal": {"name": "go"}, "needs": ["s1"]}]});
    for (name, def) in [("one", one), ("two", two)] {
        node.put_workflow(name, def).await;
        let body = json!({"id": name});
        let start = format!("/v1/workflows/{name}/instances");
        assert_eq!(node.call("POST", &start, Some(body)).await.0, 201);
        wait_events(&node, name, 2).await;
        let signal = format!("/v1/instances/{name}/signals/go");
        assert_eq!(node.call("POST", &signal, None).await.0, 202);
    }
    assert_eq!(
        ended(&node, "one").await["status"],
        "completed",
        "2 events < 3"
    );
    wait_events(&node, "two", 4).await;
    assert_eq!(
        node.call("POST", "/v1/instances/two/signals/go", None)
            .await
            .0,
        202
    );
    let two = ended(&node, "two").await;
    assert_eq!(two["status"], "failed", "4 events >= 3: {}", pretty(&two));
    assert_eq!(two["error"]["limit"], "max_history_events");
    node.shutdown().await;
}
