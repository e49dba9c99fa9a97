//! `stead bench --prefill --stored N`: the runs and the API measured with N
//! ended instances already stored (with their steps and history), as a
//! database that keeps a long history holds them.
//!
//! The stored instances are clones of a few real ones: `TEMPLATES`
//! instances of the one-step workflow `stored` run through a node, then
//! copied set-wise (`INSERT ... SELECT` over `generate_series`, a chunk per
//! transaction) under ids `stored-<n>`, every timestamp shifted back
//! `SHIFT_MS` per clone so that they spread over days, as if ended one after
//! the other. A larger `--stored` later tops the same schema up.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::Rng;
use serde_json::json;
use tokio_postgres::Client;

use super::bench::percentile;
use super::client::ApiClient;

/// The stored instances' workflow.
pub const WORKFLOW: &str = "stored";
/// Real instances the clones copy.
const TEMPLATES: i64 = 100;
/// Clones per transaction.
const CHUNK: i64 = 250_000;
/// How far back each clone's timestamps move: 10 million span 4.6 days,
/// inside the default retention of 7.
const SHIFT_MS: i64 = 40;
/// The per-instance tables, with the column holding the instance id.
const TABLES: [(&str, &str); 3] = [
    ("instances", "id"),
    ("steps", "instance_id"),
    ("history", "instance_id"),
];

/// Tops the stored instances up to `n`; returns clones per second (0 when
/// there were enough already).
pub async fn fill(url: &str, sql: &Client, schema: &str, n: usize) -> anyhow::Result<f64> {
    let have = count_clones(sql, schema).await?;
    if have >= n as i64 {
        println!("  stored: {have} ended instances already");
        return Ok(0.0);
    }
    ensure_templates(url, sql, schema).await?;
    let statements = clone_statements(sql, schema).await?;
    let started = Instant::now();
    let mut from = have + 1;
    while from <= n as i64 {
        let to = (from + CHUNK - 1).min(n as i64);
        sql.batch_execute("BEGIN").await?;
        for statement in &statements {
            sql.execute(statement.as_str(), &[&from, &to]).await?;
        }
        sql.batch_execute("COMMIT").await?;
        let done = to - have;
        println!(
            "  stored: {to} ended instances ({:.0} instances/s)",
            done as f64 / started.elapsed().as_secs_f64()
        );
        from = to + 1;
    }
    let rate = (n as i64 - have) as f64 / started.elapsed().as_secs_f64();
    // What autovacuum would have done by now on a database this old: the
    // visibility map set and the statistics current.
    for (table, _) in TABLES {
        sql.batch_execute(&format!("VACUUM (ANALYZE) {schema}.{table}"))
            .await?;
    }
    Ok(rate)
}

async fn count_clones(sql: &Client, schema: &str) -> anyhow::Result<i64> {
    let row = sql
        .query_one(
            &format!(
                "SELECT count(*) FROM {schema}.instances \
                 WHERE workflow_name = $1 AND starts_with(id, 'stored-')"
            ),
            &[&WORKFLOW],
        )
        .await?;
    Ok(row.get(0))
}

