//! The `stead` binary's command line: flags (each also read from a
//! `STEAD_*` variable) and the dispatch to each role or client command. It
//! uses only the library's public API; `client.rs` is the HTTP client of the
//! client subcommands and `bench`.

mod batch;
mod bench;
mod client;
mod dev;
mod failover;
mod options;
mod prefill;
mod shutdown;
mod stored;

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;

use client::ApiClient;
use options::{DatabaseArgs, ServerArgs};

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
    Dev(dev::DevArgs),
    /// Run the API and/or worker roles against a PostgreSQL database.
    Serve(ServeArgs),
    /// Apply database migrations and exit.
    Migrate(MigrateArgs),
    /// Make, list or revoke API keys (on the database directly).
    #[command(subcommand)]
    Key(KeyCommand),
    #[command(flatten)]
    Client(ClientCommand),
    /// Measure throughput and latency.
    Bench(bench::BenchArgs),
}

/// The subcommands that talk to a running node over its HTTP API.
#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Register or list workflow definitions.
    #[command(subcommand)]
    Workflow(WorkflowCommand),
    /// Start an instance of a workflow (or, with --batch, one per line of a file).
    Start(StartArgs),
    /// Show an instance with its steps.
    Show(ShowArgs),
    /// List instances, newest first.
    List(ListArgs),
    /// Show the event history of an instance.
    History(HistoryArgs),
    /// Deliver a signal to an instance (buffered until a step waits for it).
    Signal(SignalArgs),
    /// Cancel an instance, or with --filter every instance it matches (their
    /// compensations run).
    Cancel(CancelArgs),
    /// Retry a failed instance from its failed steps, or with --filter every
    /// failed instance it matches.
    Retry(RetryArgs),
    /// Create, list, show, pause, resume or delete cron schedules.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
}

