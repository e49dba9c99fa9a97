//! The console in a real headless Chromium (Debian's `chromium` driven
//! through `chromedriver` over WebDriver), against a keyed node and a
//! second `stead` process with real instances: log in, list and filter,
//! bulk-retry exactly the selected rows, read the step graph, signal,
//! cancel and retry through the forms, and see every member on the cluster
//! page; each change is checked through the API. Screenshots of each step
//! go to `target/console-screenshots/`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use stead::{Handlers, Role, TaskContext, TaskError};

use crate::support::events;
use crate::{wait_until, ServeProcess, TestDb, TestNode};

/// How long the browser may take to show what a step waits for.
const UI_WAIT: Duration = Duration::from_secs(30);

/// A chromedriver process and its browser session; dropping it ends both.
struct Browser {
    client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
    shots: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn on_path(program: &str) -> PathBuf {
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&dirs)
        .map(|d| d.join(program))
        .chain([PathBuf::from("/usr/bin").join(program)])
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{program} is not installed: scripts/test installs Debian's chromium and chromium-driver")
        })
}

impl Browser {
    async fn start() -> Browser {
        let chromium = on_path("chromium");
        let chromedriver = on_path("chromedriver");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        wait_until(
            "chromedriver to listen",
            Duration::from_secs(30),
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
        let profile = tempfile::tempdir().unwrap();
        // Root in CI: no sandbox. The closed network: no background traffic.
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1000",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({"goog:chromeOptions": {"binary": chromium, "args": args}});
        let caps = caps.as_object().unwrap().clone().into_iter().collect();
        // Two rustls providers are linked (ours and the client's): pick one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = ClientBuilder::rustls()
            .expect("a TLS config")
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a Chromium session through chromedriver");
        let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            client,
            driver,
            _profile: profile,
            shots,
        }
    }

    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("a screenshot");
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigating");
    }

    async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(UI_WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
    }

    async fn click(&self, css: &str) {
        self.find(css).await.click().await.expect("clicking");
    }

    async fn fill(&self, css: &str, text: &str) {
        let field = self.find(css).await;
        field.clear().await.expect("clearing a field");
        field.send_keys(text).await.expect("typing");
    }

    async fn attr(&self, css: &str, name: &str) -> Option<String> {
        self.find(css).await.attr(name).await.expect("an attribute")
    }

    /// The `data-id`s of the list's rows.
    async fn listed(&self) -> Vec<String> {
        let rows = self
            .client
            .find_all(Locator::Css("tr[data-id]"))
            .await
            .unwrap();
        let mut ids = Vec::new();
        for row in rows {
            ids.push(row.attr("data-id").await.unwrap().unwrap());
        }
        ids.sort();
        ids
    }

    /// Waits until the page's notice says `text` (a form's answer).
    async fn notice(&self, text: &str) {
        let want = text.to_string();
        wait_until(&format!("the notice {text:?}"), UI_WAIT, || async {
            let notice = self.client.find(Locator::Css("p.notice")).await.ok()?;
            notice
                .text()
                .await
                .ok()
                .filter(|t| t.contains(&want))
                .map(|_| ())
        })
        .await;
    }
}

/// The node's API as an admin sees it.
struct Api<'a> {
    node: &'a TestNode,
    key: String,
}

impl Api<'_> {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, body) = self
            .node
            .call_with_key(Some(&self.key), method, path, body)
            .await;
        assert!(status < 300, "{method} {path}: {status} {body}");
        body
    }

    async fn wait_status(&self, id: &str, status: &str) -> Value {
        wait_until(
            &format!("{id} to be {status}"),
            Duration::from_secs(60),
            || async {
                let body = self.call("GET", &format!("/v1/instances/{id}"), None).await;
                (body["status"] == status).then_some(body)
            },
        )
        .await
    }

    async fn wait_step(&self, id: &str, step: &str, status: &str) {
        wait_until(
            &format!("{step} of {id} to be {status}"),
            Duration::from_secs(60),
            || async {
                let body = self.call("GET", &format!("/v1/instances/{id}"), None).await;
                let steps = body["steps"].as_array()?.clone();
                steps
                    .iter()
                    .any(|s| s["id"] == step && s["status"] == status)
                    .then_some(())
            },
        )
        .await
    }

    async fn history_types(&self, id: &str) -> Vec<String> {
        let h = self
            .call("GET", &format!("/v1/instances/{id}/history"), None)
            .await;
        h["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_string())
            .collect()
    }
}