/// Runs `TEMPLATES` real instances of `stored` to completion, once.
async fn ensure_templates(url: &str, sql: &Client, schema: &str) -> anyhow::Result<()> {
    let count = format!(
        "SELECT count(*) FILTER (WHERE ended_at IS NOT NULL), count(*) FROM {schema}.instances \
         WHERE workflow_name = $1 AND NOT starts_with(id, 'stored-')"
    );
    let row = sql.query_one(&count, &[&WORKFLOW]).await?;
    if row.get::<_, i64>(1) >= TEMPLATES {
        return Ok(());
    }
    let mut config = super::prefill::node_config(url, 1, 4);
    config.schema = schema.to_string();
    let node = stead::start(config).await?;
    let result = async {
        let api = ApiClient::new(&node.api_url().context("the node serves no API")?)?;
        let def =
            json!({"steps": [{"id": "s1", "task": {"queue": "stead.echo", "input": "${input}"}}]});
        api.put_workflow(WORKFLOW, &def).await?;
        let inputs: Vec<serde_json::Value> = (0..TEMPLATES)
            .map(|i| json!({"order": i, "customer": format!("c{}", i % 7)}))
            .collect();
        sql.query(
            &format!("SELECT {schema}.start_workflows($1, $2::jsonb[])"),
            &[&WORKFLOW, &inputs],
        )
        .await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let row = sql.query_one(&count, &[&WORKFLOW]).await?;
            if row.get::<_, i64>(0) >= TEMPLATES {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the template instances did not end within 60s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    .await;
    node.shutdown().await;
    result
}

/// One `INSERT ... SELECT` per table, cloning templates for clone numbers
/// $1..=$2: the id `stored-<n>` (and its slot), every timestamp moved back.
async fn clone_statements(sql: &Client, schema: &str) -> anyhow::Result<Vec<String>> {
    let templates = format!(
        "(SELECT row_number() OVER (ORDER BY id) - 1 AS k, id FROM {schema}.instances \
         WHERE workflow_name = '{WORKFLOW}' AND NOT starts_with(id, 'stored-') \
         ORDER BY id LIMIT {TEMPLATES})"
    );
    let new_id = "('stored-' || g)";
    let mut statements = Vec::new();
    for (table, id_column) in TABLES {
        let columns = sql
            .query(
                "SELECT column_name::text, data_type::text FROM information_schema.columns \
                 WHERE table_schema = $1 AND table_name = $2 AND is_generated = 'NEVER' \
                 ORDER BY ordinal_position",
                &[&schema, &table],
            )
            .await?;
        let (mut names, mut values) = (Vec::new(), Vec::new());
        for c in &columns {
            let (name, kind): (String, String) = (c.get(0), c.get(1));
            let value = if name == id_column {
                new_id.to_string()
            } else if table == "instances" && name == "slot" {
                format!("{schema}.slot_for{new_id}")
            } else if kind == "timestamp with time zone" {
                format!("t.{name} - g * interval '{SHIFT_MS} milliseconds'")
            } else {
                format!("t.{name}")
            };
            names.push(format!("\"{name}\""));
            values.push(value);
        }
        statements.push(format!(
            "INSERT INTO {schema}.{table} ({}) SELECT {} \
             FROM generate_series($1::bigint, $2::bigint) g \
             JOIN {templates} p ON p.k = g % {TEMPLATES} \
             JOIN {schema}.{table} t ON t.{id_column} = p.id",
            names.join(", "),
            values.join(", ")
        ));
    }
    Ok(statements)
}

/// Deletes a run's instances (not the stored ones), so that the next run
/// drains on the same stored history.
pub async fn remove_run(sql: &Client, schema: &str, workflow: &str) -> anyhow::Result<()> {
    for (table, id_column) in TABLES.iter().rev() {
        sql.execute(
            &format!(
                "DELETE FROM {schema}.{table} WHERE {id_column} IN \
                 (SELECT id FROM {schema}.instances WHERE workflow_name = $1)"
            ),
            &[&workflow],
        )
        .await?;
    }
    // No VACUUM: it would make the deleted rows' pages, spread over the
    // stored history, free space that the next run's inserts then scatter
    // into (a page written whole to the WAL each), which a cluster whose
    // retention deletes its oldest rows does not see.
    Ok(())
}

/// p50 and p99 of the API's reads with the stored instances present:
/// an instance, its history, a filtered page of the list, and the list of a
/// status no stored instance has.
pub async fn api_latency(
    url: &str,
    schema: &str,
    stored: usize,
    samples: usize,
) -> anyhow::Result<String> {
    let mut config = super::prefill::node_config(url, 0, 4);
    config.schema = schema.to_string();
    let node = stead::start(config).await?;
    let result = async {
        let api = node.api_url().context("the node serves no API")?;
        let http = reqwest::Client::new();
        let newest = chrono::Utc::now();
        let span_ms = stored as i64 * SHIFT_MS;
        let mut rng = rand::thread_rng();
        let mut lines = Vec::new();
        for (name, path) in [
            ("GET /v1/instances/{id}", "instance"),
            ("GET /v1/instances/{id}/history", "history"),
            ("GET /v1/instances?workflow=stored&status=completed&created_before=T&limit=50", "page"),
            ("GET /v1/instances?status=failed&limit=50", "failed"),
        ] {
            let mut ms = Vec::with_capacity(samples);
            for i in 0..samples + 10 {
                let n = rng.gen_range(1..=stored.max(1));
                let url = match path {
                    "instance" => format!("{api}/v1/instances/stored-{n}"),
                    "history" => format!("{api}/v1/instances/stored-{n}/history"),
                    "page" => {
                        let before = newest - chrono::Duration::milliseconds(rng.gen_range(0..=span_ms));
                        format!(
                            "{api}/v1/instances?workflow={WORKFLOW}&status=completed&created_before={}&limit=50",
                            before.format("%Y-%m-%dT%H:%M:%S%.3fZ")
                        )
                    }
                    _ => format!("{api}/v1/instances?status=failed&limit=50"),
                };
                let t = Instant::now();
                let answer = http.get(&url).send().await?;
                let status = answer.status();
                answer.bytes().await?;
                if !status.is_success() {
                    bail!("{url}: HTTP {status}");
                }
                if i >= 10 {
                    ms.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            ms.sort_by(f64::total_cmp);
            lines.push(format!(
                "  {name}: p50 {:.2}ms p99 {:.2}ms\n  RESULT stead api {path} stored={stored} p50_ms={:.3} p99_ms={:.3}",
                percentile(&ms, 50.0),
                percentile(&ms, 99.0),
                percentile(&ms, 50.0),
                percentile(&ms, 99.0),
            ));
        }
        Ok::<_, anyhow::Error>(format!(
            "  API reads over {samples} samples each, {stored} ended instances stored:\n{}",
            lines.join("\n")
        ))
    }
    .await;
    node.shutdown().await;
    result
}
