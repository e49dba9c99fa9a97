//! Fault-injection harness for the high-availability tests (`fault.rs`):
//!
//! - [`Workers`]: a group of real `stead serve` processes on one database,
//!   with fast membership settings ([`FAST`]), that can be killed, frozen
//!   (SIGSTOP/SIGCONT), respawned or joined by one more;
//! - [`Load`]: starts instances of a three-step `stead.echo` workflow at a
//!   steady pace over HTTP, round-robin across the processes marked up in
//!   [`Targets`], and records every acknowledged (201/200) id;
//! - [`Sampler`]: samples `stead.slot_owners` every 50ms from its own
//!   connection, and `GET /v1/cluster` of every live process, records any
//!   slot seen with two owners at once, and keeps the owners over time, so
//!   that [`SamplerReport::assert_only_owners_advanced`] can check every
//!   history entry against who held its slot when it was written;
//! - [`Probe`]: a self-reconnecting database connection for the checks
//!   (it survives a PostgreSQL restart) and [`check_invariants`];
//! - [`Proxy`]: a TCP proxy that can blackhole a connection (stop
//!   forwarding both ways without closing anything);
//! - [`PrivatePg`]: a PostgreSQL of one test's own, run by `pg_ctl`, that can
//!   be restarted.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use stead::embedded::Cluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;

use crate::harness::{ClusterDir, SANITY_LIMIT};
use crate::support::{check_histories, echo_chain_workflow};
use crate::{wait_until, ServeProcess};

/// Membership TTL of [`FAST`].
pub const TTL: Duration = Duration::from_millis(2000);

/// Fast failure detection and recovery for every worker of these tests.
pub const FAST: &[&str] = &[
    "--heartbeat-ms",
    "200",
    "--member-ttl-ms",
    "2000",
    "--lease-ms",
    "2000",
    "--reap-interval-ms",
    "200",
    "--poll-interval-ms",
    "100",
];

/// The workflow every load driver starts.
pub const WORKFLOW: &str = "fault";

/// [`FAST`] followed by `extra`.
fn with_fast(extra: &[String]) -> Vec<&str> {
    FAST.iter()
        .copied()
        .chain(extra.iter().map(String::as_str))
        .collect()
}

// ---------------------------------------------------------------------------
// Targets: which processes take HTTP requests
// ---------------------------------------------------------------------------

/// The processes the load driver and the sampler talk to, each marked up or
/// down (a killed, frozen or partitioned process is marked down first).
#[derive(Clone, Default)]
pub struct Targets(Arc<Mutex<Vec<Target>>>);

#[derive(Clone, Debug)]
struct Target {
    name: String,
    url: String,
    up: bool,
}

impl Targets {
    pub fn set(&self, name: &str, url: &str) {
        let mut t = self.0.lock().unwrap();
        match t.iter_mut().find(|t| t.name == name) {
            Some(t) => {
                t.url = url.to_string();
                t.up = true;
            }
            None => t.push(Target {
                name: name.to_string(),
                url: url.to_string(),
                up: true,
            }),
        }
    }

    pub fn set_up(&self, name: &str, up: bool) {
        for t in self.0.lock().unwrap().iter_mut() {
            if t.name == name {
                t.up = up;
            }
        }
    }

    /// (name, base URL) of every process marked up.
    pub fn up(&self) -> Vec<(String, String)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|t| t.up)
            .map(|t| (t.name.clone(), t.url.clone()))
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Workers
// ---------------------------------------------------------------------------

pub struct Worker {
    pub name: String,
    /// The database URL it was given (maybe through a proxy).
    pub db_url: String,
    /// Its arguments beyond [`FAST`].
    pub extra: Vec<String>,
    pub proc: Option<ServeProcess>,
}

/// `stead serve` processes (API and worker roles) on one database.
pub struct Workers {
    pub list: Vec<Worker>,
    pub targets: Targets,
    http: reqwest::Client,
}

impl Workers {
    /// Spawns one process per (name, database URL), one after the other
    /// (the first applies the migrations), and registers [`WORKFLOW`].
    pub async fn start(specs: &[(&str, &str)]) -> Workers {
        Workers::start_with(specs, &[]).await
    }

    /// As [`Workers::start`], every process with arguments beyond [`FAST`].
    pub async fn start_with(specs: &[(&str, &str)], extra: &[String]) -> Workers {
        let mut w = Workers {
            list: Vec::new(),
            targets: Targets::default(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        };
        for (name, url) in specs {
            w.add_with(name, url, extra).await;
        }
        w.register_workflow().await;
        w
    }

    /// Spawns one more process and marks it up.
    pub async fn add(&mut self, name: &str, db_url: &str) {
        self.add_with(name, db_url, &[]).await;
    }

    /// Spawns one more process with arguments beyond [`FAST`].
    pub async fn add_with(&mut self, name: &str, db_url: &str, extra: &[String]) {
        let proc = ServeProcess::spawn(db_url, name, &with_fast(extra)).await;
        self.targets.set(name, &proc.base_url);
        self.list.push(Worker {
            name: name.to_string(),
            db_url: db_url.to_string(),
            extra: extra.to_vec(),
            proc: Some(proc),
        });
    }

    pub fn names(&self) -> Vec<String> {
        self.list.iter().map(|w| w.name.clone()).collect()
    }

    /// Every name but `name`.
    pub fn others(&self, name: &str) -> Vec<String> {
        self.names().into_iter().filter(|n| n != name).collect()
    }

    fn worker_mut(&mut self, name: &str) -> &mut Worker {
        self.list
            .iter_mut()
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("no worker {name}"))
    }

