//! Flags shared by several subcommands: a node's settings, the database,
//! and the API server a client command talks to.

use anyhow::bail;
use clap::Args;
use stead::{Config, Limits, Tuning};

#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// API and /metrics address; port 0 picks a free port.
    #[arg(long, env = "STEAD_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Member name (default: host name and pid).
    #[arg(long, env = "STEAD_NAME")]
    pub name: Option<String>,
    /// PostgreSQL schema holding stead's tables.
    #[arg(long, env = "STEAD_SCHEMA", default_value = "stead")]
    pub schema: String,
    /// PostgreSQL itself when --database-url is PgBouncer in transaction
    /// mode: member sessions, LISTEN and migrations connect here.
    #[arg(long, env = "STEAD_DIRECT_DATABASE_URL")]
    pub direct_database_url: Option<String>,
    /// Slot count of a new cluster (fixed once the schema exists).
    #[arg(long, env = "STEAD_SLOT_COUNT", default_value_t = 256)]
    pub slot_count: u32,
    /// Database connections in the pool.
    #[arg(long, env = "STEAD_POOL_SIZE", default_value_t = 16)]
    pub pool_size: usize,
    /// Statement timeout of every pooled connection, in milliseconds.
    #[arg(long, env = "STEAD_STATEMENT_TIMEOUT_MS", default_value_t = 30_000)]
    pub statement_timeout_ms: u64,
    /// Pooled sessions idle inside a transaction this long are ended by the server, in milliseconds.
    #[arg(
        long,
        env = "STEAD_IDLE_IN_TRANSACTION_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub idle_in_transaction_timeout_ms: u64,
    /// Task attempts each worker runs in-process at once.
    #[arg(long, env = "STEAD_WORKER_CONCURRENCY", default_value_t = 64)]
    pub worker_concurrency: usize,
    /// Lease of in-process task attempts, in milliseconds (heartbeated).
    #[arg(long, env = "STEAD_LEASE_MS", default_value_t = 30_000)]
    pub lease_ms: u64,
    /// How long one advance transaction may run in-process attempts inline
    /// before it commits and hands the rest over as leased tasks, in
    /// milliseconds; 0 runs every attempt through a task row.
    #[arg(long, env = "STEAD_INLINE_BUDGET_MS", default_value_t = 50)]
    pub inline_budget_ms: u64,
    /// How long attempts of a slot taken from a member that died holding it
    /// run through task rows instead of inline, in milliseconds.
    #[arg(long, env = "STEAD_INLINE_QUARANTINE_MS", default_value_t = 10_000)]
    pub inline_quarantine_ms: u64,
    /// Poll interval backing up LISTEN/NOTIFY, in milliseconds.
    #[arg(long, env = "STEAD_POLL_INTERVAL_MS", default_value_t = 500)]
    pub poll_interval_ms: u64,
    /// How often expired leases are reaped, in milliseconds.
    #[arg(long, env = "STEAD_REAP_INTERVAL_MS", default_value_t = 1_000)]
    pub reap_interval_ms: u64,
    /// Largest request body, in bytes.
    #[arg(long, env = "STEAD_BODY_LIMIT_BYTES", default_value_t = 1024 * 1024)]
    pub body_limit_bytes: usize,
    /// Most steps a definition may have.
    #[arg(long, env = "STEAD_MAX_STEPS", default_value_t = 1000)]
    pub max_steps: usize,
    /// Largest output of one step or for_each element, as JSON, in bytes: a
    /// longer one fails the step (limit error); an external result with one
    /// is refused (413).
    #[arg(long, env = "STEAD_MAX_STEP_OUTPUT_BYTES", default_value_t = 1024 * 1024)]
    pub max_step_output_bytes: usize,
    /// Most elements one for_each step may have.
    #[arg(long, env = "STEAD_MAX_FOR_EACH_ITEMS", default_value_t = 10_000)]
    pub max_for_each_items: usize,
    /// Most bytes (as JSON) one instance may store: its steps' inputs and
    /// outputs and its own output; the step that would pass it fails (limit
    /// error).
    #[arg(long, env = "STEAD_MAX_INSTANCE_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_instance_bytes: u64,
    /// Most history events one instance may record (retries included); at
    /// its next decision past it, it fails (limit error; compensations run).
    #[arg(long, env = "STEAD_MAX_HISTORY_EVENTS", default_value_t = 50_000)]
    pub max_history_events: u32,
    /// Most instances one advance transaction locks and decides.
    #[arg(long, env = "STEAD_ADVANCE_BATCH_SIZE", default_value_t = 500)]
    pub advance_batch_size: usize,
    /// Most bytes of stored instance state one advance transaction loads
    /// (an instance larger than this is advanced alone).
    #[arg(long, env = "STEAD_ADVANCE_BATCH_MAX_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub advance_batch_max_bytes: u64,
    /// Largest instance input, as JSON, in bytes (413 past it).
    #[arg(long, env = "STEAD_MAX_INPUT_BYTES", default_value_t = 1024 * 1024)]
    pub max_input_bytes: usize,
    /// Largest signal payload, as JSON, in bytes (413 past it).
    #[arg(long, env = "STEAD_MAX_SIGNAL_PAYLOAD_BYTES", default_value_t = 1024 * 1024)]
    pub max_signal_payload_bytes: usize,
    /// Most API requests served at once; past it, 503 with Retry-After.
    #[arg(long, env = "STEAD_MAX_CONCURRENT_REQUESTS", default_value_t = 512)]
    pub max_concurrent_requests: usize,
    /// How long a request waits for a database connection before it is
    /// answered 503, in milliseconds.
    #[arg(long, env = "STEAD_POOL_WAIT_TIMEOUT_MS", default_value_t = 10_000)]
    pub pool_wait_timeout_ms: u64,
    /// Longest `wait` a long-poll (claim, instance read) may ask for, in
    /// milliseconds.
    #[arg(long, env = "STEAD_MAX_WAIT_MS", default_value_t = 60_000)]
    pub max_wait_ms: u64,
    /// Most items one batch start may hold.
    #[arg(long, env = "STEAD_MAX_BATCH_START", default_value_t = 1000)]
    pub max_batch_start: usize,
    /// How often each worker member heartbeats, in milliseconds.
    #[arg(long, env = "STEAD_HEARTBEAT_MS", default_value_t = 1_000)]
    pub heartbeat_ms: u64,
    /// Members silent for this long (database time) are removed, in milliseconds.
    #[arg(long, env = "STEAD_MEMBER_TTL_MS", default_value_t = 10_000)]
    pub member_ttl_ms: u64,
    /// How often the maintenance-duty holder refreshes the query-based
    /// gauges (queue depth, members alive, unowned slots), in milliseconds.
    #[arg(long, env = "STEAD_GAUGE_REFRESH_MS", default_value_t = 5_000)]
    pub gauge_refresh_ms: u64,
    /// What `http` steps may reach beyond public addresses, comma-separated
    /// or repeated: CIDRs (10.0.0.0/8), addresses (169.254.169.254, ::1)
    /// and host names (internal.example). Loopback, link-local, private and
    /// unspecified addresses are refused otherwise.
    #[arg(long, env = "STEAD_HTTP_ALLOW", value_delimiter = ',')]
    pub http_allow: Vec<String>,
    /// Largest response body an `http` step reads, in bytes; a longer one
    /// fails the step.
    #[arg(long, env = "STEAD_HTTP_MAX_RESPONSE_BYTES", default_value_t = 1024 * 1024)]
    pub http_max_response_bytes: usize,
    /// Most redirects an `http` step follows.
    #[arg(long, env = "STEAD_HTTP_MAX_REDIRECTS", default_value_t = 5)]
    pub http_max_redirects: usize,
    /// Make `/metrics` need an API key of a role that may read (it is open
    /// by default, for Prometheus).
    #[arg(long, env = "STEAD_METRICS_AUTH")]
    pub metrics_auth: bool,
    /// Grafana's base URL (https://grafana.example.com): each console page
    /// links to the matching panel of the stead dashboard.
    #[arg(long, env = "STEAD_GRAFANA_URL")]
    pub grafana_url: Option<String>,
    /// How long ended instances are kept, with their steps, tasks, signals
    /// and history: a duration such as 7d, 12h or 30m, or 0 to keep them
    /// for ever. A workflow's "retention" overrides it for its instances.
    #[arg(long, env = "STEAD_RETENTION", default_value = "7d", value_parser = stead::parse_retention)]
    pub retention: u64,
    /// Most root instances (each with its child instances) one retention
    /// batch deletes.
    #[arg(long, env = "STEAD_RETENTION_BATCH_SIZE", default_value_t = 500)]
    pub retention_batch_size: usize,
    /// The pause between two full retention batches, in milliseconds.
    #[arg(long, env = "STEAD_RETENTION_PAUSE_MS", default_value_t = 100)]
    pub retention_pause_ms: u64,
    /// How often the maintenance-duty holder looks for ended instances due
    /// for deletion, in milliseconds.
    #[arg(long, env = "STEAD_RETENTION_INTERVAL_MS", default_value_t = 10_000)]
    pub retention_interval_ms: u64,
    /// The longest the maintenance-duty holder waits between looks for due
    /// schedules, in milliseconds (it also wakes for the next firing).
    #[arg(long, env = "STEAD_SCHEDULE_INTERVAL_MS", default_value_t = 1_000)]
    pub schedule_interval_ms: u64,
    /// A firing late by less than this is still started whatever its
    /// schedule's catchup (a failover of the duty, a restart), in
    /// milliseconds.
    #[arg(long, env = "STEAD_SCHEDULE_GRACE_MS", default_value_t = 60_000)]
    pub schedule_grace_ms: u64,
    /// Most instances one bulk cancel or retry request asks (the answer
    /// says `more` past it).
    #[arg(long, env = "STEAD_MAX_BULK", default_value_t = 100_000)]
    pub max_bulk: u64,
    /// How often each process rereads the flow controls (queue limits,
    /// paused workflows) another node changed, in milliseconds.
    #[arg(long, env = "STEAD_CONTROLS_REFRESH_MS", default_value_t = 1_000)]
    pub controls_refresh_ms: u64,
    /// Most schedules the cluster may hold.
    #[arg(long, env = "STEAD_MAX_SCHEDULES", default_value_t = 10_000)]
    pub max_schedules: u64,
    /// How long shutdown waits for in-flight work, in milliseconds.
    #[arg(long, env = "STEAD_SHUTDOWN_TIMEOUT_MS", default_value_t = 10_000)]
    pub shutdown_timeout_ms: u64,
}

