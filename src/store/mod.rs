//! All SQL lives here: the connection pool and the dedicated sessions, the
//! migrations, and one file per aggregate with its statements beside the
//! functions that run them:
//!
//! - `conn.rs`: a pooled connection and its transactions, straight to
//!   PostgreSQL (prepared statements) or through a transaction-mode pooler
//!   (unnamed statements with learned parameter types);
//! - `migrations.rs`: schema creation and versions;
//! - `workflows.rs`: registered definitions;
//! - `instances.rs`: starting, reading and listing instances, their steps,
//!   history, signals, cancel and retry requests;
//! - `queue.rs`: claiming, heartbeating, finishing and reaping tasks, and
//!   queue depth;
//! - `members.rs`: a member's dedicated session (heartbeat, slot locks) and
//!   the cluster views;
//! - `notify.rs`: LISTEN sessions and NOTIFY;
//! - `advance.rs`: the engine's transaction (lock, load, write);
//! - `bulk.rs`: cancel or retry requests for every instance a filter matches;
//! - `overview.rs`: the console's reads beside an instance's own rows
//!   (pending signals, children, leased tasks, duty holders);
//! - `controls.rs`: queue limits and pauses, paused workflows, and the
//!   claims of a limited queue;
//! - `keys.rs`: API keys;
//! - `retention.rs`: deleting ended instance trees past their retention;
//! - `schedules.rs`: schedules, and firing the due ones;
//! - `admin.rs`: the embedded cluster's database creation.
//!
//! Rows cross this boundary typed: statuses and kinds are `model` enums,
//! decoded here; a value the code does not know is a permanent error that
//! names the column and the value.

mod admin;
mod advance;
mod bulk;
mod conn;
mod controls;
mod error;
mod instances;
mod keys;
mod members;
mod migrations;
mod notify;
mod overview;
mod queue;
mod retention;
mod schedules;
mod tls;
mod workflows;

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_postgres_rustls::MakeRustlsConnect;

pub(crate) use admin::{can_connect, ensure_database};
pub(crate) use advance::{
    AdvanceTx, AdvanceWrites, DueBatch, DueInstance, FinishedTask, Hold, InstanceUpdate, Lease,
    NewChild, NewEvent, NewTask, StepWrite,
};
#[cfg(test)]
pub(crate) use advance::{RowAt, SignalRow, StoredStep};
pub(crate) use bulk::{BulkAction, BulkFilter};
pub(crate) use conn::Cached;
use conn::{Conn, Describer, Statements};
pub(crate) use controls::{ControlNames, QueueControl, QueueLimits};
pub(crate) use error::{Cause, StoreError};
pub(crate) use instances::{
    EventRecord, InstanceBrief, InstanceFilter, InstanceRecord, StepRecord,
};
pub(crate) use members::{ClusterCounts, MemberSession};
pub(crate) use migrations::latest_migration_version;
pub(crate) use notify::{ended_ids, Channel};
pub(crate) use overview::LeasedTask;
pub(crate) use queue::{ClaimedTask, QueueDepth, TaskOutcome};
pub(crate) use retention::Purged;
pub(crate) use schedules::{Fired, FiringLimits, NewSchedule, PutSchedule, ScheduleRecord};
pub(crate) use workflows::WorkflowRecord;

use crate::model::Vocabulary;

pub(crate) type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Connection settings shared by the pool and the dedicated sessions.
#[derive(Debug, Clone)]
pub(crate) struct StoreConfig {
    pub database_url: String,
    /// Set when `database_url` is a transaction-mode pooler (PgBouncer):
    /// the URL of PostgreSQL itself, for the sessions that need one of
    /// their own (members, the listener, migrations).
    pub direct_database_url: Option<String>,
    pub schema: String,
    pub pool_size: usize,
    pub pool_wait_timeout_ms: u64,
    pub statement_timeout_ms: u64,
    /// The server ends a pooled session that sits this long inside a
    /// transaction (0 = never), so a frozen or cut-off worker cannot keep
    /// row locks that the others skip.
    pub idle_in_transaction_timeout_ms: u64,
    pub application_name: String,
}

/// How long opening one connection (or creating one for the pool) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a transaction for statements written as keyed probes (the hot
/// path's): their plans do not depend on parameter values, so the generic
/// plan is the right one, and planning each bind again (the pool's
/// `force_custom_plan`) cost 0.3-1 ms a statement, a third of the idle
/// latency and as much as a claim's own work. No sequential scans: a table
/// analysed while empty (as after a pre-fill) looks free to scan whole, and
/// statements that probe it by key read it all instead. No JIT: a scan
/// that has no index to use (the one-row `cluster`) then costs 1e10, far
/// above `jit_above_cost`, and compiling a start took 77 ms.
const KEYED_PLANS: &str = "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; \
     SET LOCAL enable_seqscan = off; SET LOCAL jit = off";

