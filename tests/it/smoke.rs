//! The README quickstart, end to end: register, start, complete.

use serde_json::json;

use crate::support::greet_workflow;
use crate::{TestDb, TestNode};

#[tokio::test]
async fn quickstart_workflow_completes() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow("greet", greet_workflow()).await;
    let id = node.start_instance("greet", json!({"name": "world"})).await;
    let done = node.wait_ended(&id).await;
    assert_eq!(done["status"], "completed", "{}", crate::pretty(&done));
    assert_eq!(done["output"], json!({"message": "hello world!"}));

    // The operator view shows it.
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT status, steps_done FROM stead.instance_overview WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "completed");
    assert_eq!(row.get::<_, i64>(1), 3);
    node.shutdown().await;
}
