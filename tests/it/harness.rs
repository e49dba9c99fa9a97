//! Integration-test harness: a private PostgreSQL per test process with a
//! fresh database per test ([`TestDb`]), the real `stead serve` binary as a
//! child process ([`ServeProcess`]), and polling with deadlines
//! ([`wait_until`]).
//!
//! Nothing here depends on the rest of stead except `stead::embedded`.
#![allow(dead_code)]

use std::fmt::Debug;
use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use stead::embedded::{remove_dead_test_dirs, shared_test_server, stop_now, SharedServer};

// ---------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------

/// The test process's private PostgreSQL (`stead::embedded`'s shared test
/// server: started by whichever test comes first, gone with the process).
fn shared_pg() -> &'static SharedServer {
    shared_test_server().unwrap_or_else(|e| panic!("test PostgreSQL is not available: {e}"))
}

/// A fresh database in the test process's private PostgreSQL, dropped
/// (with whatever is still connected to it) when the last clone goes.
#[derive(Debug, Clone)]
pub struct TestDb {
    pub url: String,
    pub name: String,
    _dropped_with: Arc<DropDatabase>,
}

/// Drops its database on drop.
#[derive(Debug)]
struct DropDatabase {
    admin_url: String,
    name: String,
}

impl Drop for DropDatabase {
    fn drop(&mut self) {
        // A plain thread with a runtime of its own: this may run inside a
        // test's runtime, which cannot block on another future.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let (client, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| e.to_string())?;
                let conn = tokio::spawn(conn);
                let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                let result = client.batch_execute(&sql).await.map_err(|e| e.to_string());
                drop(client);
                let _ = conn.await;
                result
            })
        })
        .join();
        if let Ok(Err(e)) | Err(e) = dropped.map_err(|_| "panicked".to_string()) {
            eprintln!("dropping test database {}: {e}", self.name);
        }
    }
}

impl TestDb {
    pub async fn new() -> TestDb {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let pg = tokio::task::spawn_blocking(shared_pg)
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("t_{n}_{:08x}", random_u64() as u32);
        let (client, conn) = tokio_postgres::connect(&pg.url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to the test PostgreSQL at {}: {e}", pg.url));
        let conn = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        drop(client);
        let _ = conn.await;
        TestDb {
            url: pg.cluster.url(&name),
            _dropped_with: Arc::new(DropDatabase {
                admin_url: pg.url.clone(),
                name: name.clone(),
            }),
            name,
        }
    }

    /// URL of the server's `postgres` database (for admin work).
    pub fn admin_url(&self) -> String {
        shared_pg().url.clone()
    }

    /// A connected client; its connection runs on the current runtime.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.url));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

// ---------------------------------------------------------------------------
// stead serve
// ---------------------------------------------------------------------------

const LISTENING: &str = "stead listening on http://";

/// A `stead serve` child process. Its stdout and stderr are drained into a
/// buffer for its whole life ([`ServeProcess::output`]), printed if the test
/// panics. Dropping it kills it.
pub struct ServeProcess {
    /// `http://HOST:PORT` from the `stead listening on` line.
    pub base_url: String,
    pub name: String,
    pid: u32,
    exit: Arc<ExitState>,
    output: Arc<Mutex<String>>,
}

struct ExitState {
    status: Mutex<Option<ExitStatus>>,
    changed: Condvar,
}

/// `--auth none` and loopback open to `http` steps (the tests' servers),
/// unless the extra arguments choose either themselves.
fn open_unless_keyed(extra: &[&str]) -> Vec<&'static str> {
    let mut args = Vec::new();
    if !extra.contains(&"--auth") {
        args.extend(["--auth", "none"]);
    }
    if !extra.contains(&"--http-allow") {
        args.extend(["--http-allow", "127.0.0.0/8,::1"]);
    }
    args
}

impl ServeProcess {
    /// `stead serve --database-url DB_URL --listen 127.0.0.1:0 --name NAME
    /// EXTRA...`; returns once it printed `stead listening on http://...`
    /// (panics after 60s, or if it exits first, showing its output).
    pub async fn spawn(db_url: &str, name: &str, extra: &[&str]) -> ServeProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stead"));
        cmd.args([
            "serve",
            "--database-url",
            db_url,
            "--listen",
            "127.0.0.1:0",
            "--name",
            name,
        ])
        .args(open_unless_keyed(extra))
        .args(extra);
        Self::spawn_command(cmd, name).await
    }

