//! Flow control: a queue's rate limit holds across three real processes, in
//! process and inline alike; `max_leased` bounds what is leased at once; a
//! paused queue hands out nothing until resumed.

use serde_json::json;

use crate::fault_harness::{Probe, Workers};
use crate::harness::SANITY_LIMIT;
use crate::support::{claim, task_call};
use crate::{wait_until, TestDb, TestNode};

/// Instances of `workflow` that ended in the database-time window
/// `[from, from + secs)`.
async fn ended_between(
    probe: &Probe,
    workflow: &str,
    from: chrono::DateTime<chrono::Utc>,
    secs: f64,
) -> i64 {
    probe
        .query(
            "SELECT count(*) FROM stead.instances WHERE workflow_name = $1 \
             AND ended_at >= $2::timestamptz AND ended_at < $2::timestamptz + $3::float8 * interval '1 second'",
            &[&workflow, &from, &secs],
        )
        .await
        .unwrap()[0]
        .get(0)
}

/// Three processes work `stead.echo`, limited to 50 claims a second with a
/// burst of 10, under a backlog of 1500: over 20 s of database time, 1000
/// (±10%) of its instances complete, no more (no claim and no inline run
/// gets past the limit) and no fewer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_queue_stays_within_ten_percent_across_three_nodes() {
    const RATE: f64 = 50.0;
    const WINDOW_S: f64 = 20.0;
    let db = TestDb::new().await;
    let url = db.url.as_str();
    let workers = Workers::start(&[("r1", url), ("r2", url), ("r3", url)]).await;
    let (_, api) = workers.targets.up()[0].clone();
    let http = reqwest::Client::new();
    let put = http
        .put(format!("{api}/v1/queues/stead.echo"))
        .json(&json!({"rate": {"per_second": RATE, "burst": 10}}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status().as_u16(), 200, "{:?}", put.text().await);
    let put = http
        .put(format!("{api}/v1/workflows/limited"))
        .json(
            &json!({"steps": [{"id": "a", "task": {"queue": "stead.echo", "input": "${input}"}}]}),
        )
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());
    let probe = Probe::new(url);
    // Every process must know of the limit before the work arrives: the
    // claims hold to it regardless, but an attempt runs inline only on a
    // process that knows its queue has none.
    let http = &http;
    for (name, url) in workers.targets.up() {
        let url = &url;
        wait_until(
            &format!("{name} knows the limit"),
            SANITY_LIMIT,
            || async move {
                let text = http
                    .get(format!("{url}/metrics"))
                    .send()
                    .await
                    .ok()?
                    .text()
                    .await
                    .ok()?;
                let metrics = crate::support::parse_metrics(&text);
                (metrics.get("stead_queue_controlled{queue=\"stead.echo\"}") == Some(&1.0))
                    .then_some(())
            },
        )
        .await;
    }
    let p = &probe;
    probe
        .query(
            "SELECT count(*) FROM stead.start_workflows('limited', \
             ARRAY(SELECT to_jsonb(g) FROM generate_series(1, 1500) g))",
            &[],
        )
        .await
        .unwrap();
    // From two seconds in (the start-up burst spent), for 20 s.
    let from: chrono::DateTime<chrono::Utc> = probe
        .query("SELECT now() + interval '2 seconds'", &[])
        .await
        .unwrap()[0]
        .get(0);
    let until_s = WINDOW_S + 2.5;
    wait_until("the window has passed", SANITY_LIMIT * 2, || async move {
        let rows = p
            .query(
                "SELECT now() >= $1::timestamptz + $2::float8 * interval '1 second'",
                &[&from, &(until_s - 2.0)],
            )
            .await?;
        rows[0]
            .get::<_, bool>(0)
            .then_some(())
            .ok_or("not yet".to_string())
    })
    .await;
    let done = ended_between(&probe, "limited", from, WINDOW_S).await;
    let expected = RATE * WINDOW_S;
    let rate = done as f64 / WINDOW_S;
    eprintln!("{done} completed in {WINDOW_S} s: {rate:.1}/s against a limit of {RATE}/s");
    assert!(
        (done as f64 - expected).abs() <= expected * 0.1,
        "{done} completed in {WINDOW_S} s, expected {expected} ± 10%"
    );
    let left: i64 = probe
        .query(
            "SELECT count(*) FROM stead.instances WHERE workflow_name = 'limited' AND ended_at IS NULL",
            &[],
        )
        .await
        .unwrap()[0]
        .get(0);
    assert!(left > 0, "the backlog lasted the whole window");
}

