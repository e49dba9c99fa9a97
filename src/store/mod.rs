//! All SQL lives here: the connection pool, migrations, and one function per
//! statement of `sql.rs`. Nothing outside this module talks to PostgreSQL
//! except the notification listener's dedicated connection (`connect_raw`).

mod error;
pub mod sql;

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

pub use error::StoreError;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

mod embedded_migrations {
    refinery::embed_migrations!("sql");
}

/// Connection settings shared by the pool and the dedicated connections.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub database_url: String,
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

/// A handle on the database: cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    config: StoreConfig,
    pg_config: tokio_postgres::Config,
}

/// A schema name we accept: a plain lower-case SQL identifier.
pub fn validate_schema_name(schema: &str) -> std::result::Result<(), String> {
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
pub fn lock_key(schema: &str, purpose: &str) -> i64 {
    let digest = Sha256::digest(format!("stead:{schema}:{purpose}").as_bytes());
    i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

impl Store {
    pub fn new(config: StoreConfig) -> Result<Self> {
        validate_schema_name(&config.schema).map_err(StoreError::Invalid)?;
        let mut pg_config = tokio_postgres::Config::from_str(&config.database_url)
            .map_err(|e| StoreError::Invalid(format!("invalid database URL: {e}")))?;
        // Server-side keepalives and a TCP user timeout make the server drop
        // a silent client (partition, frozen process) within seconds; with
        // the idle-in-transaction timeout, its row locks are freed too.
        pg_config.options(format!(
            "-c search_path={} -c statement_timeout={} -c idle_in_transaction_session_timeout={} \
             -c tcp_keepalives_idle=5 -c tcp_keepalives_interval=1 -c tcp_keepalives_count=3 \
             -c tcp_user_timeout=10000",
            config.schema, config.statement_timeout_ms, config.idle_in_transaction_timeout_ms
        ));
        pg_config.application_name(&config.application_name);
        pg_config.connect_timeout(Duration::from_secs(10));
        // Client-side keepalives: a dead server is noticed in ~16 s, not hours.
        pg_config.keepalives(true);
        pg_config.keepalives_idle(Duration::from_secs(10));
        pg_config.keepalives_interval(Duration::from_secs(2));
        pg_config.keepalives_retries(3);
        let manager = Manager::from_config(
            pg_config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .wait_timeout(Some(Duration::from_millis(config.pool_wait_timeout_ms)))
            .create_timeout(Some(Duration::from_secs(10)))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Permanent(format!("cannot build pool: {e}")))?;
        Ok(Store {
            pool,
            config,
            pg_config,
        })
    }

    pub fn schema(&self) -> &str {
        &self.config.schema
    }

    /// The NOTIFY channel `name` of this cluster (matches SQL `channel()`).
    pub fn channel(&self, name: &str) -> String {
        format!("{}.{}", self.config.schema, name)
    }

    pub fn pool_status(&self) -> deadpool_postgres::Status {
        self.pool.status()
    }

    async fn conn(&self) -> Result<Object> {
        Ok(self.pool.get().await?)
    }

    /// A dedicated connection outside the pool (listener, migrations). The
    /// connection task is spawned; it ends when the client is dropped.
    pub async fn connect_raw(&self) -> Result<(Client, tokio::task::JoinHandle<()>)> {
        let (client, connection) = self.pg_config.connect(NoTls).await?;
        let handle = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok((client, handle))
    }

    /// Opens a member's dedicated session. TCP keepalives on both ends and
    /// a TCP user timeout on the server make a silent peer (partition,
    /// frozen process) drop within about `ttl_ms` instead of hours.
    pub async fn connect_member(&self, name: &str, ttl_ms: u64) -> Result<MemberSession> {
        let mut config = self.pg_config.clone();
        let idle_s = (ttl_ms / 4000).max(1);
        config.options(format!(
            "-c search_path={} -c statement_timeout={} -c tcp_keepalives_idle={idle_s} \
             -c tcp_keepalives_interval=1 -c tcp_keepalives_count=3 -c tcp_user_timeout={ttl_ms}",
            self.config.schema,
            (ttl_ms / 2).max(1000)
        ));
        config.application_name(format!("stead member {name}"));
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(idle_s));
        config.keepalives_interval(Duration::from_secs(1));
        config.keepalives_retries(3);
        config.connect_timeout(Duration::from_millis((ttl_ms / 2).max(1000)));
        let (client, connection) = config.connect(NoTls).await?;
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        let row = client.query_one(sql::LOCK_CLASS, &[]).await?;
        Ok(MemberSession {
            client,
            connection,
            lock_class: row.get(0),
            slot_count: row.get(1),
        })
    }

    pub async fn cluster_members(&self) -> Result<Vec<MemberRecord>> {
        let conn = self.conn().await?;
        let rows = conn.query(sql::CLUSTER_MEMBERS, &[]).await?;
        Ok(rows
            .iter()
            .map(|r| MemberRecord {
                name: r.get(0),
                alive: r.get(1),
                heartbeat_at: r.get(2),
                since_heartbeat_s: r.get(3),
                ttl_ms: r.get(4),
                joined_at: r.get(5),
                slots_owned: r.get(6),
                api_url: r.get(7),
            })
            .collect())
    }

    /// Slot -> owner as pg_locks shows it.
    pub async fn slot_owners(&self) -> Result<Vec<(i32, Option<String>)>> {
        let conn = self.conn().await?;
        let rows = conn.query(sql::CLUSTER_SLOTS, &[]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// A dedicated connection whose asynchronous messages (notifications)
    /// are handed to the caller.
    pub async fn connect_listener(
        &self,
        channels: &[String],
    ) -> Result<(
        Client,
        tokio::sync::mpsc::Receiver<tokio_postgres::Notification>,
        tokio::task::JoinHandle<()>,
    )> {
        use futures::StreamExt;
        let (client, mut connection) = self.pg_config.connect(NoTls).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let handle = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        // A full channel only loses a latency hint.
                        let _ = tx.try_send(n);
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        let mut listen = String::new();
        for channel in channels {
            listen.push_str(&format!("LISTEN \"{}\";", channel.replace('"', "")));
        }
        client.batch_execute(&listen).await?;
        Ok((client, rx, handle))
    }

    /// Applies pending migrations. Concurrent migrators serialise on an
    /// advisory lock, so they never interleave.
    pub async fn migrate(&self, slot_count: u32) -> Result<()> {
        let (mut client, _conn) = self.connect_raw().await?;
        let key = lock_key(&self.config.schema, "migrate");
        client.execute(sql::MIGRATION_LOCK, &[&key]).await?;
        let result = self.migrate_locked(&mut client, slot_count).await;
        let _ = client.execute(sql::MIGRATION_UNLOCK, &[&key]).await;
        result
    }

    async fn migrate_locked(&self, client: &mut Client, slot_count: u32) -> Result<()> {
        let schema = &self.config.schema;
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS \"{schema}\"; SET search_path TO \"{schema}\"; \
                 SET statement_timeout = 0;"
            ))
            .await?;
        embedded_migrations::migrations::runner()
            .run_async(client)
            .await
            .map_err(|e| StoreError::Permanent(format!("migration failed: {e}")))?;
        client
            .execute(sql::INIT_CLUSTER, &[&(slot_count as i32)])
            .await?;
        Ok(())
    }

    /// The newest migration version this binary knows.
    pub fn latest_migration_version() -> i32 {
        embedded_migrations::migrations::runner()
            .get_migrations()
            .iter()
            .map(|m| m.version() as i32)
            .max()
            .unwrap_or(0)
    }

    /// The newest migration applied to the database (0 if none).
    pub async fn schema_version(&self) -> Result<i32> {
        let conn = self.conn().await?;
        let row = conn.query_one(sql::SCHEMA_VERSION, &[]).await?;
        Ok(row.get(0))
    }

    pub async fn slot_count(&self) -> Result<i32> {
        let conn = self.conn().await?;
        Ok(conn.query_one(sql::SLOT_COUNT, &[]).await?.get(0))
    }

    // ---- workflows ---------------------------------------------------------

    /// Registers a definition: the same content returns its existing version
    /// (`created` false); new content becomes version N+1.
    pub async fn register_workflow(
        &self,
        name: &str,
        definition: &Value,
        content_hash: &str,
    ) -> Result<WorkflowRecord> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        tx.execute(sql::LOCK_WORKFLOW_NAME, &[&name]).await?;
        if let Some(row) = tx
            .query_opt(sql::FIND_WORKFLOW_BY_HASH, &[&name, &content_hash])
            .await?
        {
            tx.commit().await?;
            return Ok(WorkflowRecord {
                name: name.to_string(),
                version: row.get(0),
                definition: definition.clone(),
                created_at: row.get(1),
                created: false,
            });
        }
        let row = tx
            .query_one(sql::INSERT_WORKFLOW, &[&name, definition, &content_hash])
            .await?;
        tx.commit().await?;
        Ok(WorkflowRecord {
            name: name.to_string(),
            version: row.get(0),
            definition: definition.clone(),
            created_at: row.get(1),
            created: true,
        })
    }

    pub async fn get_workflow(
        &self,
        name: &str,
        version: Option<i32>,
    ) -> Result<Option<WorkflowRecord>> {
        let conn = self.conn().await?;
        let row = match version {
            Some(v) => {
                conn.query_opt(sql::GET_WORKFLOW_VERSION, &[&name, &v])
                    .await?
            }
            None => conn.query_opt(sql::GET_WORKFLOW_LATEST, &[&name]).await?,
        };
        Ok(row.map(|r| workflow_from_row(&r)))
    }

    pub async fn list_workflows(&self, limit: i64) -> Result<Vec<WorkflowRecord>> {
        let conn = self.conn().await?;
        let rows = conn.query(sql::LIST_WORKFLOWS, &[&limit]).await?;
        Ok(rows.iter().map(workflow_from_row).collect())
    }

    pub async fn list_workflow_versions(&self, name: &str) -> Result<Vec<WorkflowRecord>> {
        let conn = self.conn().await?;
        let rows = conn.query(sql::LIST_WORKFLOW_VERSIONS, &[&name]).await?;
        Ok(rows.iter().map(workflow_from_row).collect())
    }

    // ---- instances ---------------------------------------------------------

    /// Starts an instance (idempotent on `id`); returns the id and whether it
    /// was created now.
    pub async fn start_instance(
        &self,
        workflow: &str,
        version: Option<i32>,
        input: &Value,
        id: Option<&str>,
    ) -> Result<(String, bool)> {
        let conn = self.conn().await?;
        let row = conn
            .query_one(sql::START_INSTANCE, &[&workflow, &version, input, &id])
            .await?;
        Ok((row.get(0), row.get(1)))
    }

    pub async fn get_instance(&self, id: &str) -> Result<Option<InstanceRecord>> {
        let conn = self.conn().await?;
        let row = conn.query_opt(sql::GET_INSTANCE, &[&id]).await?;
        Ok(row.map(|r| instance_from_row(&r)))
    }

    pub async fn list_instances(&self, filter: &InstanceFilter) -> Result<Vec<InstanceRecord>> {
        let conn = self.conn().await?;
        let (after_time, after_id) = match &filter.after {
            Some((t, id)) => (Some(*t), Some(id.clone())),
            None => (None, None),
        };
        let rows = conn
            .query(
                sql::LIST_INSTANCES,
                &[
                    &filter.workflow,
                    &filter.status,
                    &after_time,
                    &after_id,
                    &filter.limit,
                ],
            )
            .await?;
        Ok(rows.iter().map(instance_from_row).collect())
    }

    pub async fn get_steps(&self, id: &str) -> Result<Vec<StepRecord>> {
        let conn = self.conn().await?;
        let rows = conn.query(sql::GET_STEPS, &[&id]).await?;
        Ok(rows
            .iter()
            .map(|r| StepRecord {
                step_id: r.get(0),
                status: r.get(1),
                attempt: r.get(2),
                input: r.get(3),
                output: r.get(4),
                error: r.get(5),
                scheduled_at: r.get(6),
                started_at: r.get(7),
                ended_at: r.get(8),
                leased: r.get(9),
                wake_at: r.get(10),
                items: r.get(11),
                compensation: r.get(12),
            })
            .collect())
    }

    /// Delivers a signal; returns its id.
    pub async fn send_signal(&self, id: &str, name: &str, payload: &Value) -> Result<i64> {
        let conn = self.conn().await?;
        let row = conn
            .query_one(sql::SEND_SIGNAL, &[&id, &name, payload])
            .await?;
        Ok(row.get(0))
    }

    pub async fn request_cancel(&self, id: &str, reason: Option<&str>) -> Result<()> {
        let conn = self.conn().await?;
        conn.execute(sql::REQUEST_CANCEL, &[&id, &reason]).await?;
        Ok(())
    }

    pub async fn request_retry(&self, id: &str) -> Result<()> {
        let conn = self.conn().await?;
        conn.execute(sql::REQUEST_RETRY, &[&id]).await?;
        Ok(())
    }

    pub async fn history(&self, id: &str) -> Result<Vec<EventRecord>> {
        let conn = self.conn().await?;
        let rows = conn.query(sql::GET_HISTORY, &[&id]).await?;
        Ok(rows
            .iter()
            .map(|r| EventRecord {
                seq: r.get(0),
                kind: r.get(1),
                step_id: r.get(2),
                attempt: r.get(3),
                data: r.get(4),
                created_at: r.get(5),
            })
            .collect())
    }

    // ---- queue -------------------------------------------------------------

    pub async fn claim_tasks(
        &self,
        queues: &[String],
        worker: &str,
        max: i64,
        lease_ms: u64,
    ) -> Result<Vec<ClaimedTask>> {
        let conn = self.conn().await?;
        let stmt = conn.prepare_cached(sql::CLAIM_TASKS).await?;
        let rows = conn
            .query(&stmt, &[&queues, &max, &worker, &(lease_ms as f64)])
            .await?;
        Ok(rows
            .iter()
            .map(|r| ClaimedTask {
                task_id: r.get(0),
                queue: r.get(1),
                kind: r.get(2),
                lease_token: r.get(3),
                instance_id: r.get(4),
                step_id: r.get(5),
                attempt: r.get(6),
                idempotency_key: r.get(7),
                input: r.get(8),
                lease_expires_at: r.get(9),
                timeout_ms: r.get(10),
                queue_wait_seconds: r.get(11),
            })
            .collect())
    }

    /// Extends a lease; `None` if the lease was lost.
    pub async fn heartbeat_task(
        &self,
        task_id: i64,
        lease_token: Uuid,
        lease_ms: u64,
    ) -> Result<Option<DateTime<Utc>>> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                sql::HEARTBEAT_TASK,
                &[&task_id, &lease_token, &(lease_ms as f64)],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Records task results in one statement; returns the ids whose lease was
    /// still held (the others were refused and changed nothing).
    pub async fn finish_tasks(&self, results: &[TaskOutcome]) -> Result<Vec<i64>> {
        if results.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids = Vec::with_capacity(results.len());
        let mut tokens = Vec::with_capacity(results.len());
        let mut statuses = Vec::with_capacity(results.len());
        let mut outputs: Vec<Option<Value>> = Vec::with_capacity(results.len());
        let mut errors: Vec<Option<Value>> = Vec::with_capacity(results.len());
        for r in results {
            ids.push(r.task_id);
            tokens.push(r.lease_token);
            match &r.result {
                Ok(output) => {
                    statuses.push("completed");
                    outputs.push(Some(output.clone()));
                    errors.push(None);
                }
                Err(error) => {
                    statuses.push("failed");
                    outputs.push(None);
                    errors.push(Some(error.clone()));
                }
            }
        }
        let conn = self.conn().await?;
        let stmt = conn.prepare_cached(sql::FINISH_TASKS).await?;
        let rows = conn
            .query(&stmt, &[&ids, &tokens, &statuses, &outputs, &errors])
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Sends a NOTIFY on this cluster's channel `name`.
    pub async fn notify(&self, name: &str) -> Result<()> {
        let conn = self.conn().await?;
        conn.execute(sql::NOTIFY, &[&name]).await?;
        Ok(())
    }

    /// Fails up to `limit` attempts whose lease expired; returns how many.
    pub async fn reap_expired_leases(&self, limit: i64, slots: &[i32]) -> Result<u64> {
        let conn = self.conn().await?;
        let rows = conn
            .query(sql::REAP_EXPIRED_LEASES, &[&limit, &slots])
            .await?;
        Ok(rows.len() as u64)
    }

    /// Tasks per queue and state, with the oldest ready task's age.
    pub async fn queue_depth(&self) -> Result<Vec<QueueDepth>> {
        let conn = self.conn().await?;
        let rows = conn.query(sql::QUEUE_DEPTH, &[]).await?;
        Ok(rows.iter().map(queue_depth_row).collect())
    }

    /// Live members, slots and owned slots, in one statement.
    pub async fn cluster_counts(&self) -> Result<ClusterCounts> {
        let conn = self.conn().await?;
        let row = conn.query_one(sql::CLUSTER_COUNTS, &[]).await?;
        Ok(ClusterCounts {
            members_alive: row.get(0),
            slots: row.get(1),
            slots_owned: row.get(2),
        })
    }

    // ---- engine transitions ------------------------------------------------

    /// Begins a transition transaction (see `AdvanceTx`).
    pub async fn begin_advance(&self) -> Result<AdvanceTx> {
        let conn = self.conn().await?;
        let tx = AdvanceTx {
            conn: Some(conn),
            done: false,
        };
        tx.client().batch_execute("BEGIN").await?;
        Ok(tx)
    }
}

/// A member's dedicated session (not pooled): it heartbeats and holds the
/// member's slot locks, which PostgreSQL releases when the session ends.
pub struct MemberSession {
    client: Client,
    connection: tokio::task::JoinHandle<()>,
    pub lock_class: i32,
    pub slot_count: i32,
}

impl MemberSession {
    /// True once the connection has failed; the session must be replaced.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed() || self.connection.is_finished()
    }

    pub async fn register(&self, name: &str, ttl_ms: u64, api_url: Option<&str>) -> Result<()> {
        self.client
            .execute(sql::REGISTER_MEMBER, &[&name, &(ttl_ms as i32), &api_url])
            .await?;
        Ok(())
    }

    /// False if this member's row is gone (it was judged dead).
    pub async fn heartbeat(&self, name: &str) -> Result<bool> {
        Ok(self
            .client
            .query_opt(sql::HEARTBEAT_MEMBER, &[&name])
            .await?
            .is_some())
    }

    /// Removes dead members (and ends their sessions); returns their names
    /// with the seconds since their last heartbeat.
    pub async fn reap_members(&self, me: &str) -> Result<Vec<(String, f64)>> {
        let rows = self.client.query(sql::REAP_MEMBERS, &[&me]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    pub async fn live_members(&self) -> Result<Vec<String>> {
        let rows = self.client.query(sql::LIVE_MEMBERS, &[]).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Tries to take a singleton duty's lock (held until the session ends).
    /// Call it only while not holding it: session locks stack.
    pub async fn try_lock_duty(&self, duty: i32) -> Result<bool> {
        let row = self
            .client
            .query_one(sql::TRY_LOCK_DUTY, &[&self.lock_class, &duty])
            .await?;
        Ok(row.get(0))
    }

    /// Tries to take the slots' locks; returns the slots it got.
    pub async fn try_lock_slots(&self, slots: &[i32]) -> Result<Vec<i32>> {
        if slots.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .client
            .query(sql::TRY_LOCK_SLOTS, &[&self.lock_class, &slots])
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub async fn unlock_slots(&self, slots: &[i32]) -> Result<()> {
        if !slots.is_empty() {
            self.client
                .query(sql::UNLOCK_SLOTS, &[&self.lock_class, &slots])
                .await?;
        }
        Ok(())
    }

    /// Leaves the cluster (clean shutdown); the session's end frees the locks.
    pub async fn leave(self, name: &str) {
        let _ = self.client.execute(sql::LEAVE_MEMBER, &[&name]).await;
        drop(self.client);
        let _ = self.connection.await;
    }
}

/// A transaction in which the engine moves a batch of instances on. Dropping
/// it without `commit` discards the connection, which rolls back.
pub struct AdvanceTx {
    conn: Option<Object>,
    done: bool,
}

impl Drop for AdvanceTx {
    fn drop(&mut self) {
        if !self.done {
            if let Some(conn) = self.conn.take() {
                // Never return a connection in an open transaction to the pool.
                drop(Object::take(conn));
            }
        }
    }
}

impl AdvanceTx {
    fn client(&self) -> &Object {
        self.conn.as_ref().expect("transaction is open")
    }

    pub async fn lock_due(
        &self,
        limit: i64,
        slots: &[i32],
    ) -> Result<(Vec<DueInstance>, DateTime<Utc>)> {
        let c = self.client();
        let stmt = c.prepare_cached(sql::LOCK_DUE_INSTANCES).await?;
        let rows = c.query(&stmt, &[&limit, &slots]).await?;
        let mut now = Utc::now();
        let instances = rows
            .iter()
            .map(|r| {
                now = r.get(10);
                DueInstance {
                    id: r.get(0),
                    workflow_name: r.get(1),
                    workflow_version: r.get(2),
                    slot: r.get(3),
                    status: r.get(4),
                    input: r.get(5),
                    output: r.get(6),
                    error: r.get(7),
                    state_version: r.get(8),
                    event_seq: r.get(9),
                    ending: r.get(11),
                    deadline_at: r.get(12),
                    cancel_requested: r.get(13),
                    cancel_reason: r.get(14),
                    retry_requested: r.get(15),
                    created_at: r.get(16),
                }
            })
            .collect();
        Ok((instances, now))
    }

    /// Loads the steps, unrecorded task results and pending signals of `ids`.
    pub async fn load(&self, ids: &[String]) -> Result<Loaded> {
        let c = self.client();
        let steps_stmt = c.prepare_cached(sql::LOAD_STEPS).await?;
        let tasks_stmt = c.prepare_cached(sql::LOAD_FINISHED_TASKS).await?;
        let signals_stmt = c.prepare_cached(sql::LOAD_SIGNALS).await?;
        let params: [&(dyn ToSql + Sync); 1] = [&ids];
        let (steps, tasks, signals) = futures::try_join!(
            c.query(&steps_stmt, &params),
            c.query(&tasks_stmt, &params),
            c.query(&signals_stmt, &params)
        )?;
        let steps = steps
            .iter()
            .map(|r| StepRow {
                instance_id: r.get(0),
                step_id: r.get(1),
                position: 0,
                kind: String::new(),
                status: r.get(2),
                attempt: r.get(3),
                input: r.get(4),
                output: r.get(5),
                error: r.get(6),
                scheduled_at: r.get(7),
                started_at: r.get(8),
                ended_at: r.get(9),
                wake_at: r.get(10),
                completion_order: r.get(11),
                items: r.get(12),
                compensation: r.get(13),
            })
            .collect();
        let tasks = tasks
            .iter()
            .map(|r| FinishedTask {
                task_id: r.get(0),
                instance_id: r.get(1),
                step_id: r.get(2),
                attempt: r.get(3),
                status: r.get(4),
                output: r.get(5),
                error: r.get(6),
                leased_at: r.get(7),
                leased_by: r.get(8),
                item: r.get(9),
                purpose: r.get(10),
                queue: r.get(11),
            })
            .collect();
        let signals = signals
            .iter()
            .map(|r| SignalRow {
                id: r.get(0),
                instance_id: r.get(1),
                name: r.get(2),
                payload: r.get(3),
            })
            .collect();
        Ok(Loaded {
            steps,
            finished: tasks,
            signals,
        })
    }

    pub async fn get_workflow(&self, name: &str, version: i32) -> Result<Option<Value>> {
        let c = self.client();
        let row = c
            .query_opt(sql::GET_WORKFLOW_VERSION, &[&name, &version])
            .await?;
        Ok(row.map(|r| r.get(2)))
    }

    /// Writes a batch of transitions and commits. Fails with
    /// `StoreError::Fenced` (and rolls back) if any instance moved on since
    /// it was read.
    pub async fn commit(mut self, w: &AdvanceWrites) -> Result<()> {
        let c = self.client();
        // Statements run in this order (pipelined: all are sent before the
        // first answer arrives). Children are asked to cancel before any
        // task row is touched, so this transaction never holds a task row
        // while waiting for a child's row lock.
        let mut statements: Vec<(&str, Vec<&(dyn ToSql + Sync)>)> = Vec::new();

        if !w.cancel_children_of.is_empty() {
            statements.push((sql::CANCEL_CHILDREN, vec![&w.cancel_children_of]));
        }
        if !w.consumed_tasks.is_empty() {
            statements.push((sql::DELETE_TASKS_BY_ID, vec![&w.consumed_tasks]));
        }
        if !w.withdraw_instances.is_empty() {
            statements.push((sql::DELETE_TASKS_OF_INSTANCES, vec![&w.withdraw_instances]));
        }

        let s = &w.steps;
        let s_inst = s.iter().map(|r| r.instance_id.as_str()).collect::<Vec<_>>();
        let s_id = s.iter().map(|r| r.step_id.as_str()).collect::<Vec<_>>();
        let s_pos = s.iter().map(|r| r.position).collect::<Vec<_>>();
        let s_kind = s.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>();
        let s_status = s.iter().map(|r| r.status.as_str()).collect::<Vec<_>>();
        let s_attempt = s.iter().map(|r| r.attempt).collect::<Vec<_>>();
        let s_input = s.iter().map(|r| r.input.clone()).collect::<Vec<_>>();
        let s_output = s.iter().map(|r| r.output.clone()).collect::<Vec<_>>();
        let s_error = s.iter().map(|r| r.error.clone()).collect::<Vec<_>>();
        let s_sched = s.iter().map(|r| r.scheduled_at).collect::<Vec<_>>();
        let s_start = s.iter().map(|r| r.started_at).collect::<Vec<_>>();
        let s_end = s.iter().map(|r| r.ended_at).collect::<Vec<_>>();
        let s_wake = s.iter().map(|r| r.wake_at).collect::<Vec<_>>();
        let s_order = s.iter().map(|r| r.completion_order).collect::<Vec<_>>();
        let s_items = s.iter().map(|r| r.items.clone()).collect::<Vec<_>>();
        let s_comp = s.iter().map(|r| r.compensation.clone()).collect::<Vec<_>>();
        if !s.is_empty() {
            statements.push((
                sql::UPSERT_STEPS,
                vec![
                    &s_inst, &s_id, &s_pos, &s_kind, &s_status, &s_attempt, &s_input, &s_output,
                    &s_error, &s_sched, &s_start, &s_end, &s_wake, &s_order, &s_items, &s_comp,
                ],
            ));
        }

        let t = &w.tasks;
        let t_queue = t.iter().map(|r| r.queue.as_str()).collect::<Vec<_>>();
        let t_kind = t.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>();
        let t_inst = t.iter().map(|r| r.instance_id.as_str()).collect::<Vec<_>>();
        let t_step = t.iter().map(|r| r.step_id.as_str()).collect::<Vec<_>>();
        let t_slot = t.iter().map(|r| r.slot).collect::<Vec<_>>();
        let t_attempt = t.iter().map(|r| r.attempt).collect::<Vec<_>>();
        let t_input = t.iter().map(|r| r.input.clone()).collect::<Vec<_>>();
        let t_key = t
            .iter()
            .map(|r| r.idempotency_key.as_str())
            .collect::<Vec<_>>();
        let t_delay = t.iter().map(|r| r.delay_ms as f64).collect::<Vec<_>>();
        let t_timeout = t
            .iter()
            .map(|r| r.timeout_ms.map(|v| v as i64))
            .collect::<Vec<_>>();
        let t_item = t.iter().map(|r| r.item).collect::<Vec<_>>();
        let t_purpose = t.iter().map(|r| r.purpose).collect::<Vec<_>>();
        if !t.is_empty() {
            statements.push((
                sql::INSERT_TASKS,
                vec![
                    &t_queue, &t_kind, &t_inst, &t_step, &t_slot, &t_attempt, &t_input, &t_key,
                    &t_delay, &t_timeout, &t_item, &t_purpose,
                ],
            ));
        }

        let ch = &w.children;
        let ch_parent = ch.iter().map(|r| r.parent_id.as_str()).collect::<Vec<_>>();
        let ch_step = ch.iter().map(|r| r.step_id.as_str()).collect::<Vec<_>>();
        let ch_item = ch.iter().map(|r| r.item).collect::<Vec<_>>();
        let ch_id = ch.iter().map(|r| r.child_id.as_str()).collect::<Vec<_>>();
        let ch_workflow = ch.iter().map(|r| r.workflow.as_str()).collect::<Vec<_>>();
        let ch_version = ch.iter().map(|r| r.version).collect::<Vec<_>>();
        let ch_input = ch.iter().map(|r| r.input.clone()).collect::<Vec<_>>();
        let ch_slot = ch.iter().map(|r| r.parent_slot).collect::<Vec<_>>();
        if !ch.is_empty() {
            statements.push((
                sql::START_CHILDREN,
                vec![
                    &ch_parent,
                    &ch_step,
                    &ch_item,
                    &ch_id,
                    &ch_workflow,
                    &ch_version,
                    &ch_input,
                    &ch_slot,
                ],
            ));
        }

        let e = &w.events;
        let e_inst = e.iter().map(|r| r.instance_id.as_str()).collect::<Vec<_>>();
        let e_seq = e.iter().map(|r| r.seq).collect::<Vec<_>>();
        let e_kind = e.iter().map(|r| r.kind).collect::<Vec<_>>();
        let e_step = e.iter().map(|r| r.step_id.as_deref()).collect::<Vec<_>>();
        let e_attempt = e.iter().map(|r| r.attempt).collect::<Vec<_>>();
        let e_data = e.iter().map(|r| r.data.clone()).collect::<Vec<_>>();
        if !e.is_empty() {
            statements.push((
                sql::INSERT_EVENTS,
                vec![
                    &e_inst, &e_seq, &e_kind, &e_step, &e_attempt, &e_data, &w.now,
                ],
            ));
        }

        let sig_ids = w
            .consumed_signals
            .iter()
            .map(|(id, _)| *id)
            .collect::<Vec<_>>();
        let sig_steps = w
            .consumed_signals
            .iter()
            .map(|(_, step)| step.as_str())
            .collect::<Vec<_>>();
        if !sig_ids.is_empty() {
            statements.push((sql::CONSUME_SIGNALS, vec![&sig_ids, &sig_steps]));
        }

        let u = &w.instances;
        let u_id = u.iter().map(|r| r.id.as_str()).collect::<Vec<_>>();
        let u_version = u.iter().map(|r| r.expected_version).collect::<Vec<_>>();
        let u_status = u.iter().map(|r| r.status).collect::<Vec<_>>();
        let u_output = u.iter().map(|r| r.output.clone()).collect::<Vec<_>>();
        let u_error = u.iter().map(|r| r.error.clone()).collect::<Vec<_>>();
        let u_seq = u.iter().map(|r| r.event_seq).collect::<Vec<_>>();
        let u_wake = u.iter().map(|r| r.wake_at).collect::<Vec<_>>();
        let u_ending = u.iter().map(|r| r.ending).collect::<Vec<_>>();
        let u_deadline = u.iter().map(|r| r.deadline_at).collect::<Vec<_>>();
        let update_index = statements.len();
        statements.push((
            sql::UPDATE_INSTANCES,
            vec![
                &u_id,
                &u_version,
                &u_status,
                &u_output,
                &u_error,
                &u_seq,
                &u_wake,
                &u_ending,
                &u_deadline,
                &w.now,
            ],
        ));

        // Children that ended now, or that a retried parent re-attached to.
        let mut report: Vec<&str> = w.ended_instances.iter().map(String::as_str).collect();
        report.extend(ch_id.iter().copied());
        if !report.is_empty() {
            statements.push((sql::REPORT_CHILDREN, vec![&report]));
        }
        if !w.notify_queues.is_empty() {
            statements.push((sql::NOTIFY_QUEUES, vec![&w.notify_queues]));
        }
        if !w.ended_instances.is_empty() {
            statements.push((sql::NOTIFY_ENDED, vec![&w.ended_instances]));
        }
        if !ch.is_empty() || !w.ended_instances.is_empty() {
            // Children to start, or parents to tell.
            statements.push((sql::NOTIFY_ADVANCE, vec![]));
        }

        let mut prepared = Vec::with_capacity(statements.len());
        for (text, _) in &statements {
            prepared.push(c.prepare_cached(text).await?);
        }
        let results = futures::future::try_join_all(
            statements
                .iter()
                .zip(&prepared)
                .map(|((_, params), stmt)| c.execute(stmt, params)),
        )
        .await?;
        let updated = results[update_index] as usize;
        if updated != u.len() {
            return Err(StoreError::Fenced(format!(
                "{} of {} instances changed since they were read",
                u.len() - updated,
                u.len()
            )));
        }
        c.batch_execute("COMMIT").await?;
        self.done = true;
        Ok(())
    }

    /// Ends the transaction without writing anything.
    pub async fn rollback(mut self) -> Result<()> {
        self.client().batch_execute("ROLLBACK").await?;
        self.done = true;
        Ok(())
    }
}

// ---- records -----------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct WorkflowRecord {
    pub name: String,
    pub version: i32,
    pub definition: Value,
    pub created_at: DateTime<Utc>,
    /// Whether this call created it (registration only).
    pub created: bool,
}

fn workflow_from_row(r: &tokio_postgres::Row) -> WorkflowRecord {
    WorkflowRecord {
        name: r.get(0),
        version: r.get(1),
        definition: r.get(2),
        created_at: r.get(3),
        created: false,
    }
}

#[derive(Debug, Clone)]
pub struct InstanceRecord {
    pub id: String,
    pub workflow_name: String,
    pub workflow_version: i32,
    pub status: String,
    pub input: Value,
    pub output: Option<Value>,
    pub error: Option<Value>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    /// The parent instance, for a child workflow.
    pub parent_id: Option<String>,
}

fn instance_from_row(r: &tokio_postgres::Row) -> InstanceRecord {
    InstanceRecord {
        id: r.get(0),
        workflow_name: r.get(1),
        workflow_version: r.get(2),
        status: r.get(3),
        input: r.get(4),
        output: r.get(5),
        error: r.get(6),
        created_at: r.get(7),
        started_at: r.get(8),
        updated_at: r.get(9),
        ended_at: r.get(10),
        parent_id: r.get(11),
    }
}

#[derive(Debug, Clone, Default)]
pub struct InstanceFilter {
    pub workflow: Option<String>,
    pub status: Option<String>,
    /// Keyset cursor: rows strictly older than this (created_at, id).
    pub after: Option<(DateTime<Utc>, String)>,
    pub limit: i64,
}

#[derive(Debug, Clone)]
pub struct StepRecord {
    pub step_id: String,
    pub status: String,
    pub attempt: i32,
    pub input: Option<Value>,
    pub output: Option<Value>,
    pub error: Option<Value>,
    pub scheduled_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    /// A worker holds a lease on the step's current attempt.
    pub leased: bool,
    pub wake_at: Option<DateTime<Utc>>,
    pub items: Option<Value>,
    pub compensation: Option<Value>,
}

#[derive(Debug, Clone)]
pub struct EventRecord {
    pub seq: i32,
    pub kind: String,
    pub step_id: Option<String>,
    pub attempt: Option<i32>,
    pub data: Value,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct MemberRecord {
    pub name: String,
    pub alive: bool,
    pub heartbeat_at: DateTime<Utc>,
    pub since_heartbeat_s: f64,
    pub ttl_ms: i32,
    pub joined_at: DateTime<Utc>,
    pub slots_owned: i64,
    pub api_url: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ClaimedTask {
    pub task_id: i64,
    pub queue: String,
    pub kind: String,
    pub lease_token: Uuid,
    pub instance_id: String,
    pub step_id: String,
    pub attempt: i32,
    pub idempotency_key: String,
    pub input: Value,
    pub lease_expires_at: DateTime<Utc>,
    pub timeout_ms: Option<i64>,
    /// Schedule-to-start delay: from when the task became ready to its claim.
    pub queue_wait_seconds: f64,
}

/// The result of one leased task: `Ok(output)` or `Err(error object)`.
#[derive(Debug, Clone)]
pub struct TaskOutcome {
    pub task_id: i64,
    pub lease_token: Uuid,
    pub result: std::result::Result<Value, Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterCounts {
    pub members_alive: i64,
    pub slots: i64,
    pub slots_owned: i64,
}

fn queue_depth_row(r: &tokio_postgres::Row) -> QueueDepth {
    QueueDepth {
        queue: r.get(0),
        ready: r.get(1),
        leased: r.get(2),
        delayed: r.get(3),
        oldest_ready_age_seconds: r.get(4),
    }
}

#[derive(Debug, Clone)]
pub struct QueueDepth {
    pub queue: String,
    pub ready: i64,
    pub leased: i64,
    pub delayed: i64,
    pub oldest_ready_age_seconds: f64,
}

#[derive(Debug, Clone)]
pub struct DueInstance {
    pub id: String,
    pub workflow_name: String,
    pub workflow_version: i32,
    pub slot: i32,
    pub status: String,
    pub input: Value,
    pub output: Option<Value>,
    pub error: Option<Value>,
    pub state_version: i64,
    pub event_seq: i32,
    pub ending: Option<String>,
    pub deadline_at: Option<DateTime<Utc>>,
    pub cancel_requested: bool,
    pub cancel_reason: String,
    pub retry_requested: bool,
    pub created_at: DateTime<Utc>,
}

/// What `AdvanceTx::load` returns for a batch.
#[derive(Debug, Default)]
pub struct Loaded {
    pub steps: Vec<StepRow>,
    pub finished: Vec<FinishedTask>,
    pub signals: Vec<SignalRow>,
}

#[derive(Debug, Clone)]
pub struct SignalRow {
    pub id: i64,
    pub instance_id: String,
    pub name: String,
    pub payload: Value,
}

/// A child workflow to start (see `sql::START_CHILDREN`).
#[derive(Debug, Clone)]
pub struct NewChild {
    pub parent_id: String,
    pub parent_slot: i32,
    pub step_id: String,
    pub item: Option<i32>,
    pub child_id: String,
    pub workflow: String,
    pub version: Option<i32>,
    pub input: Value,
}

#[derive(Debug, Clone)]
pub struct StepRow {
    pub instance_id: String,
    pub step_id: String,
    pub position: i32,
    pub kind: String,
    pub status: String,
    pub attempt: i32,
    pub input: Option<Value>,
    pub output: Option<Value>,
    pub error: Option<Value>,
    pub scheduled_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub wake_at: Option<DateTime<Utc>>,
    pub completion_order: Option<i32>,
    pub items: Option<Value>,
    pub compensation: Option<Value>,
}

#[derive(Debug, Clone)]
pub struct FinishedTask {
    pub task_id: i64,
    pub instance_id: String,
    pub step_id: String,
    pub attempt: i32,
    pub status: String,
    pub output: Option<Value>,
    pub error: Option<Value>,
    pub leased_at: Option<DateTime<Utc>>,
    pub leased_by: Option<String>,
    pub item: Option<i32>,
    pub purpose: String,
    pub queue: String,
}

#[derive(Debug, Clone)]
pub struct NewTask {
    pub queue: String,
    pub kind: String,
    pub instance_id: String,
    pub step_id: String,
    pub slot: i32,
    pub attempt: i32,
    pub input: Value,
    pub idempotency_key: String,
    pub delay_ms: u64,
    pub timeout_ms: Option<u64>,
    pub item: Option<i32>,
    pub purpose: &'static str,
}

#[derive(Debug, Clone)]
pub struct NewEvent {
    pub instance_id: String,
    pub seq: i32,
    pub kind: &'static str,
    pub step_id: Option<String>,
    pub attempt: Option<i32>,
    pub data: Value,
}

#[derive(Debug, Clone)]
pub struct InstanceUpdate {
    pub id: String,
    pub expected_version: i64,
    pub status: &'static str,
    pub output: Option<Value>,
    pub error: Option<Value>,
    pub event_seq: i32,
    pub wake_at: Option<DateTime<Utc>>,
    pub ending: Option<&'static str>,
    pub deadline_at: Option<DateTime<Utc>>,
}

/// Everything one advance transaction writes.
#[derive(Debug, Default)]
pub struct AdvanceWrites {
    /// The engine's clock for this batch (from `lock_due`).
    pub now: DateTime<Utc>,
    pub instances: Vec<InstanceUpdate>,
    pub steps: Vec<StepRow>,
    pub tasks: Vec<NewTask>,
    pub children: Vec<NewChild>,
    pub events: Vec<NewEvent>,
    pub consumed_tasks: Vec<i64>,
    pub consumed_signals: Vec<(i64, String)>,
    pub withdraw_instances: Vec<String>,
    pub cancel_children_of: Vec<String>,
    pub notify_queues: Vec<String>,
    pub ended_instances: Vec<String>,
}