    pub fn proc(&self, name: &str) -> &ServeProcess {
        self.list
            .iter()
            .find(|w| w.name == name)
            .and_then(|w| w.proc.as_ref())
            .unwrap_or_else(|| panic!("worker {name} is not running"))
    }

    /// Marks it down, then SIGKILLs it and waits until it is gone.
    pub fn kill9(&mut self, name: &str) {
        self.targets.set_up(name, false);
        let w = self.worker_mut(name);
        let mut proc = w.proc.take().expect("running");
        tokio::task::block_in_place(|| proc.kill9());
    }

    /// Starts a killed worker again, same name and database URL.
    pub async fn respawn(&mut self, name: &str) {
        let w = self.worker_mut(name);
        assert!(w.proc.is_none(), "{name} is still running");
        let proc = ServeProcess::spawn(&w.db_url, name, &with_fast(&w.extra)).await;
        let url = proc.base_url.clone();
        w.proc = Some(proc);
        self.targets.set(name, &url);
    }

    /// Marks it down and freezes it (SIGSTOP).
    pub fn freeze(&self, name: &str) {
        self.targets.set_up(name, false);
        self.proc(name).signal(libc::SIGSTOP);
    }

    /// Thaws it (SIGCONT) and marks it up.
    pub fn thaw(&self, name: &str) {
        self.proc(name).signal(libc::SIGCONT);
        self.targets.set_up(name, true);
    }

    pub async fn register_workflow(&self) {
        let (_, url) = self.targets.up().into_iter().next().expect("a worker");
        let resp = self
            .http
            .put(format!("{url}/v1/workflows/{WORKFLOW}"))
            .json(&echo_chain_workflow())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        assert!(
            status == 201 || status == 200,
            "registering the workflow: {status} {:?}",
            resp.text().await
        );
    }

    /// Waits until every named process answers `/readyz` with 200.
    pub async fn wait_ready(&self, names: &[String], deadline: Duration) {
        let urls: Vec<(String, String)> = names
            .iter()
            .map(|n| (n.clone(), self.proc(n).base_url.clone()))
            .collect();
        let http = &self.http;
        let urls = &urls;
        wait_until("every worker is ready", deadline, || async move {
            for (name, url) in urls {
                let status = http
                    .get(format!("{url}/readyz"))
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await
                    .map(|r| r.status().as_u16());
                if !matches!(status, Ok(200)) {
                    return Err(format!("{name}: {status:?}"));
                }
            }
            Ok(())
        })
        .await
    }
}

// ---------------------------------------------------------------------------
// Database probe and ownership conditions
// ---------------------------------------------------------------------------

