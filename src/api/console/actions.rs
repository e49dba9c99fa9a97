//! The console's forms: cancel, retry and signal one instance, and cancel
//! or retry the selected rows of the list. Each does what the API's
//! endpoint does (the same store calls and checks), then sends the browser
//! back to the page with a notice (post, redirect, get).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Redirect;
use serde_json::Value;

use super::view::{path_part, query};
use super::{Form, PageError, PageResult};
use crate::api::error::ApiError;
use crate::api::extract::{check_id, check_size, parse_json, ApiPath};
use crate::api::AppState;

/// Longest cancel reason in bytes, as the API allows.
const MAX_REASON_BYTES: usize = 1_000;

fn back_to(id: &str, notice: &str) -> Redirect {
    Redirect::to(&format!(
        "/instances/{}?{}",
        path_part(id),
        query(&[("notice", notice)])
    ))
}

/// `POST /instances/{id}/cancel` (`reason` optional).
pub(crate) async fn cancel(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    form: Form,
) -> PageResult<Redirect> {
    check_id("id", &id)?;
    let reason = form.get("reason").map(str::trim).filter(|r| !r.is_empty());
    if reason.is_some_and(|r| r.len() > MAX_REASON_BYTES) {
        return Err(PageError::bad_request(format!(
            "reason: must be at most {MAX_REASON_BYTES} bytes"
        )));
    }
    // PostgreSQL text cannot hold NUL (JSON bodies cannot carry one either).
    if reason.is_some_and(|r| r.contains('\0')) {
        return Err(PageError::bad_request(
            "reason: must not contain a NUL character",
        ));
    }
    state.inner.store.request_cancel(&id, reason).await?;
    state.inner.notifier.request();
    Ok(back_to(&id, "cancel-requested"))
}

/// `POST /instances/{id}/retry`.
pub(crate) async fn retry(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    _form: Form,
) -> PageResult<Redirect> {
    check_id("id", &id)?;
    state.inner.store.request_retry(&id).await?;
    state.inner.notifier.request();
    Ok(back_to(&id, "retry-requested"))
}

/// `POST /instances/{id}/signal` (`name`, `payload` as JSON; empty is null).
pub(crate) async fn signal(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    form: Form,
) -> PageResult<Redirect> {
    check_id("id", &id)?;
    let name = form.get("name").unwrap_or_default().trim();
    check_id("name", name)?;
    let text = form.get("payload").unwrap_or_default().trim();
    let payload: Value = if text.is_empty() {
        Value::Null
    } else {
        parse_json(text.as_bytes())
            .map_err(|e| PageError::bad_request(format!("payload: not JSON ({})", e.detail)))?
    };
    let max = state.inner.limits.max_signal_payload_bytes;
    check_size("payload", &payload, max, "--max-signal-payload-bytes")?;
    state.inner.store.send_signal(&id, name, &payload).await?;
    state.inner.notifier.request();
    Ok(back_to(&id, "signal-sent"))
}

/// `POST /` (the list's own form: `action` = cancel | retry, `id` repeated, `back`
/// the list's query): acts on each selected instance and says how many it
/// could act on; one that has ended (cancel) or is not failed (retry) is
/// counted as refused, not an error.
pub(crate) async fn bulk(State(state): State<AppState>, form: Form) -> PageResult<Redirect> {
    let action = form.get("action").unwrap_or_default();
    if !matches!(action, "cancel" | "retry") {
        return Err(PageError::bad_request("action: must be cancel or retry"));
    }
    let ids: Vec<&str> = form.all("id").collect();
    if ids.is_empty() {
        return Err(PageError::bad_request(
            "id: select at least one instance (tick its box), then choose the action",
        ));
    }
    // A page holds at most `--max-page` rows; so may one action.
    let max = state.inner.limits.max_page;
    if ids.len() > max {
        return Err(PageError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("id: at most {max} instances at once (--max-page)"),
        ));
    }
    // Every id is checked before any is acted on: a bad one acts on none.
    for id in &ids {
        check_id("id", id)?;
    }
    let store = &state.inner.store;
    let (mut done, mut refused) = (0u32, 0u32);
    for id in ids {
        let outcome = match action {
            "cancel" => store.request_cancel(id, None).await,
            _ => store.request_retry(id).await,
        };
        match outcome.map_err(ApiError::from) {
            Ok(()) => done += 1,
            // Ended already, not retryable, or gone (a 4xx the API would
            // answer): the others go on.
            Err(e) if e.status.is_client_error() => refused += 1,
            Err(e) => return Err(e.into()),
        }
    }
    if done > 0 {
        state.inner.notifier.request();
    }
    let back = form.get("back").unwrap_or_default();
    // `back` is the list's own query; only its parameters are kept.
    let back: Vec<(String, String)> = serde_urlencoded::from_str(back).unwrap_or_default();
    let mut pairs: Vec<(&str, &str)> = back
        .iter()
        .filter(|(k, _)| crate::api::instances::LIST_PARAMS.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (done, refused) = (done.to_string(), refused.to_string());
    let notice = format!("bulk-{action}");
    pairs.extend([
        ("notice", notice.as_str()),
        ("done", done.as_str()),
        ("refused", refused.as_str()),
    ]);
    Ok(Redirect::to(&format!("/?{}", query(&pairs))))
}
