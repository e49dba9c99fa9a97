//! SQL is an interface: `stead.start_workflow` inside the caller's own
//! transaction, and the operator views.

use std::time::Duration;

use serde_json::{json, Value};

use crate::{pretty, wait_until, TestDb, TestNode};

fn echo_workflow() -> Value {
    json!({
        "steps": [{"id": "echo", "task": {"queue": "stead.echo", "input": "${input}"}}],
        "output": "${steps.echo.output}"
    })
}

const START: &str = "SELECT stead.start_workflow($1, $2, $3)";

/// Rows mentioning `id` in every table that holds instance state.
async fn traces(client: &tokio_postgres::Client, id: &str) -> Vec<(&'static str, i64)> {
    let mut out = Vec::new();
    for (table, sql) in [
        (
            "instances",
            "SELECT count(*) FROM stead.instances WHERE id = $1",
        ),
        (
            "events",
            "SELECT count(*) FROM stead.events WHERE instance_id = $1",
        ),
        (
            "steps",
            "SELECT count(*) FROM stead.steps WHERE instance_id = $1",
        ),
        (
            "tasks",
            "SELECT count(*) FROM stead.tasks WHERE instance_id = $1",
        ),
    ] {
        let n: i64 = client.query_one(sql, &[&id]).await.unwrap().get(0);
        out.push((table, n));
    }
    out
}

fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.code().map(|c| c.code().to_string())
}

#[tokio::test]
async fn start_workflow_in_a_rolled_back_transaction_never_existed() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow("sqlwf", echo_workflow()).await;

    let mut client = db.client().await;
    let observer = db.client().await;
    let tx = client.transaction().await.unwrap();
    let id: String = tx
        .query_one(
            START,
            &[&"sqlwf", &json!({"n": 1}), &Some("sql-rb".to_string())],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(id, "sql-rb");
    let inside: i64 = tx
        .query_one(
            "SELECT count(*) FROM stead.instances WHERE id = 'sql-rb'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(inside, 1, "the transaction sees its own start");
    assert_eq!(traces(&observer, "sql-rb").await[0], ("instances", 0));
    tx.rollback().await.unwrap();

    // Let the workers run a full cycle: a start committed afterwards
    // completes, so they had every chance to see the rolled-back one.
    let after: String = client
        .query_one(
            START,
            &[&"sqlwf", &json!({"n": 2}), &Some("sql-after".to_string())],
        )
        .await
        .unwrap()
        .get(0);
    let done = node.wait_ended(&after).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));

    assert_eq!(
        traces(&observer, "sql-rb").await,
        vec![("instances", 0), ("events", 0), ("steps", 0), ("tasks", 0)],
        "no trace of the rolled-back start"
    );
    let (status, body) = node.call("GET", "/v1/instances/sql-rb", None).await;
    assert_eq!(status, 404, "{}", pretty(&body));

    // The id is free: a start with another input creates a new instance
    // (it would be a 409 if the rolled-back one existed).
    let (status, body) = node
        .call(
            "POST",
            "/v1/workflows/sqlwf/instances",
            Some(json!({"id": "sql-rb", "input": {"n": 3}})),
        )
        .await;
    assert_eq!(status, 201, "{}", pretty(&body));
    assert_eq!(body["created"], true);
    let done = node.wait_ended("sql-rb").await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(done["output"], json!({"n": 3}));
    node.shutdown().await;
}