/// A database connection for checks that reconnects after a failure (so it
/// outlives a PostgreSQL restart). Every call is cut off after 5s.
pub struct Probe {
    url: String,
    client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

impl Probe {
    pub fn new(url: &str) -> Probe {
        Probe {
            url: url.to_string(),
            client: tokio::sync::Mutex::new(None),
        }
    }

    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, String> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().map_or(true, |c| c.is_closed()) {
            let connect = tokio_postgres::connect(&self.url, tokio_postgres::NoTls);
            let (client, conn) = tokio::time::timeout(Duration::from_secs(5), connect)
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| format!("connect: {e}"))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            *guard = Some(client);
        }
        let client = guard.as_ref().expect("connected");
        match tokio::time::timeout(Duration::from_secs(5), client.query(sql, params)).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => {
                if client.is_closed() {
                    *guard = None;
                }
                Err(e.to_string())
            }
            Err(_) => {
                *guard = None;
                Err("query timed out".into())
            }
        }
    }

    pub async fn slot_count(&self) -> i64 {
        let rows = self
            .query("SELECT slot_count::int8 FROM stead.cluster", &[])
            .await
            .expect("reading the slot count");
        rows[0].get(0)
    }

    /// Owner name (or `?pid` for a session that is no member) -> number of
    /// slots it holds, as pg_locks shows it.
    pub async fn owners(&self) -> Result<BTreeMap<String, i64>, String> {
        let rows = self
            .query(
                "SELECT coalesce(owner, '?' || backend_pid), count(*) \
                 FROM stead.slot_owners GROUP BY 1",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Member name -> (alive, slots owned), from `stead.members_overview`.
    pub async fn members(&self) -> Result<BTreeMap<String, (bool, i64)>, String> {
        let rows = self
            .query(
                "SELECT name, coalesce(alive, false), slots_owned FROM stead.members_overview",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect())
    }

    /// Ok when every slot is held by one of `names`.
    pub async fn all_owned_by(&self, names: &[String], slot_count: i64) -> Result<(), String> {
        let owners = self.owners().await?;
        let by_them: i64 = owners
            .iter()
            .filter(|(o, _)| names.contains(o))
            .map(|(_, n)| n)
            .sum();
        if by_them == slot_count {
            Ok(())
        } else {
            Err(format!(
                "{by_them}/{slot_count} held by {names:?}; owners: {owners:?}"
            ))
        }
    }

    /// Ok when every one of `names` is alive and holds at least half its fair
    /// share, and together they hold every slot.
    pub async fn balanced(&self, names: &[String], slot_count: i64) -> Result<(), String> {
        let members = self.members().await?;
        for name in names {
            match members.get(name) {
                Some((true, _)) => {}
                other => return Err(format!("{name} is not alive: {other:?}; {members:?}")),
            }
        }
        self.all_owned_by(names, slot_count).await?;
        let owners = self.owners().await?;
        let fair = slot_count / names.len() as i64;
        for name in names {
            let n = owners.get(name).copied().unwrap_or(0);
            if n < fair / 2 {
                return Err(format!("{name} holds {n} slots; owners: {owners:?}"));
            }
        }
        Ok(())
    }
}

/// Polls `check` every 20ms until it is Ok and returns the time since
/// `since`; panics (with the last error) once `deadline` (at least
/// [`SANITY_LIMIT`]) has passed since `since`.
pub async fn measure<F, Fut>(
    what: &str,
    since: Instant,
    deadline: Duration,
    mut check: F,
) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = deadline.max(SANITY_LIMIT);
    loop {
        let left = deadline.saturating_sub(since.elapsed());
        let last = match tokio::time::timeout(left, check()).await {
            Ok(Ok(())) => return since.elapsed(),
            Ok(Err(e)) => e,
            Err(_) => "the check did not finish".into(),
        };
        if since.elapsed() >= deadline {
            panic!("{what}: not done after {deadline:?} (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn median_and_worst(times: &[Duration]) -> (Duration, Duration) {
    let mut t = times.to_vec();
    t.sort();
    (t[t.len() / 2], *t.last().expect("some times"))
}

// ---------------------------------------------------------------------------
// Load driver
// ---------------------------------------------------------------------------

/// Starts `per_second` instances a second, round-robin across the targets
/// that are up, each request on its own (a hung process cannot slow the
/// pace) and cut off after 3s. Only a 201/200 counts as acknowledged.
pub struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
    handle: JoinHandle<LoadReport>,
}

#[derive(Debug)]
pub struct LoadReport {
    pub acked: Vec<String>,
    pub attempted: u64,
    /// Refused, failed or timed-out starts, by kind.
    pub errors: BTreeMap<String, u64>,
}

impl LoadReport {
    pub fn print(&self) {
        println!(
            "load: {} attempted, {} acknowledged, errors {:?}",
            self.attempted,
            self.acked.len(),
            self.errors
        );
    }
}

impl Load {
    pub fn start(targets: Targets, prefix: &str, per_second: u32) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let handle = tokio::spawn(drive(
            targets,
            prefix.to_string(),
            per_second,
            stop.clone(),
            acked.clone(),
        ));
        Load {
            stop,
            acked,
            handle,
        }
    }

    /// Acknowledged so far.
    pub fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Stops starting and waits for the requests in flight.
    pub async fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.await.expect("load driver")
    }
}

async fn drive(
    targets: Targets,
    prefix: String,
    per_second: u32,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
) -> LoadReport {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .connect_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let errors: Arc<Mutex<BTreeMap<String, u64>>> = Default::default();
    let mut inflight = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        while inflight.try_join_next().is_some() {}
        let up = targets.up();
        if up.is_empty() {
            continue;
        }
        n += 1;
        let (_, url) = up[(n as usize) % up.len()].clone();
        let id = format!("{prefix}-{n}");
        let http = http.clone();
        let acked = acked.clone();
        let errors = errors.clone();
        inflight.spawn(async move {
            let result = http
                .post(format!("{url}/v1/workflows/{WORKFLOW}/instances"))
                .json(&json!({"id": id, "input": {"n": n}}))
                .send()
                .await;
            let kind = match result {
                Ok(r) if matches!(r.status().as_u16(), 200 | 201) => {
                    acked.lock().unwrap().push(id);
                    return;
                }
                Ok(r) => format!("status {}", r.status().as_u16()),
                Err(e) if e.is_timeout() => "timeout".to_string(),
                Err(e) if e.is_connect() => "connect".to_string(),
                Err(_) => "other".to_string(),
            };
            *errors.lock().unwrap().entry(kind).or_default() += 1;
        });
    }
    while inflight.join_next().await.is_some() {}
    let acked = acked.lock().unwrap().clone();
    let errors = errors.lock().unwrap().clone();
    LoadReport {
        acked,
        attempted: n,
        errors,
    }
}

