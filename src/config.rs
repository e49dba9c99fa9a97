//! Node configuration. The `stead` binary fills it from flags and `STEAD_*`
//! environment variables; embedders and tests build it directly.

use crate::auth::Auth;
use crate::handlers::Handlers;

/// Everything a node needs: where the database is, which roles to run,
/// and every limit and knob. `Config::new` gives the defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// PostgreSQL URL (`postgresql://user@host:port/db`).
    pub database_url: String,
    /// PostgreSQL itself, when `database_url` is a transaction-mode pooler
    /// (PgBouncer): member sessions (advisory locks), the listener (LISTEN)
    /// and migrations need sessions of their own and use this URL; the
    /// pool's statements then go out unnamed (see the README's "Behind
    /// PgBouncer").
    pub direct_database_url: Option<String>,
    /// Postgres schema holding every stead object.
    pub schema: String,
    /// `HOST:PORT` for the API and `/metrics`; port 0 picks a free port.
    pub listen: String,
    /// Member name of this process (workers get `-N` suffixes).
    pub name: String,
    /// Serve the HTTP API.
    pub api: bool,
    /// Worker members run by this process (0 = API only).
    pub workers: usize,
    /// Apply migrations on start.
    pub migrate: bool,
    /// Slot count of a cluster created by this node's migration.
    pub slot_count: u32,
    /// Bounds on what a client may send.
    pub limits: Limits,
    /// Knobs of the background loops and the pool.
    pub tuning: Tuning,
    /// In-process handlers for task queues (the built-ins are added).
    pub handlers: Handlers,
    /// Whether API requests need a key (`Auth::Keys`, the default).
    pub auth: Auth,
    /// Whether `/metrics` needs a key of a role that may read (it is open
    /// by default, for Prometheus).
    pub metrics_auth: bool,
    /// What `http` steps may reach beyond public addresses: CIDRs
    /// (`10.0.0.0/8`), addresses and host names (`--http-allow`). Loopback,
    /// link-local, private and unspecified addresses are closed otherwise.
    pub http_allow: Vec<String>,
    /// Grafana's base URL (`https://grafana.example.com`): the console
    /// links each page to the matching panel of the stead dashboard.
    pub grafana_url: Option<String>,
}

/// Bounds on what a client may send.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body.
    pub body_limit_bytes: usize,
    /// Most steps one definition may have.
    pub max_steps: usize,
    /// Longest `wait` a long-poll may ask for.
    pub max_wait_ms: u64,
    /// Most tasks one claim may ask for.
    pub max_claim: usize,
    /// Largest page of a list.
    pub max_page: usize,
    /// Longest lease a claim or heartbeat may ask for.
    pub max_lease_ms: u64,
    /// Most items one batch start (`POST .../instances/batch`) may hold.
    pub max_batch_start: usize,
    /// Largest output of one step or `for_each` element (as JSON text): a
    /// longer one fails the step with a permanent `limit` error, and an
    /// external worker's result with one is refused (413).
    pub max_step_output_bytes: usize,
    /// Most elements one `for_each` step may have.
    pub max_for_each_items: usize,
    /// Most bytes (as JSON text) one instance may store: the inputs and
    /// outputs of its steps and elements, and its own output. The step that
    /// would take it past fails with a permanent `limit` error.
    pub max_instance_bytes: u64,
    /// Most history events one instance may record (its whole history,
    /// retries included): at its next decision past it the instance fails
    /// with a `limit` error (its compensations still run).
    pub max_history_events: u32,
    /// Largest input of an instance (as JSON text), at start (413).
    pub max_input_bytes: usize,
    /// Largest signal payload (as JSON text) (413).
    pub max_signal_payload_bytes: usize,
    /// Most API requests served at once; past it a request is answered 503
    /// with `Retry-After` at once (health checks and `/metrics` are not
    /// counted). With `body_limit_bytes`, it bounds what request bodies
    /// may hold in memory.
    pub max_concurrent_requests: usize,
    /// Most schedules the cluster may hold.
    pub max_schedules: u64,
    /// Most instances one bulk cancel or retry request asks (it answers
    /// `more: true` past it).
    pub max_bulk: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            body_limit_bytes: 1024 * 1024,
            max_steps: 1000,
            max_wait_ms: 60_000,
            max_claim: 1000,
            max_page: 1000,
            max_lease_ms: 3_600_000,
            max_batch_start: 1000,
            max_concurrent_requests: 512,
            max_step_output_bytes: 1024 * 1024,
            max_for_each_items: 10_000,
            max_instance_bytes: 32 * 1024 * 1024,
            max_history_events: 50_000,
            max_input_bytes: 1024 * 1024,
            max_signal_payload_bytes: 1024 * 1024,
            max_schedules: 10_000,
            max_bulk: 100_000,
        }
    }
}

