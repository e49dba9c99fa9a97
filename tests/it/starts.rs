//! Starting instances: idempotency on the id (also under concurrency),
//! unknown workflows, the list endpoint with its cursor, and long-polls.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use crate::support::{step, wait_parked};
use crate::{pretty, wait_until, TestDb, TestNode};

async fn start(node: &TestNode, workflow: &str, body: Value) -> (u16, Value) {
    node.call(
        "POST",
        &format!("/v1/workflows/{workflow}/instances"),
        Some(body),
    )
    .await
}

async fn count(db_client: &tokio_postgres::Client, sql: &str, id: &str) -> i64 {
    db_client.query_one(sql, &[&id]).await.unwrap().get(0)
}

#[tokio::test]
async fn start_with_an_existing_id_is_idempotent_or_a_conflict() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "order",
        json!({"steps": [{"id": "echo", "task": {"queue": "stead.echo", "input": "${input}"}}],
               "output": "${steps.echo.output}"}),
    )
    .await;
    node.put_workflow("other", json!({"steps": [{"id": "a", "value": 1}]}))
        .await;

    let (status, first) = start(&node, "order", json!({"id": "order-1", "input": {"a": 1}})).await;
    assert_eq!(status, 201, "{}", pretty(&first));
    assert_eq!(first["id"], "order-1");
    assert_eq!(first["created"], true);
    assert_eq!(first["workflow"], "order");

    // Same id, same input (key order does not matter): the same instance.
    let (status, again) = start(&node, "order", json!({"input": {"a": 1}, "id": "order-1"})).await;
    assert_eq!(status, 200, "{}", pretty(&again));
    assert_eq!(again["id"], "order-1");
    assert_eq!(again["created"], false);
    assert_eq!(
        again["created_at"], first["created_at"],
        "the same instance"
    );

    // Same id with a different input, or a different workflow: 409.
    for (workflow, body) in [
        ("order", json!({"id": "order-1", "input": {"a": 2}})),
        ("order", json!({"id": "order-1"})),
        ("other", json!({"id": "order-1", "input": {"a": 1}})),
    ] {
        let resp = node
            .http
            .post(format!("{}/v1/workflows/{workflow}/instances", node.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 409, "{workflow} {body}");
        assert_eq!(
            resp.headers()["content-type"],
            "application/problem+json",
            "{workflow} {body}"
        );
        let problem: Value = resp.json().await.unwrap();
        assert_eq!(problem["status"], 409, "{}", pretty(&problem));
    }

    // It ran once, with the first input.
    let done = node.wait_ended("order-1").await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(done["output"], json!({"a": 1}));
    // After it ended, the same start still answers 200 with the same instance.
    let (status, late) = start(&node, "order", json!({"id": "order-1", "input": {"a": 1}})).await;
    assert_eq!(status, 200, "{}", pretty(&late));
    assert_eq!(late["status"], "completed");

    let client = db.client().await;
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM stead.instances WHERE id = $1",
            "order-1"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM stead.events WHERE instance_id = $1 AND type = 'instance_completed'",
            "order-1"
        )
        .await,
        1
    );
    node.shutdown().await;
}