// ---------------------------------------------------------------------------
// Slot-ownership sampler
// ---------------------------------------------------------------------------

/// Samples slot ownership during a test: `stead.slot_owners` every 50ms
/// from its own connection (a slot with two backend pids in one sample is a
/// violation), and `GET /v1/cluster` of every process that is up every
/// 200ms (a slot listed for two members in one answer is a violation).
pub struct Sampler {
    stop: Arc<AtomicBool>,
    db: JoinHandle<()>,
    api: JoinHandle<()>,
    report: Arc<Mutex<SamplerReport>>,
}

#[derive(Debug, Default, Clone)]
pub struct SamplerReport {
    pub db_samples: u64,
    pub db_errors: u64,
    pub api_samples: u64,
    pub api_errors: u64,
    pub violations: Vec<String>,
    /// Database time of each pg_locks sample, and slot -> owner (a member's
    /// name, or `?pid` for a session that is no member) in it.
    pub owners: Vec<(DateTime<Utc>, BTreeMap<i32, String>)>,
}

/// The most two samples around an event may be apart for it to be judged:
/// ownership cannot change twice within it.
const MAX_SAMPLE_GAP_MS: i64 = 500;

impl SamplerReport {
    pub fn assert_ok(&self) {
        println!(
            "slot sampler: {} pg_locks samples ({} failed), {} /v1/cluster samples ({} failed), \
             {} violations",
            self.db_samples,
            self.db_errors,
            self.api_samples,
            self.api_errors,
            self.violations.len()
        );
        assert!(
            self.violations.is_empty(),
            "two members held the same slot at once: {:#?}",
            &self.violations[..self.violations.len().min(20)]
        );
        assert!(self.db_samples >= 20, "too few slot samples: {self:?}");
        assert!(
            self.api_samples >= 5,
            "too few /v1/cluster samples: {self:?}"
        );
    }
}

impl SamplerReport {
    /// Checks every history entry written while sampling against the slot
    /// owners around it: the member that wrote it must be the one holding
    /// its instance's slot, measured from the members' own side (the
    /// `member` each advancer writes) against what PostgreSQL granted.
    /// Entries whose surrounding samples disagree or are far apart (an
    /// ownership change, a restart) are not judged; enough others must be.
    pub async fn assert_only_owners_advanced(&self, probe: &Probe) {
        let (Some(first), Some(last)) = (self.owners.first(), self.owners.last()) else {
            panic!("no ownership samples: {self:?}");
        };
        let rows = probe
            .query(
                "SELECT e.created_at, i.slot, e.member, e.instance_id, e.seq \
                 FROM stead.events e JOIN stead.instances i ON i.id = e.instance_id \
                 WHERE e.created_at BETWEEN $1 AND $2",
                &[&first.0, &last.0],
            )
            .await
            .expect("reading the history");
        let (mut judged, mut wrong) = (0, Vec::new());
        for r in &rows {
            let (at, slot): (DateTime<Utc>, i32) = (r.get(0), r.get(1));
            let member: Option<String> = r.get(2);
            let Some(owner) = self.owner_around(at, slot) else {
                continue;
            };
            judged += 1;
            if member.as_deref() != Some(owner) {
                wrong.push(format!(
                    "{} #{} (slot {slot}) written by {member:?} at {at} while {owner} held the slot",
                    r.get::<_, String>(3),
                    r.get::<_, i32>(4)
                ));
            }
        }
        println!(
            "slot exclusivity: {judged} of {} history entries judged against {} ownership \
             samples, {} written by a member not holding the slot",
            rows.len(),
            self.owners.len(),
            wrong.len()
        );
        assert!(
            wrong.is_empty(),
            "members advanced instances of slots they did not hold: {:#?}",
            &wrong[..wrong.len().min(20)]
        );
        assert!(
            judged >= 100,
            "too few history entries judged ({judged} of {}) for the check to mean anything",
            rows.len()
        );
    }

    /// The owner of `slot` in the samples just before and after `at`, if
    /// both agree and are close together.
    fn owner_around(&self, at: DateTime<Utc>, slot: i32) -> Option<&str> {
        let after = self.owners.partition_point(|(t, _)| *t < at);
        let (before, after) = (
            self.owners.get(after.checked_sub(1)?)?,
            self.owners.get(after)?,
        );
        if (after.0 - before.0).num_milliseconds() > MAX_SAMPLE_GAP_MS {
            return None;
        }
        let owner = before.1.get(&slot)?;
        (after.1.get(&slot) == Some(owner)).then_some(owner.as_str())
    }
}

