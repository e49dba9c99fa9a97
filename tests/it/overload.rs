//! Overload: past `max_concurrent_requests` a node answers 503 with
//! `Retry-After` at once instead of queueing without end, its health checks
//! still answer, its database connections stay within the pool, and every
//! start it acknowledged is stored (and none it refused).

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::scrape;
use crate::{pretty, wait_until, TestDb, TestNode};

/// A node serving at most `requests` at once, with a pool of `pool`.
async fn small_node(db: &TestDb, requests: usize, pool: usize) -> TestNode {
    let mut config = TestNode::config(db);
    config.limits.max_concurrent_requests = requests;
    config.tuning.pool_size = pool;
    TestNode::start_with(config).await
}

async fn stored_ids(db: &TestDb) -> HashSet<String> {
    let client = db.client().await;
    let rows = client
        .query("SELECT id FROM stead.instances", &[])
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

#[tokio::test]
async fn a_request_past_the_limit_is_answered_503_with_retry_after_at_once() {
    let db = TestDb::new().await;
    let node = small_node(&db, 4, 4).await;
    node.put_workflow(
        "w",
        json!({"steps": [{"id": "wait", "signal": {"name": "go"}}]}),
    )
    .await;
    let id = node.start_instance("w", json!(null)).await;
    // Four long-polls hold every permit.
    let polls: Vec<_> = (0..4)
        .map(|_| {
            let (http, url) = (
                node.http.clone(),
                format!("{}/v1/instances/{id}?wait=30s", node.url),
            );
            tokio::spawn(async move { http.get(url).send().await.unwrap().status().as_u16() })
        })
        .collect();
    let n = &node;
    wait_until(
        "four long-polls are parked",
        Duration::from_secs(30),
        || async move {
            let m = scrape(n).await;
            m.get("stead_http_requests_in_flight").copied() == Some(4.0)
                && m.get("stead_http_long_polls_waiting{kind=\"instance\"}")
                    .copied()
                    == Some(4.0)
        },
    )
    .await;

    let refused = node
        .http
        .post(format!("{}/v1/workflows/w/instances", node.url))
        .json(&json!({"id": "refused"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 503);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("1")
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(
        body["type"],
        "urn:stead:problem:overloaded",
        "{}",
        pretty(&body)
    );
    let (status, _) = node.call("GET", "/healthz", None).await;
    assert_eq!(status, 200, "the health check is always served");

    // The parked requests end normally once the instance does.
    let client = db.client().await;
    client
        .execute("SELECT stead.signal($1, 'go')", &[&id])
        .await
        .unwrap();
    for poll in polls {
        assert_eq!(poll.await.unwrap(), 200);
    }
    let (status, _) = node
        .call(
            "POST",
            "/v1/workflows/w/instances",
            Some(json!({"id": "later"})),
        )
        .await;
    assert_eq!(status, 201, "served again once below the limit");
    let stored = stored_ids(&db).await;
    assert!(
        !stored.contains("refused"),
        "a refused start stores nothing"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_ten_times_the_limit_is_acknowledged_or_refused_and_nothing_is_lost() {
    let db = TestDb::new().await;
    let (limit, pool) = (8, 3);
    let node = small_node(&db, limit, pool).await;
    node.put_workflow("w", json!({"steps": [{"id": "v", "value": 1}]}))
        .await;
    let burst: Vec<_> = (0..limit * 10 * 3)
        .map(|i| {
            let http = node.http.clone();
            let url = format!("{}/v1/workflows/w/instances", node.url);
            tokio::spawn(async move {
                let id = format!("b-{i}");
                let resp = http
                    .post(url)
                    .json(&json!({"id": id}))
                    .send()
                    .await
                    .unwrap();
                let retry_after = resp.headers().contains_key("retry-after");
                (id, resp.status().as_u16(), retry_after)
            })
        })
        .collect();
    let mut acknowledged = HashSet::new();
    let mut refused = HashSet::new();
    for answer in burst {
        let (id, status, retry_after) = answer.await.unwrap();
        match status {
            201 => {
                acknowledged.insert(id);
            }
            503 => {
                assert!(retry_after, "a 503 says when to retry");
                refused.insert(id);
            }
            other => panic!("{id}: {other}"),
        }
    }
    assert!(
        !refused.is_empty(),
        "a burst ten times the limit is partly refused"
    );
    assert!(!acknowledged.is_empty());
    let stored = stored_ids(&db).await;
    assert!(
        acknowledged.is_subset(&stored),
        "every acknowledged start is stored"
    );
    assert!(stored.is_disjoint(&refused), "no refused start is stored");
    let client = db.client().await;
    let pooled: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = $1",
            &[&format!("stead test-{}", db.name)],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        pooled as usize <= pool,
        "{pooled} pooled connections, pool {pool}"
    );
    node.shutdown().await;
}
