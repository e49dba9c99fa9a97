//! `stead start WORKFLOW --batch FILE.jsonl`: one `{input, id?}` object per
//! line, sent in batches of at most 1000 (the API's limit) while the file is
//! read, so a file of any size runs in bounded memory.

use std::io::BufRead;
use std::path::Path;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::client::ApiClient;

/// Items per request: the API's default `max_batch_start`.
const ITEMS_PER_REQUEST: usize = 1000;

/// Starts every line of `file` (`-` for stdin); returns the totals and the
/// refused items (each with its line number). Fails after sending every line
/// if any item was refused, so that scripts notice.
pub async fn start_file(
    client: &ApiClient,
    workflow: &str,
    version: Option<i32>,
    file: &Path,
) -> anyhow::Result<Value> {
    let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let opened = std::fs::File::open(file)
            .with_context(|| format!("cannot open --batch file {}", file.display()))?;
        Box::new(std::io::BufReader::new(opened))
    };
    let mut totals = Totals::default();
    let mut chunk: Vec<(usize, Value)> = Vec::with_capacity(ITEMS_PER_REQUEST);
    for (index, line) in reader.lines().enumerate() {
        let line_no = index + 1;
        let line = line.with_context(|| format!("{}: reading line {line_no}", file.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let item: Value = serde_json::from_str(&line).with_context(|| {
            format!(
                "{} line {line_no} is not a JSON object {{\"input\": ..., \"id\"?: ...}}",
                file.display()
            )
        })?;
        chunk.push((line_no, item));
        if chunk.len() == ITEMS_PER_REQUEST {
            totals.send(client, workflow, version, &mut chunk).await?;
        }
    }
    if !chunk.is_empty() {
        totals.send(client, workflow, version, &mut chunk).await?;
    }
    let summary = json!({
        "created": totals.created,
        "existing": totals.existing,
        "rejected": totals.rejected.len(),
        "rejected_items": totals.rejected,
    });
    if !totals.rejected.is_empty() {
        bail!(
            "{}\n{} of the file's items were refused (the others were started); see rejected_items",
            serde_json::to_string_pretty(&summary)?,
            totals.rejected.len()
        );
    }
    Ok(summary)
}

#[derive(Default)]
struct Totals {
    created: u64,
    existing: u64,
    rejected: Vec<Value>,
}

impl Totals {
    async fn send(
        &mut self,
        client: &ApiClient,
        workflow: &str,
        version: Option<i32>,
        chunk: &mut Vec<(usize, Value)>,
    ) -> anyhow::Result<()> {
        let items: Vec<Value> = chunk.iter().map(|(_, item)| item.clone()).collect();
        let body = client.start_batch(workflow, &items, version).await?;
        self.created += body["created"].as_u64().unwrap_or(0);
        self.existing += body["existing"].as_u64().unwrap_or(0);
        for result in body["results"].as_array().into_iter().flatten() {
            if result.get("problem").is_some() {
                let index = result["index"].as_u64().unwrap_or(0) as usize;
                let mut refused = result.clone();
                refused["line"] = json!(chunk.get(index).map(|(line, _)| *line));
                self.rejected.push(refused);
            }
        }
        chunk.clear();
        Ok(())
    }
}