impl Sampler {
    pub fn start(db_url: &str, targets: Targets) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(SamplerReport::default()));
        let db = {
            let (stop, report, probe) = (stop.clone(), report.clone(), Probe::new(db_url));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    // One row, whatever is held: the sample's database time
                    // and, per held slot lock, its backend and owner.
                    let rows = probe
                        .query(
                            "SELECT clock_timestamp(), \
                                    coalesce(array_agg(slot), '{}'), \
                                    coalesce(array_agg(backend_pid), '{}'), \
                                    coalesce(array_agg(coalesce(owner, '?' || backend_pid)), '{}') \
                             FROM stead.slot_owners",
                            &[],
                        )
                        .await;
                    let mut r = report.lock().unwrap();
                    let Ok(rows) = rows else {
                        r.db_errors += 1;
                        continue;
                    };
                    r.db_samples += 1;
                    let row = &rows[0];
                    let (slots, backends, names): (Vec<i32>, Vec<i32>, Vec<String>) =
                        (row.get(1), row.get(2), row.get(3));
                    let mut pids: BTreeMap<i32, BTreeSet<i32>> = BTreeMap::new();
                    let mut owners = BTreeMap::new();
                    for ((slot, pid), name) in slots.into_iter().zip(backends).zip(names) {
                        pids.entry(slot).or_default().insert(pid);
                        owners.insert(slot, name);
                    }
                    r.owners.push((row.get(0), owners));
                    for (slot, p) in pids.iter().filter(|(_, p)| p.len() > 1) {
                        r.violations
                            .push(format!("pg_locks: slot {slot} held by backends {p:?}"));
                    }
                }
            })
        };
        let api = {
            let (stop, report) = (stop.clone(), report.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(1))
                    .build()
                    .unwrap();
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    let fetches = targets.up().into_iter().map(|(name, url)| {
                        let http = http.clone();
                        async move {
                            let body: Result<Value, String> = async {
                                let r = http
                                    .get(format!("{url}/v1/cluster"))
                                    .send()
                                    .await
                                    .map_err(|e| e.to_string())?;
                                if !r.status().is_success() {
                                    return Err(format!("status {}", r.status()));
                                }
                                r.json().await.map_err(|e| e.to_string())
                            }
                            .await;
                            (name, body)
                        }
                    });
                    let answers = futures::future::join_all(fetches).await;
                    let mut r = report.lock().unwrap();
                    for (from, body) in answers {
                        let Ok(body) = body else {
                            r.api_errors += 1;
                            continue;
                        };
                        r.api_samples += 1;
                        let mut holders: BTreeMap<i64, Vec<String>> = BTreeMap::new();
                        for m in body["members"].as_array().into_iter().flatten() {
                            let name = m["name"].as_str().unwrap_or("?").to_string();
                            for s in m["slots"].as_array().into_iter().flatten() {
                                holders
                                    .entry(s.as_i64().unwrap_or(-1))
                                    .or_default()
                                    .push(name.clone());
                            }
                        }
                        for (slot, h) in holders.iter().filter(|(_, h)| h.len() > 1) {
                            r.violations.push(format!(
                                "/v1/cluster of {from}: slot {slot} listed for {h:?}"
                            ));
                        }
                    }
                }
            })
        };
        Sampler {
            stop,
            db,
            api,
            report,
        }
    }

    pub async fn stop(self) -> SamplerReport {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.db.await;
        let _ = self.api.await;
        let r = self.report.lock().unwrap().clone();
        r
    }
}

// ---------------------------------------------------------------------------
// Invariants
// ---------------------------------------------------------------------------

/// Ok when every acknowledged instance exists and every instance in the
/// database has completed; else what is missing.
pub async fn all_completed(probe: &Probe, acked: &[String]) -> Result<(), String> {
    let acked: Vec<String> = acked.to_vec();
    let rows = probe
        .query(
            "SELECT (SELECT count(*) FROM stead.instances WHERE id = ANY($1)), \
                    (SELECT count(*) FROM stead.instances WHERE status <> 'completed'), \
                    (SELECT string_agg(status || '=' || n, ', ') FROM \
                        (SELECT status, count(*) n FROM stead.instances GROUP BY 1) s), \
                    (SELECT string_agg(id, ', ') FROM (SELECT id FROM stead.instances \
                        WHERE status <> 'completed' ORDER BY created_at LIMIT 5) o)",
            &[&acked],
        )
        .await?;
    let (present, open): (i64, i64) = (rows[0].get(0), rows[0].get(1));
    if present == acked.len() as i64 && open == 0 {
        Ok(())
    } else {
        Err(format!(
            "{present}/{} acknowledged present; statuses: {:?}; oldest not completed: {:?}",
            acked.len(),
            rows[0].get::<_, Option<String>>(2),
            rows[0].get::<_, Option<String>>(3),
        ))
    }
}

