//! What test suites need from private servers: one shared server per test
//! process (stead's unit and integration tests both use it), the restart
//! and the immediate stop that fault tests need, and removing what test
//! processes that died left behind.

use std::path::Path;
use std::sync::OnceLock;

use super::{check_output, Cluster, PgBinaries, Result, RunAs, START_DEADLINE};

/// The directory prefix of [`shared_test_server`].
const SHARED_PREFIX: &str = "stead-test-";

/// The server of [`shared_test_server`].
pub struct SharedServer {
    /// Its cluster (a child of this process).
    pub cluster: Cluster,
    /// URL of its `postgres` database.
    pub url: String,
}

static SHARED: OnceLock<std::result::Result<SharedServer, String>> = OnceLock::new();

/// One private server per process, started on first use in
/// `<temp>/stead-test-<pid>`: from a plain thread with a runtime of its own
/// (each `#[tokio::test]` has its own runtime, and the server must outlive
/// them), as a child that dies with the process, stopped and its directory
/// removed at exit. Directories of test processes that died are removed
/// first. A failure to start is kept, so every caller reports it.
pub fn shared_test_server() -> std::result::Result<&'static SharedServer, &'static str> {
    SHARED
        .get_or_init(|| {
            std::thread::spawn(start_shared)
                .join()
                .unwrap_or_else(|_| Err("starting the test PostgreSQL panicked".into()))
        })
        .as_ref()
        .map_err(String::as_str)
}

fn start_shared() -> std::result::Result<SharedServer, String> {
    remove_dead_test_dirs(SHARED_PREFIX);
    let dir = std::env::temp_dir().join(format!("{SHARED_PREFIX}{}", std::process::id()));
    if dir.exists() {
        // A dead process with our pid left it.
        std::fs::remove_dir_all(&dir).map_err(|e| format!("removing {}: {e}", dir.display()))?;
    }
    let bins = PgBinaries::find().map_err(|e| e.to_string())?;
    let run_as = RunAs::detect().map_err(|e| e.to_string())?;
    let mut cluster = Cluster::init(&bins, &run_as, &dir).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let url = rt
        .block_on(cluster.start_child())
        .map_err(|e| e.to_string())?;
    // SAFETY: registers a plain function, run once at process exit.
    unsafe {
        libc::atexit(stop_shared_at_exit);
    }
    Ok(SharedServer { cluster, url })
}

extern "C" fn stop_shared_at_exit() {
    if let Some(Ok(shared)) = SHARED.get() {
        let _ = shared.cluster.stop();
        let _ = std::fs::remove_dir_all(&shared.cluster.data_dir);
    }
}

impl Cluster {
    /// `pg_ctl restart -m MODE -w` of a server started with
    /// [`Cluster::start`]: it comes back with the same options and port.
    pub fn restart(&self, mode: &str) -> Result<()> {
        let mut cmd = self.command(self.bins.pg_ctl());
        cmd.arg("restart")
            .arg("-D")
            .arg(self.pgdata())
            .args(["-m", mode, "-w", "-t"])
            .arg(START_DEADLINE.as_secs().to_string())
            .arg("-l")
            .arg(self.log_path());
        self.run(cmd, "pg_ctl restart")?;
        Ok(())
    }
}

/// Stops the server of the cluster in `data_dir` at once (`pg_ctl stop -m
/// immediate`), if one runs: for a harness cleaning up after a test that
/// failed, so it never fails itself.
pub fn stop_now(data_dir: &Path) {
    let pgdata = data_dir.join("pgdata");
    if !pgdata.join("postmaster.pid").exists() {
        return;
    }
    let (Ok(bins), Ok(run_as)) = (PgBinaries::find(), RunAs::detect()) else {
        return;
    };
    let cluster = Cluster {
        data_dir: data_dir.to_path_buf(),
        port: 0,
        superuser: "stead".into(),
        bins,
        run_as,
        child: None,
    };
    let mut cmd = cluster.command(cluster.bins.pg_ctl());
    cmd.arg("stop")
        .arg("-D")
        .arg(&pgdata)
        .args(["-m", "immediate", "-w", "-t"])
        .arg("30");
    if let Ok(out) = cluster.output(cmd) {
        let _ = check_output("pg_ctl stop", &out);
    }
}

/// Stops and removes the clusters in `<temp>/<prefix><pid>[-...]`
/// directories whose process `<pid>` is gone.
pub fn remove_dead_test_dirs(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only asks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if pid as u32 != std::process::id() && !alive {
            stop_now(&entry.path());
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
