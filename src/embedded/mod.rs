//! A private PostgreSQL cluster run from the machine's own server binaries.
//!
//! `stead dev` uses [`Cluster::init`] + [`Cluster::start`] (a `pg_ctl`-managed
//! server that outlives nothing in particular and is stopped with
//! [`Cluster::stop`]); test harnesses use [`Cluster::start_child`] (a
//! `postgres` child process that dies with the test process).
//!
//! PostgreSQL refuses to run as root. When we are root the server binaries
//! run as the `postgres` OS user ([`RunAs::detect`]); otherwise they run as
//! ourselves.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

mod binaries;
mod suites;
#[cfg(test)]
mod tests;

pub use binaries::{install_command, PgBinaries};
use binaries::{is_executable, which};
pub use suites::{remove_dead_test_dirs, shared_test_server, stop_now, SharedServer};

/// How long we wait for a server to accept connections or to stop.
const START_DEADLINE: Duration = Duration::from_secs(30);
const STOP_DEADLINE: Duration = Duration::from_secs(60);
/// Environment variables of libpq / the server that must not leak into the
/// commands we run (they would override what we pass).
const PG_ENV: &[&str] = &[
    "PGDATA",
    "PGPORT",
    "PGHOST",
    "PGHOSTADDR",
    "PGUSER",
    "PGDATABASE",
    "PGOPTIONS",
    "PGPASSWORD",
    "PGSERVICE",
    "PGSYSCONFDIR",
    "PGCTLTIMEOUT",
];

/// Everything that can go wrong running the embedded cluster. Every message
/// says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH or in the usual \
         places; install them with: {}",
        install_command()
    )]
    /// No `initdb`/`pg_ctl`/`postgres` anywhere we look.
    BinariesNotFound,

    #[error(
        "{dir} does not hold the PostgreSQL server binaries (missing {missing}): install them \
         with `{}`, or point at the directory that holds initdb, pg_ctl and postgres",
        install_command()
    )]
    /// A directory named as holding the binaries lacks some of them.
    IncompleteBinaries {
        /// The directory.
        dir: PathBuf,
        /// The binaries it lacks.
        missing: String,
    },

    #[error(
        "running as root, but PostgreSQL refuses to run as root and there is no `postgres` user \
         to run it as: create one (useradd --system --user-group --home-dir /var/lib/postgresql \
         postgres) or run stead as a normal user"
    )]
    /// We are root and there is no `postgres` user to run the server as.
    NoPostgresUser,

    #[error(
        "the `{user}` OS user, which runs PostgreSQL, cannot reach the data directory {path} \
         ({reason}); pass --data-dir somewhere it can reach, such as /tmp/stead"
    )]
    /// The user that runs the server cannot reach the data directory.
    DataDirUnreachable {
        /// That user.
        user: String,
        /// The data directory.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    #[error(
        "{path} is not empty but holds no PostgreSQL cluster: remove it, or pass a different \
         --data-dir"
    )]
    /// The data directory holds something else.
    NotACluster {
        /// The data directory.
        path: PathBuf,
    },

    #[error(
        "the cluster in {path} was created by PostgreSQL {data_version}, but the server binaries \
         in {bin_dir} are PostgreSQL {bin_version}: install PostgreSQL {data_version}, or pass a \
         different --data-dir (or remove this one to start afresh)"
    )]
    /// The cluster was made by another major version than the binaries.
    VersionMismatch {
        /// The data directory.
        path: PathBuf,
        /// The major version that created the cluster.
        data_version: String,
        /// Where the binaries are.
        bin_dir: PathBuf,
        /// Their version.
        bin_version: String,
    },

    #[error("could not run {program}: {source}")]
    /// A server binary could not be started.
    Spawn {
        /// The binary.
        program: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },

    #[error("{what} failed ({status}):\n{output}")]
    /// A server binary ran and failed.
    CommandFailed {
        /// What was run.
        what: String,
        /// Its exit status.
        status: String,
        /// What it printed.
        output: String,
    },

    #[error("{what}: {source}")]
    /// A file-system operation failed.
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },

    #[error(
        "PostgreSQL did not accept connections on 127.0.0.1:{port} within {secs}s \
         (last error: {last_error}); last lines of {log}:\n{log_tail}"
    )]
    /// The server did not accept connections in time.
    StartTimeout {
        /// Its port.
        port: u16,
        /// How long we waited.
        secs: u64,
        /// The last connection error.
        last_error: String,
        /// Its log file.
        log: PathBuf,
        /// The last lines of the log.
        log_tail: String,
    },

    #[error("PostgreSQL exited while starting ({status}); last lines of {log}:\n{log_tail}")]
    /// The server exited while starting.
    ServerExited {
        /// Its exit status.
        status: String,
        /// Its log file.
        log: PathBuf,
        /// The last lines of the log.
        log_tail: String,
    },

    #[error("PostgreSQL (pid {pid}) did not stop within {secs}s; see {log}")]
    /// The server did not stop in time.
    StopTimeout {
        /// Its process id.
        pid: u32,
        /// How long we waited.
        secs: u64,
        /// Its log file.
        log: PathBuf,
    },

    #[error("database error on the embedded cluster: {0}")]
    /// Creating the database failed.
    Db(#[from] tokio_postgres::Error),
}