/// Ok when every acknowledged instance has completed (whatever the others
/// do); else which have not.
pub async fn acked_completed(probe: &Probe, acked: &[String]) -> Result<(), String> {
    let acked: Vec<String> = acked.to_vec();
    let rows = probe
        .query(
            "SELECT count(*) FILTER (WHERE status = 'completed'), \
                    string_agg(id || ' ' || status, ', ') FILTER (WHERE status <> 'completed') \
             FROM stead.instances WHERE id = ANY($1)",
            &[&acked],
        )
        .await?;
    let done: i64 = rows[0].get(0);
    if done == acked.len() as i64 {
        Ok(())
    } else {
        Err(format!(
            "{done}/{} acknowledged instances completed; not completed: {:?}",
            acked.len(),
            rows[0].get::<_, Option<String>>(1)
        ))
    }
}

/// Waits (at most `deadline`) for [`all_completed`].
pub async fn wait_all_completed(probe: &Probe, acked: &[String], deadline: Duration) {
    wait_until("every instance completes", deadline, || {
        all_completed(probe, acked)
    })
    .await
}

/// Sessions of the current database in an open transaction, and the
/// instances not completed, for a failure message.
pub async fn diagnose_stall(probe: &Probe) -> String {
    let sessions = probe
        .query(
            "SELECT pid, state, application_name, client_port, \
                    extract(epoch FROM now() - xact_start)::float8, left(query, 100) \
             FROM pg_stat_activity \
             WHERE datname = current_database() AND xact_start IS NOT NULL \
               AND pid <> pg_backend_pid() ORDER BY xact_start",
            &[],
        )
        .await;
    let sessions: Vec<String> = match sessions {
        Ok(rows) => rows
            .iter()
            .map(|r| {
                format!(
                    "pid {} {:?} {:?} port {:?} in transaction for {:.1}s: {:?}",
                    r.get::<_, i32>(0),
                    r.get::<_, Option<String>>(1),
                    r.get::<_, Option<String>>(2),
                    r.get::<_, Option<i32>>(3),
                    r.get::<_, Option<f64>>(4).unwrap_or(0.0),
                    r.get::<_, Option<String>>(5),
                )
            })
            .collect(),
        Err(e) => vec![e],
    };
    let open = probe
        .query(
            "SELECT i.id, i.status, i.slot, \
                    (SELECT string_agg(t.step_id || ':' || t.status, ',') FROM stead.tasks t \
                     WHERE t.instance_id = i.id), \
                    (SELECT owner FROM stead.slot_owners o WHERE o.slot = i.slot) \
             FROM stead.instances i WHERE i.status <> 'completed' ORDER BY i.created_at LIMIT 10",
            &[],
        )
        .await;
    let open: Vec<String> = match open {
        Ok(rows) => rows
            .iter()
            .map(|r| {
                format!(
                    "{} {} slot {} tasks {:?} slot owner {:?}",
                    r.get::<_, String>(0),
                    r.get::<_, String>(1),
                    r.get::<_, i32>(2),
                    r.get::<_, Option<String>>(3),
                    r.get::<_, Option<String>>(4),
                )
            })
            .collect(),
        Err(e) => vec![e],
    };
    format!("sessions in a transaction: {sessions:#?}\ninstances not completed: {open:#?}")
}

/// After [`wait_all_completed`]: every acknowledged instance completed with
/// its own output; no step result recorded twice; every history numbered
/// 1..n without gaps or duplicates (and agreeing with the instance row);
/// no task rows left. Prints the counts and latencies.
/// Stops the load and the sampler, waits (within `deadline`) until every
/// acknowledged start has completed, and checks the invariants and the
/// sampled slot ownership; returns the load's report.
pub async fn stop_and_check(
    load: Load,
    sampler: Sampler,
    probe: &Probe,
    deadline: Duration,
) -> LoadReport {
    let report = load.stop().await;
    report.print();
    wait_all_completed(probe, &report.acked, deadline).await;
    let sampled = sampler.stop().await;
    check_invariants(probe, &report.acked).await;
    sampled.assert_ok();
    sampled.assert_only_owners_advanced(probe).await;
    report
}

pub async fn check_invariants(probe: &Probe, acked: &[String]) {
    let acked: Vec<String> = acked.to_vec();
    let q = |sql: &'static str| async move { probe.query(sql, &[]).await.expect(sql) };

    let rows = probe
        .query(
            "SELECT count(*) FROM stead.instances WHERE id = ANY($1) AND status = 'completed'",
            &[&acked],
        )
        .await
        .unwrap();
    assert_eq!(
        rows[0].get::<_, i64>(0),
        acked.len() as i64,
        "every acknowledged instance completed"
    );

    let wrong = q("SELECT id FROM stead.instances \
         WHERE status <> 'completed' \
            OR output IS DISTINCT FROM jsonb_build_object('n', input->'n', 'at', 3)")
    .await;
    let wrong: Vec<String> = wrong.iter().map(|r| r.get(0)).collect();
    assert!(
        wrong.is_empty(),
        "instances not completed with their own output: {wrong:?}"
    );

    check_histories(probe, 3).await;

    let stats = q("SELECT count(*), \
            percentile_cont(0.5) WITHIN GROUP \
                (ORDER BY extract(epoch FROM ended_at - created_at)::float8), \
            max(extract(epoch FROM ended_at - created_at)::float8) \
         FROM stead.instances")
    .await;
    println!(
        "invariants hold: {} instances ({} acknowledged), start-to-end latency p50 {:.2}s, \
         max {:.2}s",
        stats[0].get::<_, i64>(0),
        acked.len(),
        stats[0].get::<_, Option<f64>>(1).unwrap_or(0.0),
        stats[0].get::<_, Option<f64>>(2).unwrap_or(0.0),
    );
}

