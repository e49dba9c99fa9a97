//! `/v1/keys`: an admin key makes, lists and revokes keys (as `stead key`
//! does on the database).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult};
use super::extract::ApiJson;
use super::AppState;
use crate::auth::{self, Role};
use crate::keys::{mint_into, KeyInfo};

/// A key to make: what it is for, its role, and for a worker key the
/// queues it may work.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateKey {
    name: String,
    /// `admin`, `operator`, `worker` or `reader`.
    role: String,
    #[serde(default)]
    queues: Vec<String>,
}

/// A key, without its secret.
#[derive(Serialize, ToSchema)]
pub(crate) struct Key {
    id: String,
    name: String,
    role: String,
    queues: Vec<String>,
    created_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
}

/// A key just made: `key` is the only time its secret is shown.
#[derive(Serialize, ToSchema)]
pub(crate) struct CreatedKey {
    id: String,
    /// `stead_<id>_<secret>`, for `Authorization: Bearer`.
    key: String,
    name: String,
    role: String,
    queues: Vec<String>,
    created_at: DateTime<Utc>,
}

/// The keys.
#[derive(Serialize, ToSchema)]
pub(crate) struct KeyList {
    items: Vec<Key>,
}

/// A key revoked.
#[derive(Serialize, ToSchema)]
pub(crate) struct Revoked {
    id: String,
    revoked_at: DateTime<Utc>,
}

fn info_json(k: &KeyInfo) -> Key {
    Key {
        id: k.id.clone(),
        name: k.name.clone(),
        role: k.role.as_str().to_string(),
        queues: k.queues.clone(),
        created_at: k.created_at,
        revoked_at: k.revoked_at,
    }
}

/// Makes an API key (admins only); the answer holds its secret, once.
#[utoipa::path(post, path = "/v1/keys", tag = "keys",
    request_body = CreateKey,
    responses((status = 201, description = "made", body = CreatedKey)))]
pub(crate) async fn create(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CreateKey>,
) -> ApiResult<(StatusCode, Json<CreatedKey>)> {
    let role: Role = req
        .role
        .parse()
        .map_err(|e: String| ApiError::unprocessable_field("$.role", e))?;
    auth::check_new_key(&req.name, role, &req.queues)
        .map_err(|(field, message)| ApiError::unprocessable_field(format!("$.{field}"), message))?;
    let created = mint_into(&state.inner.store, &req.name, role, &req.queues).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            id: created.id,
            key: created.key,
            name: req.name,
            role: role.as_str().to_string(),
            queues: req.queues,
            created_at: created.created_at,
        }),
    ))
}

/// Every key, revoked ones too (never their secrets).
#[utoipa::path(get, path = "/v1/keys", tag = "keys",
    responses((status = 200, description = "the keys", body = KeyList)))]
pub(crate) async fn list(State(state): State<AppState>) -> ApiResult<Json<KeyList>> {
    let keys = state.inner.store.list_keys().await?;
    let items = keys.iter().map(info_json).collect();
    Ok(Json(KeyList { items }))
}

/// Revokes a key: it stops working at once, on every node.
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "the key's id")),
    responses((status = 200, description = "revoked", body = Revoked)))]
pub(crate) async fn revoke(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Revoked>> {
    match state.inner.store.revoke_key(&id).await? {
        Some(at) => Ok(Json(Revoked { id, revoked_at: at })),
        None => Err(ApiError::not_found(format!("no API key has the id {id:?}"))),
    }
}
