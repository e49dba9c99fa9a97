//! For unit tests that need a real PostgreSQL: one private server per test
//! process, started on first use from the machine's server binaries (it dies
//! with the process), and a fresh, migrated database per test.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::embedded::{Cluster, PgBinaries, RunAs};
use crate::store::{Store, StoreConfig};

/// The slots of a test database.
pub(crate) const SLOTS: u32 = 16;

struct SharedPg {
    cluster: Cluster,
    /// URL of the server's `postgres` database.
    admin_url: String,
    base: String,
}

static PG: OnceLock<Result<SharedPg, String>> = OnceLock::new();

/// The shared server; started from a plain thread with a runtime of its own,
/// because each test has its own runtime and the server must outlive them.
fn shared() -> &'static SharedPg {
    let pg = PG.get_or_init(|| {
        std::thread::spawn(start)
            .join()
            .unwrap_or_else(|_| Err("starting the unit-test PostgreSQL panicked".into()))
    });
    match pg {
        Ok(pg) => pg,
        Err(e) => panic!("unit-test PostgreSQL is not available: {e}"),
    }
}

fn start() -> Result<SharedPg, String> {
    let tmp = std::env::temp_dir();
    remove_dead_dirs(&tmp);
    let dir = tmp.join(format!("stead-unit-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| e.to_string())?;
    }
    let bins = PgBinaries::find().map_err(|e| e.to_string())?;
    let run_as = RunAs::detect().map_err(|e| e.to_string())?;
    let mut cluster = Cluster::init(&bins, &run_as, &dir).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let admin_url = rt
        .block_on(cluster.start_child())
        .map_err(|e| e.to_string())?;
    let base = admin_url.trim_end_matches("/postgres").to_string();
    // SAFETY: registers a plain function, run once at process exit.
    unsafe {
        libc::atexit(stop_at_exit);
    }
    Ok(SharedPg {
        cluster,
        admin_url,
        base,
    })
}

/// At exit: the server stops and its directory goes.
extern "C" fn stop_at_exit() {
    if let Some(Ok(pg)) = PG.get() {
        let _ = pg.cluster.stop();
        let _ = std::fs::remove_dir_all(&pg.cluster.data_dir);
    }
}

/// Removes `stead-unit-<pid>` directories of test processes that are gone.
fn remove_dead_dirs(tmp: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix("stead-unit-"))
            .and_then(|p| p.parse::<libc::pid_t>().ok());
        // SAFETY: kill with signal 0 only checks that the process exists.
        if pid.is_some_and(|p| p as u32 != std::process::id() && unsafe { libc::kill(p, 0) } != 0) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A fresh database with stead's schema: the store, and a plain client on
/// the same database (for what a test reads or changes behind its back).
pub(crate) async fn fresh_database() -> (Store, tokio_postgres::Client) {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let pg = tokio::task::spawn_blocking(shared)
        .await
        .expect("the unit-test PostgreSQL");
    let name = format!(
        "unit_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    crate::store::ensure_database(&pg.admin_url, &name)
        .await
        .expect("creating a test database");
    let url = format!("{}/{name}", pg.base);
    let store = Store::new(StoreConfig {
        database_url: url.clone(),
        schema: "stead".into(),
        pool_size: 4,
        pool_wait_timeout_ms: 10_000,
        statement_timeout_ms: 30_000,
        idle_in_transaction_timeout_ms: 0,
        application_name: "stead unit test".into(),
    })
    .expect("a store");
    store.migrate(SLOTS).await.expect("migrations");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connecting to the test database");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    (store, client)
}
