//! Extractors whose rejections are problem documents naming the field.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A JSON body. Malformed JSON is a 400; a value of the wrong shape is a
/// 422 naming the JSON path; a body over the limit is a 413.
pub(crate) struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let ApiBytes(bytes) = ApiBytes::from_request(req, state).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// A raw body, with the size limit's rejection as a problem document.
pub(crate) struct ApiBytes(pub Bytes);

impl<S> FromRequest<S> for ApiBytes
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            let status = rejection.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    status,
                    "body-too-large",
                    "Request body too large",
                    "the request body exceeds the server's limit",
                )
            } else {
                ApiError::new(
                    status,
                    "invalid-body",
                    "Invalid request body",
                    rejection.body_text(),
                )
            }
        })?;
        Ok(ApiBytes(bytes))
    }
}

/// Parses `bytes` as `T` with problem documents for the failures.
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_field(
            "$",
            "the request body is empty; send a JSON document",
        ));
    }
    // Syntax first, so that malformed JSON is told apart from a wrong shape.
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_field("$", format!("malformed JSON: {e}")))?;
    if let Some(path) = find_nul(&value, "$") {
        // PostgreSQL text and jsonb cannot hold U+0000.
        return Err(ApiError::unprocessable_field(
            path,
            "text containing the NUL character (\\u0000) cannot be stored",
        ));
    }
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = e.path().to_string();
        let mut path = if path == "." || path.is_empty() {
            "$".to_string()
        } else {
            format!("$.{path}")
        };
        let message = e.into_inner().to_string();
        // serde reports a missing or unknown field at its parent; name the
        // field itself.
        for prefix in ["missing field `", "unknown field `"] {
            if let Some(rest) = message.strip_prefix(prefix) {
                match rest.split('`').next() {
                    // ... unless the path already ends with it (as for an
                    // unknown field inside an array element).
                    Some(field) if !path.ends_with(&format!(".{field}")) => {
                        path = format!("{path}.{field}");
                    }
                    _ => {}
                }
            }
        }
        ApiError::unprocessable_field(path, message)
    })
}

/// The path of the first string or key holding U+0000, if any.
fn find_nul(value: &serde_json::Value, path: &str) -> Option<String> {
    match value {
        serde_json::Value::String(s) if s.contains('\0') => Some(path.to_string()),
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| find_nul(v, &format!("{path}[{i}]"))),
        serde_json::Value::Object(map) => map.iter().find_map(|(k, v)| {
            let child = format!("{path}.{}", k.replace('\0', "\\u0000"));
            if k.contains('\0') {
                Some(child)
            } else {
                find_nul(v, &child)
            }
        }),
        _ => None,
    }
}

/// Checks one id-like value (`[A-Za-z0-9._:@-]{1,200}`), naming it on failure.
pub(crate) fn check_id(what: &str, value: &str) -> Result<(), ApiError> {
    const RULE: &str = "must be 1-200 characters of letters, digits and . _ : @ -";
    if is_valid_id(value) {
        Ok(())
    } else if what.starts_with('$') {
        // A field of a well-formed JSON body: the body is unprocessable.
        Err(ApiError::unprocessable_field(what, RULE))
    } else {
        Err(ApiError::bad_field(what, RULE))
    }
}

pub(crate) fn is_valid_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 200
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'))
}

/// Raw query parameters; the handlers validate and name each one.
pub(crate) struct QueryParams(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        serde_urlencoded::from_str::<Vec<(String, String)>>(query)
            .map(QueryParams)
            .map_err(|e| ApiError::bad_field("query", format!("malformed query string: {e}")))
    }
}

impl QueryParams {
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Rejects parameters the endpoint does not know.
    pub(crate) fn only(&self, allowed: &[&str]) -> Result<(), ApiError> {
        for (k, _) in &self.0 {
            if !allowed.contains(&k.as_str()) {
                return Err(ApiError::bad_field(
                    format!("query.{k}"),
                    format!("unknown parameter; allowed: {}", allowed.join(", ")),
                ));
            }
        }
        Ok(())
    }
}

/// Path parameters; a rejection is a problem document.
pub(crate) struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| ApiPath(v))
            .map_err(|e| ApiError::bad_field("path", e.body_text()))
    }
}

/// 413 if `value`, as JSON text, is longer than `max` bytes (`flag` names
/// the limit).
pub(crate) fn check_size(
    path: impl Into<String>,
    value: &serde_json::Value,
    max: usize,
    flag: &str,
) -> super::error::ApiResult<()> {
    let len = crate::engine::json_len(value);
    if len > max {
        return Err(ApiError::too_large(
            path,
            format!("is {len} bytes as JSON, over the limit of {max} ({flag})"),
        ));
    }
    Ok(())
}
