//! `stead bench --prefill`: the side-by-side method of
//! `../shared/bench/README.md`. Pre-fill N instances of a K-step no-op
//! workflow with the batch start, `ANALYZE`, then start a node with workers
//! and time until every instance has ended (counted from the node's
//! `stead_instances_ended_total`, then checked in SQL). Reports workflows/s,
//! steps/s, and per step the commits, row writes and WAL bytes PostgreSQL
//! counted while the workers drained. Then the idle latency: one instance at
//! a time on an idle node, warm-ups first, 5 ms apart.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio_postgres::{Client, NoTls};

use super::bench::percentile;
use super::client::ApiClient;

/// The schema every run starts afresh (dropped before and after).
const SCHEMA: &str = "stead_bench";
/// Items per batch start, as graphile-worker's benchmark calls `addJobs`.
const ENQUEUE_BATCH: usize = 1000;
/// How often the drain's progress is read from the node's metrics.
const PROGRESS_POLL_MS: u64 = 20;
/// No drain may take longer than this.
const DRAIN_LIMIT: Duration = Duration::from_secs(3600);
/// Latency: unmeasured samples first, and the pause between samples.
const LATENCY_WARMUPS: usize = 20;
const LATENCY_GAP_MS: u64 = 5;
/// The queue of the latency handler (a no-op that reports its start).
const LATENCY_QUEUE: &str = "bench.latency";

/// How the pre-fill starts its instances.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enqueue {
    /// `stead.start_workflows` from SQL.
    Sql,
    /// `POST /v1/workflows/{name}/instances/batch`.
    Http,
}

pub struct PrefillArgs {
    pub instances: usize,
    pub steps: usize,
    pub workers: usize,
    pub pool_size: usize,
    pub database_url: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub warm: bool,
    pub runs: usize,
    pub enqueue: Enqueue,
    pub latency_samples: usize,
    /// External HTTP workers running the steps (0: in-process handlers).
    pub external_workers: usize,
    /// Most tasks one external claim takes.
    pub claim_max: usize,
    /// Ended instances stored before the runs (0: none; see `stored.rs`).
    pub stored: usize,
}

pub async fn run(args: PrefillArgs) -> anyhow::Result<()> {
    match &args.database_url {
        Some(url) => run_on(url, &args, "the given PostgreSQL").await,
        None => {
            let dir = match &args.data_dir {
                Some(d) => d.clone(),
                None => std::env::temp_dir().join(format!("stead-bench-{}", std::process::id())),
            };
            let (cluster, url) = super::dev::start_cluster(&dir).await?;
            let result = run_on(&url, &args, "a private PostgreSQL").await;
            let _ = cluster.stop();
            if args.data_dir.is_none() {
                let _ = std::fs::remove_dir_all(&dir);
            }
            result
        }
    }
}

async fn run_on(url: &str, args: &PrefillArgs, where_: &str) -> anyhow::Result<()> {
    let mode = if args.warm { "warm" } else { "cold" };
    println!(
        "stead bench --prefill: {} instances x {} no-op steps, {mode}, enqueue by {:?}, \
         {} workers, pool {}, on {where_}",
        args.instances, args.steps, args.enqueue, args.workers, args.pool_size
    );
    let sql = connect(url).await?;
    if args.stored > 0 {
        return run_with_stored(url, &sql, args, mode).await;
    }
    let mut rounds = Vec::with_capacity(args.runs);
    for run in 1..=args.runs {
        reset_schema(&sql).await?;
        if args.warm {
            round(url, &sql, args).await?;
        }
        let measured = round(url, &sql, args).await?;
        println!("  run {run}: {}", measured.line());
        rounds.push(measured);
    }
    if !rounds.is_empty() {
        println!("{}", summary(&rounds, args, mode));
    }
    if args.latency_samples > 0 {
        reset_schema(&sql).await?;
        let latency = idle_latency(url, args).await?;
        println!("{latency}");
    }
    reset_schema(&sql).await
}

