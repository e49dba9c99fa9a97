//! Registered workflow definitions: immutable versions of a name.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{Result, Store};

/// Serialises registrations of one workflow name; correctness rests on the
/// unique constraints, the lock only avoids pointless conflicts.
const LOCK_WORKFLOW_NAME: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))";
const FIND_WORKFLOW_BY_HASH: &str =
    "SELECT version, created_at FROM workflows WHERE name = $1 AND content_hash = $2";
const INSERT_WORKFLOW: &str = "
    INSERT INTO workflows (name, version, definition, content_hash, retention_ms)
    SELECT $1, coalesce(max(version), 0) + 1, $2, $3, $4 FROM workflows WHERE name = $1
    RETURNING version, created_at";
pub(super) const GET_WORKFLOW_VERSION: &str =
    "SELECT name, version, definition, created_at FROM workflows WHERE name = $1 AND version = $2";
const GET_WORKFLOW_LATEST: &str = "
    SELECT name, version, definition, created_at FROM workflows
    WHERE name = $1 ORDER BY version DESC LIMIT 1";
const LIST_WORKFLOWS: &str = "
    SELECT DISTINCT ON (name) name, version, definition, created_at
    FROM workflows ORDER BY name, version DESC LIMIT $1";
const LIST_WORKFLOW_VERSIONS: &str = "
    SELECT name, version, definition, created_at FROM workflows
    WHERE name = $1 ORDER BY version";

#[derive(Debug, Clone)]
pub(crate) struct WorkflowRecord {
    pub name: String,
    pub version: i32,
    pub definition: Value,
    pub created_at: DateTime<Utc>,
}

/// A row of `name, version, definition, created_at`.
pub(super) fn workflow_from_row(r: &tokio_postgres::Row) -> WorkflowRecord {
    WorkflowRecord {
        name: r.get(0),
        version: r.get(1),
        definition: r.get(2),
        created_at: r.get(3),
    }
}

impl Store {
    /// Registers a definition: the same content returns its existing version
    /// (and false); new content becomes version N+1 (and true).
    pub(crate) async fn register_workflow(
        &self,
        name: &str,
        definition: &Value,
        content_hash: &str,
        retention_ms: Option<u64>,
    ) -> Result<(WorkflowRecord, bool)> {
        let retention_ms = retention_ms.map(|ms| ms as i64);
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        tx.execute(LOCK_WORKFLOW_NAME, &[&name]).await?;
        let existing = tx
            .query_opt(FIND_WORKFLOW_BY_HASH, &[&name, &content_hash])
            .await?;
        let (row, created) = match existing {
            Some(row) => (row, false),
            None => {
                let row = tx
                    .query_one(
                        INSERT_WORKFLOW,
                        &[&name, definition, &content_hash, &retention_ms],
                    )
                    .await?;
                (row, true)
            }
        };
        tx.commit().await?;
        let record = WorkflowRecord {
            name: name.to_string(),
            version: row.get(0),
            definition: definition.clone(),
            created_at: row.get(1),
        };
        Ok((record, created))
    }

    /// A version, or the latest one.
    pub(crate) async fn get_workflow(
        &self,
        name: &str,
        version: Option<i32>,
    ) -> Result<Option<WorkflowRecord>> {
        let conn = self.conn().await?;
        let row = match version {
            Some(v) => conn.query_opt(GET_WORKFLOW_VERSION, &[&name, &v]).await?,
            None => conn.query_opt(GET_WORKFLOW_LATEST, &[&name]).await?,
        };
        Ok(row.map(|r| workflow_from_row(&r)))
    }

    /// Every workflow's latest version.
    pub(crate) async fn list_workflows(&self, limit: i64) -> Result<Vec<WorkflowRecord>> {
        let conn = self.conn().await?;
        let rows = conn.query(LIST_WORKFLOWS, &[&limit]).await?;
        Ok(rows.iter().map(workflow_from_row).collect())
    }

    pub(crate) async fn list_workflow_versions(&self, name: &str) -> Result<Vec<WorkflowRecord>> {
        let conn = self.conn().await?;
        let rows = conn.query(LIST_WORKFLOW_VERSIONS, &[&name]).await?;
        Ok(rows.iter().map(workflow_from_row).collect())
    }
}
