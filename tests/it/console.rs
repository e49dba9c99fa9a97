//! The web console without a browser: every page answers with HTML and the
//! right status, user data is shown as text (a `<script>` in a workflow's
//! values never becomes markup), the filters filter, and with keys the
//! console asks for one, keeps it in a strict cookie, holds each role to
//! what it may do, and takes a form only from its own page.

use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, LOCATION, SET_COOKIE};
use reqwest::redirect::Policy;
use serde_json::{json, Value};
use stead::Role;

use crate::support::events;
use crate::{wait_until, TestDb, TestNode};

/// A client that shows redirects instead of following them.
fn browserless() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A page's status, headers and text, with the cookie `cookie` if given.
async fn page(
    node: &TestNode,
    path: &str,
    cookie: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = browserless().get(format!("{}{path}", node.url));
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let resp = req.send().await.expect("GET a console page");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.unwrap())
}

/// Posts a form; returns status, headers and text.
async fn post_form(
    node: &TestNode,
    path: &str,
    cookie: Option<&str>,
    fields: &[(&str, &str)],
    extra: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = browserless()
        .post(format!("{}{path}", node.url))
        .form(fields);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("POST a console form");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.unwrap())
}

/// The form token a page carries.
fn token_in(html: &str) -> String {
    let at = html.find("name=\"token\" value=\"").expect("a form token") + 20;
    html[at..].split('"').next().unwrap().to_string()
}

/// The `data-id`s of the rows of the instance list, in order.
fn listed_ids(html: &str) -> Vec<String> {
    html.split("<tr data-id=\"")
        .skip(1)
        .map(|s| s.split('"').next().unwrap().to_string())
        .collect()
}

const XSS: &str = "<script>alert('stead')</script>";

/// A workflow whose values carry markup: a value step's output, and a
/// signal step that waits.
fn markup_workflow() -> Value {
    json!({"steps": [
        {"id": "render", "value": {"html": XSS, "input": "${input}"}},
        {"id": "wait", "signal": {"name": "go"}, "needs": ["render"]}
    ]})
}

