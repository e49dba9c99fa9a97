//! Command-line interface: flags (each also read from a `STEAD_*` variable)
//! and the dispatch to each role or client command.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;

use crate::client::ApiClient;
use crate::config::{Config, Limits, Tuning};

#[derive(Parser, Debug)]
#[command(
    name = "stead",
    version,
    about = "A durable workflow engine whose only dependency is PostgreSQL"
)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "STEAD_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start a private PostgreSQL and run the API and two workers in one process.
    Dev(DevArgs),
    /// Run the API and/or worker roles against a PostgreSQL database.
    Serve(ServeArgs),
    /// Apply database migrations and exit.
    Migrate(MigrateArgs),
    /// Register or list workflow definitions.
    #[command(subcommand)]
    Workflow(WorkflowCommand),
    /// Start an instance of a workflow.
    Start(StartArgs),
    /// Show an instance with its steps.
    Show(ShowArgs),
    /// List instances, newest first.
    List(ListArgs),
    /// Show the event history of an instance.
    History(HistoryArgs),
    /// Deliver a signal to an instance (buffered until a step waits for it).
    Signal(SignalArgs),
    /// Cancel an instance (its compensations run).
    Cancel(CancelArgs),
    /// Retry a failed instance from its failed steps.
    Retry(HistoryArgs),
    /// Measure throughput and latency.
    Bench(crate::bench::BenchArgs),
}

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
        config.slot_count = self.slot_count;
        config.limits = Limits {
            body_limit_bytes: self.body_limit_bytes,
            max_steps: self.max_steps,
            ..Limits::default()
        };
        config.tuning = Tuning {
            pool_size: self.pool_size,
            statement_timeout_ms: self.statement_timeout_ms,
            idle_in_transaction_timeout_ms: self.idle_in_transaction_timeout_ms,
            worker_concurrency: self.worker_concurrency,
            lease_ms: self.lease_ms,
            poll_interval_ms: self.poll_interval_ms,
            reap_interval_ms: self.reap_interval_ms,
            shutdown_timeout_ms: self.shutdown_timeout_ms,
            heartbeat_ms: self.heartbeat_ms,
            member_ttl_ms: self.member_ttl_ms,
            gauge_refresh_ms: self.gauge_refresh_ms,
            ..Tuning::default()
        };
        config
    }
}

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Where the private PostgreSQL cluster lives.
    #[arg(long, env = "STEAD_DATA_DIR", default_value = ".stead")]
    pub data_dir: PathBuf,
    /// Worker members to run in this process.
    #[arg(long, env = "STEAD_WORKERS", default_value_t = 2)]
    pub workers: usize,
    #[command(flatten)]
    pub node: NodeArgs,
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

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Serve the HTTP API (with --worker: both; neither: both).
    #[arg(long, env = "STEAD_API")]
    pub api: bool,
    /// Run a worker (with --api: both; neither: both).
    #[arg(long, env = "STEAD_WORKER")]
    pub worker: bool,
    /// Do not apply migrations on start.
    #[arg(long, env = "STEAD_NO_MIGRATE")]
    pub no_migrate: bool,
    #[command(flatten)]
    pub node: NodeArgs,
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// PostgreSQL schema holding stead's tables.
    #[arg(long, env = "STEAD_SCHEMA", default_value = "stead")]
    pub schema: String,
    /// Slot count of a new cluster (fixed once the schema exists).
    #[arg(long, env = "STEAD_SLOT_COUNT", default_value_t = 256)]
    pub slot_count: u32,
}

#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// URL of the stead API.
    #[arg(long, env = "STEAD_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
}

#[derive(Subcommand, Debug)]
pub enum WorkflowCommand {
    /// Register a definition from a JSON file (`-` for stdin).
    Put {
        file: PathBuf,
        /// Workflow name (default: the file's "name" field).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List registered workflows.
    List {
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Args, Debug)]
pub struct StartArgs {
    pub workflow: String,
    /// Input as JSON, or @FILE.
    #[arg(long, default_value = "null")]
    pub input: String,
    /// Instance id (idempotency key); default: generated.
    #[arg(long)]
    pub id: Option<String>,
    /// Definition version (default: latest).
    #[arg(long)]
    pub version: Option<i32>,
    /// Wait up to this long (e.g. 30s) for the instance to end.
    #[arg(long)]
    pub wait: Option<String>,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    pub id: String,
    /// Wait up to this long (e.g. 30s) for the instance to end.
    #[arg(long)]
    pub wait: Option<String>,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[arg(long)]
    pub workflow: Option<String>,
    #[arg(long)]
    pub status: Option<String>,
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    #[arg(long)]
    pub cursor: Option<String>,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Args, Debug)]