type Result<T, E = EmbeddedError> = std::result::Result<T, E>;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> EmbeddedError {
    let what = what.into();
    move |source| EmbeddedError::Io { what, source }
}

// ---------------------------------------------------------------------------
// Whom to run as
// ---------------------------------------------------------------------------

/// Whom to run the server binaries as: ourselves, or (when euid is 0) the
/// `postgres` user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunAs {
    /// The user running stead (not root).
    CurrentUser,
    /// Another OS user (as root: `postgres`).
    User {
        /// Its name.
        name: String,
        /// Its user id.
        uid: u32,
        /// Its primary group id.
        gid: u32,
    },
}

impl RunAs {
    /// Ourselves unless we are root; as root, the `postgres` OS user.
    pub fn detect() -> Result<Self> {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(RunAs::CurrentUser);
        }
        match lookup_user("postgres")? {
            Some((uid, gid)) if uid != 0 => Ok(RunAs::User {
                name: "postgres".into(),
                uid,
                gid,
            }),
            _ => Err(EmbeddedError::NoPostgresUser),
        }
    }

    /// The named OS user, looked up in the user database.
    pub fn user(name: &str) -> Result<Self> {
        match lookup_user(name)? {
            Some((uid, gid)) => Ok(RunAs::User {
                name: name.to_string(),
                uid,
                gid,
            }),
            None => Err(EmbeddedError::Io {
                what: format!("looking up OS user `{name}`"),
                source: io::Error::new(io::ErrorKind::NotFound, "no such user"),
            }),
        }
    }

    fn name(&self) -> String {
        match self {
            RunAs::CurrentUser => "current".into(),
            RunAs::User { name, .. } => name.clone(),
        }
    }

    fn ids(&self) -> Option<(u32, u32)> {
        match self {
            RunAs::CurrentUser => None,
            RunAs::User { uid, gid, .. } => Some((*uid, *gid)),
        }
    }

    /// Make `cmd` run as this user (std drops supplementary groups too).
    fn apply(&self, cmd: &mut Command) {
        if let RunAs::User { name, uid, gid } = self {
            cmd.uid(*uid)
                .gid(*gid)
                .env("USER", name)
                .env("LOGNAME", name);
        }
    }

    fn chown(&self, path: &Path) -> Result<()> {
        if let Some((uid, gid)) = self.ids() {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(io_err(format!("changing the owner of {}", path.display())))?;
        }
        Ok(())
    }
}

/// (uid, gid) of the named user, via getpwnam_r.
fn lookup_user(name: &str) -> Result<Option<(u32, u32)>> {
    let cname = std::ffi::CString::new(name).map_err(|_| EmbeddedError::NoPostgresUser)?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    loop {
        // SAFETY: passwd is plain data; getpwnam_r fills it with pointers into buf.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(EmbeddedError::Io {
                what: format!("looking up OS user `{name}`"),
                source: io::Error::from_raw_os_error(rc),
            });
        }
        if result.is_null() {
            return Ok(None);
        }
        return Ok(Some((pwd.pw_uid, pwd.pw_gid)));
    }
}

// ---------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------

/// A cluster in a data directory: `data_dir/pgdata` holds the cluster files,
/// `data_dir/postgres.log` the server log and `data_dir/port` the port of
/// the last `start`.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Absolute.
    pub data_dir: PathBuf,
    /// 0 until known (started, or saved by an earlier start).
    pub port: u16,
    /// The bootstrap superuser, `stead`; authentication is `trust` on
    /// 127.0.0.1 only.
    pub superuser: String,
    bins: PgBinaries,
    run_as: RunAs,
    child: Option<Arc<ChildState>>,
}