/// Every field a user fills in has a label: its own `<label for>`, an
/// `aria-label`, or a label around it.
fn assert_fields_labelled(html: &str, page: &str) {
    for tag in ["<input", "<select", "<textarea"] {
        for field in html.split(tag).skip(1) {
            let field = field.split('>').next().unwrap();
            if field.contains("type=\"hidden\"") || field.contains("aria-label=") {
                continue;
            }
            let id = field
                .split("id=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .unwrap_or_else(|| panic!("{page}: a field without id or label: {tag}{field}>"));
            let labelled = html.contains(&format!("for=\"{id}\""))
                || html.contains(&format!("<label class=\"refresh\"><input id=\"{id}\""));
            assert!(labelled, "{page}: field {id} has no label");
        }
    }
}

fn assert_no_markup_from_data(html: &str, page: &str) {
    assert!(
        !html.contains(XSS),
        "{page} shows user data as markup:\n{html}"
    );
    assert!(!html.contains("<script>alert"), "{page}:\n{html}");
    // The one script element is the console's own.
    assert_eq!(html.matches("<script").count(), 1, "{page}:\n{html}");
    assert!(
        html.contains("<script src=\"/assets/console.js?v="),
        "{page}"
    );
}

#[tokio::test]
async fn every_page_renders_and_shows_user_data_as_text() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow("markup", markup_workflow()).await;
    let id = node.start_instance("markup", json!({"note": XSS})).await;
    node.wait_step(&id, "wait", "waiting").await;
    // A signal nobody waits for stays pending, payload and all.
    let (status, _) = node
        .call(
            "POST",
            &format!("/v1/instances/{id}/signals/other"),
            Some(json!(XSS)),
        )
        .await;
    assert_eq!(status, 202);
    let cancelled = node.start_instance("markup", json!(XSS)).await;
    node.wait_step(&cancelled, "wait", "waiting").await;
    let (status, _) = node
        .call(
            "POST",
            &format!("/v1/instances/{cancelled}/cancel"),
            Some(json!({"reason": XSS})),
        )
        .await;
    assert_eq!(status, 202);
    node.wait_ended(&cancelled).await;

    let pages = [
        "/".to_string(),
        "/?status=running".into(),
        format!("/instances/{id}"),
        format!("/instances/{cancelled}"),
        "/workflows".into(),
        "/workflows/markup".into(),
        "/workflows/markup?version=1".into(),
        "/queues".into(),
        "/cluster".into(),
    ];
    for path in &pages {
        let (status, headers, html) = page(&node, path, None).await;
        assert_eq!(status, 200, "{path}: {html}");
        assert_eq!(headers[CONTENT_TYPE], "text/html; charset=utf-8", "{path}");
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
        assert_eq!(headers["x-frame-options"], "DENY");
        assert_no_markup_from_data(&html, path);
        assert_fields_labelled(&html, path);
    }
    let (_, _, html) = page(&node, &format!("/instances/{id}"), None).await;
    for shown in [
        "&lt;script&gt;",
        "data-step=\"render\" data-status=\"completed\"",
        "data-step=\"wait\" data-status=\"waiting\"",
        "Pending signals",
        "other",
    ] {
        assert!(
            html.contains(shown),
            "the instance page shows {shown}:\n{html}"
        );
    }
    let (_, _, html) = page(&node, &format!("/instances/{cancelled}"), None).await;
    assert!(html.contains("instance_cancel_requested"), "{html}");
    // Any id has its page, even one that reads like a route.
    crate::support::start_with_id(&node, "markup", "bulk", json!(1)).await;
    let (status, _, html) = page(&node, "/instances/bulk", None).await;
    assert_eq!(status, 200, "{html}");

    // Not there, or asked for wrongly: an HTML page with the right status.
    for (path, want, says) in [
        ("/instances/nope", 404, "does not exist"),
        ("/workflows/nope", 404, "not registered"),
        ("/workflows/markup?version=9", 400, "no version"),
        ("/?status=sideways", 400, "query.status"),
        ("/?created_after=yesterday", 400, "query.created_after"),
        ("/assets/nope.css", 404, "no such asset"),
    ] {
        let (status, _, html) = page(&node, path, None).await;
        assert_eq!(status, want, "{path}: {html}");
        assert!(html.contains(says), "{path} says {says}: {html}");
    }
    let (status, headers, css) = page(&node, "/assets/console.css", None).await;
    assert_eq!(status, 200);
    assert!(headers["cache-control"]
        .to_str()
        .unwrap()
        .contains("immutable"));
    assert!(css.contains(".st-failed"));
    node.shutdown().await;
}

#[tokio::test]
async fn with_a_grafana_url_every_page_links_to_its_panel() {
    let db = TestDb::new().await;
    let mut config = TestNode::config(&db);
    config.grafana_url = Some("https://grafana.example.com/".into());
    let node = TestNode::start_with(config).await;
    node.put_workflow("markup", markup_workflow()).await;
    let id = node.start_instance("markup", json!(1)).await;
    let base = "https://grafana.example.com/d/stead/stead?viewPanel=";
    for (path, panel) in [
        ("/".to_string(), "3&amp;var-workflow=%24__all"),
        (format!("/instances/{id}"), "7&amp;var-workflow=markup"),
        ("/workflows".into(), "2"),
        ("/workflows/markup".into(), "2&amp;var-workflow=markup"),
        ("/queues".into(), "13"),
        ("/cluster".into(), "25"),
    ] {
        let (status, _, html) = page(&node, &path, None).await;
        assert_eq!(status, 200);
        let link = format!("href=\"{base}{panel}\"");
        assert!(html.contains(&link), "{path} links {link}:\n{html}");
    }
    // Without the flag, no link.
    let plain = TestNode::start(&db).await;
    let (_, _, html) = page(&plain, "/", None).await;
    assert!(!html.contains("grafana"), "{html}");
    plain.shutdown().await;
    node.shutdown().await;

    // A URL that is not one is refused at start, naming the flag.
    let mut config = TestNode::config(&db);
    config.grafana_url = Some("grafana.example.com".into());
    let refused = stead::start(config)
        .await
        .err()
        .expect("a bad --grafana-url");
    assert!(refused.to_string().contains("--grafana-url"), "{refused}");
}