    /// Run any `stead` command line that prints the listening line.
    pub async fn spawn_command(mut cmd: Command, name: &str) -> ServeProcess {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls. If this test process dies,
        // the server dies too (the supervisor thread below lives as long as
        // the child, so the death signal fires only when the process goes).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }

        let output = Arc::new(Mutex::new(String::new()));
        let exit = Arc::new(ExitState {
            status: Mutex::new(None),
            changed: Condvar::new(),
        });
        let (line_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
        let (pid_tx, pid_rx) = tokio::sync::oneshot::channel();
        {
            let output = output.clone();
            let exit = exit.clone();
            std::thread::Builder::new()
                .name(format!("serve-{name}"))
                .spawn(move || {
                    let mut child = match cmd.spawn() {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = pid_tx.send(Err(e));
                            return;
                        }
                    };
                    let readers = [
                        drain(
                            child.stdout.take().unwrap(),
                            output.clone(),
                            line_tx.clone(),
                        ),
                        drain(child.stderr.take().unwrap(), output, line_tx),
                    ];
                    let _ = pid_tx.send(Ok(child.id()));
                    // Leave the zombie until the exit is recorded, so that
                    // kill9 (under the same lock) never hits a reused pid.
                    wait_exited_nowait(child.id());
                    let mut status = exit.status.lock().unwrap();
                    *status = Some(child.wait().expect("waiting for stead"));
                    drop(status);
                    exit.changed.notify_all();
                    for r in readers {
                        let _ = r.join();
                    }
                })
                .expect("spawning a thread");
        }
        let pid = match pid_rx.await.expect("supervisor thread") {
            Ok(pid) => pid,
            Err(e) => panic!("could not run {}: {e}", env!("CARGO_BIN_EXE_stead")),
        };
        let mut proc = ServeProcess {
            base_url: String::new(),
            name: name.to_string(),
            pid,
            exit,
            output,
        };

        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, lines.recv()).await {
                Ok(Some(line)) => {
                    if let Some(addr) = listening_addr(&line) {
                        proc.base_url = format!("http://{addr}");
                        return proc;
                    }
                }
                Ok(None) => {
                    let status = proc.wait_exit(Duration::from_secs(10));
                    panic!(
                        "stead {name} exited ({status:?}) before listening; output:\n{}",
                        proc.output()
                    );
                }
                Err(_) => {
                    proc.kill9();
                    panic!(
                        "stead {name} did not print `{LISTENING}...` within 60s; output:\n{}",
                        proc.output()
                    );
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Everything it printed so far (stdout and stderr, interleaved by line).
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Its exit status, if it has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.status.lock().unwrap()
    }

    /// Send a signal (e.g. `libc::SIGTERM`) unless it has exited.
    pub fn signal(&self, sig: libc::c_int) {
        let status = self.exit.status.lock().unwrap();
        if status.is_none() {
            // SAFETY: the child is not reaped while we hold the lock.
            unsafe {
                libc::kill(self.pid as libc::pid_t, sig);
            }
        }
    }

    /// SIGKILL and wait for it to be gone.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        if self.wait_exit(Duration::from_secs(30)).is_none() {
            panic!("stead {} (pid {}) survived SIGKILL", self.name, self.pid);
        }
    }

    /// Wait (blocking, at most `timeout`) for it to exit.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        self.exit.wait(timeout)
    }

    /// Wait (at most `timeout`) for it to exit, without blocking the runtime.
    pub async fn wait_exit_async(&self, timeout: Duration) -> Option<ExitStatus> {
        let exit = self.exit.clone();
        tokio::task::spawn_blocking(move || exit.wait(timeout))
            .await
            .expect("waiting for stead")
    }
}

impl ExitState {
    fn wait(&self, timeout: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + timeout;
        let mut status = self.status.lock().unwrap();
        while status.is_none() {
            let now = Instant::now();
            if now >= until {
                return None;
            }
            status = self.changed.wait_timeout(status, until - now).unwrap().0;
        }
        *status
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.wait_exit(Duration::from_secs(30));
        if std::thread::panicking() {
            eprintln!(
                "----- output of stead {} (pid {}) -----\n{}----- end of output of stead {} -----",
                self.name,
                self.pid,
                self.output(),
                self.name
            );
        }
    }
}

/// `HOST:PORT` from a line containing `stead listening on http://HOST:PORT`
/// (plain, JSON log or coloured: the address ends at the first character
/// that cannot be part of it).
fn listening_addr(line: &str) -> Option<String> {
    let at = line.find(LISTENING)? + LISTENING.len();
    let addr: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']' | '-'))
        .collect();
    let port = addr.rsplit_once(':')?.1;
    port.parse::<u16>().ok().filter(|p| *p != 0)?;
    Some(addr)
}

fn drain(
    stream: impl Read + Send + 'static,
    output: Arc<Mutex<String>>,
    lines: tokio::sync::mpsc::UnboundedSender<String>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']);
                    {
                        let mut out = output.lock().unwrap();
                        out.push_str(line);
                        out.push('\n');
                    }
                    let _ = lines.send(line.to_string());
                }
            }
        }
    })
}