// ---------------------------------------------------------------------------
// Blackhole proxy
// ---------------------------------------------------------------------------

/// A TCP proxy on 127.0.0.1 to `127.0.0.1:upstream`. While blackholed it
/// moves no byte in either direction and closes nothing (no FIN, no RST):
/// it stops reading, so the peers' data sits in socket buffers, and holds
/// back connection ends and new connections until it is switched back.
pub struct Proxy {
    pub port: u16,
    blackholed: watch::Sender<bool>,
    /// Added to every chunk forwarded, in milliseconds (a slow link).
    latency_ms: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (blackholed, rx) = watch::channel(false);
        let latency_ms = Arc::new(AtomicU64::new(0));
        let latency = latency_ms.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((down, _)) = listener.accept().await else {
                    continue;
                };
                let mut rx = rx.clone();
                let latency = latency.clone();
                tokio::spawn(async move {
                    open(&mut rx).await;
                    let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    let _ = down.set_nodelay(true);
                    let _ = up.set_nodelay(true);
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::join!(
                        pump(dr, uw, rx.clone(), latency.clone()),
                        pump(ur, dw, rx, latency)
                    );
                });
            }
        });
        Proxy {
            port,
            blackholed,
            latency_ms,
            accept,
        }
    }

    pub fn blackhole(&self, on: bool) {
        self.blackholed.send_replace(on);
    }

    /// Delay every chunk by `latency` in each direction from now on.
    pub fn set_latency(&self, latency: Duration) {
        self.latency_ms
            .store(latency.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Waits until the proxy is not blackholed.
async fn open(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|b| !*b).await;
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut rx: watch::Receiver<bool>,
    latency_ms: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        open(&mut rx).await;
        let read = tokio::select! {
            r = from.read(&mut buf) => r,
            // Blackholed while waiting for data: stop reading (a TCP read
            // is cancel-safe).
            _ = rx.wait_for(|b| *b) => continue,
        };
        let latency = latency_ms.load(Ordering::SeqCst);
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        // Whatever was read is held back until the blackhole ends.
        open(&mut rx).await;
        match read {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// `url` with its port replaced (`postgresql://user@host:PORT/db`).
pub fn with_port(url: &str, port: u16) -> String {
    let (head, rest) = url.rsplit_once(':').expect("a port in the URL");
    let path = &rest[rest.find('/').unwrap_or(rest.len())..];
    format!("{head}:{port}{path}")
}

/// The port of `postgresql://user@host:PORT/db`.
pub fn port_of(url: &str) -> u16 {
    let (_, rest) = url.rsplit_once(':').expect("a port in the URL");
    rest[..rest.find('/').unwrap_or(rest.len())]
        .parse()
        .expect("a numeric port")
}

// ---------------------------------------------------------------------------
// A private PostgreSQL that can be restarted
// ---------------------------------------------------------------------------

/// A PostgreSQL of its own, run by `pg_ctl` (not as our child: `pg_ctl
/// restart` must be able to replace it), in a [`ClusterDir`] that stops it
/// and removes it on drop.
pub struct PrivatePg {
    pub cluster: Cluster,
    /// URL of its database `stead`.
    pub url: String,
    dir: ClusterDir,
}

impl PrivatePg {
    pub async fn start() -> PrivatePg {
        let dir = ClusterDir::new("fault");
        let cluster = crate::harness::init_cluster(&dir).await;
        let mut pg = PrivatePg {
            cluster,
            url: String::new(),
            dir,
        };
        pg.url = pg.cluster.start().await.expect("pg_ctl start");
        pg
    }

    /// `pg_ctl restart -m MODE -w` (the server keeps its options and port).
    pub async fn restart(&self, mode: &str) {
        let (cluster, m) = (self.cluster.clone(), mode.to_string());
        tokio::task::spawn_blocking(move || cluster.restart(&m))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("pg_ctl restart -m {mode}: {e}"));
    }
}

// ---------------------------------------------------------------------------
// A primary with a synchronous streaming standby
// ---------------------------------------------------------------------------

/// A primary and a standby made from it with `pg_basebackup`, streaming,
/// with synchronous replication (`synchronous_standby_names`, commits wait
/// for the standby's flush): what a managed PostgreSQL with a hot standby
/// runs.
pub struct ReplicatedPg {
    pub primary: Cluster,
    pub standby: Cluster,
    _dirs: (ClusterDir, ClusterDir),
}

/// The standby's `application_name`, which the primary waits for.
const STANDBY_NAME: &str = "standby1";

/// `program` run as the server's OS user (as root, `postgres`).
pub fn as_server_user(program: std::path::PathBuf) -> std::process::Command {
    match stead::embedded::RunAs::detect().expect("whom to run PostgreSQL as") {
        stead::embedded::RunAs::User { name, .. } => {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", &name, "--"]).arg(program);
            c
        }
        stead::embedded::RunAs::CurrentUser => std::process::Command::new(program),
    }
}

pub fn run_ok(mut cmd: std::process::Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn append(path: &std::path::Path, text: &str) {
    let mut all = std::fs::read_to_string(path).unwrap();
    all.push_str(text);
    std::fs::write(path, all).unwrap();
}

impl ReplicatedPg {
    pub async fn start() -> ReplicatedPg {
        let primary_dir = ClusterDir::new("primary");
        let mut primary = crate::harness::init_cluster(&primary_dir).await;
        append(
            &primary.pgdata().join("postgresql.conf"),
            "\nwal_level = replica\nmax_wal_senders = 4\nsynchronous_commit = on\n",
        );
        // Synchronous only once the standby exists: until then every commit
        // (the start's CREATE DATABASE too) would wait for it.
        primary.start().await.expect("pg_ctl start (primary)");

        let standby_dir = ClusterDir::new("standby");
        std::fs::create_dir_all(&standby_dir.path).unwrap();
        let owner = std::fs::metadata(primary.pgdata()).unwrap();
        use std::os::unix::fs::MetadataExt;
        std::os::unix::fs::chown(&standby_dir.path, Some(owner.uid()), Some(owner.gid())).unwrap();
        let bins = stead::embedded::PgBinaries::find().expect("PostgreSQL binaries");
        let basebackup = bins.bin_dir.join("pg_basebackup");
        let mut cmd = as_server_user(if basebackup.exists() {
            basebackup
        } else {
            "pg_basebackup".into()
        });
        let conninfo = format!(
            "host=127.0.0.1 port={} user=stead application_name={STANDBY_NAME}",
            primary.port
        );
        cmd.arg("-d")
            .arg(&conninfo)
            .arg("-D")
            .arg(standby_dir.path.join("pgdata"))
            .args(["-X", "stream", "-R", "-c", "fast"]);
        tokio::task::block_in_place(|| run_ok(cmd, "pg_basebackup"));
        // -R wrote standby.signal; name the standby so the primary waits for it.
        append(
            &standby_dir.path.join("pgdata/postgresql.auto.conf"),
            // Once promoted it runs alone: it waits for no standby of its own.
            &format!("\nprimary_conninfo = '{conninfo}'\nsynchronous_standby_names = ''\n"),
        );
        let mut standby = crate::harness::init_cluster(&standby_dir).await;
        standby.start().await.expect("pg_ctl start (standby)");
        let probe = Probe::new(&primary.url("stead"));
        for sql in [
            format!("ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'"),
            "SELECT pg_reload_conf()".to_string(),
        ] {
            probe.query(&sql, &[]).await.expect(&sql);
        }
        let pg = ReplicatedPg {
            primary,
            standby,
            _dirs: (primary_dir, standby_dir),
        };
        pg.wait_synchronous().await;
        pg
    }

    /// Both hosts, primary first; libpq's (and stead's) connections pick
    /// whichever accepts writes.
    pub fn url(&self) -> String {
        format!(
            "postgresql://stead@127.0.0.1:{},127.0.0.1:{}/stead?target_session_attrs=read-write",
            self.primary.port, self.standby.port
        )
    }

    async fn wait_synchronous(&self) {
        let probe = Probe::new(&self.primary.url("stead"));
        wait_until(
            "the standby streams synchronously",
            SANITY_LIMIT,
            || async {
                let rows = probe
                    .query(
                        "SELECT 1 FROM pg_stat_replication WHERE application_name = $1 \
                     AND sync_state = 'sync' AND state = 'streaming'",
                        &[&STANDBY_NAME],
                    )
                    .await?;
                if rows.is_empty() {
                    Err("not streaming synchronously yet".to_string())
                } else {
                    Ok(())
                }
            },
        )
        .await
    }

    /// Promotes the standby (`pg_ctl promote -w`), then stops the old
    /// primary at once (`-m immediate`, as a crash), so it can take no more
    /// connections.
    pub async fn fail_over(&self) {
        let bins = stead::embedded::PgBinaries::find().expect("PostgreSQL binaries");
        let mut promote = as_server_user(bins.pg_ctl());
        promote
            .arg("promote")
            .arg("-D")
            .arg(self.standby.pgdata())
            .args(["-w", "-t", "30"]);
        let mut stop = as_server_user(bins.pg_ctl());
        stop.arg("stop").arg("-D").arg(self.primary.pgdata()).args([
            "-m",
            "immediate",
            "-w",
            "-t",
            "30",
        ]);
        tokio::task::block_in_place(|| {
            run_ok(promote, "pg_ctl promote");
            run_ok(stop, "pg_ctl stop (old primary)");
        });
    }
}
