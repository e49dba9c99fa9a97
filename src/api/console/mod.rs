//! The web console: HTML pages served by every API node at `/`, rendered on
//! the server (maud, which escapes every value it is given), with one
//! stylesheet and one small script embedded in the binary. No CDN, no
//! build step: it works offline.
//!
//! Who may see and do what is the API's table (`need_of`): the pages need a
//! role that may read, the forms one that may operate. With `--auth keys`
//! the console asks for a key once (`/login`) and keeps it in a `Secure`,
//! `HttpOnly`, `SameSite=Lax` cookie (`__Host-`); with `--auth none` (`stead dev` on
//! loopback) it opens directly. A form is taken only from a page of the same
//! origin (`Sec-Fetch-Site`/`Origin`) and with the page's token, so another
//! site cannot make a browser act through it.
//!
//! - `pages.rs`: the pages (instances, instance, workflows, queues, cluster);
//! - `actions.rs`: the forms (cancel, retry, signal, and bulk, posted to `/`);
//! - `session.rs`: the cookie, the login form, the token;
//! - `view.rs`: the layout and the pieces every page shares;
//! - `graph.rs`: a step graph as SVG; `timeline.rs`: attempts from history.

mod actions;
mod graph;
mod pages;
mod session;
mod timeline;
mod view;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use super::error::ApiError;
use super::AppState;

pub(crate) use session::Session;

/// The console's routes, with their access check and headers.
pub(crate) fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/", get(pages::instances).post(actions::bulk))
        .route("/instances/{id}", get(pages::instance))
        .route("/instances/{id}/cancel", post(actions::cancel))
        .route("/instances/{id}/retry", post(actions::retry))
        .route("/instances/{id}/signal", post(actions::signal))
        .route("/workflows", get(pages::workflows))
        .route("/workflows/{name}", get(pages::workflow))
        .route("/queues", get(pages::queues))
        .route("/cluster", get(pages::cluster))
        .route("/login", get(session::login_form).post(session::login))
        .route("/logout", post(session::logout))
        .route("/assets/{file}", get(view::asset))
        .route_layer(middleware::from_fn_with_state(state, session::require))
        .layer(middleware::from_fn(page_headers))
}

/// Headers of every console response: a content policy that runs only the
/// console's own script and style (so even a value that slipped past the
/// escaping could not run), no framing, no sniffing, and pages (which hold
/// data) kept out of caches.
async fn page_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    let set = |headers: &mut HeaderMap, name, value: &'static str| {
        headers.insert(name, HeaderValue::from_static(value));
    };
    set(
        headers,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    set(headers, header::REFERRER_POLICY, "same-origin");
    if !headers.contains_key(header::CACHE_CONTROL) {
        set(headers, header::CACHE_CONTROL, "no-store");
    }
    response
}

/// A page that could not be shown: its status and what to tell the user
/// (never an internal detail: it comes from an `ApiError`).
#[derive(Debug)]
pub(crate) struct PageError {
    status: StatusCode,
    message: String,
    /// The database failed (counted in `stead_db_errors_total`).
    db_fault: bool,
}

impl PageError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        PageError {
            status,
            message: message.into(),
            db_fault: false,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        PageError {
            db_fault: e.db_fault,
            ..PageError::new(e.status, e.detail)
        }
    }
}

impl From<crate::store::StoreError> for PageError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::from(e).into()
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, view::error_page(self.status, &self.message)).into_response();
        // As the API's errors: counted as a database fault, and a 503 says
        // when to come back.
        if self.db_fault {
            response.extensions_mut().insert(super::error::DbFault);
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

type PageResult<T> = Result<T, PageError>;

/// A form posted from a console page: its fields, taken only from a page of
/// this console (same origin, with the session's token).
pub(crate) struct Form(Vec<(String, String)>);

impl Form {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Form {
    /// The fields of a form sent from a page of this origin; the login form
    /// (which has no session yet, so no token) stops here.
    async fn same_origin(request: Request, state: &AppState) -> Result<Form, PageError> {
        if !same_origin(request.headers()) {
            return Err(PageError::new(
                StatusCode::FORBIDDEN,
                "this form was sent from another site; use the console's own pages",
            ));
        }
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|e| PageError::new(e.status(), e.body_text()))?;
        serde_urlencoded::from_bytes(&bytes)
            .map(Form)
            .map_err(|_| PageError::bad_request("the form could not be read"))
    }
}

impl FromRequest<AppState> for Form {
    type Rejection = PageError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = request
            .extensions()
            .get::<Session>()
            .map(|s| s.token.clone());
        let form = Form::same_origin(request, state).await?;
        if token.is_none() || form.get("token") != token.as_deref() {
            return Err(PageError::new(
                StatusCode::FORBIDDEN,
                "the form's token is not this session's (the page is older than your login?): reload the page and try again",
            ));
        }
        Ok(form)
    }
}

/// Whether a browser says the request comes from a page of this origin. A
/// client that sends neither header is not a browser acting for another
/// site (browsers send `Origin` with every form POST).
fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        return site == "same-origin";
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    matches!((origin_host, host), (Some(o), Some(h)) if o == h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_forms_from_this_origin_are_taken() {
        assert!(same_origin(&headers(&[("sec-fetch-site", "same-origin")])));
        assert!(!same_origin(&headers(&[("sec-fetch-site", "cross-site")])));
        assert!(!same_origin(&headers(&[("sec-fetch-site", "same-site")])));
        assert!(same_origin(&headers(&[
            ("origin", "http://127.0.0.1:8080"),
            ("host", "127.0.0.1:8080")
        ])));
        assert!(!same_origin(&headers(&[
            ("origin", "https://evil.example"),
            ("host", "127.0.0.1:8080")
        ])));
        assert!(!same_origin(&headers(&[
            ("origin", "null"),
            ("host", "127.0.0.1:8080")
        ])));
        assert!(same_origin(&headers(&[])), "curl and scripts send neither");
    }
}
