//! Batch start: over HTTP each item is answered on its own and the good ones
//! start even when others are refused; from SQL it is all or nothing and
//! lives or dies with the caller's transaction; `stead start --batch` sends a
//! JSON Lines file.

use serde_json::{json, Value};

use crate::{pretty, TestDb, TestNode};

const BATCH: &str = "/v1/workflows/echo/instances/batch";

async fn node_with_echo(db: &TestDb) -> TestNode {
    let node = TestNode::start(db).await;
    node.put_workflow(
        "echo",
        json!({"steps": [{"id": "echo", "task": {"queue": "stead.echo", "input": "${input}"}}],
               "output": "${steps.echo.output}"}),
    )
    .await;
    node
}

async fn instance_count(db: &TestDb) -> i64 {
    let client = db.client().await;
    let row = client
        .query_one("SELECT count(*) FROM stead.instances", &[])
        .await
        .unwrap();
    row.get(0)
}

fn outcomes(body: &Value) -> Vec<(String, String)> {
    let results = body["results"].as_array().expect("results");
    results
        .iter()
        .map(|r| {
            let id = r["id"].as_str().unwrap_or_default().to_string();
            (id, r["outcome"].as_str().unwrap().to_string())
        })
        .collect()
}

#[tokio::test]
async fn http_batch_answers_each_item_and_starts_the_good_ones() {
    let db = TestDb::new().await;
    let node = node_with_echo(&db).await;
    crate::support::start_with_id(&node, "echo", "taken", json!(1)).await;

    let items = json!([
        {"id": "b-1", "input": {"n": 1}},
        {"input": {"n": 2}},
        {"id": "taken", "input": 1},
        {"id": "taken", "input": 2},
        {"id": "not valid!", "input": 3},
        {"id": "b-1", "input": {"n": 1}},
        {"id": "b-7"}
    ]);
    let (status, body) = node
        .call("POST", BATCH, Some(json!({"items": items})))
        .await;
    assert_eq!(status, 200, "{}", pretty(&body));
    let got = outcomes(&body);
    let kinds: Vec<&str> = got.iter().map(|(_, o)| o.as_str()).collect();
    assert_eq!(
        kinds,
        ["created", "created", "existing", "conflict", "invalid", "existing", "created"],
        "{}",
        pretty(&body)
    );
    assert_eq!(
        (
            body["created"].clone(),
            body["existing"].clone(),
            body["rejected"].clone()
        ),
        (json!(3), json!(2), json!(2))
    );
    let conflict = &body["results"][3]["problem"];
    assert_eq!(conflict["status"], 409, "{}", pretty(&body));
    let invalid = &body["results"][4]["problem"];
    assert_eq!(
        invalid["errors"][0]["path"],
        "$.items[4].id",
        "{}",
        pretty(&body)
    );

    // The created ones run; the generated id is a real instance.
    for (id, input) in [
        ("b-1", json!({"n": 1})),
        (got[1].0.as_str(), json!({"n": 2})),
        ("b-7", Value::Null),
    ] {
        let done = node.wait_ended(id).await;
        assert_eq!(done["status"], "completed", "{}", pretty(&done));
        assert_eq!(done["output"], input, "{}", pretty(&done));
    }
    // "taken" kept its first input; nothing else was stored.
    assert_eq!(node.wait_ended("taken").await["output"], json!(1));
    assert_eq!(instance_count(&db).await, 4);

    // The same batch again: nothing new, each item answered the same way.
    let (_, again) = node
        .call("POST", BATCH, Some(json!({"items": items})))
        .await;
    let kinds: Vec<String> = outcomes(&again).into_iter().map(|(_, o)| o).collect();
    assert_eq!(kinds[0], "existing");
    assert_eq!(
        kinds[1], "created",
        "an item without id is a new instance each time"
    );
    assert_eq!(
        kinds[2..],
        ["existing", "conflict", "invalid", "existing", "existing"]
    );
    assert_eq!(instance_count(&db).await, 5);
    node.shutdown().await;
}

