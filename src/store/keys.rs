//! API keys: made, listed, revoked, and looked up by id on every request.
//! Only digests of secrets are stored (see `auth.rs`).

use chrono::{DateTime, Utc};

use super::Cached;
use super::{decode, Result, Store};
use crate::auth::Role;
use crate::keys::KeyInfo;

const INSERT_KEY: &str = "
    INSERT INTO api_keys (id, name, role, queues, secret_sha256)
    VALUES ($1, $2, $3, $4, $5)
    RETURNING created_at";
const LIST_KEYS: &str = "
    SELECT id, name, role, queues, created_at, revoked_at FROM api_keys
    ORDER BY created_at, id";
const REVOKE_KEY: &str = "
    UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1
    RETURNING revoked_at";
/// A live key's role, queues and digest (a revoked key is not found).
const FIND_LIVE_KEY: &str = "
    SELECT role, queues, secret_sha256 FROM api_keys WHERE id = $1 AND revoked_at IS NULL";

/// What a live key may do, and its digest to check the secret against.
#[derive(Debug, Clone)]
pub(crate) struct LiveKey {
    pub role: Role,
    pub queues: Vec<String>,
    pub secret_sha256: Vec<u8>,
}

fn role_of(stored: &str) -> Result<Role> {
    decode("api_keys.role", stored)
}

impl Store {
    /// Stores a new key; returns when it was made.
    pub(crate) async fn insert_key(
        &self,
        id: &str,
        name: &str,
        role: Role,
        queues: &[String],
        digest: &[u8; 32],
    ) -> Result<DateTime<Utc>> {
        let conn = self.conn().await?;
        let row = conn
            .query_one(
                INSERT_KEY,
                &[&id, &name, &role.as_str(), &queues, &digest.as_slice()],
            )
            .await?;
        Ok(row.get(0))
    }

    pub(crate) async fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        let conn = self.conn().await?;
        let rows = conn.query(LIST_KEYS, &[]).await?;
        rows.iter()
            .map(|r| {
                Ok(KeyInfo {
                    id: r.get(0),
                    name: r.get(1),
                    role: role_of(r.get(2))?,
                    queues: r.get(3),
                    created_at: r.get(4),
                    revoked_at: r.get(5),
                })
            })
            .collect()
    }

    /// Revokes a key (again: no change); returns when it was revoked, or
    /// `None` if no key has this id.
    pub(crate) async fn revoke_key(&self, id: &str) -> Result<Option<DateTime<Utc>>> {
        let conn = self.conn().await?;
        let row = conn.query_opt(REVOKE_KEY, &[&id]).await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// The live key with this id, if any.
    pub(crate) async fn find_live_key(&self, id: &str) -> Result<Option<LiveKey>> {
        let conn = self.conn().await?;
        let Some(row) = conn.query_opt(Cached(FIND_LIVE_KEY), &[&id]).await? else {
            return Ok(None);
        };
        Ok(Some(LiveKey {
            role: role_of(row.get(0))?,
            queues: row.get(1),
            secret_sha256: row.get(2),
        }))
    }
}