/// A handle on the database: cheap to clone.
#[derive(Clone)]
pub(crate) struct Store {
    pool: Pool,
    config: StoreConfig,
    /// The dedicated sessions' settings (straight to PostgreSQL, even when
    /// the pool goes through a pooler).
    pg_config: tokio_postgres::Config,
    /// How the pool's connections run statements.
    statements: Statements,
    /// How every connection of this store speaks TLS (per the URL's
    /// `sslmode`; `disable` never does).
    tls: tls::MakeTls,
    /// This process's mark on the notifications it sends, so that its own
    /// listener can tell them from other processes' (its own advancers
    /// were woken in-process already).
    origin: std::sync::Arc<str>,
}

/// A schema name we accept: a plain lower-case SQL identifier.
pub(crate) fn validate_schema_name(schema: &str) -> std::result::Result<(), String> {
    let ok = !schema.is_empty()
        && schema.len() <= 48
        && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "schema name {schema:?} must be 1-48 characters of [a-z0-9_], starting with a letter or _"
        ))
    }
}

/// A 64-bit advisory lock key derived from the schema and a purpose, so two
/// clusters in one database never share a lock.
fn lock_key(schema: &str, purpose: &str) -> i64 {
    let digest = Sha256::digest(format!("stead:{schema}:{purpose}").as_bytes());
    i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// The connection settings and TLS of a database URL, with the client-side
/// timeouts every connection of the store has.
fn connect_config(url: &str) -> Result<(tokio_postgres::Config, tls::MakeTls)> {
    let tls_settings = tls::split_url(url)
        .map_err(|e| StoreError::invalid(format!("invalid database URL: {e}")))?;
    let tls = tls::MakeTls(MakeRustlsConnect::new(
        tls::client_config(&tls_settings)
            .map_err(|e| StoreError::invalid(format!("database TLS: {e}")))?,
    ));
    let mut pg_config =
        tokio_postgres::Config::from_str(&tls_settings.url).map_err(|e| StoreError::Invalid {
            message: format!("invalid database URL: {e}"),
            source: Some(e),
        })?;
    pg_config.ssl_mode(tls::mode_for(pg_config.get_hosts(), tls_settings.mode));
    pg_config.connect_timeout(CONNECT_TIMEOUT);
    // Client-side keepalives: a dead server is noticed in ~16 s, not hours.
    pg_config.keepalives(true);
    pg_config.keepalives_idle(Duration::from_secs(10));
    pg_config.keepalives_interval(Duration::from_secs(2));
    pg_config.keepalives_retries(3);
    Ok((pg_config, tls))
}

/// The settings a session of the store starts with, sent as startup
/// options (which only PostgreSQL itself takes, not a pooler).
fn set_session_options(pg_config: &mut tokio_postgres::Config, config: &StoreConfig) {
    // Server-side keepalives and a TCP user timeout make the server drop
    // a silent client (partition, frozen process) within seconds; with
    // the idle-in-transaction timeout, its row locks are freed too.
    pg_config.options(format!(
        "-c search_path={} -c statement_timeout={} -c idle_in_transaction_session_timeout={} \
         -c tcp_keepalives_idle=5 -c tcp_keepalives_interval=1 -c tcp_keepalives_count=3 \
         -c tcp_user_timeout=10000 -c plan_cache_mode=force_custom_plan",
        config.schema, config.statement_timeout_ms, config.idle_in_transaction_timeout_ms
    ));
    pg_config.application_name(&config.application_name);
}

impl Store {
    pub(crate) fn new(config: StoreConfig) -> Result<Self> {
        validate_schema_name(&config.schema).map_err(StoreError::invalid)?;
        let (mut pool_config, pool_tls) = connect_config(&config.database_url)?;
        let (pg_config, tls, statements) = match config.direct_database_url.as_deref() {
            // Straight to PostgreSQL: the pool's sessions and the dedicated
            // ones start alike.
            None => {
                set_session_options(&mut pool_config, &config);
                (pool_config.clone(), pool_tls.clone(), Statements::Prepared)
            }
            // A transaction-mode pooler passes no startup options on: the
            // pooled sessions' settings come from the role (`check_pooled`).
            Some(url) => {
                let (mut direct, tls) = connect_config(url)?;
                set_session_options(&mut direct, &config);
                pool_config.application_name(&config.application_name);
                let describer = Describer::new(direct.clone(), tls.clone());
                (
                    direct,
                    tls,
                    Statements::Unnamed(std::sync::Arc::new(describer)),
                )
            }
        };
        let manager = Manager::from_config(
            pool_config,
            pool_tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .wait_timeout(Some(Duration::from_millis(config.pool_wait_timeout_ms)))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Permanent(e.into()))?;
        Ok(Store {
            pool,
            config,
            pg_config,
            tls,
            statements,
            origin: uuid::Uuid::new_v4().to_string().into(),
        })
    }

    pub(crate) fn schema(&self) -> &str {
        &self.config.schema
    }

    /// The payload of this process's own wake-up notifications.
    pub(crate) fn origin(&self) -> &str {
        &self.origin
    }

    pub(crate) fn pool_status(&self) -> deadpool_postgres::Status {
        self.pool.status()
    }

    async fn conn(&self) -> Result<Conn> {
        Ok(Conn::new(self.pool.get().await?, self.statements.clone()))
    }

    /// Through a transaction-mode pooler, checks that the pool's sessions
    /// resolve names in this store's schema: the pooler passes no startup
    /// options on, so the schema must come from the role's settings. Warns
    /// when they run without a statement timeout. Straight to PostgreSQL,
    /// there is nothing to check.
    pub(crate) async fn check_pooled(&self) -> Result<()> {
        if matches!(self.statements, Statements::Prepared) {
            return Ok(());
        }
        let conn = self.conn().await?;
        let row = conn
            .query_one(
                "SELECT current_schema()::text, current_setting('statement_timeout'), \
                 current_user::text, current_database()::text",
                &[],
            )
            .await?;
        let (schema, timeout, user, database): (Option<String>, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        if schema.as_deref() != Some(self.schema()) {
            return Err(StoreError::invalid(format!(
                "the pooled database URL's sessions use schema {}, not {:?}: a transaction-mode \
                 pooler passes no startup options on, so set the schema on the role, on a direct \
                 connection: ALTER ROLE \"{user}\" IN DATABASE \"{database}\" SET search_path = {}",
                schema.map_or_else(|| "none".to_string(), |s| format!("{s:?}")),
                self.schema(),
                self.schema()
            )));
        }
        if timeout == "0" {
            tracing::warn!(
                "the pooled database URL's sessions have no statement_timeout: set one on the \
                 role (ALTER ROLE \"{user}\" IN DATABASE \"{database}\" SET statement_timeout = \
                 '{}ms') or PgBouncer's query_timeout",
                self.config.statement_timeout_ms
            );
        }
        Ok(())
    }

    /// Runs one statement written as keyed probes (its plan right whatever
    /// the parameters and the statistics) in its own transaction with the
    /// settings of `KEYED_PLANS`, all in one round trip.
    async fn query_keyed(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let conn = self.conn().await?;
        let stmt = conn.prepare(sql).await?;
        // If the statement fails, COMMIT ends the aborted transaction as a
        // rollback; its answer is dropped with the others.
        let ((), rows, ()) = futures::try_join!(
            conn.batch_execute(KEYED_PLANS),
            conn.query(&stmt, params),
            conn.batch_execute("COMMIT")
        )?;
        Ok(rows)
    }

    /// A dedicated connection outside the pool (migrations). The connection
    /// task is spawned; it ends when the client is dropped.
    async fn connect_raw(&self) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
        let (client, connection) = self.pg_config.connect(self.tls.clone()).await?;
        let handle = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok((client, handle))
    }
}

/// The enum a text column holds; a value no variant spells is a permanent
/// error naming the column and the value.
fn decode<T: Vocabulary>(column: &'static str, text: &str) -> Result<T> {
    T::parse(text).ok_or_else(|| StoreError::unknown_value(column, text))
}

/// The typed form of a JSON column; a shape this version does not read is a
/// permanent error naming the column.
fn decode_json<T: DeserializeOwned>(column: &'static str, value: Value) -> Result<T> {
    serde_json::from_value(value)
        .map_err(|source| StoreError::Permanent(Cause::BadJson { column, source }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{InstanceStatus, ItemState, StepStatus};
    use serde_json::json;

    #[test]
    fn known_text_decodes_to_its_variant() {
        let status: InstanceStatus = decode("instances.status", "running").unwrap();
        assert_eq!(status, InstanceStatus::Running);
        let status: StepStatus = decode("steps.status", "compensated").unwrap();
        assert_eq!(status, StepStatus::Compensated);
    }

    #[test]
    fn an_unknown_status_is_a_permanent_error_naming_column_and_value() {
        let e = decode::<InstanceStatus>("instances.status", "paused").unwrap_err();
        match &e {
            StoreError::Permanent(Cause::UnknownValue { column, value }) => {
                assert_eq!(*column, "instances.status");
                assert_eq!(value, "paused");
            }
            other => panic!("expected a permanent unknown-value error, got {other:?}"),
        }
    }

    #[test]
    fn json_of_the_wrong_shape_is_a_permanent_error_naming_the_column() {
        let e = decode_json::<Vec<ItemState>>("steps.items", json!([{"status": "paused"}]))
            .unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::Permanent(Cause::BadJson {
                    column: "steps.items",
                    ..
                })
            ),
            "{e:?}"
        );
    }
}