pub struct SignalArgs {
    pub id: String,
    pub name: String,
    /// Payload as JSON, or @FILE.
    #[arg(long, default_value = "null")]
    pub payload: String,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Args, Debug)]
pub struct CancelArgs {
    pub id: String,
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Args, Debug)]
pub struct HistoryArgs {
    pub id: String,
    #[command(flatten)]
    pub server: ServerArgs,
}

fn read_json_arg(what: &str, raw: &str) -> anyhow::Result<Value> {
    let text = if let Some(path) = raw.strip_prefix('@') {
        std::fs::read_to_string(path).with_context(|| format!("reading {what} from {path}"))?
    } else {
        raw.to_string()
    };
    serde_json::from_str(&text).with_context(|| format!("{what} is not valid JSON"))
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

async fn ctrl_c() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c().await;
}

pub async fn execute(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dev(args) => crate::dev::run(args).await,
        Command::Serve(args) => {
            let mut config = args.node.to_config(args.database.url()?);
            let (api, worker) = match (args.api, args.worker) {
                (false, false) => (true, true),
                other => other,
            };
            config.api = api;
            config.workers = usize::from(worker);
            config.migrate = !args.no_migrate;
            crate::run(config, shutdown_signal()).await
        }
        Command::Migrate(args) => {
            let store = crate::store::Store::new(crate::store::StoreConfig {
                database_url: args.database.url()?,
                schema: args.schema.clone(),
                pool_size: 1,
                pool_wait_timeout_ms: 10_000,
                statement_timeout_ms: 0,
                idle_in_transaction_timeout_ms: 0,
                application_name: "stead migrate".into(),
            })?;
            store.migrate(args.slot_count).await?;
            println!(
                "schema {:?} is at migration version {}",
                args.schema,
                crate::store::Store::latest_migration_version()
            );
            Ok(())
        }
        Command::Workflow(WorkflowCommand::Put { file, name, server }) => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            let doc: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", file.display()))?;
            let name =
                match name.or_else(|| doc.get("name").and_then(Value::as_str).map(String::from)) {
                    Some(n) => n,
                    None => bail!("the definition has no \"name\"; pass --name NAME"),
                };
            let (_, body) = ApiClient::new(&server.server)?
                .put_workflow(&name, &doc)
                .await?;
            print_json(&body);
            Ok(())
        }
        Command::Workflow(WorkflowCommand::List { server }) => {
            print_json(&ApiClient::new(&server.server)?.list_workflows().await?);
            Ok(())
        }
        Command::Start(args) => {
            let input = read_json_arg("--input", &args.input)?;
            let client = ApiClient::new(&args.server.server)?;
            let (_, body) = client
                .start(&args.workflow, &input, args.id.as_deref(), args.version)
                .await?;
            match (&args.wait, body["id"].as_str()) {
                (Some(wait), Some(id)) => print_json(&client.instance(id, Some(wait)).await?),
                _ => print_json(&body),
            }
            Ok(())
        }
        Command::Show(args) => {
            let client = ApiClient::new(&args.server.server)?;
            print_json(&client.instance(&args.id, args.wait.as_deref()).await?);
            Ok(())
        }
        Command::List(args) => {
            let mut query = vec![("limit", args.limit.to_string())];
            if let Some(w) = args.workflow {
                query.push(("workflow", w));
            }
            if let Some(s) = args.status {
                query.push(("status", s));
            }
            if let Some(c) = args.cursor {
                query.push(("cursor", c));
            }
            print_json(&ApiClient::new(&args.server.server)?.list(&query).await?);
            Ok(())
        }
        Command::History(args) => {
            print_json(
                &ApiClient::new(&args.server.server)?
                    .history(&args.id)
                    .await?,
            );
            Ok(())
        }
        Command::Signal(args) => {
            let payload = read_json_arg("--payload", &args.payload)?;
            let client = ApiClient::new(&args.server.server)?;
            print_json(&client.signal(&args.id, &args.name, &payload).await?);
            Ok(())
        }
        Command::Cancel(args) => {
            let client = ApiClient::new(&args.server.server)?;
            print_json(&client.cancel(&args.id, args.reason.as_deref()).await?);
            Ok(())
        }
        Command::Retry(args) => {
            print_json(&ApiClient::new(&args.server.server)?.retry(&args.id).await?);
            Ok(())
        }
        Command::Bench(args) => crate::bench::run(args).await,
    }
}