/// `max_leased` bounds the tasks leased at once, for external workers too;
/// a paused queue gives out none; resumed, it does again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_leased_and_pause_bound_external_claims() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    let (status, body) = node
        .call("PUT", "/v1/queues/ext", Some(json!({"max_leased": 3})))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["max_leased"], 3);
    node.put_workflow(
        "ext",
        json!({"steps": [{"id": "a", "task": {"queue": "ext"}}]}),
    )
    .await;
    for i in 0..10 {
        node.start_instance("ext", json!(i)).await;
    }
    let wait = json!({"worker": "w", "max": 10, "wait": "5s"});
    let first = claim(&node, "ext", wait.clone()).await;
    assert_eq!(first.len(), 3, "max_leased: 3");
    let none = claim(&node, "ext", json!({"worker": "w", "max": 10})).await;
    assert!(none.is_empty(), "nothing past max_leased");
    let done = json!({"lease_token": first[0]["lease_token"], "output": 1});
    assert_eq!(task_call(&node, &first[0], "complete", done).await.0, 200);
    let one = claim(&node, "ext", wait.clone()).await;
    assert_eq!(one.len(), 1, "one place freed");

    let (status, paused) = node.call("POST", "/v1/queues/ext/pause", None).await;
    assert_eq!((status, paused["paused"].clone()), (200, json!(true)));
    for task in first.iter().skip(1).chain(&one) {
        let done = json!({"lease_token": task["lease_token"], "output": 1});
        assert_eq!(task_call(&node, task, "complete", done).await.0, 200);
    }
    let none = claim(&node, "ext", json!({"worker": "w", "max": 10})).await;
    assert!(none.is_empty(), "a paused queue gives out nothing");
    let (_, listed) = node.call("GET", "/v1/queues", None).await;
    assert_eq!(listed["queues"][0]["queue"], "ext");
    assert_eq!(listed["queues"][0]["paused"], true);
    let (status, _) = node.call("POST", "/v1/queues/ext/resume", None).await;
    assert_eq!(status, 200);
    let again = claim(&node, "ext", wait).await;
    assert_eq!(again.len(), 3);

    let (status, problem) = node
        .call(
            "PUT",
            "/v1/queues/ext",
            Some(json!({"rate": {"per_second": 0}})),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(problem["errors"][0]["path"], "$.rate.per_second");
    let (status, freed) = node.call("PUT", "/v1/queues/ext", Some(json!({}))).await;
    assert_eq!(status, 200);
    assert_eq!(freed["max_leased"], json!(null));
    let (_, listed) = node.call("GET", "/v1/queues", None).await;
    assert_eq!(
        listed["queues"],
        json!([]),
        "a queue without limits has no row"
    );
    node.shutdown().await;
}

