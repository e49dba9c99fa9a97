//! `stead bench`: starts N instances of a K-step workflow of no-op tasks
//! (the built-in `stead.echo` queue), waits for all of them, and reports
//! throughput and end-to-end latency with the configuration used.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use clap::Args;
use futures::StreamExt;
use serde_json::{json, Value};

use super::client::ApiClient;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// A running stead API to measure; without it, bench starts its own
    /// private PostgreSQL and node.
    #[arg(long, env = "STEAD_SERVER")]
    pub server: Option<String>,
    /// Instances to start.
    #[arg(long, default_value_t = 2000)]
    pub instances: usize,
    /// Steps per instance (each a no-op task on stead.echo).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Concurrent HTTP requests while submitting and waiting.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Embedded mode: worker members in the node.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Embedded mode: database pool size.
    #[arg(long, default_value_t = 16)]
    pub pool_size: usize,
    /// Embedded mode: where the private PostgreSQL lives (default: a
    /// temporary directory, removed afterwards).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Measure the side-by-side way instead: pre-fill --instances with the
    /// batch start, ANALYZE, then time a node's workers draining them (and
    /// the idle latency); see the README's Benchmarks section.
    #[arg(long, conflicts_with_all = ["server", "failover"])]
    pub prefill: bool,
    /// Prefill: run on this PostgreSQL (e.g. `$(../shared/bench/pg.sh url
    /// postgres)`) in a schema `stead_bench` that is dropped before and
    /// after; default: a private PostgreSQL of its own.
    #[arg(long, requires = "prefill")]
    pub database_url: Option<String>,
    /// Prefill: drain one unmeasured round first and measure the second, so
    /// that every table was analysed at volume.
    #[arg(long, requires = "prefill")]
    pub warm: bool,
    /// Prefill: measured runs (each on a fresh schema); medians and ranges
    /// are printed.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Prefill: how instances are started.
    #[arg(long, value_enum, default_value = "sql")]
    pub enqueue: super::prefill::Enqueue,
    /// Prefill: idle-latency samples after the runs (0: none).
    #[arg(long, default_value_t = 300)]
    pub latency_samples: usize,
    /// With --prefill: run the steps on the queue `bench.external`, which no
    /// node handles, through this many external workers over HTTP (claim,
    /// then complete each task), and report tasks/s. 0: in-process handlers.
    #[arg(long, default_value_t = 0, requires = "prefill")]
    pub external_workers: usize,
    /// With --prefill: first store this many ended instances (one-step,
    /// with their steps and history) in the schema, which is then kept (a
    /// larger number later tops it up); each run's own instances are
    /// deleted after it, and the API's reads are timed at the end
    /// (--latency-samples each). Drop it with `DROP SCHEMA stead_bench
    /// CASCADE`.
    #[arg(long, default_value_t = 0, requires = "prefill")]
    pub stored: usize,
    /// With --external-workers: most tasks one claim takes.
    #[arg(long, default_value_t = 100, requires = "prefill")]
    pub claim_max: usize,
    /// Measure failover instead: kill -9 and SIGSTOP real `stead serve`
    /// processes on a private PostgreSQL and time how long their slots take
    /// to move.
    #[arg(long)]
    pub failover: bool,
    /// Failover: `stead serve` processes to run.
    #[arg(long, default_value_t = 3)]
    pub processes: usize,
    /// Failover: kills (and as many freezes) to time.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Failover: the processes' --heartbeat-ms.
    #[arg(long, default_value_t = 1_000)]
    pub heartbeat_ms: u64,
    /// Failover: the processes' --member-ttl-ms.
    #[arg(long, default_value_t = 10_000)]
    pub member_ttl_ms: u64,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.failover {
        return super::failover::run(super::failover::FailoverArgs {
            processes: args.processes,
            rounds: args.rounds,
            heartbeat_ms: args.heartbeat_ms,
            member_ttl_ms: args.member_ttl_ms,
        })
        .await;
    }
    if args.prefill {
        if args.instances == 0 || args.steps == 0 || args.steps > 1000 {
            bail!("--instances must be at least 1 and --steps from 1 to 1000");
        }
        return super::prefill::run(super::prefill::PrefillArgs {
            instances: args.instances,
            steps: args.steps,
            workers: args.workers,
            pool_size: args.pool_size,
            database_url: args.database_url,
            data_dir: args.data_dir,
            warm: args.warm,
            runs: args.runs,
            enqueue: args.enqueue,
            latency_samples: args.latency_samples,
            external_workers: args.external_workers,
            claim_max: args.claim_max,
            stored: args.stored,
        })
        .await;
    }
    if args.instances == 0 || args.steps == 0 || args.concurrency == 0 {
        bail!("--instances, --steps and --concurrency must be at least 1");
    }
    if args.steps > 1000 {
        bail!("--steps must be at most 1000");
    }
    match &args.server {
        Some(server) => {
            let report = measure(&ApiClient::new(server)?, &args).await?;
            println!("{}", report.render(&args, &format!("server {server}")));
            Ok(())
        }
        None => run_embedded(args).await,
    }
}