#[tokio::test]
async fn the_list_filters_by_status_workflow_id_prefix_and_creation_time() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow("quick", json!({"steps": [{"id": "a", "value": 1}]}))
        .await;
    node.put_workflow("markup", markup_workflow()).await;
    for k in 0..3 {
        crate::support::start_with_id(&node, "quick", &format!("done-{k}"), json!(k)).await;
        node.wait_ended(&format!("done-{k}")).await;
    }
    let started_after = chrono::Utc::now();
    for k in 0..2 {
        crate::support::start_with_id(&node, "markup", &format!("wait-{k}"), json!(k)).await;
        node.wait_step(&format!("wait-{k}"), "wait", "waiting")
            .await;
    }
    let cases: [(&str, &[&str]); 5] = [
        ("/?status=completed", &["done-2", "done-1", "done-0"]),
        ("/?workflow=markup", &["wait-1", "wait-0"]),
        ("/?id_prefix=done-1", &["done-1"]),
        ("/?status=running&workflow=quick", &[]),
        ("/?workflow=&status=&id_prefix=wait-", &["wait-1", "wait-0"]),
    ];
    for (path, want) in cases {
        let (status, _, html) = page(&node, path, None).await;
        assert_eq!(status, 200, "{path}: {html}");
        assert_eq!(listed_ids(&html), want, "{path}");
    }
    // The same filters on the API, and the creation range.
    let after = started_after.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let (status, body) = node
        .call("GET", &format!("/v1/instances?created_after={after}"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let ids: Vec<&str> = body["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["wait-1", "wait-0"]);
    let (_, body) = node
        .call(
            "GET",
            &format!("/v1/instances?created_before={after}&id_prefix=done-"),
            None,
        )
        .await;
    assert_eq!(body["instances"].as_array().unwrap().len(), 3, "{body}");
    // Counts per status ignore the status filter (they are the filter's
    // other choices).
    let (_, _, html) = page(&node, "/?status=completed", None).await;
    assert!(html.contains("data-count=\"completed\">3<"), "{html}");
    assert!(html.contains("data-count=\"running\">2<"), "{html}");
    // Paging: one row a page, the cursor leads on.
    let (_, _, html) = page(&node, "/?limit=1&workflow=markup", None).await;
    assert_eq!(listed_ids(&html), ["wait-1"]);
    let next = html
        .split("href=\"")
        .find(|s| s.contains("cursor="))
        .unwrap();
    let next = next.split('"').next().unwrap().replace("&amp;", "&");
    let (_, _, html) = page(&node, &next, None).await;
    assert_eq!(listed_ids(&html), ["wait-0"], "{next}");
    node.shutdown().await;
}

/// A node that requires keys, and keys of each role that matters here.
struct Keyed {
    node: TestNode,
    db: TestDb,
}

async fn keyed() -> Keyed {
    let db = TestDb::new().await;
    let mut config = TestNode::config(&db);
    config.auth = stead::Auth::Keys;
    let node = TestNode::start_with(config).await;
    Keyed { node, db }
}

async fn key(db: &TestDb, role: Role) -> stead::keys::CreatedKey {
    let queues = if role == Role::Worker {
        vec!["q".to_string()]
    } else {
        vec![]
    };
    stead::keys::create(&db.url, "stead", &format!("{role} key"), role, &queues)
        .await
        .expect("creating a key")
}

/// Logs in with `key`; returns the cookie to send.
async fn login(node: &TestNode, key: &str) -> String {
    let (status, headers, html) = post_form(
        node,
        "/login",
        None,
        &[("key", key), ("next", "/queues")],
        &[],
    )
    .await;
    assert_eq!(status, 303, "{html}");
    assert_eq!(headers[LOCATION], "/queues");
    let cookie = headers[SET_COOKIE].to_str().unwrap();
    for attribute in ["HttpOnly", "Secure", "SameSite=Lax", "Path=/", "__Host-"] {
        assert!(
            cookie.contains(attribute),
            "the cookie is {attribute}: {cookie}"
        );
    }
    cookie.split(';').next().unwrap().to_string()
}

#[tokio::test]
async fn with_keys_the_console_asks_for_one_and_holds_each_role_to_its_own() {
    let Keyed { node, db } = keyed().await;
    let admin = key(&db, Role::Admin).await.key;
    let put = node
        .call_with_key(
            Some(&admin),
            "PUT",
            "/v1/workflows/markup",
            Some(markup_workflow()),
        )
        .await;
    assert_eq!(put.0, 201, "{:?}", put.1);
    let (_, started) = node
        .call_with_key(
            Some(&admin),
            "POST",
            "/v1/workflows/markup/instances",
            Some(json!({"id": "k-1"})),
        )
        .await;
    assert_eq!(started["id"], "k-1");

    // No key: to the login form, which comes back to the page.
    let (status, headers, _) = page(&node, "/instances/k-1", None).await;
    assert_eq!(status, 303);
    assert_eq!(headers[LOCATION], "/login?next=%2Finstances%2Fk-1");
    let (status, _, html) = page(&node, "/login?next=%2Finstances%2Fk-1", None).await;
    assert_eq!(status, 200);
    assert!(
        html.contains("type=\"password\"") && html.contains("value=\"/instances/k-1\""),
        "{html}"
    );
    // A form post without a session is refused, not redirected.
    let (status, _, _) = post_form(&node, "/instances/k-1/cancel", None, &[], &[]).await;
    assert_eq!(status, 401);

    // Wrong keys are refused with a reason; a worker key cannot read.
    let worker = key(&db, Role::Worker).await.key;
    for (tried, says) in [
        ("hunter2", "that is not a key"),
        ("stead_0000000000000000_0000000000000000000000000000000000000000000000000000000000000000", "not valid"),
        (worker.as_str(), "cannot read"),
    ] {
        let (status, headers, html) = post_form(&node, "/login", None, &[("key", tried)], &[]).await;
        assert_eq!(status, 401, "{tried}: {html}");
        assert!(html.contains(says), "{says}: {html}");
        assert!(headers.get(SET_COOKIE).is_none());
    }
    // A login from another site is refused.
    let (status, _, _) = post_form(
        &node,
        "/login",
        None,
        &[("key", &admin)],
        &[("sec-fetch-site", "cross-site")],
    )
    .await;
    assert_eq!(status, 403);

    // A reader sees the pages, and no action on them; its forms are refused.
    let reader = login(&node, &key(&db, Role::Reader).await.key).await;
    let (status, _, html) = page(&node, "/instances/k-1", Some(&reader)).await;
    assert_eq!(status, 200, "{html}");
    assert!(!html.contains("Cancel instance"), "{html}");
    assert!(html.contains("Log out"), "{html}");
    let (status, _, html) = page(&node, "/", Some(&reader)).await;
    assert!(status == 200 && !html.contains("Cancel selected"), "{html}");
    let (status, _, html) = post_form(
        &node,
        "/instances/k-1/cancel",
        Some(&reader),
        &[("token", &token_in(&html))],
        &[],
    )
    .await;
    assert_eq!(status, 403, "{html}");
    assert!(html.contains("operator or admin"), "{html}");

    // An operator acts, with its page's token, from its own origin.
    let operator_key = key(&db, Role::Operator).await;
    let operator = login(&node, &operator_key.key).await;
    let (_, _, html) = page(&node, "/instances/k-1", Some(&operator)).await;
    assert!(html.contains("Cancel instance"), "{html}");
    let token = token_in(&html);
    let cancel = "/instances/k-1/cancel";
    let (status, _, _) = post_form(&node, cancel, Some(&operator), &[("token", "0000")], &[]).await;
    assert_eq!(status, 403, "a wrong token");
    let (status, _, _) = post_form(
        &node,
        cancel,
        Some(&operator),
        &[("token", &token)],
        &[("sec-fetch-site", "cross-site")],
    )
    .await;
    assert_eq!(status, 403, "another site");
    let (status, _, _) = post_form(
        &node,
        cancel,
        Some(&operator),
        &[("token", &token)],
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(status, 403, "another origin");
    let (_, body) = node
        .call_with_key(Some(&admin), "GET", "/v1/instances/k-1", None)
        .await;
    assert_eq!(
        body["status"], "running",
        "nothing refused was done: {body}"
    );
    let (status, headers, _) = post_form(
        &node,
        cancel,
        Some(&operator),
        &[("token", &token), ("reason", "asked by ops")],
        &[("sec-fetch-site", "same-origin")],
    )
    .await;
    assert_eq!(status, 303);
    assert_eq!(headers[LOCATION], "/instances/k-1?notice=cancel-requested");
    wait_until(
        "the cancel to end the instance",
        Duration::from_secs(30),
        || async {
            let (_, body) = node
                .call_with_key(Some(&admin), "GET", "/v1/instances/k-1", None)
                .await;
            (body["status"] == "cancelled").then_some(())
        },
    )
    .await;
    let (_, history) = node
        .call_with_key(Some(&admin), "GET", "/v1/instances/k-1/history", None)
        .await;
    let asked = events(
        history["events"].as_array().unwrap(),
        "instance_cancel_requested",
    );
    assert_eq!(asked[0]["data"]["reason"], "asked by ops");

    // A revoked key is logged out at its next page.
    stead::keys::revoke(&db.url, "stead", &operator_key.id)
        .await
        .unwrap();
    let (status, headers, _) = page(&node, "/", Some(&operator)).await;
    assert_eq!(status, 303);
    assert!(headers[LOCATION].to_str().unwrap().starts_with("/login"));
    assert!(headers[SET_COOKIE].to_str().unwrap().contains("Max-Age=0"));
    // Logging out forgets the cookie; another site cannot log one out.
    let (status, _, _) = post_form(
        &node,
        "/logout",
        Some(&reader),
        &[],
        &[("sec-fetch-site", "cross-site")],
    )
    .await;
    assert_eq!(status, 403);
    let (status, headers, _) = post_form(&node, "/logout", Some(&reader), &[], &[]).await;
    assert_eq!(status, 303);
    assert!(headers[SET_COOKIE].to_str().unwrap().contains("Max-Age=0"));
    node.shutdown().await;
}

#[tokio::test]
async fn a_bulk_action_acts_on_exactly_the_selected_rows() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db).await;
    node.put_workflow("markup", markup_workflow()).await;
    for k in 0..4 {
        crate::support::start_with_id(&node, "markup", &format!("b-{k}"), json!(k)).await;
        node.wait_step(&format!("b-{k}"), "wait", "waiting").await;
    }
    let (_, _, html) = page(&node, "/", None).await;
    let token = token_in(&html);
    let fields = [
        ("token", token.as_str()),
        ("action", "cancel"),
        ("id", "b-1"),
        ("id", "b-3"),
        ("back", "workflow=markup&notice=forged"),
    ];
    let (status, headers, html) = post_form(&node, "/", None, &fields, &[]).await;
    assert_eq!(status, 303, "{html}");
    assert_eq!(
        headers[LOCATION],
        "/?workflow=markup&notice=bulk-cancel&done=2&refused=0"
    );
    for k in 0..4 {
        let id = format!("b-{k}");
        let want = if k % 2 == 1 { "cancelled" } else { "running" };
        if want == "cancelled" {
            node.wait_ended(&id).await;
        }
        let (_, body) = node.call("GET", &format!("/v1/instances/{id}"), None).await;
        assert_eq!(body["status"], want, "{id}");
    }
    // Ended ones are refused and counted, not an error.
    let fields = [
        ("token", token.as_str()),
        ("action", "cancel"),
        ("id", "b-1"),
        ("id", "b-0"),
    ];
    let (_, headers, _) = post_form(&node, "/", None, &fields, &[]).await;
    assert_eq!(headers[LOCATION], "/?notice=bulk-cancel&done=1&refused=1");
    let (_, _, html) = page(&node, "/?notice=bulk-cancel&done=1&refused=1", None).await;
    assert!(
        html.contains("Cancel requested for 1 instance(s). 1 refused"),
        "{html}"
    );
    // A bad id among good ones: refused before any is acted on.
    let fields = [
        ("token", token.as_str()),
        ("action", "cancel"),
        ("id", "b-2"),
        ("id", "no such id!"),
    ];
    let (status, _, html) = post_form(&node, "/", None, &fields, &[]).await;
    assert_eq!(status, 400, "{html}");
    let (_, body) = node.call("GET", "/v1/instances/b-2", None).await;
    assert_eq!(body["status"], "running", "b-2 was not cancelled: {body}");
    // Nothing selected, or an unknown action: a 400 that says what to do.
    let (status, _, html) = post_form(
        &node,
        "/",
        None,
        &[("token", &token), ("action", "cancel")],
        &[],
    )
    .await;
    assert_eq!(status, 400);
    assert!(html.contains("select at least one"), "{html}");
    let (status, _, _) = post_form(
        &node,
        "/",
        None,
        &[("token", &token), ("action", "delete"), ("id", "b-0")],
        &[],
    )
    .await;
    assert_eq!(status, 400);
    node.shutdown().await;
}