/// The runs with `--stored` ended instances in the schema, which is kept
/// afterwards (a larger `--stored` tops it up): each run's instances are
/// deleted after it instead of the schema. Then the API's reads.
async fn run_with_stored(
    url: &str,
    sql: &Client,
    args: &PrefillArgs,
    mode: &str,
) -> anyhow::Result<()> {
    stead::migrate(url, SCHEMA, 256).await?;
    let started = Instant::now();
    let rate = super::stored::fill(url, sql, SCHEMA, args.stored).await?;
    println!(
        "  stored {} ended instances in {:.0}s ({rate:.0} instances/s); RESULT stead stored={} \
         fill_per_s={rate:.0}",
        args.stored,
        started.elapsed().as_secs_f64(),
        args.stored
    );
    let workflow = format!("noop_{}", args.steps);
    let mut rounds = Vec::with_capacity(args.runs);
    for run in 1..=args.runs {
        if args.warm {
            round(url, sql, args).await?;
            super::stored::remove_run(sql, SCHEMA, &workflow).await?;
        }
        let measured = round(url, sql, args).await?;
        super::stored::remove_run(sql, SCHEMA, &workflow).await?;
        println!("  run {run}: {}", measured.line());
        rounds.push(measured);
    }
    if !rounds.is_empty() {
        println!("{}", summary(&rounds, args, mode));
    }
    let reads = super::stored::api_latency(url, SCHEMA, args.stored, args.latency_samples).await?;
    println!("{reads}");
    Ok(())
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(connection);
    client
        .batch_execute("SET client_min_messages = warning")
        .await?;
    Ok(client)
}

