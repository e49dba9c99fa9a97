//! Migrations, schemas and readiness.

use serde_json::json;

use crate::{TestDb, TestNode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrators_apply_each_migration_once() {
    let db = TestDb::new().await;
    let runs = (0..6).map(|_| stead::migrate(&db.url, "stead", 64));
    for result in futures::future::join_all(runs).await {
        result.expect("every concurrent migrator succeeds");
    }
    let client = db.client().await;
    let applied: i64 = client
        .query_one("SELECT count(*) FROM stead.refinery_schema_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(applied as i32, stead::schema_version());
    let slots: i32 = client
        .query_one("SELECT slot_count FROM stead.cluster", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 64);
    // The schema works: a start from SQL lands in a valid slot.
    client
        .execute(
            "INSERT INTO stead.workflows (name, version, definition, content_hash) \
             VALUES ('w', 1, '{\"steps\":[{\"id\":\"a\",\"value\":1}]}', 'h')",
            &[],
        )
        .await
        .unwrap();
    client
        .execute("SELECT stead.start_workflow('w', '{}'::jsonb, 'x')", &[])
        .await
        .unwrap();
    let slot: i32 = client
        .query_one("SELECT slot FROM stead.instances WHERE id = 'x'", &[])
        .await
        .unwrap()
        .get(0);
    assert!((0..64).contains(&slot), "slot {slot}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_share_a_database_under_different_schemas() {
    let db = TestDb::new().await;
    let mut config_a = TestNode::config(&db);
    config_a.schema = "alpha".into();
    let mut config_b = TestNode::config(&db);
    config_b.schema = "beta".into();
    let a = TestNode::start_with(config_a).await;
    let b = TestNode::start_with(config_b).await;
    a.put_workflow(
        "w",
        json!({"steps": [{"id": "s", "task": {"queue": "stead.echo", "input": "a"}}]}),
    )
    .await;
    b.put_workflow(
        "w",
        json!({"steps": [{"id": "s", "task": {"queue": "stead.echo", "input": "b"}}]}),
    )
    .await;
    let ia = a.start_instance("w", json!(null)).await;
    let ib = b.start_instance("w", json!(null)).await;
    assert_eq!(a.wait_ended(&ia).await["output"], json!({"s": "a"}));
    assert_eq!(b.wait_ended(&ib).await["output"], json!({"s": "b"}));
    // Each cluster sees only its own instance.
    let (status, _) = a.call("GET", &format!("/v1/instances/{ib}"), None).await;
    assert_eq!(status, 404);
    let client = db.client().await;
    for (schema, id) in [("alpha", &ia), ("beta", &ib)] {
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM {schema}.instances"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "{schema}");
        let found: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM {schema}.instances WHERE id = $1"),
                &[id],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(found, 1, "{schema} holds {id}");
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn readyz_reports_database_and_schema() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    let (status, body) = node.call("GET", "/readyz", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["schema_version"], stead::schema_version());
    let (status, _) = node.call("GET", "/healthz", None).await;
    assert_eq!(status, 200);
    // A schema that falls behind this binary is not ready.
    db.client()
        .await
        .execute("DELETE FROM stead.refinery_schema_history", &[])
        .await
        .unwrap();
    let (status, body) = node.call("GET", "/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["type"], "urn:stead:problem:not-ready");
    node.shutdown().await;
}