fn wait_exited_nowait(pid: u32) {
    loop {
        // SAFETY: siginfo_t is plain data filled in by waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/// What a [`wait_until`] condition returns: `true`, `Some(v)` or `Ok(v)`
/// mean done.
pub trait Outcome {
    type Value;
    fn into_done(self) -> Result<Self::Value, String>;
}

impl Outcome for bool {
    type Value = ();
    fn into_done(self) -> Result<(), String> {
        if self {
            Ok(())
        } else {
            Err("false".into())
        }
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn into_done(self) -> Result<T, String> {
        self.ok_or_else(|| "None".into())
    }
}

impl<T, E: Debug> Outcome for Result<T, E> {
    type Value = T;
    fn into_done(self) -> Result<T, String> {
        self.map_err(|e| format!("{e:?}"))
    }
}

/// The least time any wait of the suite allows: a deadline is a sanity
/// limit against a hang, never a speed requirement (speed is measured by
/// `stead bench`), so a loaded machine cannot make a test fail.
pub const SANITY_LIMIT: Duration = Duration::from_secs(60);

/// Poll `f` every ~50ms until it returns `true` / `Some(v)` / `Ok(v)` and
/// return `()` / `v`; panic naming `what` (and the last `Err`) after
/// `deadline` (at least [`SANITY_LIMIT`]). A call of `f` that hangs is cut
/// off at the deadline too.
pub async fn wait_until<F, Fut, O>(what: &str, deadline: Duration, mut f: F) -> O::Value
where
    F: FnMut() -> Fut,
    Fut: Future<Output = O>,
    O: Outcome,
{
    let deadline = deadline.max(SANITY_LIMIT);
    let start = Instant::now();
    let until = start + deadline;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let last = match tokio::time::timeout(left, f()).await {
            Ok(outcome) => match outcome.into_done() {
                Ok(v) => return v,
                Err(e) => e,
            },
            Err(_) => "the check itself did not finish".to_string(),
        };
        if Instant::now() >= until {
            panic!("timed out after {deadline:?} waiting for {what} (last result: {last})");
        }
        tokio::time::sleep(Duration::from_millis(50).min(until - Instant::now())).await;
    }
}

/// Where the test PostgreSQL keeps its files (for debugging).
pub fn test_pg_dir() -> PathBuf {
    shared_pg().cluster.data_dir.clone()
}

// ---------------------------------------------------------------------------
// Directories of PostgreSQL servers run by pg_ctl
// ---------------------------------------------------------------------------

const CLUSTER_DIR_PREFIX: &str = "stead-pg-";

/// The directory of a PostgreSQL cluster that outlives its starter (run by
/// `pg_ctl`, as `stead dev` and [`crate::fault_harness::PrivatePg`] do). On
/// drop, even when the test panics, its server is stopped (`-m immediate`)
/// and the directory removed; those of test processes that died are cleaned
/// up by the next [`ClusterDir::new`].
pub struct ClusterDir {
    pub path: PathBuf,
}

impl ClusterDir {
    pub fn new(what: &str) -> ClusterDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        remove_dead_test_dirs(CLUSTER_DIR_PREFIX);
        let path = std::env::temp_dir().join(format!(
            "{CLUSTER_DIR_PREFIX}{}-{what}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        if path.exists() {
            stop_now(&path);
            let _ = std::fs::remove_dir_all(&path);
        }
        ClusterDir { path }
    }
}

/// `initdb` of a new cluster in `dir` (not started).
pub async fn init_cluster(dir: &ClusterDir) -> stead::embedded::Cluster {
    let path = dir.path.clone();
    tokio::task::spawn_blocking(move || {
        let bins = stead::embedded::PgBinaries::find().expect("PostgreSQL binaries");
        let run_as = stead::embedded::RunAs::detect().expect("whom to run PostgreSQL as");
        stead::embedded::Cluster::init(&bins, &run_as, &path).expect("initdb")
    })
    .await
    .unwrap()
}

impl Drop for ClusterDir {
    fn drop(&mut self) {
        stop_now(&self.path);
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod self_tests {
    use super::*;

    #[test]
    fn parses_listening_lines() {
        assert_eq!(
            listening_addr("stead listening on http://127.0.0.1:4321").as_deref(),
            Some("127.0.0.1:4321")
        );
        assert_eq!(
            listening_addr(
                r#"{"level":"INFO","message":"stead listening on http://127.0.0.1:80","x":1}"#
            )
            .as_deref(),
            Some("127.0.0.1:80")
        );
        assert_eq!(
            listening_addr("\x1b[32mINFO\x1b[0m stead listening on http://[::1]:9\x1b[0m")
                .as_deref(),
            Some("[::1]:9")
        );
        assert_eq!(
            listening_addr("stead listening on http://127.0.0.1:0"),
            None
        );
        assert_eq!(listening_addr("starting"), None);
    }
}