impl Limits {
    /// The limits the engine enforces on each instance.
    pub(crate) fn engine(&self) -> crate::engine::EngineLimits {
        crate::engine::EngineLimits {
            max_step_output_bytes: self.max_step_output_bytes,
            max_for_each_items: self.max_for_each_items,
            max_instance_bytes: self.max_instance_bytes,
            max_history_events: self.max_history_events,
        }
    }
}

/// Knobs of the background loops and the pool.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Database connections in the pool.
    pub pool_size: usize,
    /// How long a caller waits for a pooled connection.
    pub pool_wait_timeout_ms: u64,
    /// Statement timeout of pooled connections.
    pub statement_timeout_ms: u64,
    /// A pooled session idle inside a transaction this long is ended by the
    /// server (frees the row locks of a frozen or cut-off worker).
    pub idle_in_transaction_timeout_ms: u64,
    /// Most instances one advance transaction locks and decides.
    pub advance_batch_size: usize,
    /// Most bytes of stored state (what the instances' steps hold) one
    /// advance transaction loads; an instance larger than this is advanced
    /// alone. With `advance_batch_size`, it bounds an advancer's memory.
    pub advance_batch_max_bytes: u64,
    /// How long one advance transaction may run `task` attempts inline
    /// (on the member owning the instance, without a task row) before the
    /// ones still running are handed to the queue as leased tasks; 0 runs
    /// every attempt through the queue. The batch's instances stay locked
    /// meanwhile (signals and cancels to them wait), so keep it short.
    pub inline_budget_ms: u64,
    /// How long a member that took a slot from a member that died holding
    /// it runs that slot's attempts through task rows (counted before they
    /// run) instead of inline, so an attempt that kills its process cannot
    /// crash one member after another uncounted; 0 never does.
    pub inline_quarantine_ms: u64,
    /// Most tasks one in-process claim takes.
    pub claim_batch_size: usize,
    /// Most task results recorded in one statement.
    pub completion_batch_size: usize,
    /// Attempts run at once by each worker's in-process executor.
    pub worker_concurrency: usize,
    /// Lease of in-process attempts (heartbeated every third of it).
    pub lease_ms: u64,
    /// Default lease of external claims that do not name one.
    pub default_claim_lease_ms: u64,
    /// Polling behind LISTEN/NOTIFY: a lost notification costs at most this.
    pub poll_interval_ms: u64,
    /// How often expired leases are reaped.
    pub reap_interval_ms: u64,
    /// Timeout of an `http` step's request when the step sets none.
    pub http_step_timeout_ms: u64,
    /// Largest response body an `http` step reads; a longer one fails the
    /// step (permanently) without being read further.
    pub http_max_response_bytes: usize,
    /// Most redirects an `http` step follows.
    pub http_max_redirects: usize,
    /// How long shutdown waits for in-flight work before aborting it.
    pub shutdown_timeout_ms: u64,
    /// How often each member heartbeats.
    pub heartbeat_ms: u64,
    /// A member that has not heartbeaten for this long (database time) is
    /// removed by the others and its session terminated.
    pub member_ttl_ms: u64,
    /// How often the maintenance-duty holder refreshes the cluster gauges
    /// (queue depth, members alive, unowned slots), which need queries
    /// (at least `MIN_GAUGE_REFRESH_MS`).
    pub gauge_refresh_ms: u64,
    /// After a failed run, the advancer and the executor wait this long
    /// before they try again. (The reaper and the gauge refresh wait their
    /// interval.)
    pub error_backoff_ms: u64,
    /// The dedicated sessions (membership, LISTEN) reconnect after a failure
    /// with a backoff that doubles from `reconnect_min_ms` to
    /// `reconnect_max_ms`.
    pub reconnect_min_ms: u64,
    /// See `reconnect_min_ms`.
    pub reconnect_max_ms: u64,
    /// Most expired leases one reaper run hands back.
    pub reap_batch_size: usize,
    /// How long ended instances are kept when their workflow version sets
    /// no `retention`; 0 keeps them for ever.
    pub retention_ms: u64,
    /// Most root instances (each with its descendants) one retention batch
    /// deletes.
    pub retention_batch_size: usize,
    /// The pause between full retention batches.
    pub retention_pause_ms: u64,
    /// How often the maintenance-duty holder looks for instances due for
    /// deletion when the last batch was not full.
    pub retention_interval_ms: u64,
    /// The longest the maintenance-duty holder waits between looks for
    /// due schedules (it also wakes for the next firing it knows of).
    pub schedule_interval_ms: u64,
    /// A firing late by less than this is still started, whatever its
    /// schedule's `catchup` (it covers a failover of the duty or a restart).
    pub schedule_grace_ms: u64,
    /// Most due schedules one scheduler run fires (one transaction).
    pub schedule_batch_size: usize,
    /// Most firings of one schedule one run considers (a long catchup is
    /// made up over several runs).
    pub schedule_max_firings: usize,
    /// How often each process rereads the flow controls (queue limits,
    /// paused workflows) others may have changed.
    pub controls_refresh_ms: u64,
    /// Instances one transaction of a bulk cancel or retry asks.
    pub bulk_batch_size: usize,
    /// Wake-ups of other processes' advancers (API starts, task results)
    /// are folded into at most one NOTIFY per this window.
    pub notify_coalesce_ms: u64,
}

