//! `stead bench --failover`: how long the slots of a failed worker take to
//! move. It runs a private PostgreSQL and `--processes` real `stead serve`
//! processes (this binary), then, round after round, `kill -9`s one (and
//! later freezes one with SIGSTOP), timing until the survivors own every
//! slot as `GET /v1/cluster` shows it, and how long the respawned (or
//! thawed) one takes to rejoin. It prints the median and worst of each.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long any one wait of the bench may take before it gives up.
const GIVE_UP: Duration = Duration::from_secs(120);
/// How often the cluster is looked at while waiting.
const POLL: Duration = Duration::from_millis(10);

/// The settings of a failover run (from `stead bench --failover ...`).
#[derive(Debug, Clone)]
pub struct FailoverArgs {
    pub processes: usize,
    pub rounds: usize,
    pub heartbeat_ms: u64,
    pub member_ttl_ms: u64,
}

/// A `stead serve` child of the bench.
struct Worker {
    name: String,
    url: String,
    child: Option<Child>,
}

pub async fn run(args: FailoverArgs) -> anyhow::Result<()> {
    if args.processes < 2 || args.rounds == 0 {
        bail!("--processes must be at least 2 and --rounds at least 1");
    }
    let dir = std::env::temp_dir().join(format!("stead-failover-{}", std::process::id()));
    let (cluster, db_url) = super::dev::start_cluster(&dir).await?;
    let result = measure(&args, &db_url).await;
    let _ = cluster.stop();
    let _ = std::fs::remove_dir_all(&dir);
    println!("{}", result?);
    Ok(())
}

async fn measure(args: &FailoverArgs, db_url: &str) -> anyhow::Result<String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let mut workers = Vec::new();
    for n in 1..=args.processes {
        workers.push(spawn(args, db_url, &format!("failover-{n}")).await?);
    }
    wait_balanced(&http, &workers).await?;
    let (mut killed, mut stopped, mut rejoined) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let victim = round % workers.len();
        let t = Instant::now();
        if let Some(mut child) = workers[victim].child.take() {
            child.kill().await?;
        }
        killed.push(wait_taken_over(&http, &workers, victim, t).await?);
        workers[victim] = spawn(args, db_url, &workers[victim].name.clone()).await?;
        rejoined.push(wait_balanced(&http, &workers).await?);
    }
    for round in 0..args.rounds {
        let victim = round % workers.len();
        let pid = workers[victim].child.as_ref().and_then(Child::id);
        let pid = pid.context("a running worker")? as libc::pid_t;
        let t = Instant::now();
        // SAFETY: plain syscalls on our own child.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let took = wait_taken_over(&http, &workers, victim, t).await;
        unsafe { libc::kill(pid, libc::SIGCONT) };
        stopped.push(took?);
        wait_balanced(&http, &workers).await?;
    }
    for w in &mut workers {
        if let Some(mut child) = w.child.take() {
            let _ = child.kill().await;
        }
    }
    Ok(report(args, &killed, &stopped, &rejoined))
}

fn report(args: &FailoverArgs, killed: &[f64], stopped: &[f64], rejoined: &[f64]) -> String {
    let line = |what: &str, times: &[f64]| {
        let mut t = times.to_vec();
        t.sort_by(f64::total_cmp);
        format!(
            "{what:<34} median {:.2}s  worst {:.2}s  ({} runs)",
            t[t.len() / 2],
            t[t.len() - 1],
            t.len()
        )
    };
    format!(
        "stead bench --failover: {} processes, heartbeat {}ms, member TTL {}ms, private PostgreSQL\n{}\n{}\n{}",
        args.processes,
        args.heartbeat_ms,
        args.member_ttl_ms,
        line("kill -9: survivors own every slot", killed),
        line("SIGSTOP: others own every slot", stopped),
        line("respawned worker rebalanced", rejoined),
    )
}

/// Starts `stead serve` (this binary) as `name`; returns once it listens.
async fn spawn(args: &FailoverArgs, db_url: &str, name: &str) -> anyhow::Result<Worker> {
    let exe = std::env::current_exe().context("finding the stead binary")?;
    let mut child = Command::new(exe)
        .args(["serve", "--database-url", db_url, "--listen", "127.0.0.1:0"])
        // A private benchmark cluster on loopback.
        .args(["--auth", "none"])
        .args(["--name", name])
        .args(["--heartbeat-ms", &args.heartbeat_ms.to_string()])
        .args(["--member-ttl-ms", &args.member_ttl_ms.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting stead serve")?;
    let stdout = child.stdout.take().context("its output")?;
    let mut lines = BufReader::new(stdout).lines();
    let url = tokio::time::timeout(GIVE_UP, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(addr) = line.strip_prefix("stead listening on ") {
                return Ok(addr.trim().to_string());
            }
        }
        bail!("stead serve {name} exited before it listened")
    })
    .await
    .context("stead serve did not listen in time")??;
    // Keep reading its output so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Worker {
        name: name.to_string(),
        url,
        child: Some(child),
    })
}

/// Slots per member name and the slot count, as a node's `/v1/cluster`
/// shows them (from PostgreSQL's locks).
async fn cluster(
    http: &reqwest::Client,
    url: &str,
) -> anyhow::Result<(Vec<(String, usize)>, usize)> {
    let body: Value = http
        .get(format!("{url}/v1/cluster"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let members = body["members"]
        .as_array()
        .context("members")?
        .iter()
        .map(|m| {
            let slots = m["slots"].as_array().map_or(0, Vec::len);
            (m["name"].as_str().unwrap_or_default().to_string(), slots)
        })
        .collect();
    let slot_count = body["slot_count"].as_u64().context("slot_count")? as usize;
    Ok((members, slot_count))
}

/// The slots `names` own between them.
fn owned_by(members: &[(String, usize)], names: &[&str]) -> usize {
    members
        .iter()
        .filter(|(n, _)| names.contains(&n.as_str()))
        .map(|(_, s)| s)
        .sum()
}

/// Waits until every slot is owned and every worker owns some; returns the
/// seconds it took.
async fn wait_balanced(http: &reqwest::Client, workers: &[Worker]) -> anyhow::Result<f64> {
    let t = Instant::now();
    let names: Vec<&str> = workers.iter().map(|w| w.name.as_str()).collect();
    while t.elapsed() < GIVE_UP {
        if let Ok((members, slots)) = cluster(http, &workers[0].url).await {
            let owns = |name: &str| members.iter().any(|(n, s)| n == name && *s > 0);
            if owned_by(&members, &names) == slots && names.iter().all(|n| owns(n)) {
                return Ok(t.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(POLL).await;
    }
    bail!("the workers did not share the slots within {GIVE_UP:?}")
}

/// Waits until the workers other than `victim` own every slot; returns the
/// seconds since `since`.
async fn wait_taken_over(
    http: &reqwest::Client,
    workers: &[Worker],
    victim: usize,
    since: Instant,
) -> anyhow::Result<f64> {
    let survivor = &workers[(victim + 1) % workers.len()].url;
    let others: Vec<&str> = workers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, w)| w.name.as_str())
        .collect();
    let mut last = None;
    while since.elapsed() < GIVE_UP {
        match cluster(http, survivor).await {
            Ok((members, slots)) if owned_by(&members, &others) == slots => {
                return Ok(since.elapsed().as_secs_f64());
            }
            seen => last = Some(seen),
        }
        tokio::time::sleep(POLL).await;
    }
    let victim = &workers[victim].name;
    bail!("the slots of {victim} did not move within {GIVE_UP:?} (last seen: {last:?})")
}