/// Three processes, 200 instances over 5 keys with a limit of 2: an
/// external worker, claiming across all three, never holds more than 2
/// tasks of one key at once (and does reach 2); all complete. While they
/// wait, instances show `held: concurrency`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_key_limit_of_two_holds_across_three_nodes() {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};
    const INSTANCES: i64 = 200;
    let db = TestDb::new().await;
    let url = db.url.as_str();
    let workers = Workers::start(&[("k1", url), ("k2", url), ("k3", url)]).await;
    let targets: Vec<String> = workers.targets.up().into_iter().map(|(_, u)| u).collect();
    let http = reqwest::Client::new();
    let def = json!({
        "concurrency": {"key": "${input.customer}", "limit": 2},
        "steps": [{"id": "work", "task": {"queue": "per-key", "input": "${input}"}}]
    });
    let put = http
        .put(format!("{}/v1/workflows/keyed", targets[0]))
        .json(&def)
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{:?}", put.text().await);
    let probe = Probe::new(url);
    probe
        .query(
            "SELECT count(*) FROM stead.start_workflows('keyed', ARRAY(
                 SELECT jsonb_build_object('customer', 'c' || (g % 5), 'n', g)
                 FROM generate_series(1, $1::int8) g))",
            &[&INSTANCES],
        )
        .await
        .unwrap();

    // The external worker: claims round-robin, holds each task a moment,
    // and counts what it holds per key.
    let holding: Arc<Mutex<BTreeMap<String, (i64, i64)>>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let mut worker = tokio::task::JoinSet::new();
    for (n, base) in targets.iter().enumerate() {
        let (http, base, holding, done) =
            (http.clone(), base.clone(), holding.clone(), done.clone());
        worker.spawn(async move {
            let mut rng = n as u64;
            while done.load(std::sync::atomic::Ordering::SeqCst) < INSTANCES {
                let answer: serde_json::Value = http
                    .post(format!("{base}/v1/queues/per-key/claim"))
                    .json(&json!({"worker": format!("ext-{n}"), "max": 20, "wait": "500ms"}))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let mut running = tokio::task::JoinSet::new();
                for task in answer["tasks"].as_array().cloned().unwrap_or_default() {
                    let key = task["input"]["customer"].as_str().unwrap().to_string();
                    {
                        let mut h = holding.lock().unwrap();
                        let e = h.entry(key.clone()).or_default();
                        e.0 += 1;
                        e.1 = e.1.max(e.0);
                    }
                    rng = rng
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let hold_ms = 10 + (rng >> 33) % 40;
                    let (http, base, holding, done) =
                        (http.clone(), base.clone(), holding.clone(), done.clone());
                    running.spawn(async move {
                        // The work the task stands for.
                        tokio::time::sleep(std::time::Duration::from_millis(hold_ms)).await;
                        holding.lock().unwrap().get_mut(&key).unwrap().0 -= 1;
                        let url = format!("{base}/v1/tasks/{}/complete", task["task_id"]);
                        let body = json!({"lease_token": task["lease_token"], "output": null});
                        let status = http.post(url).json(&body).send().await.unwrap().status();
                        assert_eq!(status.as_u16(), 200);
                        done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    });
                }
                while running.join_next().await.is_some() {}
            }
        });
    }
    let p = &probe;
    let held = wait_until(
        "an instance waits for its key",
        SANITY_LIMIT,
        || async move {
            let rows = p
                .query(
                    "SELECT id FROM stead.instances WHERE held = 'concurrency' LIMIT 1",
                    &[],
                )
                .await
                .ok()?;
            rows.first().map(|r| r.get::<_, String>(0))
        },
    )
    .await;
    let shown: serde_json::Value = http
        .get(format!("{}/v1/instances/{held}", targets[0]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    if shown["status"] == "pending" {
        assert_eq!(shown["held"], "concurrency", "{shown}");
    }
    wait_until("every instance completes", SANITY_LIMIT * 2, || async move {
        let rows = p
            .query(
                "SELECT count(*) FROM stead.instances WHERE workflow_name = 'keyed' AND status = 'completed'",
                &[],
            )
            .await?;
        let n: i64 = rows[0].get(0);
        (n == INSTANCES).then_some(()).ok_or(format!("{n} completed"))
    })
    .await;
    while let Some(r) = worker.join_next().await {
        r.unwrap();
    }
    let most = holding.lock().unwrap().clone();
    eprintln!("most held at once per key: {most:?}");
    assert_eq!(most.len(), 5);
    assert!(most.values().all(|(_, max)| *max <= 2), "{most:?}");
    assert!(
        most.values().any(|(_, max)| *max == 2),
        "the limit was reached: {most:?}"
    );
    let left: i64 = probe
        .query(
            "SELECT count(*) FROM stead.instances WHERE held IS NOT NULL",
            &[],
        )
        .await
        .unwrap()[0]
        .get(0);
    assert_eq!(left, 0, "nobody is left waiting");
}

/// A paused workflow's new instances wait `pending`, held `paused`, and
/// start once it is resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_workflow_holds_new_instances_until_resumed() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow("later", json!({"steps": [{"id": "a", "value": 1}]}))
        .await;
    let (status, body) = node.call("POST", "/v1/workflows/later/pause", None).await;
    assert_eq!((status, body["paused"].clone()), (200, json!(true)));
    let id = node.start_instance("later", json!(null)).await;
    let n = &node;
    let id_ref = &id;
    wait_until("the instance is held", SANITY_LIMIT, || async move {
        let (_, shown) = n
            .call("GET", &format!("/v1/instances/{id_ref}"), None)
            .await;
        (shown["held"] == "paused" && shown["status"] == "pending").then_some(())
    })
    .await;
    let metrics = crate::support::scrape(&node).await;
    assert_eq!(
        metrics.get("stead_workflow_paused{workflow=\"later\"}"),
        Some(&1.0)
    );
    let (status, body) = node.call("POST", "/v1/workflows/later/resume", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["released"], 1);
    assert_eq!(node.wait_ended(&id).await["status"], "completed");
    let (status, _) = node.call("POST", "/v1/workflows/nobody/pause", None).await;
    assert_eq!(status, 404);
    node.shutdown().await;
}