/// `--retention`'s default: 7 days.
pub const DEFAULT_RETENTION_MS: u64 = 7 * 24 * 3_600_000;

/// The most trees one retention batch may delete (one transaction).
pub const MAX_RETENTION_BATCH_SIZE: usize = 10_000;

/// The fastest the cluster gauges are refreshed, whatever is asked.
pub const MIN_GAUGE_REFRESH_MS: u64 = 100;

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            pool_size: 16,
            pool_wait_timeout_ms: 10_000,
            statement_timeout_ms: 30_000,
            idle_in_transaction_timeout_ms: 5_000,
            advance_batch_size: 500,
            advance_batch_max_bytes: 8 * 1024 * 1024,
            inline_budget_ms: 50,
            inline_quarantine_ms: 10_000,
            claim_batch_size: 100,
            completion_batch_size: 500,
            worker_concurrency: 64,
            lease_ms: 30_000,
            default_claim_lease_ms: 60_000,
            poll_interval_ms: 500,
            reap_interval_ms: 1_000,
            http_step_timeout_ms: 30_000,
            http_max_response_bytes: 1024 * 1024,
            http_max_redirects: 5,
            shutdown_timeout_ms: 10_000,
            heartbeat_ms: 1_000,
            member_ttl_ms: 10_000,
            gauge_refresh_ms: 5_000,
            error_backoff_ms: 500,
            reconnect_min_ms: 100,
            reconnect_max_ms: 5_000,
            reap_batch_size: 1_000,
            retention_ms: DEFAULT_RETENTION_MS,
            retention_batch_size: 500,
            retention_pause_ms: 100,
            retention_interval_ms: 10_000,
            notify_coalesce_ms: 5,
            schedule_interval_ms: 1_000,
            schedule_grace_ms: 60_000,
            schedule_batch_size: 100,
            schedule_max_firings: 100,
            bulk_batch_size: 500,
            controls_refresh_ms: 1_000,
        }
    }
}

impl Config {
    /// A config with every default, for `database_url`.
    pub fn new(database_url: impl Into<String>) -> Self {
        Config {
            database_url: database_url.into(),
            direct_database_url: None,
            schema: "stead".into(),
            listen: "127.0.0.1:8080".into(),
            name: default_member_name(),
            api: true,
            workers: 1,
            migrate: true,
            slot_count: 256,
            limits: Limits::default(),
            tuning: Tuning::default(),
            handlers: Handlers::default(),
            auth: Auth::Keys,
            metrics_auth: false,
            http_allow: Vec::new(),
            grafana_url: None,
        }
    }
}

