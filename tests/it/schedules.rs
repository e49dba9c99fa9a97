//! Schedules: each firing starts exactly one instance, across a kill -9 of
//! the maintenance-duty holder; `skip` skips while the previous instance
//! runs; the API names the field of a bad schedule, shows the next firings
//! and the last instances, pauses, resumes and deletes.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::fault_harness::{Probe, Workers};
use crate::harness::SANITY_LIMIT;
use crate::{wait_until, TestDb, TestNode};

/// The firing times (UTC) of a schedule's instances, oldest first.
async fn firings(probe: &Probe, schedule: &str) -> Vec<DateTime<Utc>> {
    let prefix = format!("sched:{schedule}:");
    let rows = probe
        .query(
            "SELECT id FROM stead.instances WHERE starts_with(id, $1) ORDER BY id",
            &[&prefix],
        )
        .await
        .expect("reading the schedule's instances");
    rows.iter()
        .map(|r| {
            let id: String = r.get(0);
            let at = id.strip_prefix(&prefix).expect("the prefix");
            DateTime::parse_from_rfc3339(at)
                .unwrap_or_else(|e| panic!("{id}: {e}"))
                .with_timezone(&Utc)
        })
        .collect()
}

/// The id of the instance a firing starts.
fn instance_id(schedule: &str, at: DateTime<Utc>) -> String {
    format!("sched:{schedule}:{}", at.format("%Y-%m-%dT%H:%M:%SZ"))
}

/// The member holding the maintenance duty, as PostgreSQL's locks show it.
async fn duty_holder(probe: &Probe) -> Result<String, String> {
    let rows = probe
        .query(
            "SELECT holder FROM stead.duty_holders WHERE duty = 'maintenance' AND holder IS NOT NULL",
            &[],
        )
        .await?;
    rows.first()
        .map(|r| r.get(0))
        .ok_or_else(|| "no member holds the duty".into())
}

/// Seconds between consecutive firings that are not exactly one apart.
fn gaps(times: &[DateTime<Utc>]) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
    times
        .windows(2)
        .filter(|w| (w[1] - w[0]).num_milliseconds() != 1000)
        .map(|w| (w[0], w[1]))
        .collect()
}

