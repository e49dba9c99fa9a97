//! Creating and upgrading the schema: refinery migrations from `sql/`, run
//! on a dedicated connection under an advisory lock so that concurrent
//! migrators serialise.

use super::{lock_key, Cause, Result, Store, StoreError};

mod embedded {
    refinery::embed_migrations!("sql");
}

const MIGRATION_LOCK: &str = "SELECT pg_advisory_lock($1)";
const MIGRATION_UNLOCK: &str = "SELECT pg_advisory_unlock($1)";
/// The slot count is fixed by whichever migrator creates the cluster row.
const INIT_CLUSTER: &str =
    "INSERT INTO cluster (slot_count) VALUES ($1) ON CONFLICT (singleton) DO NOTHING";
const SCHEMA_VERSION: &str = "SELECT coalesce(max(version), 0)::int FROM refinery_schema_history";
const SLOT_COUNT: &str = "SELECT slot_count FROM cluster";

/// The newest migration version this binary knows.
pub(crate) fn latest_migration_version() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version() as i32)
        .max()
        .unwrap_or(0)
}

impl Store {
    /// Applies pending migrations (creating the schema and, for a new
    /// cluster, fixing its slot count).
    pub(crate) async fn migrate(&self, slot_count: u32) -> Result<()> {
        self.migrate_to(slot_count, None).await
    }

    /// Applies pending migrations up to `target` (all of them for `None`).
    pub(crate) async fn migrate_to(&self, slot_count: u32, target: Option<u32>) -> Result<()> {
        let (mut client, _conn) = self.connect_raw().await?;
        let key = lock_key(self.schema(), "migrate");
        client.execute(MIGRATION_LOCK, &[&key]).await?;
        let result = self.migrate_locked(&mut client, slot_count, target).await;
        let _ = client.execute(MIGRATION_UNLOCK, &[&key]).await;
        result
    }

    async fn migrate_locked(
        &self,
        client: &mut tokio_postgres::Client,
        slot_count: u32,
        target: Option<u32>,
    ) -> Result<()> {
        let schema = self.schema();
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS \"{schema}\"; SET search_path TO \"{schema}\"; \
                 SET statement_timeout = 0;"
            ))
            .await?;
        let target = target.map_or(refinery::Target::Latest, refinery::Target::Version);
        embedded::migrations::runner()
            .set_target(target)
            .run_async(client)
            .await
            .map_err(|e| StoreError::Permanent(Cause::Migration(e)))?;
        client
            .execute(INIT_CLUSTER, &[&(slot_count as i32)])
            .await?;
        Ok(())
    }

    /// The newest migration applied to the database (0 if none).
    pub(crate) async fn schema_version(&self) -> Result<i32> {
        let conn = self.conn().await?;
        Ok(conn.query_one(SCHEMA_VERSION, &[]).await?.get(0))
    }

    pub(crate) async fn slot_count(&self) -> Result<i32> {
        let conn = self.conn().await?;
        Ok(conn.query_one(SLOT_COUNT, &[]).await?.get(0))
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::fresh_database_at;

    /// Version 6 moves the per-event rows of `events` into one-event rows of
    /// `history`; the `events` view shows them as they were.
    #[tokio::test]
    async fn the_history_keeps_its_events_across_version_6() {
        let (store, client) = fresh_database_at(Some(5)).await;
        client
            .batch_execute(
                "INSERT INTO stead.events (instance_id, seq, type, step_id, attempt, data, member) VALUES \
                   ('i', 1, 'instance_started', NULL, NULL, '{}', 'm1'), \
                   ('i', 2, 'step_scheduled', 'a', 1, '{\"queue\": \"q\"}', 'm1')",
            )
            .await
            .unwrap();
        let before = client
            .query("SELECT seq, type, step_id, attempt, data, created_at, member FROM stead.events ORDER BY seq", &[])
            .await
            .unwrap();
        store.migrate(crate::testing::SLOTS).await.unwrap();
        let after = client
            .query("SELECT seq, type, step_id, attempt, data, created_at, member FROM stead.events ORDER BY seq", &[])
            .await
            .unwrap();
        let rows = |r: &[tokio_postgres::Row]| -> Vec<String> {
            r.iter()
                .map(|row| {
                    let data: serde_json::Value = row.get(4);
                    let at: chrono::DateTime<chrono::Utc> = row.get(5);
                    format!(
                        "{} {} {:?} {:?} {data} {at} {:?}",
                        row.get::<_, i32>(0),
                        row.get::<_, &str>(1),
                        row.get::<_, Option<&str>>(2),
                        row.get::<_, Option<i32>>(3),
                        row.get::<_, Option<&str>>(6)
                    )
                })
                .collect()
        };
        assert_eq!(rows(&after), rows(&before));
        assert_eq!(rows(&after).len(), 2);
    }
}