impl NodeArgs {
    pub fn to_config(&self, database_url: String) -> Config {
        let mut config = Config::new(database_url);
        config.listen = self.listen.clone();
        if let Some(name) = &self.name {
            config.name = name.clone();
        }
        config.schema = self.schema.clone();
        config.direct_database_url = self.direct_database_url.clone();
        config.slot_count = self.slot_count;
        config.metrics_auth = self.metrics_auth;
        config.http_allow = self.http_allow.clone();
        config.grafana_url = self.grafana_url.clone();
        config.limits = Limits {
            body_limit_bytes: self.body_limit_bytes,
            max_steps: self.max_steps,
            max_batch_start: self.max_batch_start,
            max_wait_ms: self.max_wait_ms,
            max_concurrent_requests: self.max_concurrent_requests,
            max_step_output_bytes: self.max_step_output_bytes,
            max_for_each_items: self.max_for_each_items,
            max_instance_bytes: self.max_instance_bytes,
            max_history_events: self.max_history_events,
            max_input_bytes: self.max_input_bytes,
            max_signal_payload_bytes: self.max_signal_payload_bytes,
            max_schedules: self.max_schedules,
            max_bulk: self.max_bulk,
            ..Limits::default()
        };
        config.tuning = Tuning {
            pool_size: self.pool_size,
            pool_wait_timeout_ms: self.pool_wait_timeout_ms,
            statement_timeout_ms: self.statement_timeout_ms,
            idle_in_transaction_timeout_ms: self.idle_in_transaction_timeout_ms,
            worker_concurrency: self.worker_concurrency,
            lease_ms: self.lease_ms,
            inline_budget_ms: self.inline_budget_ms,
            advance_batch_size: self.advance_batch_size,
            advance_batch_max_bytes: self.advance_batch_max_bytes,
            inline_quarantine_ms: self.inline_quarantine_ms,
            poll_interval_ms: self.poll_interval_ms,
            reap_interval_ms: self.reap_interval_ms,
            shutdown_timeout_ms: self.shutdown_timeout_ms,
            heartbeat_ms: self.heartbeat_ms,
            member_ttl_ms: self.member_ttl_ms,
            gauge_refresh_ms: self.gauge_refresh_ms,
            http_max_response_bytes: self.http_max_response_bytes,
            http_max_redirects: self.http_max_redirects,
            retention_ms: self.retention,
            retention_batch_size: self.retention_batch_size,
            retention_pause_ms: self.retention_pause_ms,
            retention_interval_ms: self.retention_interval_ms,
            schedule_interval_ms: self.schedule_interval_ms,
            schedule_grace_ms: self.schedule_grace_ms,
            controls_refresh_ms: self.controls_refresh_ms,
            ..Tuning::default()
        };
        config
    }
}

#[derive(Args, Debug)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. postgresql://user@host:5432/db (also DATABASE_URL).
    #[arg(long, env = "STEAD_DATABASE_URL")]
    pub database_url: Option<String>,
}

impl DatabaseArgs {
    pub fn url(&self) -> anyhow::Result<String> {
        match self
            .database_url
            .clone()
            .or_else(|| std::env::var("DATABASE_URL").ok())
        {
            Some(url) if !url.trim().is_empty() => Ok(url),
            _ => bail!(
                "no database configured: pass --database-url postgresql://USER@HOST:PORT/DB \
                 (or set STEAD_DATABASE_URL or DATABASE_URL), or use `stead dev` for a private one"
            ),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// URL of the stead API.
    #[arg(long, env = "STEAD_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// API key, sent as `Authorization: Bearer` (not needed by `stead dev`).
    #[arg(long, env = "STEAD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}