#[tokio::test]
async fn start_workflow_in_a_committed_transaction_runs_to_completion() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow("sqlwf", echo_workflow()).await;

    let mut client = db.client().await;
    let observer = db.client().await;
    client
        .batch_execute("CREATE TABLE public.orders (id text PRIMARY KEY, amount int NOT NULL)")
        .await
        .unwrap();

    // The user's own write and the start commit together.
    let tx = client.transaction().await.unwrap();
    tx.execute("INSERT INTO public.orders VALUES ('o-1', 42)", &[])
        .await
        .unwrap();
    let id: String = tx
        .query_one(
            "SELECT stead.start_workflow('sqlwf', jsonb_build_object('order', o.id, 'amount', o.amount), 'order:' || o.id) FROM public.orders o WHERE o.id = 'o-1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(id, "order:o-1");
    // Not visible (so not run) before the commit.
    assert_eq!(traces(&observer, &id).await[0], ("instances", 0));
    tx.commit().await.unwrap();

    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(done["output"], json!({"order": "o-1", "amount": 42}));
    assert_eq!(done["workflow"], "sqlwf");

    // Without an id, one is generated and returned.
    let generated: String = client
        .query_one("SELECT stead.start_workflow('sqlwf', '[1, 2]')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!generated.is_empty());
    let done = node.wait_ended(&generated).await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(done["output"], json!([1, 2]));
    node.shutdown().await;
}

#[tokio::test]
async fn start_workflow_is_idempotent_on_the_id() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow("sqlwf", echo_workflow()).await;
    node.put_workflow("other", json!({"steps": [{"id": "a", "value": 1}]}))
        .await;
    let client = db.client().await;
    let id = Some("dup".to_string());

    let first: String = client
        .query_one(START, &[&"sqlwf", &json!({"a": 1}), &id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(first, "dup");
    let again: String = client
        .query_one(START, &[&"sqlwf", &json!({"a": 1}), &id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(again, "dup");

    // A different input, or another workflow, under the same id: an error.
    for (workflow, input) in [("sqlwf", json!({"a": 2})), ("other", json!({"a": 1}))] {
        let err = client
            .query_one(START, &[&workflow, &input, &id])
            .await
            .expect_err("a conflicting start must fail");
        assert_eq!(sqlstate(&err).as_deref(), Some("ST409"), "{err:?}");
    }
    // An unknown workflow and a bad id are errors too.
    let err = client
        .query_one(START, &[&"ghost", &json!(1), &Some("g-1".to_string())])
        .await
        .expect_err("unknown workflow");
    assert_eq!(sqlstate(&err).as_deref(), Some("ST404"), "{err:?}");
    let err = client
        .query_one(START, &[&"sqlwf", &json!(1), &Some("bad id".to_string())])
        .await
        .expect_err("bad id");
    assert_eq!(sqlstate(&err).as_deref(), Some("22023"), "{err:?}");

    let n: i64 = client
        .query_one("SELECT count(*) FROM stead.instances", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "only one instance exists");
    let done = node.wait_ended("dup").await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(
        done["output"],
        json!({"a": 1}),
        "it ran with the first input"
    );
    // Still idempotent once it has ended.
    let late: String = client
        .query_one(START, &[&"sqlwf", &json!({"a": 1}), &id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(late, "dup");
    let completions: i64 = client
        .query_one(
            "SELECT count(*) FROM stead.events WHERE instance_id = 'dup' AND type = 'instance_completed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(completions, 1);
    node.shutdown().await;
}

#[tokio::test]
async fn operator_views_show_instances_and_queue_depth() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow("sqlwf", echo_workflow()).await;
    node.put_workflow(
        "stuck",
        json!({"steps": [
            {"id": "prep", "value": "${input}"},
            {"id": "work", "task": {"queue": "nobody", "input": "${steps.prep.output}"}}
        ]}),
    )
    .await;
    let client = db.client().await;
    for i in 1..=3 {
        client
            .query_one(
                START,
                &[&"stuck", &json!({"i": i}), &Some(format!("stuck-{i}"))],
            )
            .await
            .unwrap();
    }
    client
        .query_one(START, &[&"sqlwf", &json!("hi"), &Some("fine".to_string())])
        .await
        .unwrap();
    let done = node.wait_ended("fine").await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));

    // Queue depth: three ready tasks nobody takes.
    let c = &client;
    let (ready, leased, delayed, age, expected_age) = wait_until(
        "queue_depth shows 3 ready tasks on queue nobody",
        Duration::from_secs(60),
        || async move {
            // The view's age against the oldest ready task itself, at one now().
            let row = c
                .query_opt(
                    "SELECT ready, leased, delayed, extract(epoch FROM oldest_ready_age)::float8, \
                            extract(epoch FROM now() - (SELECT min(run_at) FROM stead.tasks \
                                   WHERE queue = 'nobody' AND status = 'ready'))::float8 \
                     FROM stead.queue_depth WHERE queue = 'nobody'",
                    &[],
                )
                .await
                .unwrap()?;
            let v: (i64, i64, i64, f64, f64) =
                (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
            (v.0 == 3).then_some(v)
        },
    )
    .await;
    assert_eq!((ready, leased, delayed), (3, 0, 0));
    assert_eq!(
        age, expected_age,
        "oldest_ready_age is the age of the oldest ready task"
    );
    // The echo queue, worked by the node, holds nothing once all is done.
    let echo: Option<i64> = client
        .query_opt(
            "SELECT ready + leased + delayed FROM stead.queue_depth WHERE queue = 'stead.echo'",
            &[],
        )
        .await
        .unwrap()
        .map(|r| r.get(0));
    assert!(echo.unwrap_or(0) == 0, "stead.echo depth {echo:?}");

    // Instance overview: the stuck ones are on `work`, one step done.
    let rows = client
        .query(
            "SELECT id, workflow, version, status, current_steps, steps_done, error, ended_at IS NULL \
             FROM stead.instance_overview ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 4);
    for (row, i) in rows[1..].iter().zip(1..) {
        let id: String = row.get(0);
        assert_eq!(id, format!("stuck-{i}"));
        assert_eq!(row.get::<_, String>(1), "stuck");
        assert_eq!(row.get::<_, i32>(2), 1);
        assert_eq!(row.get::<_, String>(3), "running", "{id}");
        assert_eq!(
            row.get::<_, Vec<String>>(4),
            vec!["work".to_string()],
            "{id}"
        );
        assert_eq!(row.get::<_, i64>(5), 1, "{id}: prep is done");
        assert_eq!(row.get::<_, Option<String>>(6), None);
        assert!(row.get::<_, bool>(7), "{id} has not ended");
    }
    let fine = &rows[0];
    assert_eq!(fine.get::<_, String>(0), "fine");
    assert_eq!(fine.get::<_, String>(3), "completed");
    assert_eq!(fine.get::<_, Vec<String>>(4), Vec::<String>::new());
    assert_eq!(fine.get::<_, i64>(5), 1);
    assert!(!fine.get::<_, bool>(7), "fine has ended");
    let has_duration: bool = client
        .query_one(
            "SELECT duration IS NOT NULL AND duration >= interval '0' FROM stead.instance_overview WHERE id = 'fine'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(has_duration);
    node.shutdown().await;
}

/// The history is stored as one row per transition (`stead.history`); the
/// `stead.events` view and the history API show every event of it, in
/// order, the same.
#[tokio::test]
async fn history_rows_hold_whole_transitions_and_the_events_view_lists_each_event() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow("sqlwf", echo_workflow()).await;
    let id = node.start_instance("sqlwf", json!({"n": 1})).await;
    node.wait_ended(&id).await;

    let client = db.client().await;
    let rows: i64 = client
        .query_one(
            "SELECT count(*) FROM stead.history WHERE instance_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    let view = client
        .query(
            "SELECT seq, type FROM stead.events WHERE instance_id = $1 ORDER BY seq",
            &[&id],
        )
        .await
        .unwrap();
    let from_view: Vec<(i32, String)> = view.iter().map(|r| (r.get(0), r.get(1))).collect();
    let seqs: Vec<i32> = from_view.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        (1..=from_view.len() as i32).collect::<Vec<_>>(),
        "numbered 1..n"
    );
    assert!(
        rows < from_view.len() as i64,
        "{rows} history rows for {} events: transitions share rows",
        from_view.len()
    );
    let api: Vec<(i32, String)> = node
        .history(&id)
        .await
        .iter()
        .map(|e| {
            (
                e["seq"].as_i64().unwrap() as i32,
                e["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(api, from_view);
    assert_eq!(
        from_view.first().map(|e| e.1.as_str()),
        Some("instance_started")
    );
    assert_eq!(
        from_view.last().map(|e| e.1.as_str()),
        Some("instance_completed")
    );
    node.shutdown().await;
}
