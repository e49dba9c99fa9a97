//! The layout and the pieces every page shares: the frame with its
//! navigation, status badges, times, JSON blocks, the login and error pages,
//! and the embedded assets. Pure: no IO.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{html, Markup, DOCTYPE};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::Session;

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");
/// JSON text past this is collapsed behind a summary.
const COLLAPSE_BYTES: usize = 1_500;
/// JSON text past this is cut (the API has the whole value).
const MAX_SHOWN_BYTES: usize = 256 * 1024;
/// The same for a value in a table's cell.
const MAX_CELL_BYTES: usize = 16 * 1024;

/// The pages of the main navigation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nav {
    Instances,
    Workflows,
    Queues,
    Cluster,
}

impl Nav {
    const ALL: [(Nav, &'static str, &'static str); 4] = [
        (Nav::Instances, "/", "Instances"),
        (Nav::Workflows, "/workflows", "Workflows"),
        (Nav::Queues, "/queues", "Queues"),
        (Nav::Cluster, "/cluster", "Cluster"),
    ];
}

/// What frames a page.
pub(crate) struct Frame<'a> {
    pub title: String,
    pub nav: Nav,
    pub session: &'a Session,
    /// The matching Grafana panel, when `--grafana-url` is set.
    pub grafana: Option<String>,
    /// The page refreshes itself (while the box is ticked).
    pub live: bool,
}

/// A whole page: head, navigation, and `body` as its main content.
pub(crate) fn page(frame: &Frame, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(&frame.title))
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    nav aria-label="Main" {
                        a.brand href="/" { "stead" }
                        ul {
                            @for (nav, href, label) in Nav::ALL {
                                li {
                                    @if nav == frame.nav {
                                        a href=(href) aria-current="page" { (label) }
                                    } @else {
                                        a href=(href) { (label) }
                                    }
                                }
                            }
                        }
                    }
                    div.tools {
                        @if frame.live {
                            label.refresh {
                                input #auto-refresh type="checkbox" checked;
                                " Auto-refresh"
                            }
                        }
                        @if let Some(url) = &frame.grafana {
                            a.grafana href=(url) rel="noopener" { "Grafana" }
                        }
                        @if frame.session.keyed {
                            form.logout method="post" action="/logout" {
                                span.role { (frame.session.caller.role) }
                                button type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main #main data-live=[frame.live.then_some("5")] {
                    h1 { (frame.title) }
                    (body)
                }
            }
        }
    }
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · stead" }
            link rel="stylesheet" href=(format!("/assets/console.css?v={}", asset_version()));
            script src=(format!("/assets/console.js?v={}", asset_version())) defer {}
        }
    }
}

/// The login page, with an error from the last try.
pub(crate) fn login_page(next: &str, error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head("Log in"))
            body.login {
                main #main {
                    h1 { "stead" }
                    form method="post" action="/login" {
                        @if let Some(e) = error {
                            p.error role="alert" { (e) }
                        }
                        label for="key" { "API key" }
                        input #key name="key" type="password" autocomplete="current-password"
                            required autofocus spellcheck="false" placeholder="stead_…";
                        input type="hidden" name="next" value=(next);
                        p.hint {
                            "A reader key shows everything; an operator or admin key can also "
                            "cancel, retry and signal. Make one with "
                            code { "stead key create --name me --role operator" } "."
                        }
                        button type="submit" { "Log in" }
                    }
                }
            }
        }
    }
}

/// A page for a request that could not be served.
pub(crate) fn error_page(status: StatusCode, message: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(status.canonical_reason().unwrap_or("Error")))
            body {
                main #main {
                    h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("Error")) }
                    p.error role="alert" { (message) }
                    p { a href="/" { "Back to the instances" } }
                }
            }
        }
    }
}

/// `GET /assets/{file}`: the stylesheet and the script, cached for good
/// (their URLs carry a digest of their content).
pub(crate) async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "console.css" => (CSS, "text/css; charset=utf-8"),
        "console.js" => (JS, "text/javascript; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        body,
    )
        .into_response()
}

/// A digest of the assets, so a new build's assets are fetched afresh.
fn asset_version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        let digest = Sha256::digest(format!("{CSS}{JS}").as_bytes());
        digest[..6].iter().map(|b| format!("{b:02x}")).collect()
    })
}

/// A status as a badge: its word, and a colour class (never colour alone).
pub(crate) fn badge(status: &str) -> Markup {
    html! { span class=(format!("badge st-{status}")) { (status) } }
}

/// A time in UTC, with its exact value in a tooltip.
pub(crate) fn time(t: Option<DateTime<Utc>>) -> Markup {
    match t {
        None => html! { span.none { "—" } },
        Some(t) => html! {
            time datetime=(t.to_rfc3339()) title=(t.to_rfc3339()) {
                (t.format("%Y-%m-%d %H:%M:%S%.3f"))
            }
        },
    }
}

