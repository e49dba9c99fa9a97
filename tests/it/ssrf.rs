//! The SSRF guard of `http` steps, on nodes with the default policy and with
//! `--http-allow`: loopback, link-local and private addresses, and names that
//! resolve to them, are refused (permanently, saying why) unless allowed;
//! redirects are judged hop by hop and capped; response bodies are capped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use serde_json::{json, Value};

use crate::support::step;
use crate::{pretty, TestDb, TestNode};

/// A loopback server: `/ok` answers `{"ok": true}`, `/bytes/{n}` n bytes,
/// `/to?url=U` redirects to U, `/hops/{k}` redirects k times to `/ok`;
/// counts every request.
struct Target {
    url: String,
    port: u16,
    hits: Arc<AtomicUsize>,
}

impl Target {
    async fn start() -> Target {
        let hits = Arc::new(AtomicUsize::new(0));
        let app = axum::Router::new()
            .route(
                "/ok",
                axum::routing::any(|| async { axum::Json(json!({"ok": true})) }),
            )
            .route(
                "/bytes/{n}",
                axum::routing::get(|Path(n): Path<usize>| async move { "x".repeat(n) }),
            )
            .route("/to", axum::routing::get(redirect_to))
            .route("/hops/{k}", axum::routing::get(hops))
            .layer(axum::middleware::from_fn_with_state(hits.clone(), count))
            .with_state(());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Target {
            url: format!("http://127.0.0.1:{port}"),
            port,
            hits,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn count(
    State(hits): State<Arc<AtomicUsize>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    hits.fetch_add(1, Ordering::SeqCst);
    next.run(request).await
}

#[derive(serde::Deserialize)]
struct To {
    url: String,
}

async fn redirect_to(Query(to): Query<To>) -> Redirect {
    Redirect::temporary(&to.url)
}

async fn hops(Path(k): Path<usize>) -> Response {
    if k == 0 {
        Redirect::temporary("/ok").into_response()
    } else {
        Redirect::temporary(&format!("/hops/{}", k - 1)).into_response()
    }
}

/// A node whose `http` steps may reach what `allow` opens (nothing beyond
/// public addresses when empty).
async fn node_allowing(db: &TestDb, allow: &[&str], max_response_bytes: usize) -> TestNode {
    let mut config = TestNode::config(db);
    config.http_allow = allow.iter().map(|a| a.to_string()).collect();
    config.tuning.http_max_response_bytes = max_response_bytes;
    config.tuning.http_max_redirects = 3;
    TestNode::start_with(config).await
}

/// Runs a one-step workflow calling `url` (one attempt, 1 s timeout);
/// returns the ended instance.
async fn call(node: &TestNode, name: &str, url: &str) -> Value {
    node.put_workflow(
        name,
        json!({"steps": [{"id": "call", "http": {"method": "GET", "url": url},
                           "retry": {"max_attempts": 1}, "timeout": "1s"}]}),
    )
    .await;
    let id = node.start_instance(name, json!(null)).await;
    node.wait_ended(&id).await
}

fn error_message(instance: &Value) -> String {
    step(instance, "call")["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn closed_addresses_and_names_that_resolve_to_them_are_refused_by_default() {
    let db = TestDb::new().await;
    let target = Target::start().await;
    let node = node_allowing(&db, &[], 1 << 20).await;
    let cases = [
        (
            "loopback",
            format!("{}/ok", target.url),
            "127.0.0.1 is a loopback address",
        ),
        (
            "metadata",
            "http://169.254.169.254/latest/meta-data/".into(),
            "link-local",
        ),
        (
            "private",
            "http://10.0.0.1/".into(),
            "10.0.0.1 is a private address",
        ),
        (
            "by_name",
            format!("http://localhost:{}/ok", target.port),
            "localhost (at ",
        ),
        (
            "v6",
            format!("http://[::1]:{}/ok", target.port),
            "a loopback address",
        ),
    ];
    for (name, url, why) in cases {
        let ended = call(&node, name, &url).await;
        assert_eq!(ended["status"], "failed", "{url}: {}", pretty(&ended));
        let message = error_message(&ended);
        assert!(
            message.contains("refused by the SSRF guard"),
            "{url}: {message}"
        );
        assert!(message.contains(why), "{url}: {message}");
        assert_eq!(
            step(&ended, "call")["attempt"],
            1,
            "refused for good, not retried"
        );
    }
    assert_eq!(target.hits(), 0, "no request reached the loopback server");
    node.shutdown().await;
}

#[tokio::test]
async fn http_allow_opens_exactly_what_it_names() {
    let db = TestDb::new().await;
    let target = Target::start().await;
    let allow = ["127.0.0.1/32", "localhost", "169.254.169.254", "10.0.0.1"];
    let node = node_allowing(&db, &allow, 1 << 20).await;
    for (name, url) in [
        ("by_cidr", format!("{}/ok", target.url)),
        ("by_name", format!("http://localhost:{}/ok", target.port)),
    ] {
        let ended = call(&node, name, &url).await;
        assert_eq!(ended["status"], "completed", "{url}: {}", pretty(&ended));
        assert_eq!(step(&ended, "call")["output"], json!({"ok": true}));
    }
    // Allowed, so tried: these addresses do not answer here, and the step
    // fails on the attempt itself, not on the guard.
    for (name, url) in [
        ("metadata", "http://169.254.169.254/latest/meta-data/"),
        ("private", "http://10.0.0.1/"),
    ] {
        let ended = call(&node, name, url).await;
        let message = error_message(&ended);
        assert!(!message.contains("SSRF"), "{url} was allowed: {message}");
        assert_eq!(ended["status"], "failed", "{url}: {}", pretty(&ended));
    }
    // A redirect from an allowed host to a closed one is refused at that hop.
    let to_private = format!("{}/to?url=http://10.0.0.2/", target.url);
    let ended = call(&node, "redirected", &to_private).await;
    assert!(
        error_message(&ended).contains("10.0.0.2 is a private address"),
        "{}",
        pretty(&ended)
    );
    node.shutdown().await;
}

#[tokio::test]
async fn redirects_and_response_bodies_are_capped() {
    let db = TestDb::new().await;
    let target = Target::start().await;
    let node = node_allowing(&db, &["127.0.0.1"], 1000).await;
    // Three redirects is the limit: followed; four are not.
    let ended = call(&node, "three_hops", &format!("{}/hops/2", target.url)).await;
    assert_eq!(ended["status"], "completed", "{}", pretty(&ended));
    let ended = call(&node, "four_hops", &format!("{}/hops/3", target.url)).await;
    assert_eq!(ended["status"], "failed", "{}", pretty(&ended));
    assert!(
        error_message(&ended).contains("redirects"),
        "{}",
        pretty(&ended)
    );
    // A body of exactly the limit is read; one byte more fails for good.
    let ended = call(&node, "at_limit", &format!("{}/bytes/1000", target.url)).await;
    assert_eq!(ended["status"], "completed", "{}", pretty(&ended));
    assert_eq!(
        step(&ended, "call")["output"].as_str().map(str::len),
        Some(1000)
    );
    let ended = call(&node, "past_limit", &format!("{}/bytes/1001", target.url)).await;
    assert_eq!(ended["status"], "failed", "{}", pretty(&ended));
    let message = error_message(&ended);
    assert!(message.contains("longer than 1000 bytes"), "{message}");
    assert_eq!(step(&ended, "call")["attempt"], 1, "a limit is not retried");
    node.shutdown().await;
}