impl Cluster {
    /// initdb if needed (superuser "stead", auth trust, UTF8, locale C), as
    /// `run_as`. As root, the directories we create are given to that user;
    /// if it cannot reach `data_dir` (e.g. under /root) this fails with an
    /// error that says to pass `--data-dir` somewhere it can reach.
    pub fn init(bins: &PgBinaries, run_as: &RunAs, data_dir: &Path) -> Result<Self> {
        let data_dir = std::path::absolute(data_dir)
            .map_err(io_err(format!("resolving {}", data_dir.display())))?;
        let mut cluster = Cluster {
            data_dir,
            port: 0,
            superuser: "stead".into(),
            bins: bins.clone(),
            run_as: run_as.clone(),
            child: None,
        };
        cluster.prepare_dirs()?;
        cluster.initdb_if_needed()?;
        cluster.port = cluster.saved_port().unwrap_or(0);
        Ok(cluster)
    }

    /// `data_dir/pgdata`.
    pub fn pgdata(&self) -> PathBuf {
        self.data_dir.join("pgdata")
    }

    /// `data_dir/postgres.log`.
    pub fn log_path(&self) -> PathBuf {
        self.data_dir.join("postgres.log")
    }

    fn port_file(&self) -> PathBuf {
        self.data_dir.join("port")
    }

