//! Retention (`--retention`): a `stead serve` keeping ended instances for
//! 1 s deletes exactly those whose time is up, in bounded batches, while
//! instances keep starting; never a running instance, never a child whose
//! parent runs, never one whose workflow keeps its instances longer; a
//! parent and its children go in one transaction, with every row they own.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{scrape, start_with_id};
use crate::{wait_until, ServeProcess, TestDb, TestNode};

/// Trees one retention transaction may delete (`--retention-batch-size`).
const BATCH: i64 = 7;

/// Every instance row deleted, with the transaction that deleted it.
const AUDIT: &str = "
    CREATE TABLE public.deleted (
        id text, workflow text, parent_id text, status text, ended_at timestamptz,
        deleted_at timestamptz NOT NULL DEFAULT now(),
        tx bigint NOT NULL DEFAULT txid_current());
    CREATE FUNCTION public.log_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO public.deleted (id, workflow, parent_id, status, ended_at)
        VALUES (OLD.id, OLD.workflow_name, OLD.parent_id, OLD.status, OLD.ended_at);
        RETURN OLD;
    END $$;
    CREATE TRIGGER log_deleted AFTER DELETE ON stead.instances
        FOR EACH ROW EXECUTE FUNCTION public.log_deleted();";

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.client().await.query_one(sql, &[]).await.unwrap().get(0)
}

async fn register(node: &TestNode) {
    let value = json!({"steps": [{"id": "v", "value": "${input}"}]});
    node.put_workflow("quick", value.clone()).await;
    let mut kept = value.clone();
    kept["retention"] = json!("0s");
    node.put_workflow("kept", kept).await;
    let mut long = value;
    long["retention"] = json!("1h");
    node.put_workflow("long", long).await;
    node.put_workflow(
        "waiter",
        json!({"steps": [{"id": "w", "signal": {"name": "go"}}]}),
    )
    .await;
    node.put_workflow(
        "parent",
        json!({"steps": [
            {"id": "c", "workflow": {"name": "quick", "input": 1}},
            {"id": "w", "signal": {"name": "go"}, "needs": ["c"]}
        ]}),
    )
    .await;
}