#[tokio::test]
async fn http_batch_of_the_wrong_shape_or_size_starts_nothing() {
    let db = TestDb::new().await;
    let node = node_with_echo(&db).await;
    let too_many: Vec<Value> = (0..1001).map(|i| json!({"input": i})).collect();
    let cases = [
        (BATCH, json!({"items": too_many}), 422, "$.items"),
        (
            BATCH,
            json!({"items": [{"input": 1}, {"input": 2, "idd": "x"}]}),
            422,
            "$.items[1].idd",
        ),
        (
            BATCH,
            json!({"items": [{"input": 1}], "version": 0}),
            422,
            "$.version",
        ),
        (BATCH, json!({"itemz": []}), 422, "$.itemz"),
        (BATCH, json!({}), 422, "$.items"),
    ];
    for (path, body, want_status, want_field) in cases {
        let (status, problem) = node.call("POST", path, Some(body)).await;
        assert_eq!(status, want_status, "{}", pretty(&problem));
        let fields: Vec<&str> = problem["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["path"].as_str())
            .collect();
        assert!(
            fields.contains(&want_field),
            "{want_field} in {}",
            pretty(&problem)
        );
    }
    let (status, problem) = node
        .call(
            "POST",
            "/v1/workflows/nope/instances/batch",
            Some(json!({"items": [{"input": 1}]})),
        )
        .await;
    assert_eq!(status, 404, "{}", pretty(&problem));
    assert_eq!(instance_count(&db).await, 0, "nothing was started");
    node.shutdown().await;
}

/// Batch starts compute each slot themselves: it must be `slot_for`'s.
async fn assert_slots_are_slot_for(client: &tokio_postgres::Client) {
    let row = client
        .query_one(
            "SELECT count(*) FROM stead.instances WHERE slot <> stead.slot_for(id)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 0, "every slot is slot_for(id)");
}

const START_MANY: &str = "SELECT stead.start_workflows('echo', $1::jsonb[], $2::text[])";

#[tokio::test]
async fn sql_batch_is_all_or_nothing_and_rolls_back_with_the_caller() {
    let db = TestDb::new().await;
    let node = node_with_echo(&db).await;
    let mut client = db.client().await;
    let inputs = vec![json!({"n": 1}), json!({"n": 2}), json!({"n": 3})];
    let ids = vec![Some("s-1"), None, Some("s-3")];

    let tx = client.transaction().await.unwrap();
    let rows = tx.query(START_MANY, &[&inputs, &ids]).await.unwrap();
    assert_eq!(rows.len(), 3);
    tx.rollback().await.unwrap();
    assert_eq!(instance_count(&db).await, 0, "the rollback left nothing");

    let rows = client.query(START_MANY, &[&inputs, &ids]).await.unwrap();
    let started: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        (started[0].as_str(), started[2].as_str()),
        ("s-1", "s-3"),
        "ids in input order"
    );
    for (id, input) in started.iter().zip(&inputs) {
        assert_eq!(&node.wait_ended(id).await["output"], input);
    }
    // The batch computes each slot itself; it must be slot_for's.
    assert_slots_are_slot_for(&client).await;
    // Idempotent per id: the same call again starts only the id-less item.
    let again = client.query(START_MANY, &[&inputs, &ids]).await.unwrap();
    assert_eq!(again[0].get::<_, String>(0), "s-1");
    assert_eq!(instance_count(&db).await, 4);

    // One bad item refuses the whole call: nothing of it is started.
    let bad_cases: [(Vec<Option<&str>>, &str); 2] = [
        (vec![Some("s-new"), Some("s-1"), None], "ST409"),
        (vec![Some("s-new"), Some("bad id"), None], "22023"),
    ];
    let other_inputs = vec![json!("x"), json!("different"), json!("z")];
    for (ids, code) in bad_cases {
        let err = client
            .query(START_MANY, &[&other_inputs, &ids])
            .await
            .unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some(code), "{err:?}");
        assert_eq!(
            instance_count(&db).await,
            4,
            "nothing of a refused call starts"
        );
    }
    let err = client
        .query(START_MANY, &[&inputs, &vec![Some("only-one")]])
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22023"), "{err:?}");
    node.shutdown().await;
}

#[tokio::test]
async fn stead_start_batch_sends_a_json_lines_file_in_requests_of_1000() {
    let db = TestDb::new().await;
    let node = node_with_echo(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("starts.jsonl");
    let mut lines: Vec<String> = (0..1500)
        .map(|i| json!({"id": format!("f-{i}"), "input": i}).to_string())
        .collect();
    lines.insert(700, String::new());
    lines.push(json!({"id": "bad id", "input": 0}).to_string());
    std::fs::write(&file, lines.join("\n")).unwrap();

    let url = node.url.clone();
    let path = file.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_stead"))
            .args(["start", "echo", "--server", &url, "--batch"])
            .arg(&path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a refused item fails the command");
    assert!(stderr.contains("\"created\": 1500"), "{stderr}");
    assert!(
        stderr.contains("\"line\": 1502"),
        "the refused item's line: {stderr}"
    );
    assert_eq!(instance_count(&db).await, 1500);
    assert_eq!(node.wait_ended("f-1499").await["output"], json!(1499));
    node.shutdown().await;
}

/// A batch without ids (from SQL with no ids array, or over HTTP with no
/// item naming one) takes the one-insert path: every item is created, under
/// a fresh id in input order, in the slot `slot_for` gives, and runs.
#[tokio::test]
async fn batches_without_ids_start_every_item_under_a_fresh_id() {
    let db = TestDb::new().await;
    let node = node_with_echo(&db).await;
    let client = db.client().await;
    let inputs: Vec<Value> = (0..50).map(|n| json!({ "n": n })).collect();
    let rows = client
        .query(
            "SELECT stead.start_workflows('echo', $1::jsonb[])",
            &[&inputs],
        )
        .await
        .unwrap();
    let mut ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();

    let items: Vec<Value> = (50..60).map(|n| json!({"input": {"n": n}})).collect();
    let (status, body) = node
        .call(
            "POST",
            "/v1/workflows/echo/instances/batch",
            Some(json!({ "items": items })),
        )
        .await;
    assert_eq!(status, 200, "{}", pretty(&body));
    assert_eq!(body["created"], 10, "{}", pretty(&body));
    for (i, r) in body["results"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            (r["index"].as_u64(), &r["outcome"]),
            (Some(i as u64), &json!("created"))
        );
        ids.push(r["id"].as_str().unwrap().to_string());
    }

    let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 60, "every id is fresh");
    for (n, id) in ids.iter().enumerate() {
        assert_eq!(
            node.wait_ended(id).await["output"],
            json!({ "n": n }),
            "{id}"
        );
    }
    assert_slots_are_slot_for(&client).await;
    node.shutdown().await;
}