#[tokio::test]
async fn start_of_an_unknown_workflow_is_404() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    for body in [json!({"input": 1}), json!({"input": 1, "id": "x-1"})] {
        let resp = node
            .http
            .post(format!("{}/v1/workflows/ghost/instances", node.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 404, "{body}");
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
        let problem: Value = resp.json().await.unwrap();
        assert_eq!(problem["status"], 404);
        assert!(
            problem["detail"].as_str().unwrap_or("").contains("ghost"),
            "the problem names the workflow: {}",
            pretty(&problem)
        );
    }
    let client = db.client().await;
    let n: i64 = client
        .query_one("SELECT count(*) FROM stead.instances", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_with_one_id_make_one_instance() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "once",
        json!({"steps": [
            {"id": "first", "task": {"queue": "stead.echo", "input": "${input}"}},
            {"id": "second", "task": {"queue": "stead.echo", "input": "${steps.first.output}"}}
        ], "output": "${steps.second.output}"}),
    )
    .await;

    let body = json!({"id": "the-one", "input": {"k": "v"}});
    let calls = (0..50).map(|_| {
        let node = &node;
        let body = body.clone();
        async move { start(node, "once", body).await }
    });
    let answers = futures::future::join_all(calls).await;

    let created = answers.iter().filter(|(s, _)| *s == 201).count();
    let existing = answers.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(
        (created, existing),
        (1, 49),
        "statuses: {:?}",
        answers
            .iter()
            .map(|(s, b)| (s, b.clone()))
            .collect::<Vec<_>>()
    );
    for (_, b) in &answers {
        assert_eq!(b["id"], "the-one", "{}", pretty(b));
    }
    let created_flags = answers.iter().filter(|(_, b)| b["created"] == true).count();
    assert_eq!(created_flags, 1);

    let done = node.wait_ended("the-one").await;
    assert_eq!(done["status"], "completed", "{}", pretty(&done));
    assert_eq!(done["output"], json!({"k": "v"}));

    let client = db.client().await;
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM stead.instances WHERE id = $1",
            "the-one"
        )
        .await,
        1
    );
    let total: i64 = client
        .query_one("SELECT count(*) FROM stead.instances", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 1);
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM stead.events WHERE instance_id = $1 AND type = 'instance_completed'",
            "the-one"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM stead.events WHERE instance_id = $1 AND type = 'step_completed'",
            "the-one"
        )
        .await,
        2,
        "each step completed once"
    );
    node.shutdown().await;
}

/// Every instance id of a paginated list walk, page by page.
/// An instance read shows one moment: the instance row and its steps come
/// from one snapshot. Read one after the other, a poll could straddle an
/// advance's commit and show steps completed under an instance still
/// `pending` (CI caught it once in the cancel test). Here a writer holds
/// `steps` locked, so the read's steps query waits; meanwhile the writer
/// marks the instance and its step and commits. The read must show both
/// marks or neither.
#[tokio::test]
async fn an_instance_read_shows_the_instance_and_its_steps_from_one_moment() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow("nap", json!({"steps": [{"id": "nap", "sleep": "1h"}]}))
        .await;
    let id = node.start_instance("nap", json!({})).await;
    node.wait_step(&id, "nap", "waiting").await;

    let mut writer = db.client().await;
    let tx = writer.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE stead.steps IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let path = format!("/v1/instances/{id}");
    let read = node.call("GET", &path, None);
    let write = async {
        wait_until(
            "the read to wait for the lock on steps",
            Duration::from_secs(10),
            || async { waiting_on_lock(&db).await },
        )
        .await;
        for sql in [
            "UPDATE stead.instances SET output = '{\"mark\": 1}' WHERE id = $1",
            "UPDATE stead.steps SET output = '{\"mark\": 1}' WHERE instance_id = $1",
        ] {
            tx.execute(sql, &[&id]).await.unwrap();
        }
        tx.commit().await.unwrap();
    };
    let ((status, body), ()) = tokio::join!(read, write);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["output"] == json!({"mark": 1}),
        step(&body, "nap")["output"] == json!({"mark": 1}),
        "the instance and its step from different moments: {}",
        pretty(&body)
    );
    node.shutdown().await;
}

/// Whether some session of the test database waits for a lock.
async fn waiting_on_lock(db: &TestDb) -> bool {
    let client = db.client().await;
    let waiting: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    waiting > 0
}

async fn walk(node: &TestNode, query: &str, limit: usize) -> Vec<Vec<Value>> {
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/instances?limit={limit}");
        if !query.is_empty() {
            path.push('&');
            path.push_str(query);
        }
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, body) = node.call("GET", &path, None).await;
        assert_eq!(status, 200, "GET {path}: {}", pretty(&body));
        let page = body["instances"].as_array().unwrap().clone();
        assert!(page.len() <= limit, "{}", pretty(&body));
        pages.push(page);
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(pages.len() < 100, "pagination does not end");
    }
    pages
}