#[derive(Subcommand, Debug)]
pub enum ScheduleCommand {
    /// Create or replace a schedule that starts a workflow at each time its
    /// cron names.
    Put {
        name: String,
        /// The workflow each firing starts.
        #[arg(long)]
        workflow: String,
        /// 5 fields (minute hour day month weekday) or 6 with seconds
        /// first, e.g. "0 3 * * *"; quote it.
        #[arg(long)]
        cron: String,
        /// IANA time zone the cron is read in.
        #[arg(long, default_value = "UTC")]
        timezone: String,
        /// Input of every instance, as JSON or @FILE.
        #[arg(long, default_value = "null")]
        input: String,
        /// skip (default), allow or cancel_previous: what a firing does
        /// while the previous firing's instance runs.
        #[arg(long, default_value = "skip")]
        overlap: String,
        /// How far back firings missed while no node ran are made up
        /// (e.g. 1h; default none).
        #[arg(long)]
        catchup: Option<String>,
        /// Store it paused.
        #[arg(long)]
        paused: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List the schedules.
    List {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Show a schedule with its next firings and last instances.
    Show {
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Pause a schedule.
    Pause {
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Resume a schedule from its next firing after now.
    Resume {
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Delete a schedule (the instances it started stay).
    Delete {
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
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
    /// Who may call the API: `keys` (every request needs an API key; make
    /// the first with `stead key create --role admin`) or `none` (anyone
    /// who can reach it may do everything).
    #[arg(long, env = "STEAD_AUTH", value_enum, default_value = "keys")]
    pub auth: AuthMode,
    #[command(flatten)]
    pub node: options::NodeArgs,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMode {
    Keys,
    None,
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Make a key; it is printed once and cannot be shown again.
    Create {
        /// What the key is for (shown by `stead key list`).
        #[arg(long)]
        name: String,
        /// admin, operator, worker or reader.
        #[arg(long)]
        role: stead::Role,
        /// With --role worker: the queues it may work, comma-separated.
        #[arg(long, value_delimiter = ',')]
        queues: Vec<String>,
        #[command(flatten)]
        schema: SchemaArgs,
    },
    /// List the keys (never their secrets).
    List {
        #[command(flatten)]
        schema: SchemaArgs,
    },
    /// Revoke a key by its id; it stops working at once on every node.
    Revoke {
        id: String,
        #[command(flatten)]
        schema: SchemaArgs,
    },
}

/// The database and schema of a command that works on the database directly.
#[derive(Args, Debug)]
pub struct SchemaArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// PostgreSQL schema holding stead's tables.
    #[arg(long, env = "STEAD_SCHEMA", default_value = "stead")]
    pub schema: String,
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
    /// Start one instance per line of this JSON Lines file (`-` for stdin),
    /// each line `{"input": ..., "id"?: "..."}`, 1000 per request.
    #[arg(long, conflicts_with_all = ["input", "id", "wait"])]
    pub batch: Option<PathBuf>,
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
    /// The instance (or give --filter).
    #[arg(required_unless_present = "filter", conflicts_with = "filter")]
    pub id: Option<String>,
    /// Which instances, as KEY=VALUE (repeat for more; all must hold):
    /// workflow, status, created_after, created_before (RFC 3339),
    /// id_prefix, ids (comma-separated).
    #[arg(long, value_name = "KEY=VALUE")]
    pub filter: Vec<String>,
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Args, Debug)]
pub struct RetryArgs {
    /// The instance (or give --filter).
    #[arg(required_unless_present = "filter", conflicts_with = "filter")]
    pub id: Option<String>,
    /// Which failed instances, as for `stead cancel --filter`.
    #[arg(long, value_name = "KEY=VALUE")]
    pub filter: Vec<String>,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// `--filter KEY=VALUE ...` as the bulk actions' `filter` object.
fn filter_arg(pairs: &[String]) -> anyhow::Result<Value> {
    const KEYS: [&str; 6] = [
        "workflow",
        "status",
        "created_after",
        "created_before",
        "id_prefix",
        "ids",
    ];
    let mut filter = serde_json::Map::new();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            bail!(
                "--filter {pair:?} is not KEY=VALUE (keys: {})",
                KEYS.join(", ")
            );
        };
        if !KEYS.contains(&key) {
            bail!(
                "--filter {key:?} is not a filter key; use one of {}",
                KEYS.join(", ")
            );
        }
        let value = if key == "ids" {
            Value::from(value.split(',').map(str::to_string).collect::<Vec<_>>())
        } else {
            Value::from(value)
        };
        filter.insert(key.to_string(), value);
    }
    Ok(Value::Object(filter))
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

fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub async fn execute(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dev(args) => dev::run(args).await,
        Command::Serve(args) => serve(args).await,
        Command::Migrate(args) => {
            let url = args.database.url()?;
            stead::migrate(&url, &args.schema, args.slot_count).await?;
            println!(
                "schema {:?} is at migration version {}",
                args.schema,
                stead::schema_version()
            );
            Ok(())
        }
        Command::Key(command) => key(command).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Client(command) => print_json(&call_api(command).await?),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = args.node.to_config(args.database.url()?);
    let (api, worker) = match (args.api, args.worker) {
        (false, false) => (true, true),
        other => other,
    };
    config.api = api;
    config.workers = usize::from(worker);
    config.migrate = !args.no_migrate;
    config.auth = match args.auth {
        AuthMode::Keys => stead::Auth::Keys,
        AuthMode::None => stead::Auth::None,
    };
    stead::run(config, shutdown::signal()).await?;
    Ok(())
}

async fn key(command: KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Create {
            name,
            role,
            queues,
            schema,
        } => {
            let url = schema.database.url()?;
            let created = stead::keys::create(&url, &schema.schema, &name, role, &queues).await?;
            eprintln!("the key is shown this once: keep it now (only its digest is stored)");
            print_json(&serde_json::json!({
                "id": created.id,
                "key": created.key,
                "name": name,
                "role": role.as_str(),
                "queues": queues,
                "created_at": created.created_at,
            }))
        }
        KeyCommand::List { schema } => {
            let url = schema.database.url()?;
            let keys = stead::keys::list(&url, &schema.schema).await?;
            let items: Vec<Value> = keys
                .iter()
                .map(|k| {
                    serde_json::json!({
                        "id": k.id, "name": k.name, "role": k.role.as_str(), "queues": k.queues,
                        "created_at": k.created_at, "revoked_at": k.revoked_at,
                    })
                })
                .collect();
            print_json(&serde_json::json!({ "items": items }))
        }
        KeyCommand::Revoke { id, schema } => {
            let url = schema.database.url()?;
            match stead::keys::revoke(&url, &schema.schema, &id).await? {
                Some(at) => print_json(&serde_json::json!({ "id": id, "revoked_at": at })),
                None => bail!("no API key has the id {id:?} (see `stead key list`)"),
            }
        }
    }
}

/// A client subcommand: one or two API calls; returns what to print.
async fn call_api(command: ClientCommand) -> anyhow::Result<Value> {
    match command {
        ClientCommand::Workflow(WorkflowCommand::Put { file, name, server }) => {
            let (name, doc) = read_definition(&file, name)?;
            let (_, body) = ApiClient::from_args(&server)?
                .put_workflow(&name, &doc)
                .await?;
            Ok(body)
        }
        ClientCommand::Workflow(WorkflowCommand::List { server }) => {
            ApiClient::from_args(&server)?.list_workflows().await
        }
        ClientCommand::Start(args) => {
            let client = ApiClient::from_args(&args.server)?;
            if let Some(file) = &args.batch {
                return batch::start_file(&client, &args.workflow, args.version, file).await;
            }
            let input = read_json_arg("--input", &args.input)?;
            let (_, body) = client
                .start(&args.workflow, &input, args.id.as_deref(), args.version)
                .await?;
            match (&args.wait, body["id"].as_str()) {
                (Some(wait), Some(id)) => client.instance(id, Some(wait)).await,
                _ => Ok(body),
            }
        }
        ClientCommand::Show(args) => {
            let client = ApiClient::from_args(&args.server)?;
            client.instance(&args.id, args.wait.as_deref()).await
        }
        ClientCommand::List(args) => {
            let mut query = vec![("limit", args.limit.to_string())];
            query.extend(args.workflow.map(|w| ("workflow", w)));
            query.extend(args.status.map(|s| ("status", s)));
            query.extend(args.cursor.map(|c| ("cursor", c)));
            ApiClient::from_args(&args.server)?.list(&query).await
        }
        ClientCommand::History(args) => ApiClient::from_args(&args.server)?.history(&args.id).await,
        ClientCommand::Signal(args) => {
            let payload = read_json_arg("--payload", &args.payload)?;
            let client = ApiClient::from_args(&args.server)?;
            client.signal(&args.id, &args.name, &payload).await
        }
        ClientCommand::Cancel(args) => {
            let client = ApiClient::from_args(&args.server)?;
            match &args.id {
                Some(id) => client.cancel(id, args.reason.as_deref()).await,
                None => {
                    let body = serde_json::json!({
                        "filter": filter_arg(&args.filter)?, "reason": args.reason,
                    });
                    client.post_json("/v1/instances/cancel", Some(&body)).await
                }
            }
        }
        ClientCommand::Retry(args) => {
            let client = ApiClient::from_args(&args.server)?;
            match &args.id {
                Some(id) => client.retry(id).await,
                None => {
                    let body = serde_json::json!({ "filter": filter_arg(&args.filter)? });
                    client.post_json("/v1/instances/retry", Some(&body)).await
                }
            }
        }
        ClientCommand::Schedule(command) => schedule(command).await,
    }
}

async fn schedule(command: ScheduleCommand) -> anyhow::Result<Value> {
    let path = |name: &str| format!("/v1/schedules/{name}");
    match command {
        ScheduleCommand::Put {
            name,
            workflow,
            cron,
            timezone,
            input,
            overlap,
            catchup,
            paused,
            server,
        } => {
            let body = serde_json::json!({
                "workflow": workflow,
                "cron": cron,
                "timezone": timezone,
                "input": read_json_arg("--input", &input)?,
                "overlap": overlap,
                "catchup": catchup,
                "paused": paused,
            });
            ApiClient::from_args(&server)?
                .put_json(&path(&name), &body)
                .await
        }
        ScheduleCommand::List { server } => {
            ApiClient::from_args(&server)?.get("/v1/schedules").await
        }
        ScheduleCommand::Show { name, server } => {
            ApiClient::from_args(&server)?.get(&path(&name)).await
        }
        ScheduleCommand::Pause { name, server } => {
            let client = ApiClient::from_args(&server)?;
            client
                .post_json(&format!("{}/pause", path(&name)), None)
                .await
        }
        ScheduleCommand::Resume { name, server } => {
            let client = ApiClient::from_args(&server)?;
            client
                .post_json(&format!("{}/resume", path(&name)), None)
                .await
        }
        ScheduleCommand::Delete { name, server } => {
            ApiClient::from_args(&server)?.delete(&path(&name)).await?;
            Ok(serde_json::json!({ "deleted": name }))
        }
    }
}

/// A definition file (`-` for stdin) and the workflow name: `--name`, or
/// the file's `"name"`.
fn read_definition(
    file: &std::path::Path,
    name: Option<String>,
) -> anyhow::Result<(String, Value)> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let doc: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", file.display()))?;
    match name.or_else(|| doc.get("name").and_then(Value::as_str).map(String::from)) {
        Some(n) => Ok((n, doc)),
        None => bail!("the definition has no \"name\"; pass --name NAME"),
    }
}