fn handlers(healed: Arc<AtomicBool>) -> Handlers {
    let mut handlers = Handlers::default();
    handlers.register("console.ship", |task: TaskContext| async move {
        Ok(json!({"shipped": task.input}))
    });
    handlers.register("console.flaky", move |_task: TaskContext| {
        let healed = healed.clone();
        async move {
            if healed.load(Ordering::SeqCst) {
                Ok(json!("fine now"))
            } else {
                Err(TaskError::permanent("the partner API is down"))
            }
        }
    });
    handlers
}

#[tokio::test]
async fn the_console_lists_filters_and_acts_in_a_real_browser() {
    let db = TestDb::new().await;
    let healed = Arc::new(AtomicBool::new(false));
    let mut config = TestNode::config(&db);
    config.auth = stead::Auth::Keys;
    config.handlers = handlers(healed.clone());
    let node = TestNode::start_with(config).await;
    let peer = ServeProcess::spawn(&db.url, "console-peer", &["--auth", "keys"]).await;
    let admin = stead::keys::create(&db.url, "stead", "admin", Role::Admin, &[])
        .await
        .unwrap();
    let operator = stead::keys::create(&db.url, "stead", "ops", Role::Operator, &[])
        .await
        .unwrap();
    let api = Api {
        node: &node,
        key: admin.key,
    };
    api.call(
        "PUT",
        "/v1/workflows/order",
        Some(json!({"steps": [
            {"id": "reserve", "value": {"sku": "${input.sku}"}},
            {"id": "approve", "signal": {"name": "approve"}},
            {"id": "ship", "task": {"queue": "console.ship", "input": "${steps.approve.output}"}}
        ]})),
    )
    .await;
    api.call(
        "PUT",
        "/v1/workflows/flaky",
        Some(json!({"steps": [
            {"id": "call", "task": {"queue": "console.flaky"}, "retry": {"max_attempts": 1}}
        ]})),
    )
    .await;
    for id in ["o-1", "o-2"] {
        api.call(
            "POST",
            "/v1/workflows/order/instances",
            Some(json!({"id": id, "input": {"sku": "<b>sku</b>"}})),
        )
        .await;
    }
    for id in ["f-1", "f-2", "f-3"] {
        api.call(
            "POST",
            "/v1/workflows/flaky/instances",
            Some(json!({"id": id})),
        )
        .await;
    }
    for id in ["f-1", "f-2", "f-3"] {
        api.wait_status(id, "failed").await;
    }
    for id in ["o-1", "o-2"] {
        api.wait_step(id, "approve", "waiting").await;
    }

    let b = Browser::start().await;
    let base = &node.url;
    // No key yet: the login form, then back to the page asked for.
    b.goto(&format!("{base}/instances/o-1")).await;
    b.find("input#key").await;
    b.screenshot("01-login").await;
    b.fill("input#key", &operator.key).await;
    b.click("body.login button[type=submit]").await;
    b.find("svg.graph").await;
    assert!(b
        .client
        .current_url()
        .await
        .unwrap()
        .path()
        .ends_with("/instances/o-1"));
    // The test reads pages as they load: no refreshing under it.
    let refresh = b.find("#auto-refresh").await;
    if refresh.is_selected().await.unwrap() {
        refresh.click().await.unwrap();
    }

    // The graph colours each step by its status; the README shows this page.
    for (step, status) in [
        ("reserve", "completed"),
        ("approve", "waiting"),
        ("ship", "pending"),
    ] {
        let css = format!("svg.graph g[data-step=\"{step}\"]");
        assert_eq!(
            b.attr(&css, "data-status").await.as_deref(),
            Some(status),
            "{step}"
        );
    }
    b.screenshot("02-instance-waiting").await;

    // A signal through the form: the instance goes on and completes.
    b.fill("#signal-name", "approve").await;
    b.fill("#signal-payload", r#"{"by": "browser"}"#).await;
    b.click("form[action$=\"/signal\"] button").await;
    b.notice("Signal sent").await;
    let done = api.wait_status("o-1", "completed").await;
    let approve = done["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "approve")
        .unwrap()
        .clone();
    assert_eq!(approve["output"], json!({"by": "browser"}));
    b.goto(&format!("{base}/instances/o-1")).await;
    for step in ["reserve", "approve", "ship"] {
        let css = format!("svg.graph g[data-step=\"{step}\"]");
        assert_eq!(
            b.attr(&css, "data-status").await.as_deref(),
            Some("completed"),
            "{step}"
        );
    }
    b.screenshot("03-instance-completed").await;

    // Cancel with a reason through the form.
    b.goto(&format!("{base}/instances/o-2")).await;
    b.fill("#cancel-reason", "cancelled from the browser").await;
    b.click("form[action$=\"/cancel\"] button").await;
    b.notice("Cancel requested").await;
    api.wait_status("o-2", "cancelled").await;
    let history = api.call("GET", "/v1/instances/o-2/history", None).await;
    let asked = events(
        history["events"].as_array().unwrap(),
        "instance_cancel_requested",
    );
    assert_eq!(asked[0]["data"]["reason"], "cancelled from the browser");

    // The list shows every instance, and filters by status.
    b.goto(&format!("{base}/")).await;
    b.find("table.instances").await;
    assert_eq!(b.listed().await, ["f-1", "f-2", "f-3", "o-1", "o-2"]);
    b.screenshot("04-list").await;
    b.find("#f-status")
        .await
        .select_by_value("failed")
        .await
        .unwrap();
    b.click("form.filters button[type=submit]").await;
    wait_until("the filtered list", UI_WAIT, || async {
        let url = b.client.current_url().await.ok()?;
        url.query()
            .unwrap_or("")
            .contains("status=failed")
            .then_some(())
    })
    .await;
    assert_eq!(b.listed().await, ["f-1", "f-2", "f-3"]);
    b.screenshot("05-list-failed").await;

    // Bulk retry of two of the three failed: exactly those run again.
    healed.store(true, Ordering::SeqCst);
    b.click("input[name=id][value=\"f-1\"]").await;
    b.click("input[name=id][value=\"f-3\"]").await;
    b.click("button[name=action][value=retry]").await;
    b.notice("Retry requested for 2 instance(s)").await;
    b.screenshot("06-bulk-retried").await;
    for id in ["f-1", "f-3"] {
        api.wait_status(id, "completed").await;
        assert!(api
            .history_types(id)
            .await
            .contains(&"instance_retried".to_string()));
    }
    let f2 = api.call("GET", "/v1/instances/f-2", None).await;
    assert_eq!(f2["status"], "failed", "f-2 was not selected");
    assert!(!api
        .history_types("f-2")
        .await
        .contains(&"instance_retried".to_string()));

    // The one left, retried from its own page.
    b.goto(&format!("{base}/instances/f-2")).await;
    b.click("form[action$=\"/retry\"] button").await;
    b.notice("Retry requested").await;
    api.wait_status("f-2", "completed").await;

    // The cluster page shows every member the API lists, live ones alive.
    let cluster = api.call("GET", "/v1/cluster", None).await;
    let members: Vec<String> = cluster["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect();
    assert!(
        members.iter().any(|m| m.starts_with("console-peer")),
        "{members:?}"
    );
    b.goto(&format!("{base}/cluster")).await;
    b.find("svg.slots").await;
    for m in &members {
        let css = format!("tr[data-member=\"{m}\"]");
        assert_eq!(
            b.attr(&css, "data-alive").await.as_deref(),
            Some("true"),
            "{m}"
        );
    }
    b.screenshot("07-cluster").await;
    for (page, shot) in [
        ("/workflows/order", "08-workflow"),
        ("/queues", "09-queues"),
    ] {
        b.goto(&format!("{base}{page}")).await;
        b.find("main h1").await;
        b.screenshot(shot).await;
    }

    // The keyboard alone: type a prefix into the filter and press Enter.
    b.goto(&format!("{base}/")).await;
    b.fill("#f-prefix", "o-\u{E007}").await;
    wait_until("the list filtered by the keyboard", UI_WAIT, || async {
        let url = b.client.current_url().await.ok()?;
        url.query()
            .unwrap_or("")
            .contains("id_prefix=o-")
            .then_some(())
    })
    .await;
    assert_eq!(b.listed().await, ["o-1", "o-2"]);

    // On a phone's width no page is wider than the screen (wide tables
    // scroll inside their box).
    b.client.set_window_size(390, 844).await.unwrap();
    for page in [
        "/",
        "/instances/o-1",
        "/workflows/order",
        "/queues",
        "/cluster",
    ] {
        b.goto(&format!("{base}{page}")).await;
        b.find("main h1").await;
        let fits = b
            .client
            .execute(
                "return document.documentElement.scrollWidth <= window.innerWidth",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(fits, json!(true), "{page} is wider than a phone's screen");
        let name = page.trim_matches('/').split('/').next().unwrap_or_default();
        b.screenshot(&format!(
            "10-phone-{}",
            if name.is_empty() { "list" } else { name }
        ))
        .await;
    }
    b.client.clone().close().await.unwrap();
    drop(peer);
    node.shutdown().await;
}
