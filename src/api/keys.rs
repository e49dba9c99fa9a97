//! `/v1/keys`: an admin key makes, lists and revokes keys (as `stead key`
//! does on the database).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, ApiResult};
use super::extract::ApiJson;
use super::AppState;
use crate::auth::{self, Role};
use crate::keys::{mint_into, KeyInfo};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateKey {
    name: String,
    role: String,
    #[serde(default)]
    queues: Vec<String>,
}

fn info_json(k: &KeyInfo) -> Value {
    json!({
        "id": k.id,
        "name": k.name,
        "role": k.role.as_str(),
        "queues": k.queues,
        "created_at": k.created_at,
        "revoked_at": k.revoked_at,
    })
}

pub(crate) async fn create(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CreateKey>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let role: Role = req
        .role
        .parse()
        .map_err(|e: String| ApiError::unprocessable_field("$.role", e))?;
    auth::check_new_key(&req.name, role, &req.queues)
        .map_err(|(field, message)| ApiError::unprocessable_field(format!("$.{field}"), message))?;
    let created = mint_into(&state.inner.store, &req.name, role, &req.queues).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": created.id,
            "key": created.key,
            "name": req.name,
            "role": role.as_str(),
            "queues": req.queues,
            "created_at": created.created_at,
        })),
    ))
}

pub(crate) async fn list(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let keys = state.inner.store.list_keys().await?;
    let items: Vec<Value> = keys.iter().map(info_json).collect();
    Ok(Json(json!({ "items": items })))
}

pub(crate) async fn revoke(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    match state.inner.store.revoke_key(&id).await? {
        Some(at) => Ok(Json(json!({ "id": id, "revoked_at": at }))),
        None => Err(ApiError::not_found(format!("no API key has the id {id:?}"))),
    }
}