async fn run_embedded(args: BenchArgs) -> anyhow::Result<()> {
    let (data_dir, temporary) = match &args.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("stead-bench-{}", std::process::id())),
            true,
        ),
    };
    let (cluster, url) = super::dev::start_cluster(&data_dir).await?;
    let mut config = stead::Config::new(url);
    config.listen = "127.0.0.1:0".into();
    // A private node on loopback, measured as clients would reach it.
    config.auth = stead::Auth::None;
    config.workers = args.workers;
    config.tuning.pool_size = args.pool_size;
    let result = async {
        let node = stead::start(config).await?;
        let api = node.api_url().context("node has no API")?;
        let report = measure(&ApiClient::new(&api)?, &args).await;
        node.shutdown().await;
        report
    }
    .await;
    let _ = cluster.stop();
    if temporary {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    let setup = format!(
        "embedded node ({} workers, pool {}, private PostgreSQL)",
        args.workers, args.pool_size
    );
    println!("{}", result?.render(&args, &setup));
    Ok(())
}

struct Report {
    submit_elapsed: Duration,
    submit_latencies_ms: Vec<f64>,
    total_elapsed_s: f64,
    e2e_latencies_ms: Vec<f64>,
    completed: usize,
    failed: usize,
}

async fn measure(client: &ApiClient, args: &BenchArgs) -> anyhow::Result<Report> {
    let run_tag = uuid::Uuid::now_v7().simple().to_string();
    // A workflow per run, so that waiting and reading back see only this
    // run's instances.
    let name = format!("bench_{}_{}", args.steps, &run_tag[run_tag.len() - 12..]);
    let steps: Vec<Value> = (1..=args.steps)
        .map(|i| json!({ "id": format!("s{i}"), "task": { "queue": "stead.echo", "input": { "step": i } } }))
        .collect();
    client
        .put_workflow(&name, &json!({ "name": name, "steps": steps }))
        .await?;

    let started = Instant::now();
    let submits: Vec<anyhow::Result<(String, f64)>> = futures::stream::iter(0..args.instances)
        .map(|i| {
            let client = client.clone();
            let name = name.clone();
            let id = format!("bench-{run_tag}-{i}");
            async move {
                let t = Instant::now();
                client
                    .start(&name, &json!({ "i": i }), Some(&id), None)
                    .await?;
                Ok((id, t.elapsed().as_secs_f64() * 1000.0))
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let submit_elapsed = started.elapsed();
    let mut ids = Vec::with_capacity(args.instances);
    let mut submit_latencies_ms = Vec::with_capacity(args.instances);
    for s in submits {
        let (id, ms) = s?;
        ids.push(id);
        submit_latencies_ms.push(ms);
    }

    // Wait cheaply (two one-row list queries per poll) rather than reading
    // every instance while the engine works: the bench must not compete with
    // what it measures.
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let mut busy = false;
        for status in ["pending", "running"] {
            let page = client
                .list(&[
                    ("workflow", name.clone()),
                    ("status", status.to_string()),
                    ("limit", "1".to_string()),
                ])
                .await?;
            busy |= page["instances"].as_array().is_some_and(|a| !a.is_empty());
        }
        if !busy {
            break;
        }
        if Instant::now() > deadline {
            bail!("instances did not all end within an hour");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Read every instance back, a page at a time.
    let mut finals: Vec<Value> = Vec::with_capacity(ids.len());
    let mut cursor: Option<String> = None;
    loop {
        let mut query = vec![("workflow", name.clone()), ("limit", "1000".to_string())];
        if let Some(c) = &cursor {
            query.push(("cursor", c.clone()));
        }
        let page = client.list(&query).await?;
        if let Some(items) = page["instances"].as_array() {
            finals.extend(items.iter().cloned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    if finals.len() != ids.len() {
        bail!(
            "started {} instances but read back {}",
            ids.len(),
            finals.len()
        );
    }
    let mut first_created: Option<DateTime<Utc>> = None;
    let mut last_ended: Option<DateTime<Utc>> = None;
    let mut e2e_latencies_ms = Vec::with_capacity(finals.len());
    let (mut completed, mut failed) = (0, 0);
    for v in finals {
        if v["status"] == "completed" {
            completed += 1;
        } else {
            failed += 1;
        }
        let created: DateTime<Utc> = serde_json::from_value(v["created_at"].clone())?;
        let ended: DateTime<Utc> = serde_json::from_value(v["ended_at"].clone())?;
        first_created = Some(first_created.map_or(created, |c| c.min(created)));
        last_ended = Some(last_ended.map_or(ended, |e| e.max(ended)));
        e2e_latencies_ms.push((ended - created).num_microseconds().unwrap_or(0) as f64 / 1000.0);
    }
    let total_elapsed_s = match (first_created, last_ended) {
        (Some(a), Some(b)) => ((b - a).num_microseconds().unwrap_or(0) as f64 / 1e6).max(1e-6),
        _ => started.elapsed().as_secs_f64(),
    };
    Ok(Report {
        submit_elapsed,
        submit_latencies_ms,
        total_elapsed_s,
        e2e_latencies_ms,
        completed,
        failed,
    })
}

/// The p-th percentile (0..=100) by nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Report {
    fn render(mut self, args: &BenchArgs, setup: &str) -> String {
        self.submit_latencies_ms.sort_by(f64::total_cmp);
        self.e2e_latencies_ms.sort_by(f64::total_cmp);
        let n = args.instances as f64;
        let submit_s = self.submit_elapsed.as_secs_f64().max(1e-6);
        let s = &self.submit_latencies_ms;
        let e = &self.e2e_latencies_ms;
        format!(
            "stead bench: {} instances x {} steps (no-op tasks on stead.echo), concurrency {}, {setup}\n\
             submitted   {:>8.1}/s  ({} in {:.2}s; start request p50 {:.1}ms p99 {:.1}ms)\n\
             completed   {:>8.1}/s  ({} completed, {} failed, first start to last end {:.2}s)\n\
             steps       {:>8.1}/s\n\
             end-to-end latency  p50 {:.1}ms  p90 {:.1}ms  p99 {:.1}ms  max {:.1}ms",
            args.instances,
            args.steps,
            args.concurrency,
            n / submit_s,
            args.instances,
            submit_s,
            percentile(s, 50.0),
            percentile(s, 99.0),
            self.completed as f64 / self.total_elapsed_s,
            self.completed,
            self.failed,
            self.total_elapsed_s,
            (self.completed * args.steps) as f64 / self.total_elapsed_s,
            percentile(e, 50.0),
            percentile(e, 90.0),
            percentile(e, 99.0),
            e.last().copied().unwrap_or(0.0),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(percentile(&[7.0], 90.0), 7.0);
    }
}