/// A span of time, short: "840 ms", "12.3 s", "5 min 2 s", "3 h 4 min".
pub(crate) fn span_of(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        format!("{} min {} s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else if s < 86_400.0 {
        format!(
            "{} h {} min",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    } else {
        format!(
            "{} d {} h",
            (s / 86_400.0) as u64,
            ((s % 86_400.0) / 3600.0) as u64
        )
    }
}

/// The time between two instants, if both are known.
pub(crate) fn between(from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> String {
    match (from, to) {
        (Some(a), Some(b)) => span_of((b - a).num_milliseconds() as f64 / 1000.0),
        _ => String::new(),
    }
}

/// A JSON value, pretty-printed; a long one collapsed behind a summary
/// that says its size, a huge one cut (with where to read the rest).
pub(crate) fn json(label: &str, value: Option<&Value>, whole_at: &str) -> Markup {
    json_within(label, value, whole_at, MAX_SHOWN_BYTES)
}

/// `json` for a cell of a table, which may have a thousand rows: cut
/// sooner, so that a page stays a few megabytes at most.
pub(crate) fn json_cell(label: &str, value: Option<&Value>, whole_at: &str) -> Markup {
    json_within(label, value, whole_at, MAX_CELL_BYTES)
}

fn json_within(label: &str, value: Option<&Value>, whole_at: &str, max: usize) -> Markup {
    let Some(value) = value else {
        return html! { span.none { "—" } };
    };
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    let size = text.len();
    let (shown, cut) = if size > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        (&text[..end], true)
    } else {
        (text.as_str(), false)
    };
    let body = html! {
        pre.json tabindex="0" { (shown) }
        @if cut {
            p.hint { "Cut at " (bytes(max)) " of " (bytes(size)) "; the whole value: "
                code { (whole_at) } }
        }
    };
    if size <= COLLAPSE_BYTES {
        return body;
    }
    html! {
        details.json {
            summary { (label) " (" (bytes(size)) ")" }
            (body)
        }
    }
}

/// A size in bytes, short.
pub(crate) fn bytes(n: usize) -> String {
    match n {
        n if n < 1024 => format!("{n} B"),
        n if n < 1024 * 1024 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0)),
    }
}

/// The hidden token field every form carries.
pub(crate) fn token(session: &Session) -> Markup {
    html! { input type="hidden" name="token" value=(session.token); }
}

/// What the page after a form says it did; the codes are the console's
/// own (a link cannot make it say anything else).
pub(crate) fn notice(code: Option<&str>, done: Option<&str>, refused: Option<&str>) -> Markup {
    let count = |n: Option<&str>| n.and_then(|n| n.parse::<u32>().ok()).unwrap_or(0);
    let text = match code {
        Some("cancel-requested") => {
            "Cancel requested: the instance winds down (its compensations run).".to_string()
        }
        Some("retry-requested") => "Retry requested: the failed steps run again.".to_string(),
        Some("signal-sent") => "Signal sent: it is buffered until a step waits for it.".to_string(),
        Some(action @ ("bulk-cancel" | "bulk-retry")) => {
            let verb = if action == "bulk-cancel" {
                "Cancel"
            } else {
                "Retry"
            };
            let (done, refused) = (count(done), count(refused));
            let mut s = format!("{verb} requested for {done} instance(s).");
            if refused > 0 {
                s.push_str(&format!(
                    " {refused} refused (ended already, or not retryable)."
                ));
            }
            s
        }
        _ => return html! {},
    };
    html! { p.notice role="status" { (text) } }
}

/// An id in a path (ids are `[A-Za-z0-9._:@-]`, which need no escaping in a
/// path, but a value from the database is encoded all the same).
pub(crate) fn path_part(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A query string of the non-empty pairs.
pub(crate) fn query(pairs: &[(&str, &str)]) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs.iter().filter(|(_, v)| !v.is_empty()) {
        q.append_pair(k, v);
    }
    q.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_is_escaped_collapsed_when_long_and_cut_when_huge() {
        let small = json(
            "output",
            Some(&json!({"x": "<script>alert(1)</script>"})),
            "/v1",
        );
        let small = small.into_string();
        assert!(small.contains("&lt;script&gt;"), "{small}");
        assert!(!small.contains("<script>"), "{small}");
        assert!(!small.contains("<details"), "{small}");
        let long = json("output", Some(&json!("x".repeat(5_000))), "/v1").into_string();
        assert!(long.contains("<details"), "{long}");
        let huge = json("output", Some(&json!("y".repeat(400_000))), "/v1/x").into_string();
        assert!(
            huge.len() < 300_000 && huge.contains("Cut at"),
            "{}",
            huge.len()
        );
    }

    #[test]
    fn spans_read_naturally() {
        assert_eq!(span_of(0.25), "250 ms");
        assert_eq!(span_of(12.34), "12.3 s");
        assert_eq!(span_of(302.0), "5 min 2 s");
        assert_eq!(span_of(11_040.0), "3 h 4 min");
    }

    #[test]
    fn notices_are_only_the_consoles_own() {
        let n = notice(Some("bulk-retry"), Some("3"), Some("1")).into_string();
        assert!(
            n.contains("Retry requested for 3 instance(s). 1 refused"),
            "{n}"
        );
        assert_eq!(notice(Some("<b>hi</b>"), None, None).into_string(), "");
    }
}