/// Starts `quick` instances, ten at a time, until `rounds` retention
/// transactions have deleted some.
async fn load_until_deleted_in(node: &TestNode, db: &TestDb, rounds: i64) -> usize {
    let mut started = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while count(db, "SELECT count(DISTINCT tx) FROM public.deleted").await < rounds {
        assert!(
            std::time::Instant::now() < deadline,
            "retention deleted nothing in 60 s"
        );
        let items: Vec<Value> = (0..10).map(|n| json!({"input": n})).collect();
        let (status, body) = node
            .call(
                "POST",
                "/v1/workflows/quick/instances/batch",
                Some(json!({"items": items})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        started += 10;
    }
    started
}

#[tokio::test]
async fn retention_deletes_exactly_the_due_trees_in_batches_under_load() {
    let db = TestDb::new().await;
    let batch = BATCH.to_string();
    let serve = ServeProcess::spawn(
        &db.url,
        "keeper",
        &[
            "--retention",
            "1s",
            "--retention-batch-size",
            &batch,
            "--retention-pause-ms",
            "20",
            "--retention-interval-ms",
            "100",
            "--gauge-refresh-ms",
            "100",
        ],
    )
    .await;
    let node = TestNode::remote(&serve.base_url);
    register(&node).await;
    db.client().await.batch_execute(AUDIT).await.unwrap();

    start_with_id(&node, "waiter", "w-1", json!(null)).await;
    start_with_id(&node, "parent", "p-1", json!(null)).await;
    for n in 1..=3 {
        start_with_id(&node, "kept", &format!("k-{n}"), json!(n)).await;
        start_with_id(&node, "long", &format!("l-{n}"), json!(n)).await;
    }
    node.wait_step("p-1", "w", "waiting").await;
    let started = load_until_deleted_in(&node, &db, 3).await;
    assert!(started >= 10);

    // Once the parent's child ended 1.5 s ago, and every `quick` root that
    // ended before that is gone, retention has passed the child: it stays.
    wait_until(
        "retention to pass the running parent's child",
        Duration::from_secs(60),
        || async {
            let row = db
                .client()
                .await
                .query_one(
                    "SELECT extract(epoch FROM now() - ended_at)::float8,
                        (SELECT count(*) FROM stead.instances WHERE workflow_name = 'quick'
                         AND parent_id IS NULL AND ended_at < now() - interval '1.5 s')
                 FROM stead.instances WHERE id = 'p-1:c'",
                    &[],
                )
                .await
                .expect("the running parent's ended child is kept");
            let (child_age_s, due_left): (f64, i64) = (row.get(0), row.get(1));
            (child_age_s > 1.5 && due_left == 0).then_some(())
        },
    )
    .await;

    // The parent ends: it goes with its child, in one transaction.
    let (status, body) = node
        .call("POST", "/v1/instances/p-1/signals/go", Some(json!(1)))
        .await;
    assert_eq!(status, 202, "{body}");
    wait_until(
        "every due instance to be deleted",
        Duration::from_secs(60),
        || async {
            let left = count(
                &db,
                "SELECT count(*) FROM stead.instances WHERE workflow_name IN ('quick', 'parent')",
            )
            .await;
            (left == 0).then_some(())
        },
    )
    .await;

    check_what_was_deleted(&db, started as i64 + 2).await;
    check_what_is_left(&db).await;
    let metrics = scrape(&node).await;
    let deleted = count(&db, "SELECT count(*) FROM public.deleted").await;
    assert_eq!(
        metrics["stead_retention_deleted_rows_total{table=\"instances\"}"],
        deleted as f64
    );
    assert!(metrics["stead_retention_deleted_rows_total{table=\"history\"}"] >= deleted as f64);
    assert!(metrics["stead_oldest_ended_instance_age_seconds"] > 1.0);
}

/// Each deleted instance had ended at least the retention before its
/// transaction began, was of a workflow that keeps them 1 s, and went with
/// its parent; no transaction took more than a batch of trees.
async fn check_what_was_deleted(db: &TestDb, expected: i64) {
    let deleted = count(db, "SELECT count(*) FROM public.deleted").await;
    assert_eq!(deleted, expected, "load and p-1 with its child");
    let early = count(
        db,
        "SELECT count(*) FROM public.deleted
         WHERE ended_at IS NULL OR deleted_at - ended_at < interval '1 s'
            OR status NOT IN ('completed', 'failed', 'cancelled')
            OR workflow NOT IN ('quick', 'parent')",
    )
    .await;
    assert_eq!(
        early, 0,
        "instances deleted before their time or of the wrong workflow"
    );
    let orphaned = count(
        db,
        "SELECT count(*) FROM public.deleted c WHERE c.parent_id IS NOT NULL
         AND NOT EXISTS (SELECT 1 FROM public.deleted p WHERE p.id = c.parent_id AND p.tx = c.tx)",
    )
    .await;
    assert_eq!(orphaned, 0, "a child deleted apart from its parent");
    let largest_batch = count(
        db,
        "SELECT max(n) FROM (SELECT count(*) AS n FROM public.deleted
                             WHERE parent_id IS NULL GROUP BY tx) b",
    )
    .await;
    assert!(largest_batch <= BATCH, "a batch of {largest_batch} trees");
    let batches = count(db, "SELECT count(DISTINCT tx) FROM public.deleted").await;
    assert!(
        batches >= expected / BATCH,
        "{batches} batches for {expected}"
    );
}

/// What must stay stays, and nothing of a deleted instance is left behind.
async fn check_what_is_left(db: &TestDb) {
    let client = db.client().await;
    let left: Vec<String> = client
        .query("SELECT id FROM stead.instances ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["k-1", "k-2", "k-3", "l-1", "l-2", "l-3", "w-1"]);
    for table in ["steps", "tasks", "signals", "history"] {
        let rows = count(
            db,
            &format!(
                "SELECT count(*) FROM stead.{table} t
                 WHERE NOT EXISTS (SELECT 1 FROM stead.instances i WHERE i.id = t.instance_id)"
            ),
        )
        .await;
        assert_eq!(rows, 0, "{table} rows of deleted instances");
    }
}