    /// postgresql://stead@127.0.0.1:PORT/DB
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgresql://{}@127.0.0.1:{}/{}",
            self.superuser, self.port, database
        )
    }

    /// The exact `psql` command that opens `database`, to paste in a shell.
    pub fn psql_command(&self, database: &str) -> String {
        let psql = if which("psql").is_some() {
            "psql".to_string()
        } else if is_executable(&self.bins.bin_dir.join("psql")) {
            shell_quote(&self.bins.bin_dir.join("psql").to_string_lossy())
        } else {
            "psql".to_string()
        };
        format!("{psql} {}", shell_quote(&self.url(database)))
    }

    /// For `stead dev`: start the server with `pg_ctl start -w` (log in
    /// `data_dir/postgres.log`), listening on 127.0.0.1 only, at the port
    /// saved in `data_dir/port` if it is free, else at a free one (saved). A
    /// server already running from this data directory is reused. Then
    /// creates database `stead` if missing and returns its URL.
    pub async fn start(&mut self) -> Result<String> {
        let this = self.clone();
        let port = tokio::task::spawn_blocking(move || this.start_blocking())
            .await
            .map_err(|e| EmbeddedError::Io {
                what: "starting PostgreSQL".into(),
                source: io::Error::other(e.to_string()),
            })??;
        self.port = port;
        self.wait_ready(START_DEADLINE).await?;
        self.ensure_database("stead").await?;
        Ok(self.url("stead"))
    }

    /// Stop the server: `pg_ctl stop -m fast -w` (a server started with
    /// [`Cluster::start_child`] gets SIGINT and is waited for). Stopping a
    /// server that is not running is not an error.
    pub fn stop(&self) -> Result<()> {
        if let Some(child) = &self.child {
            return child.stop(&self.log_path());
        }
        if self.running_port()?.is_none() {
            return Ok(());
        }
        let mut cmd = self.command(self.bins.pg_ctl());
        cmd.arg("stop")
            .arg("-D")
            .arg(self.pgdata())
            .args(["-m", "fast", "-w", "-t"])
            .arg(STOP_DEADLINE.as_secs().to_string());
        self.run(cmd, "pg_ctl stop")?;
        Ok(())
    }

    /// Whether a server from this data directory is running (per
    /// `pg_ctl status`).
    pub fn is_running(&self) -> Result<bool> {
        if let Some(child) = &self.child {
            return Ok(child.exit_status().is_none());
        }
        Ok(self.running_port()?.is_some())
    }

    /// For test harnesses: run `postgres` directly as a child process that
    /// dies with us (PR_SET_PDEATHSIG, SIGINT: a fast shutdown), with fast,
    /// unsafe settings (fsync off, ...), on 127.0.0.1 at a free port. Waits
    /// (at most 30s) until it accepts connections and returns the URL of
    /// database `postgres`.
    pub async fn start_child(&mut self) -> Result<String> {
        let mut last_err = None;
        for _attempt in 0..3 {
            let port = free_port()?;
            let child = self.spawn_child(port).await?;
            self.port = port;
            self.child = Some(child.clone());
            match self.wait_ready(START_DEADLINE).await {
                Ok(()) => return Ok(self.url("postgres")),
                Err(e @ EmbeddedError::ServerExited { .. }) if !port_is_free(port) => {
                    // Someone took the port between our probe and the bind.
                    last_err = Some(e);
                }
                Err(e) => {
                    let _ = child.stop(&self.log_path());
                    self.child = None;
                    return Err(e);
                }
            }
            self.child = None;
        }
        Err(last_err.expect("at least one attempt"))
    }

    // -- init --------------------------------------------------------------

    fn prepare_dirs(&self) -> Result<()> {
        let data_dir = &self.data_dir;
        let created = !data_dir.exists();
        fs::create_dir_all(data_dir).map_err(io_err(format!("creating {}", data_dir.display())))?;
        if created {
            // Ours: give it to the server's user (it keeps its log here).
            self.run_as.chown(data_dir)?;
        }
        self.check_reachable()?;

        let pgdata = self.pgdata();
        if !pgdata.exists() {
            fs::create_dir(&pgdata).map_err(io_err(format!("creating {}", pgdata.display())))?;
            fs::set_permissions(&pgdata, fs::Permissions::from_mode(0o700)).map_err(io_err(
                format!("setting permissions of {}", pgdata.display()),
            ))?;
            self.run_as.chown(&pgdata)?;
        }
        let log = self.log_path();
        if !log.exists() {
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .map_err(io_err(format!("creating {}", log.display())))?;
            fs::set_permissions(&log, fs::Permissions::from_mode(0o600))
                .map_err(io_err(format!("setting permissions of {}", log.display())))?;
            self.run_as.chown(&log)?;
        }
        Ok(())
    }

    /// As another user, probe that it can enter data_dir (the commands run
    /// there): std reports a failing chdir in the child as a spawn error.
    fn check_reachable(&self) -> Result<()> {
        if self.run_as == RunAs::CurrentUser {
            return Ok(());
        }
        let mut cmd = self.command(self.bins.pg_ctl());
        cmd.arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match cmd.status() {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                Err(EmbeddedError::DataDirUnreachable {
                    user: self.run_as.name(),
                    path: self.data_dir.clone(),
                    reason: "permission denied on it or on a directory above it".into(),
                })
            }
            Err(source) => Err(EmbeddedError::Spawn {
                program: self.bins.pg_ctl(),
                source,
            }),
        }
    }

    fn initdb_if_needed(&self) -> Result<()> {
        let pgdata = self.pgdata();
        let version_file = pgdata.join("PG_VERSION");
        if version_file.exists() {
            let data_version = fs::read_to_string(&version_file)
                .map_err(io_err(format!("reading {}", version_file.display())))?
                .trim()
                .to_string();
            let bin_version = self.bins.major_version()?;
            if data_version != bin_version {
                return Err(EmbeddedError::VersionMismatch {
                    path: pgdata,
                    data_version,
                    bin_dir: self.bins.bin_dir.clone(),
                    bin_version,
                });
            }
            return Ok(());
        }
        let non_empty = fs::read_dir(&pgdata)
            .map_err(io_err(format!("reading {}", pgdata.display())))?
            .next()
            .is_some();
        if non_empty {
            return Err(EmbeddedError::NotACluster { path: pgdata });
        }
        tracing::info!(pgdata = %pgdata.display(), bin_dir = %self.bins.bin_dir.display(), "creating PostgreSQL cluster (initdb)");
        let mut cmd = self.command(self.bins.initdb());
        cmd.arg("-D")
            .arg(&pgdata)
            .arg("--username")
            .arg(&self.superuser)
            .args(["--auth=trust", "--encoding=UTF8", "--locale=C"]);
        self.run(cmd, "initdb")?;
        Ok(())
    }

    // -- pg_ctl ------------------------------------------------------------

    fn saved_port(&self) -> Option<u16> {
        fs::read_to_string(self.port_file())
            .ok()?
            .trim()
            .parse()
            .ok()
            .filter(|p| *p != 0)
    }

    fn save_port(&self, port: u16) -> Result<()> {
        let path = self.port_file();
        fs::write(&path, format!("{port}\n")).map_err(io_err(format!("writing {}", path.display())))
    }

    /// Port of the server running from this data directory, if any.
    fn running_port(&self) -> Result<Option<u16>> {
        let mut cmd = self.command(self.bins.pg_ctl());
        cmd.arg("status").arg("-D").arg(self.pgdata());
        let out = self.output(cmd)?;
        match out.status.code() {
            Some(0) => {}
            Some(3) => return Ok(None),
            _ => {
                return Err(command_failed("pg_ctl status", &out));
            }
        }
        // postmaster.pid: pid, data dir, start time, port, socket dir, ...
        let pidfile = self.pgdata().join("postmaster.pid");
        let text = fs::read_to_string(&pidfile)
            .map_err(io_err(format!("reading {}", pidfile.display())))?;
        let port = text
            .lines()
            .nth(3)
            .and_then(|l| l.trim().parse::<u16>().ok())
            .ok_or_else(|| EmbeddedError::Io {
                what: format!("reading the port from {}", pidfile.display()),
                source: io::Error::new(io::ErrorKind::InvalidData, "no port on line 4"),
            })?;
        Ok(Some(port))
    }

    fn start_blocking(&self) -> Result<u16> {
        if let Some(port) = self.running_port()? {
            tracing::info!(
                port,
                "reusing the PostgreSQL server already running from this data directory"
            );
            self.save_port(port)?;
            return Ok(port);
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = match self.saved_port() {
                Some(p) if attempt == 1 && port_is_free(p) => p,
                _ => free_port()?,
            };
            self.save_port(port)?;
            let mut cmd = self.command(self.bins.pg_ctl());
            cmd.arg("start")
                .arg("-D")
                .arg(self.pgdata())
                .arg("-l")
                .arg(self.log_path())
                .args(["-w", "-t"])
                .arg(START_DEADLINE.as_secs().to_string())
                .arg("-o")
                .arg(format!(
                    "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
                ));
            let out = self.output(cmd)?;
            if out.status.success() {
                return Ok(port);
            }
            if attempt < 3 && !port_is_free(port) {
                tracing::warn!(
                    port,
                    "port taken while PostgreSQL was starting; trying another"
                );
                continue;
            }
            let mut err = command_failed("pg_ctl start", &out);
            if let EmbeddedError::CommandFailed { output, .. } = &mut err {
                output.push_str(&format!(
                    "\nlast lines of {}:\n{}",
                    self.log_path().display(),
                    log_tail(&self.log_path())
                ));
            }
            return Err(err);
        }
    }

    // -- helpers -----------------------------------------------------------

    /// A command for one of the server binaries: as `run_as`, in data_dir
    /// (our cwd may be unreadable to that user), stdin from /dev/null,
    /// without libpq's environment.
    fn command(&self, program: PathBuf) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.data_dir)
            .stdin(Stdio::null())
            .env("HOME", &self.data_dir);
        for var in PG_ENV {
            cmd.env_remove(var);
        }
        self.run_as.apply(&mut cmd);
        cmd
    }

    fn output(&self, mut cmd: Command) -> Result<Output> {
        cmd.output().map_err(|source| {
            if source.kind() == io::ErrorKind::PermissionDenied && self.run_as != RunAs::CurrentUser
            {
                EmbeddedError::DataDirUnreachable {
                    user: self.run_as.name(),
                    path: self.data_dir.clone(),
                    reason: source.to_string(),
                }
            } else {
                EmbeddedError::Spawn {
                    program: PathBuf::from(cmd.get_program()),
                    source,
                }
            }
        })
    }

    fn run(&self, cmd: Command, what: &str) -> Result<Output> {
        let out = self.output(cmd)?;
        check_output(what, &out)?;
        Ok(out)
    }

    async fn wait_ready(&self, deadline: Duration) -> Result<()> {
        let url = self.url("postgres");
        let until = Instant::now() + deadline;
        let mut delay = Duration::from_millis(10);
        loop {
            let last_error =
                match tokio::time::timeout(Duration::from_secs(5), crate::store::can_connect(&url))
                    .await
                {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "connect timed out".to_string(),
                };
            if let Some(child) = &self.child {
                if let Some(status) = child.exit_status() {
                    return Err(EmbeddedError::ServerExited {
                        status,
                        log: self.log_path(),
                        log_tail: log_tail(&self.log_path()),
                    });
                }
            }
            if Instant::now() >= until {
                return Err(EmbeddedError::StartTimeout {
                    port: self.port,
                    secs: deadline.as_secs(),
                    last_error,
                    log: self.log_path(),
                    log_tail: log_tail(&self.log_path()),
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    }

    /// Create `database` unless it exists.
    pub async fn ensure_database(&self, database: &str) -> Result<()> {
        crate::store::ensure_database(&self.url("postgres"), database).await?;
        Ok(())
    }

    // -- child mode --------------------------------------------------------

    /// Spawn `postgres` from a dedicated thread that lives as long as the
    /// child (PR_SET_PDEATHSIG fires when the *thread* that forked exits).
    async fn spawn_child(&self, port: u16) -> Result<Arc<ChildState>> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io_err(format!("opening {}", self.log_path().display())))?;
        let log2 = log
            .try_clone()
            .map_err(io_err(format!("opening {}", self.log_path().display())))?;

        let mut cmd = Command::new(self.bins.postgres());
        cmd.current_dir(&self.data_dir)
            .env("HOME", &self.data_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .arg("-D")
            .arg(self.pgdata())
            .arg("-p")
            .arg(port.to_string())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=400",
            ]);
        for var in PG_ENV {
            cmd.env_remove(var);
        }
        if let RunAs::User { name, .. } = &self.run_as {
            cmd.env("USER", name).env("LOGNAME", name);
        }
        let ids = self.run_as.ids();
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls, no allocation.
        unsafe {
            cmd.pre_exec(move || {
                if let Some((uid, gid)) = ids {
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
                // After setuid, which clears the parent-death signal.
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGINT as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // We may have died between fork and prctl.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }

        let program = self.bins.postgres();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("stead-postgres".into())
            .spawn(move || match cmd.spawn() {
                Ok(mut child) => {
                    let state = Arc::new(ChildState {
                        pid: child.id(),
                        exit: Mutex::new(None),
                        exited: Condvar::new(),
                    });
                    let _ = tx.send(Ok(state.clone()));
                    // Wait for the exit but leave the zombie, so that the pid
                    // stays ours until the exit is recorded (ChildState::stop
                    // signals it under the same lock).
                    wait_exited_nowait(child.id());
                    let mut exit = state.exit.lock().unwrap();
                    let status = match child.wait() {
                        Ok(s) => describe_status(s),
                        Err(e) => format!("wait failed: {e}"),
                    };
                    *exit = Some(status);
                    drop(exit);
                    state.exited.notify_all();
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            })
            .map_err(io_err("starting the PostgreSQL supervisor thread"))?;
        match rx.await {
            Ok(Ok(state)) => Ok(state),
            Ok(Err(source)) => Err(EmbeddedError::Spawn { program, source }),
            Err(_) => Err(EmbeddedError::Io {
                what: "starting PostgreSQL".into(),
                source: io::Error::other("supervisor thread died"),
            }),
        }
    }
}

/// A `postgres` child process, reaped by its supervisor thread.
#[derive(Debug)]
struct ChildState {
    pid: u32,
    exit: Mutex<Option<String>>,
    exited: Condvar,
}

impl ChildState {
    fn exit_status(&self) -> Option<String> {
        self.exit.lock().unwrap().clone()
    }

    /// SIGINT (fast shutdown) and wait. The pid cannot have been reused:
    /// the supervisor reaps the child only while holding `exit`, and
    /// records the exit before releasing it.
    fn stop(&self, log: &Path) -> Result<()> {
        let mut exit = self.exit.lock().unwrap();
        if exit.is_some() {
            return Ok(());
        }
        // SAFETY: plain syscall; the child is not reaped yet (lock held).
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGINT);
        }
        let until = Instant::now() + STOP_DEADLINE;
        while exit.is_none() {
            let now = Instant::now();
            if now >= until {
                return Err(EmbeddedError::StopTimeout {
                    pid: self.pid,
                    secs: STOP_DEADLINE.as_secs(),
                    log: log.to_path_buf(),
                });
            }
            exit = self.exited.wait_timeout(exit, until - now).unwrap().0;
        }
        Ok(())
    }
}

/// Block until the child `pid` has exited, without reaping it.
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
        if rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

fn describe_status(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => s.to_string(),
    }
}

fn check_output(what: &str, out: &Output) -> Result<()> {
    if out.status.success() {
        Ok(())
    } else {
        Err(command_failed(what, out))
    }
}

fn command_failed(what: &str, out: &Output) -> EmbeddedError {
    let mut output = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stdout = stdout.trim();
    if !stdout.is_empty() {
        if !output.is_empty() {
            output.push('\n');
        }
        output.push_str(stdout);
    }
    EmbeddedError::CommandFailed {
        what: what.to_string(),
        status: describe_status(out.status),
        output,
    }
}

/// The last 30 lines (at most 8 KiB) of a log file.
fn log_tail(path: &Path) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return "(no log)".into();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(8192)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .map_err(io_err("finding a free port on 127.0.0.1"))?;
    let port = listener
        .local_addr()
        .map_err(io_err("finding a free port on 127.0.0.1"))?
        .port();
    Ok(port)
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).is_ok()
}

fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
