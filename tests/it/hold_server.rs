//! An HTTP endpoint for `http` steps that can hold its answers: it records
//! every request (its `Idempotency-Key` and JSON body) and answers with the
//! body, at once, or, for the requests the test chose to hold, only once it
//! releases them. Attempts held here are in flight for as long as the test
//! wants.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub key: Option<String>,
    pub body: Value,
    /// Whether it was held (not answered until released).
    pub held: bool,
}

type Rule = Box<dyn Fn(&Value) -> bool + Send + Sync>;

pub struct HoldServer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    state: Arc<Hold>,
    task: JoinHandle<()>,
}

struct Hold {
    /// Which bodies to hold; `None` holds nothing.
    rule: Mutex<Option<Rule>>,
    released: watch::Sender<bool>,
    seen: Mutex<Vec<Seen>>,
    /// Requests waiting for an answer right now.
    waiting: AtomicUsize,
}

/// Counts a request as waiting for as long as it does (its handler may be
/// dropped when the caller goes away).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn answer(
    State(hold): State<Arc<Hold>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Json<Value> {
    let mut released = hold.released.subscribe();
    let held = hold.rule.lock().unwrap().as_ref().is_some_and(|r| r(&body));
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    hold.seen.lock().unwrap().push(Seen {
        key,
        body: body.clone(),
        held,
    });
    if held {
        hold.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&hold.waiting);
        let _ = released.wait_for(|r| *r).await;
    }
    Json(body)
}

impl HoldServer {
    pub async fn start() -> HoldServer {
        let state = Arc::new(Hold {
            rule: Mutex::new(None),
            released: watch::channel(false).0,
            seen: Mutex::new(Vec::new()),
            waiting: AtomicUsize::new(0),
        });
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        HoldServer { url, state, task }
    }

    /// Holds every request whose JSON body `rule` picks, until `release`.
    pub fn hold_where(&self, rule: impl Fn(&Value) -> bool + Send + Sync + 'static) {
        *self.state.rule.lock().unwrap() = Some(Box::new(rule));
    }

    /// Answers the held requests, and holds nothing from now on.
    pub fn release(&self) {
        *self.state.rule.lock().unwrap() = None;
        self.state.released.send_replace(true);
    }

    /// Requests waiting for their answer right now.
    pub fn waiting(&self) -> usize {
        self.state.waiting.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
}

impl Drop for HoldServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