impl Config {
    /// Refuses settings that cannot work together; the message names them.
    pub fn validate(&self) -> Result<(), crate::Error> {
        let t = &self.tuning;
        if t.member_ttl_ms < 2 * t.heartbeat_ms.max(1) {
            return Err(crate::Error::Config(format!(
                "--member-ttl-ms ({}) must be at least twice --heartbeat-ms ({})",
                t.member_ttl_ms, t.heartbeat_ms
            )));
        }
        if t.inline_budget_ms >= t.idle_in_transaction_timeout_ms
            && t.idle_in_transaction_timeout_ms > 0
        {
            return Err(crate::Error::Config(format!(
                "--inline-budget-ms ({}) must be below --idle-in-transaction-timeout-ms ({}): the server would end the transaction that runs the attempts",
                t.inline_budget_ms, t.idle_in_transaction_timeout_ms
            )));
        }
        if t.reconnect_min_ms > t.reconnect_max_ms {
            return Err(crate::Error::Config(format!(
                "reconnect_min_ms ({}) must not exceed reconnect_max_ms ({})",
                t.reconnect_min_ms, t.reconnect_max_ms
            )));
        }
        let at_least_one = [
            ("--poll-interval-ms", t.poll_interval_ms as usize),
            ("--reap-interval-ms", t.reap_interval_ms as usize),
            ("--heartbeat-ms", t.heartbeat_ms as usize),
            ("advance_batch_size", t.advance_batch_size),
            ("claim_batch_size", t.claim_batch_size),
            ("completion_batch_size", t.completion_batch_size),
            ("reap_batch_size", t.reap_batch_size),
            ("--retention-batch-size", t.retention_batch_size),
            ("--retention-interval-ms", t.retention_interval_ms as usize),
            ("--schedule-interval-ms", t.schedule_interval_ms as usize),
            ("schedule_batch_size", t.schedule_batch_size),
            ("schedule_max_firings", t.schedule_max_firings),
            ("bulk_batch_size", t.bulk_batch_size),
            ("--controls-refresh-ms", t.controls_refresh_ms as usize),
            ("--max-bulk", self.limits.max_bulk as usize),
            (
                "--max-concurrent-requests",
                self.limits.max_concurrent_requests,
            ),
            ("error_backoff_ms", t.error_backoff_ms as usize),
            (
                "--advance-batch-max-bytes",
                t.advance_batch_max_bytes as usize,
            ),
            (
                "--max-instance-bytes",
                self.limits.max_instance_bytes as usize,
            ),
            (
                "--max-history-events",
                self.limits.max_history_events as usize,
            ),
            ("reconnect_min_ms", t.reconnect_min_ms as usize),
        ];
        // A zero here would make a loop spin.
        if let Some((name, _)) = at_least_one.iter().find(|(_, v)| *v == 0) {
            return Err(crate::Error::Config(format!("{name} must be at least 1")));
        }
        if t.retention_batch_size > MAX_RETENTION_BATCH_SIZE {
            return Err(crate::Error::Config(format!(
                "--retention-batch-size ({}) must be at most {MAX_RETENTION_BATCH_SIZE}",
                t.retention_batch_size
            )));
        }
        crate::worker::HttpAllow::parse(&self.http_allow).map_err(crate::Error::Config)?;
        if let Some(g) = &self.grafana_url {
            let parsed = url::Url::parse(g).ok();
            if !parsed.is_some_and(|u| matches!(u.scheme(), "http" | "https")) {
                return Err(crate::Error::Config(format!(
                    "--grafana-url {g:?} must be an http:// or https:// URL"
                )));
            }
        }
        crate::store::validate_schema_name(&self.schema).map_err(crate::Error::Config)
    }
}

/// Host name and pid, e.g. `web-1-4242`.
pub fn default_member_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "stead".into());
    format!("{host}-{}", std::process::id())
}