/// A per-second schedule on three real processes, the duty holder killed
/// with SIGKILL half-way through 20 s: every second that passed started
/// exactly one instance (none missed, none doubled), and they all ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_second_schedule_fires_each_second_once_across_a_kill_of_the_duty_holder() {
    const SECONDS: i64 = 20;
    let db = TestDb::new().await;
    let url = db.url.as_str();
    let mut workers = Workers::start(&[("s1", url), ("s2", url), ("s3", url)]).await;
    let (_, api) = workers.targets.up()[0].clone();
    let http = reqwest::Client::new();
    let put = http
        .put(format!("{api}/v1/workflows/tick"))
        .json(&json!({"steps": [{"id": "a", "value": "${input}"}]}))
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());
    let put = http
        .put(format!("{api}/v1/schedules/every-second"))
        .json(
            &json!({"workflow": "tick", "cron": "* * * * * *", "overlap": "allow",
                      "input": {"from": "schedule"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(put.status().as_u16(), 201, "{:?}", put.text().await);

    let probe = Probe::new(url);
    let p = &probe;
    let first = wait_until("the first firing", SANITY_LIMIT, || async move {
        firings(p, "every-second").await.first().copied()
    })
    .await;
    let half = first + chrono::Duration::seconds(SECONDS / 2);
    wait_until("half of the firings", SANITY_LIMIT, || async move {
        firings(p, "every-second")
            .await
            .last()
            .is_some_and(|t| *t >= half)
    })
    .await;
    let holder = wait_until("a duty holder", SANITY_LIMIT, || async move {
        duty_holder(p).await
    })
    .await;
    workers.kill9(&holder);
    let end = first + chrono::Duration::seconds(SECONDS);
    let p = &probe;
    wait_until(
        "the last firing, after the kill",
        SANITY_LIMIT,
        || async move {
            firings(p, "every-second")
                .await
                .last()
                .is_some_and(|t| *t >= end)
        },
    )
    .await;
    let taken_over = duty_holder(&probe).await.expect("a new duty holder");
    assert_ne!(taken_over, holder, "another member took the duty over");

    let times: Vec<_> = firings(&probe, "every-second")
        .await
        .into_iter()
        .filter(|t| *t <= end)
        .collect();
    assert_eq!(times.first(), Some(&first));
    assert_eq!(times.last(), Some(&end));
    assert_eq!(gaps(&times), [], "no second missed");
    assert_eq!(times.len() as i64, SECONDS + 1, "one instance per second");
    let p = &probe;
    wait_until(
        "every fired instance completed",
        SANITY_LIMIT,
        || async move {
            let rows = p
                .query(
                    "SELECT count(*) FILTER (WHERE status <> 'completed') FROM stead.instances \
                 WHERE starts_with(id, 'sched:every-second:')",
                    &[],
                )
                .await?;
            match rows[0].get::<_, i64>(0) {
                0 => Ok(()),
                n => Err(format!("{n} not completed")),
            }
        },
    )
    .await;
    let input: Value = probe
        .query(
            "SELECT input FROM stead.instances WHERE starts_with(id, 'sched:') LIMIT 1",
            &[],
        )
        .await
        .unwrap()[0]
        .get(0);
    assert_eq!(input, json!({"from": "schedule"}));
}

/// `skip`: while the instance of a firing still runs, the firings after it
/// start nothing (and are counted as skipped); once it ended, the next
/// firing starts one again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_starts_nothing_while_the_previous_instance_runs() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow(
        "waits",
        json!({"steps": [{"id": "wait", "signal": {"name": "done"}}]}),
    )
    .await;
    let (status, body) = node
        .call(
            "PUT",
            "/v1/schedules/slow",
            Some(json!({"workflow": "waits", "cron": "* * * * * *"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["overlap"], "skip");
    let probe = Probe::new(&db.url);
    let p = &probe;
    let first = wait_until("the first firing", SANITY_LIMIT, || async move {
        firings(p, "slow").await.first().copied()
    })
    .await;
    // Three firings pass while the first instance waits for its signal.
    let n = &node;
    wait_until("three firings skipped", SANITY_LIMIT, || async move {
        let metrics = crate::support::scrape(n).await;
        let skipped = metrics["stead_schedule_firings_total{outcome=\"skipped\"}"];
        (skipped >= 3.0).then_some(())
    })
    .await;
    assert_eq!(firings(&probe, "slow").await, [first], "one instance only");

    let id = instance_id("slow", first);
    let (status, _) = node
        .call(
            "POST",
            &format!("/v1/instances/{id}/signals/done"),
            Some(json!(1)),
        )
        .await;
    assert_eq!(status, 202);
    node.wait_ended(&id).await;
    let p = &probe;
    let later = wait_until("a firing after the end", SANITY_LIMIT, || async move {
        let times = firings(p, "slow").await;
        (times.len() == 2).then(|| times[1])
    })
    .await;
    assert!(later >= first + chrono::Duration::seconds(3));
    node.shutdown().await;
}

/// The API: a bad cron, zone, overlap, catchup or workflow is a problem
/// naming the field; a schedule shows its next five firings; pause stops
/// them, resume sets the next one after now; delete removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_api_names_bad_fields_and_pauses_resumes_and_deletes() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow("nightly", json!({"steps": [{"id": "a", "value": 1}]}))
        .await;
    let bad = [
        (
            json!({"workflow": "nightly", "cron": "61 * * * *"}),
            "$.cron",
        ),
        (json!({"workflow": "nightly", "cron": "* * *"}), "$.cron"),
        (
            json!({"workflow": "nightly", "cron": "0 0 30 2 *"}),
            "$.cron",
        ),
        (
            json!({"workflow": "nightly", "cron": "0 3 * * *", "timezone": "Mars/Base"}),
            "$.timezone",
        ),
        (
            json!({"workflow": "nightly", "cron": "0 3 * * *", "catchup": "soon"}),
            "$.catchup",
        ),
        (
            json!({"workflow": "nobody", "cron": "0 3 * * *"}),
            "$.workflow",
        ),
        (
            json!({"workflow": "nightly", "cron": "0 3 * * *", "overlap": "sometimes"}),
            "$.overlap",
        ),
    ];
    for (body, field) in bad {
        let (status, problem) = node
            .call("PUT", "/v1/schedules/n", Some(body.clone()))
            .await;
        assert_eq!(status, 422, "{body}: {problem}");
        assert_eq!(problem["errors"][0]["path"], field, "{body}: {problem}");
    }
    let (status, _) = node
        .call(
            "PUT",
            "/v1/schedules/a:b",
            Some(json!({"workflow": "nightly", "cron": "0 3 * * *"})),
        )
        .await;
    assert_eq!(status, 400, "a name with a colon");

    let (status, body) = node
        .call(
            "PUT",
            "/v1/schedules/n",
            Some(json!({"workflow": "nightly", "cron": "30 2 * * *",
                        "timezone": "Europe/Berlin", "catchup": "1h"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["catchup"], "1h");
    let next: Vec<DateTime<Utc>> = body["next_firings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| crate::support::time(t, "a firing"))
        .collect();
    assert_eq!(next.len(), 5);
    assert!(next.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(body["next_fire_at"], body["next_firings"][0]);

    let (status, paused) = node.call("POST", "/v1/schedules/n/pause", None).await;
    assert_eq!((status, paused["paused"].clone()), (200, json!(true)));
    let (_, shown) = node.call("GET", "/v1/schedules/n", None).await;
    assert_eq!(shown["next_firings"], json!([]));
    let (status, resumed) = node.call("POST", "/v1/schedules/n/resume", None).await;
    assert_eq!((status, resumed["paused"].clone()), (200, json!(false)));
    assert!(crate::support::time(&resumed["next_fire_at"], "next") > Utc::now());

    let (status, list) = node.call("GET", "/v1/schedules", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["schedules"][0]["name"], "n");
    let (status, _) = node.call("DELETE", "/v1/schedules/n", None).await;
    assert_eq!(status, 204);
    let (status, _) = node.call("GET", "/v1/schedules/n", None).await;
    assert_eq!(status, 404);
    let (status, _) = node.call("DELETE", "/v1/schedules/n", None).await;
    assert_eq!(status, 404);
    node.shutdown().await;
}