async fn reset_schema(sql: &Client) -> anyhow::Result<()> {
    sql.batch_execute(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        .await?;
    Ok(())
}

pub(super) fn node_config(url: &str, workers: usize, pool_size: usize) -> stead::Config {
    let mut config = stead::Config::new(url);
    config.schema = SCHEMA.into();
    config.listen = "127.0.0.1:0".into();
    // A private node on loopback.
    config.auth = stead::Auth::None;
    config.workers = workers;
    config.tuning.pool_size = pool_size;
    config
}

/// What one measured drain saw.
struct Round {
    enqueue_per_s: f64,
    node_start_s: f64,
    drain_s: f64,
    instances: usize,
    steps: usize,
    stats: Counters,
}

impl Round {
    fn wf_per_s(&self) -> f64 {
        self.instances as f64 / self.drain_s
    }

    fn steps_per_s(&self) -> f64 {
        (self.instances * self.steps) as f64 / self.drain_s
    }

    fn per_step(&self, value: f64) -> f64 {
        value / (self.instances * self.steps) as f64
    }

    fn line(&self) -> String {
        let s = &self.stats;
        format!(
            "enqueue {:.0}/s; drain {:.2}s (node start {:.2}s): {:.0} wf/s, {:.0} steps/s; \
             per step {:.2} commits, {:.2} row writes, {:.0} WAL bytes; HOT updates {:.0}%",
            self.enqueue_per_s,
            self.drain_s,
            self.node_start_s,
            self.wf_per_s(),
            self.steps_per_s(),
            self.per_step(s.commits),
            self.per_step(s.row_writes),
            self.per_step(s.wal_bytes),
            s.hot_percent(),
        )
    }
}

/// Pre-fills, analyses and drains once.
async fn round(url: &str, sql: &Client, args: &PrefillArgs) -> anyhow::Result<Round> {
    let workflow = format!("noop_{}", args.steps);
    let enqueue_per_s = prefill(url, sql, args, &workflow).await?;
    sql.batch_execute("ANALYZE").await?;
    let before = Counters::read(sql).await?;
    let started = Instant::now();
    let node = stead::start(node_config(url, args.workers, args.pool_size)).await?;
    let node_start_s = started.elapsed().as_secs_f64();
    let api = node.api_url().context("the node serves no API")?;
    let stop = tokio_util::sync::CancellationToken::new();
    let workers: Vec<_> = (0..args.external_workers)
        .map(|k| {
            tokio::spawn(external_worker(
                api.clone(),
                k,
                args.claim_max,
                stop.clone(),
            ))
        })
        .collect();
    let drained = wait_drained(&api, args.instances, started).await;
    stop.cancel();
    for w in workers {
        w.await??;
    }
    node.shutdown().await;
    let drain_s = drained?;
    check_all_completed(sql, &workflow, args.instances).await?;
    let stats = Counters::read(sql).await?.minus(&before);
    Ok(Round {
        enqueue_per_s,
        node_start_s,
        drain_s,
        instances: args.instances,
        steps: args.steps,
        stats,
    })
}

/// Registers the workflow (through an API-only node) and starts N instances
/// of it, 1000 per call; returns the starts per second.
async fn prefill(
    url: &str,
    sql: &Client,
    args: &PrefillArgs,
    workflow: &str,
) -> anyhow::Result<f64> {
    let node = stead::start(node_config(url, 0, 4)).await?;
    let api = ApiClient::new(&node.api_url().context("the node serves no API")?)?;
    let result = async {
        let queue = if args.external_workers > 0 {
            EXTERNAL_QUEUE
        } else {
            "stead.echo"
        };
        let steps: Vec<Value> = (1..=args.steps)
            .map(|i| json!({"id": format!("s{i}"), "task": {"queue": queue}}))
            .collect();
        api.put_workflow(workflow, &json!({"steps": steps})).await?;
        let started = Instant::now();
        for first in (0..args.instances).step_by(ENQUEUE_BATCH) {
            let inputs: Vec<Value> = (first..args.instances.min(first + ENQUEUE_BATCH))
                .map(|i| json!({ "i": i }))
                .collect();
            enqueue(sql, &api, args.enqueue, workflow, inputs).await?;
        }
        Ok::<_, anyhow::Error>(args.instances as f64 / started.elapsed().as_secs_f64())
    }
    .await;
    node.shutdown().await;
    result
}

async fn enqueue(
    sql: &Client,
    api: &ApiClient,
    how: Enqueue,
    workflow: &str,
    inputs: Vec<Value>,
) -> anyhow::Result<()> {
    let expected = inputs.len();
    let started = match how {
        Enqueue::Sql => {
            let statement = format!("SELECT {SCHEMA}.start_workflows($1, $2::jsonb[])");
            sql.query(&statement, &[&workflow, &inputs]).await?.len()
        }
        Enqueue::Http => {
            let items: Vec<Value> = inputs.into_iter().map(|i| json!({"input": i})).collect();
            let body = api.start_batch(workflow, &items, None).await?;
            body["created"].as_u64().unwrap_or(0) as usize
        }
    };
    if started != expected {
        bail!("a batch start of {expected} started {started}");
    }
    Ok(())
}

/// The queue the external workers of `--external-workers` serve.
const EXTERNAL_QUEUE: &str = "bench.external";

/// An external worker over HTTP: claims up to `max` tasks (waiting up to a
/// second for some), and records their results (each its input) in one
/// `POST /v1/tasks/results`, until `stop`.
async fn external_worker(
    api: String,
    k: usize,
    max: usize,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let worker = format!("bench-external-{k}");
    while !stop.is_cancelled() {
        let claim = json!({"worker": worker, "max": max, "wait": "1s"});
        let url = format!("{api}/v1/queues/{EXTERNAL_QUEUE}/claim");
        let claimed: Value = http.post(url).json(&claim).send().await?.json().await?;
        let tasks = claimed["tasks"].as_array().cloned().unwrap_or_default();
        if tasks.is_empty() {
            continue;
        }
        let results: Vec<Value> = tasks
            .iter()
            .map(|t| json!({"task_id": t["task_id"], "lease_token": t["lease_token"], "output": t["input"]}))
            .collect();
        let url = format!("{api}/v1/tasks/results");
        let body = json!({ "results": results });
        let answer = http.post(url).json(&body).send().await?;
        if !answer.status().is_success() {
            bail!("recording results: HTTP {}", answer.status());
        }
    }
    Ok(())
}

/// Waits until the node has ended `n` instances; returns the seconds since
/// `started`. Fails at once if any failed.
async fn wait_drained(api: &str, n: usize, started: Instant) -> anyhow::Result<f64> {
    let http = reqwest::Client::new();
    loop {
        let text = http
            .get(format!("{api}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let (completed, other) = ended_counts(&text);
        if other > 0.0 {
            bail!("{other} instances did not complete");
        }
        if completed >= n as f64 {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > DRAIN_LIMIT {
            bail!("only {completed} of {n} instances ended within {DRAIN_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(PROGRESS_POLL_MS)).await;
    }
}

/// `stead_instances_ended_total`: (completed, any other end).
fn ended_counts(metrics: &str) -> (f64, f64) {
    let mut counts = (0.0, 0.0);
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("stead_instances_ended_total{") else {
            continue;
        };
        let value: f64 = rest
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        if rest.contains("status=\"completed\"") {
            counts.0 += value;
        } else {
            counts.1 += value;
        }
    }
    counts
}

async fn check_all_completed(sql: &Client, workflow: &str, n: usize) -> anyhow::Result<()> {
    let statement = format!(
        "SELECT count(*) FILTER (WHERE status = 'completed'), count(*) \
         FROM {SCHEMA}.instances WHERE workflow_name = $1"
    );
    let row = sql.query_one(&statement, &[&workflow]).await?;
    let (completed, all): (i64, i64) = (row.get(0), row.get(1));
    if completed != all {
        bail!("SQL shows {completed} of {all} instances completed");
    }
    // A warm run drains a first round of n, so there may be 2n.
    if all as usize % n != 0 || all == 0 {
        bail!("SQL shows {all} instances, expected a multiple of {n}");
    }
    Ok(())
}

/// Database-wide counters PostgreSQL keeps (flushed when sessions end, which
/// is why they are read after the node has stopped).
#[derive(Default)]
struct Counters {
    commits: f64,
    row_writes: f64,
    wal_bytes: f64,
    updates: f64,
    hot_updates: f64,
}

impl Counters {
    async fn read(sql: &Client) -> anyhow::Result<Counters> {
        sql.batch_execute("SELECT pg_stat_force_next_flush()")
            .await?;
        let db = sql
            .query_one(
                "SELECT xact_commit::float8, (tup_inserted + tup_updated + tup_deleted)::float8, \
                        pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8 \
                 FROM pg_stat_database WHERE datname = current_database()",
                &[],
            )
            .await?;
        let tables = sql
            .query_one(
                "SELECT coalesce(sum(n_tup_upd), 0)::float8, coalesce(sum(n_tup_hot_upd), 0)::float8 \
                 FROM pg_stat_user_tables WHERE schemaname = $1",
                &[&SCHEMA],
            )
            .await?;
        Ok(Counters {
            commits: db.get(0),
            row_writes: db.get(1),
            wal_bytes: db.get(2),
            updates: tables.get(0),
            hot_updates: tables.get(1),
        })
    }

    fn minus(&self, before: &Counters) -> Counters {
        Counters {
            commits: self.commits - before.commits,
            row_writes: self.row_writes - before.row_writes,
            wal_bytes: self.wal_bytes - before.wal_bytes,
            updates: self.updates - before.updates,
            hot_updates: self.hot_updates - before.hot_updates,
        }
    }

    fn hot_percent(&self) -> f64 {
        if self.updates > 0.0 {
            100.0 * self.hot_updates / self.updates
        } else {
            0.0
        }
    }
}

/// Medians and ranges over the runs, and one machine-readable line.
fn summary(rounds: &[Round], args: &PrefillArgs, mode: &str) -> String {
    let stat = |f: &dyn Fn(&Round) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        (percentile(&v, 50.0), v[0], v[v.len() - 1])
    };
    let wf = stat(&|r| r.wf_per_s());
    let steps = stat(&|r| r.steps_per_s());
    let enqueue = stat(&|r| r.enqueue_per_s);
    let commits = stat(&|r| r.per_step(r.stats.commits));
    let rows = stat(&|r| r.per_step(r.stats.row_writes));
    let wal = stat(&|r| r.per_step(r.stats.wal_bytes));
    format!(
        "  median of {} (range): {:.0} wf/s ({:.0}-{:.0}), {:.0} steps/s ({:.0}-{:.0}), \
         enqueue {:.0}/s ({:.0}-{:.0})\n\
         RESULT stead steps={} n={} mode={mode} external_workers={} wf_per_s={:.0} steps_per_s={:.0} \
         enqueue_per_s={:.0} commits_per_step={:.2} row_writes_per_step={:.2} wal_bytes_per_step={:.0}",
        rounds.len(),
        wf.0,
        wf.1,
        wf.2,
        steps.0,
        steps.1,
        steps.2,
        enqueue.0,
        enqueue.1,
        enqueue.2,
        args.steps,
        args.instances,
        args.external_workers,
        wf.0,
        steps.0,
        enqueue.0,
        commits.0,
        rows.0,
        wal.0,
    )
}

/// The start time of each latency-handler attempt, keyed by instance id.
type Starts = Arc<Mutex<Vec<(String, Instant)>>>;

/// Idle latency: submit (HTTP start) → first step's handler start, and →
/// the instance's result as a waiting client sees it.
async fn idle_latency(url: &str, args: &PrefillArgs) -> anyhow::Result<String> {
    let starts: Starts = Arc::default();
    let mut config = node_config(url, args.workers, args.pool_size);
    let recorder = starts.clone();
    config
        .handlers
        .register(LATENCY_QUEUE, move |task: stead::TaskContext| {
            let recorder = recorder.clone();
            async move {
                let now = Instant::now();
                recorder
                    .lock()
                    .expect("latency log")
                    .push((task.instance_id, now));
                Ok(Value::Null)
            }
        });
    let node = stead::start(config).await?;
    let result = async {
        let api = ApiClient::new(&node.api_url().context("the node serves no API")?)?;
        wait_settled(&api, args.workers).await?;
        let def = json!({"steps": [{"id": "s1", "task": {"queue": LATENCY_QUEUE}}]});
        api.put_workflow("latency", &def).await?;
        let mut to_start = Vec::with_capacity(args.latency_samples);
        let mut to_result = Vec::with_capacity(args.latency_samples);
        for i in 0..LATENCY_WARMUPS + args.latency_samples {
            let (start_ms, result_ms) = one_sample(&api, &starts, i).await?;
            if i >= LATENCY_WARMUPS {
                to_start.push(start_ms);
                to_result.push(result_ms);
            }
            tokio::time::sleep(Duration::from_millis(LATENCY_GAP_MS)).await;
        }
        to_start.sort_by(f64::total_cmp);
        to_result.sort_by(f64::total_cmp);
        Ok::<_, anyhow::Error>(format!(
            "  idle latency over {} samples: submit -> step start p50 {:.2}ms p99 {:.2}ms; \
             submit -> result p50 {:.2}ms p99 {:.2}ms\n\
             RESULT stead latency start_p50_ms={:.3} start_p99_ms={:.3} result_p50_ms={:.3} result_p99_ms={:.3}",
            to_start.len(),
            percentile(&to_start, 50.0),
            percentile(&to_start, 99.0),
            percentile(&to_result, 50.0),
            percentile(&to_result, 99.0),
            percentile(&to_start, 50.0),
            percentile(&to_start, 99.0),
            percentile(&to_result, 50.0),
            percentile(&to_result, 99.0),
        ))
    }
    .await;
    node.shutdown().await;
    result
}

/// Waits until every worker member owns its share of the slots: latency is
/// measured on a settled cluster, not during the first rebalance.
async fn wait_settled(api: &ApiClient, workers: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let cluster = api.cluster().await?;
        let members = cluster["members"].as_array().cloned().unwrap_or_default();
        let owning = members
            .iter()
            .filter(|m| m["slots"].as_array().is_some_and(|s| !s.is_empty()))
            .count();
        if owning >= workers
            && cluster["unowned_slots"]
                .as_array()
                .is_some_and(Vec::is_empty)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the node's {workers} workers did not share the slots within 60s: {cluster}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One sample: (ms to the handler's start, ms to the result).
async fn one_sample(api: &ApiClient, starts: &Starts, i: usize) -> anyhow::Result<(f64, f64)> {
    let id = format!("lat-{i}");
    let t0 = Instant::now();
    api.start("latency", &json!({ "i": i }), Some(&id), None)
        .await?;
    let done = api.instance(&id, Some("10s")).await?;
    let result_ms = t0.elapsed().as_secs_f64() * 1000.0;
    if done["status"] != "completed" {
        bail!("latency instance {id} did not complete within 10s: {done}");
    }
    let started_at = starts
        .lock()
        .expect("latency log")
        .iter()
        .find(|(instance, _)| *instance == id)
        .map(|(_, at)| *at)
        .context("the handler did not run")?;
    Ok(((started_at - t0).as_secs_f64() * 1000.0, result_ms))
}

#[cfg(test)]
mod tests {
    use super::ended_counts;

    #[test]
    fn ended_counts_split_completed_from_other_ends() {
        let text = "# HELP x\n\
            stead_instances_ended_total{workflow=\"a\",status=\"completed\"} 7\n\
            stead_instances_ended_total{workflow=\"b\",status=\"completed\"} 3\n\
            stead_instances_ended_total{workflow=\"a\",status=\"failed\"} 1\n\
            stead_instances_started_total 11\n";
        assert_eq!(ended_counts(text), (10.0, 1.0));
    }
}