fn ids(pages: &[Vec<Value>]) -> Vec<String> {
    pages
        .iter()
        .flatten()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn list_is_newest_first_with_filters_and_a_cursor_that_visits_each_once() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "lista",
        json!({"steps": [{"id": "a", "value": "${input}"}]}),
    )
    .await;
    // Nobody works this queue: its instances stay running.
    node.put_workflow(
        "listb",
        json!({"steps": [{"id": "b", "task": {"queue": "nobody.works.here"}}]}),
    )
    .await;

    let mut started_a = Vec::new();
    let mut started_b = Vec::new();
    let mut started_all = Vec::new();
    for i in 0..10 {
        let (workflow, list) = if i % 3 == 2 {
            ("listb", &mut started_b)
        } else {
            ("lista", &mut started_a)
        };
        let (status, body) = start(
            &node,
            workflow,
            json!({"input": i, "id": format!("i{i:02}")}),
        )
        .await;
        assert_eq!(status, 201, "{}", pretty(&body));
        list.push(format!("i{i:02}"));
        started_all.push(format!("i{i:02}"));
    }
    for id in &started_a {
        let done = node.wait_ended(id).await;
        assert_eq!(done["status"], "completed");
    }
    for id in &started_b {
        let n = &node;
        wait_until(
            &format!("{id} is running"),
            Duration::from_secs(10),
            move || async move {
                let (_, body) = n.call("GET", &format!("/v1/instances/{id}"), None).await;
                body["status"] == "running"
            },
        )
        .await;
    }
    let newest_first = |v: &[String]| v.iter().rev().cloned().collect::<Vec<_>>();

    // Everything, one page: newest first, times never increasing.
    let pages = walk(&node, "", 50).await;
    assert_eq!(pages.len(), 1);
    assert_eq!(ids(&pages), newest_first(&started_all));
    let times: Vec<&str> = pages[0]
        .iter()
        .map(|i| i["created_at"].as_str().unwrap())
        .collect();
    let parsed: Vec<chrono::DateTime<chrono::Utc>> =
        times.iter().map(|t| t.parse().unwrap()).collect();
    assert!(
        parsed.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );

    // Small pages visit every instance exactly once, in the same order.
    for limit in [1, 3, 4, 10] {
        let pages = walk(&node, "", limit).await;
        let seen = ids(&pages);
        assert_eq!(seen, newest_first(&started_all), "limit {limit}");
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), 10, "limit {limit}");
        assert!(
            pages[..pages.len() - 1].iter().all(|p| p.len() == limit),
            "limit {limit}: only the last page may be short"
        );
    }

    // Filters, also paginated.
    let pages = walk(&node, "workflow=lista", 3).await;
    assert_eq!(ids(&pages), newest_first(&started_a));
    let pages = walk(&node, "workflow=listb", 2).await;
    assert_eq!(ids(&pages), newest_first(&started_b));
    let pages = walk(&node, "status=completed", 2).await;
    assert_eq!(ids(&pages), newest_first(&started_a));
    let pages = walk(&node, "status=running", 50).await;
    assert_eq!(ids(&pages), newest_first(&started_b));
    let pages = walk(&node, "workflow=listb&status=completed", 5).await;
    assert_eq!(ids(&pages), Vec::<String>::new());
    let pages = walk(&node, "workflow=nothing", 5).await;
    assert_eq!(ids(&pages), Vec::<String>::new());

    // Instances started while walking do not disturb the walk of older ones.
    let (status, page) = node.call("GET", "/v1/instances?limit=4", None).await;
    assert_eq!(status, 200);
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let (status, _) = start(&node, "lista", json!({"input": 99, "id": "late"})).await;
    assert_eq!(status, 201);
    let (_, rest) = node
        .call(
            "GET",
            &format!("/v1/instances?limit=50&cursor={cursor}"),
            None,
        )
        .await;
    let rest: Vec<String> = rest["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(rest, newest_first(&started_all)[4..].to_vec());
    node.shutdown().await;
}

/// Sends a GET over a fresh TCP connection and returns once the request is
/// written; the returned future reads the answer (status, JSON body).
async fn send_get(base_url: &str, path: &str) -> tokio::net::TcpStream {
    let host = base_url.strip_prefix("http://").unwrap();
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    stream
}

