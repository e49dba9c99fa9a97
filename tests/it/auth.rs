//! API keys and roles, against nodes that require keys: every route admits
//! exactly the roles that may use it, a worker key is held to its queues, a
//! revoked key stops working at once, and a key never reaches the logs or
//! the database.

use std::process::Command;

use serde_json::{json, Value};
use stead::Role;

use crate::{pretty, ServeProcess, TestDb, TestNode};

/// A node on `db` that requires keys.
async fn keyed_node(db: &TestDb) -> TestNode {
    let mut config = TestNode::config(db);
    config.auth = stead::Auth::Keys;
    TestNode::start_with(config).await
}

async fn make_key(db: &TestDb, role: Role, queues: &[&str]) -> String {
    let queues: Vec<String> = queues.iter().map(|q| q.to_string()).collect();
    let name = format!("{role} key");
    stead::keys::create(&db.url, "stead", &name, role, &queues)
        .await
        .expect("creating a key")
        .key
}

/// Sends a request with `key` as the bearer token (or none).
async fn call_as(
    node: &TestNode,
    key: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    node.call_with_key(key, method, path, body).await
}

/// Who may use a route, written out here (not taken from the code).
#[derive(Clone, Copy, Debug, PartialEq)]
enum May {
    Anyone,
    Readers,
    Operators,
    Workers,
    Admins,
}

fn allowed(may: May, role: Role) -> bool {
    match may {
        May::Anyone => true,
        May::Readers => matches!(role, Role::Admin | Role::Operator | Role::Reader),
        May::Operators => matches!(role, Role::Admin | Role::Operator),
        May::Workers => matches!(role, Role::Admin | Role::Worker),
        May::Admins => role == Role::Admin,
    }
}

fn routes() -> Vec<(&'static str, &'static str, Option<Value>, May)> {
    let token = json!({"lease_token": "00000000-0000-4000-8000-000000000000"});
    let def = json!({"steps": [{"id": "a", "task": {"queue": "q"}}]});
    vec![
        ("GET", "/healthz", None, May::Anyone),
        ("GET", "/readyz", None, May::Anyone),
        ("GET", "/metrics", None, May::Anyone),
        ("GET", "/v1/openapi.json", None, May::Anyone),
        ("GET", "/v1/workflows", None, May::Readers),
        ("GET", "/v1/workflows/w", None, May::Readers),
        ("PUT", "/v1/workflows/w", Some(def), May::Admins),
        ("GET", "/v1/workflows/w/versions/1", None, May::Readers),
        (
            "POST",
            "/v1/workflows/w/instances",
            Some(json!({})),
            May::Operators,
        ),
        (
            "POST",
            "/v1/workflows/w/instances/batch",
            Some(json!({"items": [{"input": 1}]})),
            May::Operators,
        ),
        ("GET", "/v1/instances", None, May::Readers),
        ("GET", "/v1/instances/i-1", None, May::Readers),
        ("GET", "/v1/instances/i-1/history", None, May::Readers),
        (
            "POST",
            "/v1/instances/i-1/signals/go",
            Some(json!(1)),
            May::Operators,
        ),
        ("POST", "/v1/instances/i-1/retry", None, May::Operators),
        (
            "POST",
            "/v1/instances/i-1/cancel",
            Some(json!({})),
            May::Operators,
        ),
        (
            "POST",
            "/v1/queues/q/claim",
            Some(json!({"worker": "w", "max": 1})),
            May::Workers,
        ),
        (
            "POST",
            "/v1/tasks/1/heartbeat",
            Some(token.clone()),
            May::Workers,
        ),
        (
            "POST",
            "/v1/tasks/1/complete",
            Some(token.clone()),
            May::Workers,
        ),
        (
            "POST",
            "/v1/tasks/1/fail",
            Some(json!({"lease_token": token["lease_token"], "error": {"message": "no"}})),
            May::Workers,
        ),
        (
            "POST",
            "/v1/tasks/results",
            Some(json!({"results": [{"task_id": 1, "lease_token": token["lease_token"]}]})),
            May::Workers,
        ),
        ("GET", "/v1/cluster", None, May::Readers),
        ("GET", "/v1/keys", None, May::Admins),
        (
            "POST",
            "/v1/keys",
            Some(json!({"name": "made over the API", "role": "reader"})),
            May::Admins,
        ),
        ("DELETE", "/v1/keys/0000000000000000", None, May::Admins),
    ]
}

