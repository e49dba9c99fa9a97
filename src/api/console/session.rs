//! Who is using the console: the key kept in a cookie (or anyone, with
//! `--auth none`), checked on every request against the same table and the
//! same store lookup as the API, so a revoked key stops working here too.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use sha2::{Digest, Sha256};

use super::view;
use super::{Form, PageError};
use crate::api::auth::{caller_of_key, need_of_request, Caller, Refused};
use crate::api::extract::QueryParams;
use crate::api::AppState;
use crate::auth::Auth;

/// The cookie holding the console's key. `__Host-`: browsers take it only
/// `Secure`, for `Path=/` and without a `Domain`, so a sibling subdomain
/// cannot plant one.
const COOKIE: &str = "__Host-stead_console_key";
/// How long a browser keeps the cookie, in seconds (12 hours).
const COOKIE_MAX_AGE_S: u32 = 12 * 3600;

/// The console's user, for the pages and forms of one request.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub caller: Caller,
    /// Every form carries it; a form without it is refused.
    pub token: String,
    /// Logged in with a key (so there is a logout), not an open console.
    pub keyed: bool,
}

impl Session {
    fn open() -> Session {
        Session {
            caller: Caller::open(),
            token: token_of(""),
            keyed: false,
        }
    }
}

/// A form token bound to the key: a page's forms work for the session that
/// loaded it, on any node, and for no other key.
fn token_of(key: &str) -> String {
    let digest = Sha256::digest(format!("stead-console-form:{key}").as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The key in the request's cookie, if any.
fn cookie_key(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

fn set_cookie(key: &str, max_age_s: u32) -> HeaderValue {
    // A key is `stead_<hex>_<hex>`: nothing in it needs quoting.
    HeaderValue::from_str(&format!(
        "{COOKIE}={key}; Path=/; Max-Age={max_age_s}; HttpOnly; Secure; SameSite=Lax"
    ))
    .expect("a key is a valid header value")
}

/// The middleware of every console route: lets open routes through, sends
/// a page without a live key to the login form, and refuses a role that
/// may not do what the route does.
pub(crate) async fn require(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(need) = need_of_request(&request, false) else {
        return next.run(request).await;
    };
    let session = match state.inner.auth {
        Auth::None => Session::open(),
        Auth::Keys => {
            let Some(key) = cookie_key(request.headers()).map(str::to_string) else {
                return to_login(&request);
            };
            match caller_of_key(&state, &key).await {
                Ok(caller) => Session {
                    caller,
                    token: token_of(&key),
                    keyed: true,
                },
                Err(Refused::Store(e)) => return PageError::from(e).into_response(),
                Err(Refused::Malformed | Refused::NotLive) => {
                    let mut response = to_login(&request);
                    response
                        .headers_mut()
                        .insert(header::SET_COOKIE, set_cookie("", 0));
                    return response;
                }
            }
        }
    };
    if !session.caller.role.may(need) {
        return PageError::new(
            StatusCode::FORBIDDEN,
            format!(
                "{}; the key you logged in with has the role {}",
                need.describe(),
                session.caller.role
            ),
        )
        .into_response();
    }
    request.extensions_mut().insert(session);
    next.run(request).await
}

/// To the login form, which comes back here after; a form post without a
/// session is refused rather than redirected (its fields would be lost).
fn to_login(request: &Request) -> Response {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return PageError::new(
            StatusCode::UNAUTHORIZED,
            "your session has ended: log in again, then send the form again",
        )
        .into_response();
    }
    let here = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let next: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("next", here)
        .finish();
    Redirect::to(&format!("/login?{next}")).into_response()
}

/// Where to go after logging in: a path of this console, never another
/// site. Browsers drop tabs and newlines from a `Location` before they
/// resolve it (`/\t/evil` is `//evil`), so no control character or space
/// is taken either.
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.contains('\\')
                && n.bytes().all(|b| b > 0x20 && b != 0x7f) =>
        {
            n
        }
        _ => "/",
    }
}

/// `GET /login`: the key form (or, with `--auth none`, straight in).
pub(crate) async fn login_form(State(state): State<AppState>, query: QueryParams) -> Response {
    let next = safe_next(query.get("next")).to_string();
    if state.inner.auth == Auth::None {
        return Redirect::to(&next).into_response();
    }
    view::login_page(&next, None).into_response()
}

/// `POST /login`: checks the key and keeps it in the cookie.
pub(crate) async fn login(State(state): State<AppState>, request: Request) -> Response {
    let form = match Form::same_origin(request, &state).await {
        Ok(form) => form,
        Err(refused) => return refused.into_response(),
    };
    let next = safe_next(form.get("next")).to_string();
    let key = form.get("key").unwrap_or_default().trim();
    let refused = |message: &str| {
        (
            StatusCode::UNAUTHORIZED,
            view::login_page(&next, Some(message)),
        )
            .into_response()
    };
    match caller_of_key(&state, key).await {
        Ok(caller) if caller.role.may(crate::auth::Need::Read) => {
            let mut response = Redirect::to(&next).into_response();
            response
                .headers_mut()
                .insert(header::SET_COOKIE, set_cookie(key, COOKIE_MAX_AGE_S));
            response
        }
        Ok(caller) => refused(&format!(
            "a {} key cannot read; the console needs a reader, operator or admin key",
            caller.role
        )),
        Err(Refused::Malformed) => refused("that is not a key: a key reads stead_<id>_<secret>"),
        Err(Refused::NotLive) => refused("that key is not valid (unknown, revoked or mistyped)"),
        Err(Refused::Store(e)) => PageError::from(e).into_response(),
    }
}

/// `POST /logout`: forgets the cookie (asked from a page of this console).
pub(crate) async fn logout(headers: HeaderMap) -> Response {
    if !super::same_origin(&headers) {
        return PageError::new(StatusCode::FORBIDDEN, "log out from the console's own page")
            .into_response();
    }
    let mut response = Redirect::to("/login").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, set_cookie("", 0));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; __Host-stead_console_key=stead_ab_cd; b=2"),
        );
        assert_eq!(cookie_key(&h), Some("stead_ab_cd"));
        assert_eq!(cookie_key(&HeaderMap::new()), None);
    }

    #[test]
    fn login_goes_back_only_to_a_console_path() {
        assert_eq!(safe_next(Some("/instances/x?y=1")), "/instances/x?y=1");
        for bad in [
            "//evil.example",
            "https://evil.example",
            "/\\evil",
            "evil",
            "/\t/evil.example",
            "/\n/evil.example",
            "/ /evil",
        ] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad}");
        }
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn tokens_differ_per_key() {
        assert_ne!(token_of("stead_a_b"), token_of("stead_a_c"));
        assert_eq!(token_of("k").len(), 32);
    }
}
