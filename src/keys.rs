//! Managing API keys on the database directly, without a running node (so
//! that the first admin key can be made): what `stead key create|list|revoke`
//! run. The API's `/v1/keys` routes do the same for an admin key.

use chrono::{DateTime, Utc};

use crate::auth::{self, Role};
use crate::error::Error;
use crate::store::{Store, StoreConfig};

/// A key just made: the whole key is shown this once and never again.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    /// The key's id (the part of the key that may be shown and logged).
    pub id: String,
    /// The whole key, `stead_<id>_<secret>`, for `Authorization: Bearer`.
    pub key: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
}

/// A stored key, without its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key's id.
    pub id: String,
    /// What it is for, as its maker named it.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// The queues a worker key may work (empty for other roles).
    pub queues: Vec<String>,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Makes a key in the cluster of `schema` (whose migrations must have been
/// applied: `stead migrate` or any node).
pub async fn create(
    database_url: &str,
    schema: &str,
    name: &str,
    role: Role,
    queues: &[String],
) -> Result<CreatedKey, Error> {
    auth::check_new_key(name, role, queues)
        .map_err(|(field, message)| Error::Config(format!("--{field}: {message}")))?;
    let store = open(database_url, schema)?;
    Ok(mint_into(&store, name, role, queues).await?)
}

/// Every key of the cluster, oldest first.
pub async fn list(database_url: &str, schema: &str) -> Result<Vec<KeyInfo>, Error> {
    let store = open(database_url, schema)?;
    Ok(store.list_keys().await?)
}

/// Revokes a key at once, on every node; returns when it was revoked, or
/// `None` if no key has this id.
pub async fn revoke(
    database_url: &str,
    schema: &str,
    id: &str,
) -> Result<Option<DateTime<Utc>>, Error> {
    let store = open(database_url, schema)?;
    Ok(store.revoke_key(id).await?)
}

/// Mints a key and stores its digest (the API's create uses it too).
pub(crate) async fn mint_into(
    store: &Store,
    name: &str,
    role: Role,
    queues: &[String],
) -> Result<CreatedKey, crate::store::StoreError> {
    let minted = auth::mint();
    let created_at = store
        .insert_key(&minted.id, name, role, queues, &minted.digest)
        .await?;
    Ok(CreatedKey {
        id: minted.id,
        key: minted.key,
        created_at,
    })
}

fn open(database_url: &str, schema: &str) -> Result<Store, Error> {
    Ok(Store::new(StoreConfig {
        database_url: database_url.to_string(),
        direct_database_url: None,
        schema: schema.to_string(),
        pool_size: 1,
        pool_wait_timeout_ms: 10_000,
        statement_timeout_ms: 30_000,
        idle_in_transaction_timeout_ms: 0,
        application_name: "stead key".into(),
    })?)
}