#[tokio::test]
async fn every_route_admits_exactly_the_roles_that_may_use_it() {
    let db = TestDb::new().await;
    let node = keyed_node(&db).await;
    let mut keys = Vec::new();
    for role in Role::ALL {
        let queues: &[&str] = if role == Role::Worker { &["q"] } else { &[] };
        keys.push((role, make_key(&db, role, queues).await));
    }
    let admin = &keys[0].1;
    let def = json!({"steps": [{"id": "a", "task": {"queue": "q"}}]});
    let (status, body) = call_as(&node, Some(admin), "PUT", "/v1/workflows/w", Some(def)).await;
    assert_eq!(status, 201, "{}", pretty(&body));
    let start = json!({"id": "i-1", "input": 1});
    let (status, body) = call_as(
        &node,
        Some(admin),
        "POST",
        "/v1/workflows/w/instances",
        Some(start),
    )
    .await;
    assert_eq!(status, 201, "{}", pretty(&body));

    for (method, path, body, may) in routes() {
        let (status, answer) = call_as(&node, None, method, path, body.clone()).await;
        if may == May::Anyone {
            assert!(
                status < 400,
                "{method} {path} without a key: {status} {answer}"
            );
        } else {
            assert_eq!(status, 401, "{method} {path} without a key: {answer}");
            assert_eq!(answer["type"], "urn:stead:problem:unauthorized");
        }
        for (role, key) in &keys {
            let (status, answer) = call_as(&node, Some(key), method, path, body.clone()).await;
            if allowed(may, *role) {
                assert!(
                    status != 401 && status != 403 && status < 500,
                    "{method} {path} as {role}: {status} {answer}"
                );
            } else {
                assert_eq!(status, 403, "{method} {path} as {role}: {answer}");
                assert_eq!(answer["type"], "urn:stead:problem:forbidden");
            }
        }
    }
    // A token that is not a key, and a key with a wrong secret: 401.
    let mut wrong = admin.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == '0' { '1' } else { '0' });
    for bad in ["nonsense", wrong.as_str()] {
        let (status, answer) = call_as(&node, Some(bad), "GET", "/v1/workflows", None).await;
        assert_eq!(status, 401, "{bad}: {answer}");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn a_worker_key_cannot_claim_or_finish_another_queues_tasks() {
    let db = TestDb::new().await;
    let node = keyed_node(&db).await;
    let admin = make_key(&db, Role::Admin, &[]).await;
    let worker = make_key(&db, Role::Worker, &["mine"]).await;
    let def = json!({"steps": [{"id": "a", "task": {"queue": "theirs"}}]});
    call_as(&node, Some(&admin), "PUT", "/v1/workflows/w", Some(def)).await;
    let start = json!({"id": "i-1"});
    call_as(
        &node,
        Some(&admin),
        "POST",
        "/v1/workflows/w/instances",
        Some(start),
    )
    .await;

    let claim = json!({"worker": "x", "max": 1, "wait": "10s"});
    let (status, body) = call_as(
        &node,
        Some(&worker),
        "POST",
        "/v1/queues/theirs/claim",
        Some(claim.clone()),
    )
    .await;
    assert_eq!(status, 403, "{}", pretty(&body));
    // The admin claims it; the worker key, given the token, may not finish it.
    let (status, body) = call_as(
        &node,
        Some(&admin),
        "POST",
        "/v1/queues/theirs/claim",
        Some(claim),
    )
    .await;
    assert_eq!(status, 200, "{}", pretty(&body));
    let task = &body["tasks"][0];
    let id = task["task_id"].as_i64().expect("a claimed task");
    let token = json!({"lease_token": task["lease_token"], "output": "forged"});
    for path in [
        format!("/v1/tasks/{id}/complete"),
        format!("/v1/tasks/{id}/heartbeat"),
    ] {
        let mut body = token.clone();
        if path.ends_with("heartbeat") {
            body.as_object_mut().unwrap().remove("output");
        }
        let (status, answer) = call_as(&node, Some(&worker), "POST", &path, Some(body)).await;
        assert_eq!(status, 403, "{path}: {}", pretty(&answer));
    }
    let results = json!({"results": [{"task_id": id, "lease_token": task["lease_token"]}]});
    let (status, answer) = call_as(
        &node,
        Some(&worker),
        "POST",
        "/v1/tasks/results",
        Some(results),
    )
    .await;
    assert_eq!(status, 403, "{}", pretty(&answer));
    let client = db.client().await;
    let status: String = client
        .query_one("SELECT status FROM stead.tasks WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "leased", "the forged completion changed nothing");
    // Its own queue it may claim.
    let claim = json!({"worker": "x", "max": 1});
    let (status, body) = call_as(
        &node,
        Some(&worker),
        "POST",
        "/v1/queues/mine/claim",
        Some(claim),
    )
    .await;
    assert_eq!(status, 200, "{}", pretty(&body));
    node.shutdown().await;
}

#[tokio::test]
async fn a_revoked_key_stops_working_at_once() {
    let db = TestDb::new().await;
    let node = keyed_node(&db).await;
    let admin = make_key(&db, Role::Admin, &[]).await;
    let reader = make_key(&db, Role::Reader, &[]).await;
    let (status, _) = call_as(&node, Some(&reader), "GET", "/v1/workflows", None).await;
    assert_eq!(status, 200);
    // Revoked on the database (as `stead key revoke` does).
    let id = reader.split('_').nth(1).unwrap();
    let revoked = stead::keys::revoke(&db.url, "stead", id).await.unwrap();
    assert!(revoked.is_some());
    let (status, _) = call_as(&node, Some(&reader), "GET", "/v1/workflows", None).await;
    assert_eq!(status, 401, "the very next request is refused");

    // Made and revoked over the API by an admin.
    let new = json!({"name": "ops", "role": "operator"});
    let (status, made) = call_as(&node, Some(&admin), "POST", "/v1/keys", Some(new)).await;
    assert_eq!(status, 201, "{}", pretty(&made));
    let key = made["key"].as_str().unwrap().to_string();
    let (status, _) = call_as(&node, Some(&key), "GET", "/v1/instances", None).await;
    assert_eq!(status, 200);
    let path = format!("/v1/keys/{}", made["id"].as_str().unwrap());
    let (status, _) = call_as(&node, Some(&admin), "DELETE", &path, None).await;
    assert_eq!(status, 200);
    let (status, _) = call_as(&node, Some(&key), "GET", "/v1/instances", None).await;
    assert_eq!(status, 401);
    let (_, listed) = call_as(&node, Some(&admin), "GET", "/v1/keys", None).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 3);
    assert!(
        !listed.to_string().contains(&key[key.len() - 64..]),
        "a listing never shows a secret"
    );
    node.shutdown().await;
}

/// `stead key ...` on the test database; returns its stdout, or panics.
fn stead_key(db: &TestDb, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_stead"))
        .arg("key")
        .args(args)
        .args(["--database-url", &db.url])
        .output()
        .expect("running stead key");
    assert!(out.status.success(), "stead key {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn keys_made_with_the_cli_work_and_never_reach_logs_or_the_database() {
    let db = TestDb::new().await;
    // Debug logs of a real `stead serve` that requires keys.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stead"));
    cmd.args([
        "serve",
        "--database-url",
        &db.url,
        "--listen",
        "127.0.0.1:0",
    ])
    .args(["--name", "keyed", "--auth", "keys"])
    // Everything, the database driver's statements included.
    .env("STEAD_LOG", "debug");
    let node = ServeProcess::spawn_command(cmd, "keyed").await;
    let made: Value = serde_json::from_str(&stead_key(
        &db,
        &["create", "--name", "ops", "--role", "operator"],
    ))
    .unwrap();
    let key = made["key"].as_str().unwrap().to_string();
    let secret = &key[key.len() - 64..];
    let client = reqwest::Client::new();
    let list = format!("{}/v1/instances", node.base_url);
    let refused = client.get(&list).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let listed = client.get(&list).bearer_auth(&key).send().await.unwrap();
    assert_eq!(listed.status(), 200);
    // The client subcommands take --api-key (and STEAD_API_KEY).
    let cli = Command::new(env!("CARGO_BIN_EXE_stead"))
        .args(["list", "--server", &node.base_url, "--api-key", &key])
        .output()
        .unwrap();
    assert!(cli.status.success(), "{cli:?}");
    let cli = Command::new(env!("CARGO_BIN_EXE_stead"))
        .args(["list", "--server", &node.base_url])
        .output()
        .unwrap();
    assert!(!cli.status.success());
    assert!(
        String::from_utf8_lossy(&cli.stderr).contains("401"),
        "{cli:?}"
    );

    let sql = db.client().await;
    let stored: i64 = sql
        .query_one(
            "SELECT count(*) FROM stead.api_keys WHERE row_to_json(api_keys)::text LIKE '%' || $1 || '%'",
            &[&secret],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0, "only a digest of the secret is stored");
    let seen: i64 = sql
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
            &[&secret],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 0, "no session shows the key");
    assert!(
        !stead_key(&db, &["list"]).contains(secret),
        "a listing never shows a secret"
    );
    let logs = node.output();
    assert!(
        logs.contains("/v1/instances"),
        "requests are logged: {logs}"
    );
    assert!(
        logs.contains("api_keys"),
        "the key lookups are logged: {logs}"
    );
    assert!(!logs.contains(secret), "the key is not in the logs");
}