async fn read_answer(mut stream: tokio::net::TcpStream) -> (u16, Value) {
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    (
        status,
        serde_json::from_str(body).unwrap_or(Value::String(body.into())),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_returns_as_soon_as_the_instance_ends() {
    let db = TestDb::new().await;
    let release = Arc::new(Notify::new());
    let entered = Arc::new(Notify::new());
    let mut handlers = stead::Handlers::default();
    {
        let release = release.clone();
        let entered = entered.clone();
        handlers.register("gate", move |task: stead::TaskContext| {
            let release = release.clone();
            let entered = entered.clone();
            async move {
                entered.notify_one();
                release.notified().await;
                Ok(json!({"released": task.input}))
            }
        });
    }
    let node = TestNode::start_with_handlers(&db, handlers).await;
    node.put_workflow(
        "gated",
        json!({"steps": [{"id": "wait_for_test", "task": {"queue": "gate", "input": "${input}"}}],
               "output": "${steps.wait_for_test.output}"}),
    )
    .await;
    let id = node.start_instance("gated", json!(42)).await;
    tokio::time::timeout(Duration::from_secs(60), entered.notified())
        .await
        .expect("the handler was called");

    // While the handler is held, a long-poll waits its whole time and then
    // answers with the instance still running.
    let t = Instant::now();
    let (status, body) = node
        .call("GET", &format!("/v1/instances/{id}?wait=300ms"), None)
        .await;
    assert_eq!(status, 200, "{}", pretty(&body));
    assert_eq!(body["status"], "running", "{}", pretty(&body));
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "the long-poll waited: {:?}",
        t.elapsed()
    );

    // A long-poll of 60s is parked when the handler is let go: it answers
    // `completed` well before its wait is up.
    let poll = send_get(&node.url, &format!("/v1/instances/{id}?wait=60s")).await;
    let sent = Instant::now();
    let reader = tokio::spawn(read_answer(poll));
    wait_parked(&node, "instance", 1).await;
    release.notify_one();
    let (status, body) = reader.await.unwrap();
    let took = sent.elapsed();
    assert_eq!(status, 200, "{}", pretty(&body));
    assert_eq!(body["status"], "completed", "{}", pretty(&body));
    assert_eq!(body["output"], json!({"released": 42}));
    assert!(
        took < Duration::from_secs(55),
        "the long-poll answered {took:?} after it was sent; it should not wait out its 60s"
    );
    node.shutdown().await;
}

/// The creation time (Unix milliseconds) of a generated instance id, which
/// must be a version-7 UUID.
fn v7_millis(id: &str) -> u64 {
    let uuid = uuid::Uuid::parse_str(id).unwrap_or_else(|e| panic!("{id:?} is no UUID: {e}"));
    assert_eq!(uuid.get_version_num(), 7, "{id} is not a version-7 UUID");
    let (secs, nanos) = uuid
        .get_timestamp()
        .expect("a v7 UUID has a time")
        .to_unix();
    secs * 1000 + u64::from(nanos) / 1_000_000
}

/// Ids stead makes up are time-ordered (so the indexes keyed by them grow
/// at one end): a single start, a batch start without ids and a start from
/// SQL each get a version-7 UUID of the moment they were made.
#[tokio::test]
async fn generated_ids_are_version_7_uuids_in_creation_order() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow("greet", crate::support::greet_workflow())
        .await;
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let before = now_ms();
    let single = node.start_instance("greet", json!({"name": "a"})).await;
    let (status, batch) = node
        .call(
            "POST",
            "/v1/workflows/greet/instances/batch",
            Some(json!({"items": [{"input": {"name": "b"}}, {"input": {"name": "c"}}]})),
        )
        .await;
    assert_eq!(status, 200, "{}", pretty(&batch));
    let batched: Vec<String> = batch["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|i| i["id"].as_str().expect("an id").to_string())
        .collect();
    let client = db.client().await;
    let from_sql: String = client
        .query_one(
            "SELECT stead.start_workflow('greet', '{\"name\": \"d\"}')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let after = now_ms();

    let ids: Vec<&str> = std::iter::once(single.as_str())
        .chain(batched.iter().map(String::as_str))
        .chain(std::iter::once(from_sql.as_str()))
        .collect();
    assert_eq!(ids.len(), 4, "{ids:?}");
    let times: Vec<u64> = ids.iter().map(|id| v7_millis(id)).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]) && before <= times[0] && times[3] <= after,
        "ids {ids:?} at {times:?} are not in creation order within [{before}, {after}]"
    );
}
