//! The pool through a real PgBouncer in transaction mode (Debian's
//! `pgbouncer`), member sessions and LISTEN straight to PostgreSQL
//! (`--direct-database-url`): the fault tests' core scenario (three
//! workers under load, one killed with `kill -9` and respawned) keeps every
//! guarantee, while PgBouncer runs more stead clients than it has server
//! sessions (so consecutive transactions of one client do run on different
//! sessions). Before the role has the schema as its search path, stead
//! refuses to start through the pooler and says what to run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use std::time::{Duration, Instant};

use crate::fault::SERIAL;
use crate::fault_harness::{
    measure, stop_and_check, Load, PrivatePg, Probe, Sampler, Workers, FAST,
};
use crate::harness::SANITY_LIMIT;
use crate::wait_until;

/// Server sessions PgBouncer keeps per database and user: fewer than the
/// stead clients it serves.
const SERVER_SESSIONS: usize = 4;

/// A PgBouncer in transaction mode in front of one PostgreSQL, killed on
/// drop.
struct PgBouncer {
    port: u16,
    child: Child,
    dir: PathBuf,
}

fn pgbouncer_binary() -> PathBuf {
    let sbin = PathBuf::from("/usr/sbin/pgbouncer");
    if sbin.exists() {
        sbin
    } else {
        PathBuf::from("pgbouncer")
    }
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PgBouncer {
    async fn start(pg: &PrivatePg) -> PgBouncer {
        let dir = std::env::temp_dir().join(format!("stead-pgbouncer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let user = &pg.cluster.superuser;
        std::fs::write(dir.join("users.txt"), format!("\"{user}\" \"\"\n")).unwrap();
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\nstead = host=127.0.0.1 port={pg_port} dbname=stead\n\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                 unix_socket_dir =\nauth_type = trust\nauth_file = {users}\n\
                 admin_users = {user}\npool_mode = transaction\n\
                 default_pool_size = {SERVER_SESSIONS}\nmax_client_conn = 200\n\
                 logfile = {log}\npidfile = {pid}\n",
                pg_port = pg.cluster.port,
                users = dir.join("users.txt").display(),
                log = dir.join("pgbouncer.log").display(),
                pid = dir.join("pgbouncer.pid").display(),
            ),
        )
        .unwrap();
        let mut cmd = Command::new(pgbouncer_binary());
        // PgBouncer will not run as root: it switches to the server's user.
        if let stead::embedded::RunAs::User { name, .. } =
            stead::embedded::RunAs::detect().expect("whom to run PostgreSQL as")
        {
            chown_like(&dir, &pg.cluster.pgdata());
            for file in ["users.txt", "pgbouncer.ini"] {
                chown_like(&dir.join(file), &pg.cluster.pgdata());
            }
            cmd.args(["-u", &name]);
        }
        let child = cmd
            .arg(dir.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting pgbouncer (Debian's pgbouncer package): {e}"));
        let bouncer = PgBouncer { port, child, dir };
        let url = bouncer.url("stead");
        wait_until("PgBouncer accepts connections", SANITY_LIMIT, || async {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            // The simple protocol: a one-off statement may not outlive its
            // server session in transaction mode.
            client
                .simple_query("SELECT 1")
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await;
        bouncer
    }

    fn url(&self, database: &str) -> String {
        format!("postgresql://stead@127.0.0.1:{}/{database}", self.port)
    }

    /// Rows of a `SHOW` command of PgBouncer's admin console, as maps of
    /// column to value.
    async fn show(&self, what: &str) -> Vec<std::collections::HashMap<String, String>> {
        self.show_or_run(&format!("SHOW {what}")).await
    }

    /// Runs a command of PgBouncer's admin console (simple protocol only);
    /// the rows it answers, as maps of column to value.
    async fn show_or_run(&self, command: &str) -> Vec<std::collections::HashMap<String, String>> {
        let (client, conn) = tokio_postgres::connect(&self.url("pgbouncer"), tokio_postgres::NoTls)
            .await
            .expect("PgBouncer's admin console");
        let conn = tokio::spawn(conn);
        let messages = client
            .simple_query(command)
            .await
            .unwrap_or_else(|e| panic!("PgBouncer: {command}: {e}"));
        drop(client);
        let _ = conn.await;
        messages
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                    row.columns()
                        .iter()
                        .enumerate()
                        .map(|(i, c)| (c.name().to_string(), row.get(i).unwrap_or("").to_string()))
                        .collect(),
                ),
                _ => None,
            })
            .collect()
    }

    /// How many of its connections of `kind` (CLIENTS or SERVERS) are to
    /// the database `stead`.
    async fn count(&self, kind: &str) -> usize {
        self.show(kind)
            .await
            .iter()
            .filter(|r| r.get("database").map(String::as_str) == Some("stead"))
            .count()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn chown_like(path: &Path, like: &Path) {
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(like).unwrap();
    std::os::unix::fs::chown(path, Some(owner.uid()), Some(owner.gid())).unwrap();
}

/// `stead serve` through the pooler, expected to refuse to start: its
/// stderr.
async fn refused_start(pooled: &str, direct: &str) -> String {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_stead"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--database-url", pooled])
        .args(["--direct-database-url", direct])
        .args(FAST)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(SANITY_LIMIT, cmd.output())
        .await
        .expect("stead serve exits")
        .unwrap();
    assert!(
        !out.status.success(),
        "stead serve started through the pooler with the wrong search_path"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_pgbouncer_in_transaction_mode_the_core_scenario_keeps_every_guarantee() {
    let _serial = SERIAL.lock().await;
    let pg = PrivatePg::start().await;
    // PostgreSQL's default search path ("$user", public) would find the
    // schema `stead` for the role `stead`: a role set elsewhere does not.
    let probe = Probe::new(&pg.url);
    probe
        .query(
            "ALTER ROLE stead IN DATABASE stead SET search_path = public",
            &[],
        )
        .await
        .unwrap();
    let bouncer = PgBouncer::start(&pg).await;
    let (pooled, direct) = (bouncer.url("stead"), pg.url.clone());

    let refused = refused_start(&pooled, &direct).await;
    assert!(
        refused.contains("ALTER ROLE") && refused.contains("search_path = stead"),
        "the refusal says what to run: {refused}"
    );
    probe
        .query(
            "ALTER ROLE stead IN DATABASE stead SET search_path = stead",
            &[],
        )
        .await
        .unwrap();
    probe
        .query(
            "ALTER ROLE stead IN DATABASE stead SET statement_timeout = '30s'",
            &[],
        )
        .await
        .unwrap();
    // PgBouncer's server sessions took their settings when they opened.
    bouncer.show_or_run("RECONNECT stead").await;

    let all: Vec<String> = (1..=3).map(|i| format!("p{i}")).collect();
    let specs: Vec<(&str, &str)> = all.iter().map(|n| (n.as_str(), pooled.as_str())).collect();
    let extra = ["--direct-database-url".to_string(), direct.clone()];
    let mut workers = Workers::start_with(&specs, &extra).await;
    let slots = probe.slot_count().await;
    wait_until("the members share the slots", SANITY_LIMIT, || {
        probe.balanced(&all, slots)
    })
    .await;
    let sampler = Sampler::start(&direct, workers.targets.clone());
    let load = Load::start(workers.targets.clone(), "pooled", 30);
    tokio::time::sleep(Duration::from_secs(2)).await; // load runs (time passing)

    let victim = all[0].clone();
    let survivors = workers.others(&victim);
    let t = Instant::now();
    workers.kill9(&victim);
    let took = measure(
        "the survivors own every slot after kill -9",
        t,
        Duration::from_secs(15),
        || probe.all_owned_by(&survivors, slots),
    )
    .await;
    println!("through PgBouncer: failover after kill -9 in {took:?}");
    workers.respawn(&victim).await;
    wait_until("the respawned worker rejoins", SANITY_LIMIT, || {
        probe.balanced(&all, slots)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await; // load runs (time passing)

    let report = stop_and_check(load, sampler, &probe, Duration::from_secs(40)).await;
    assert!(report.acked.len() >= 60, "too little load: {report:?}");

    // The pool did go through PgBouncer, multiplexed: more stead clients
    // than server sessions, and at least a transaction per start.
    let (clients, servers) = (
        bouncer.count("CLIENTS").await,
        bouncer.count("SERVERS").await,
    );
    let stats = bouncer.show("STATS").await;
    let transactions: u64 = stats
        .iter()
        .find(|r| r.get("database").map(String::as_str) == Some("stead"))
        .and_then(|r| r.get("total_xact_count"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    println!(
        "PgBouncer: {clients} clients on {servers} server sessions, {transactions} transactions"
    );
    assert!(
        clients > SERVER_SESSIONS && servers <= SERVER_SESSIONS,
        "{clients} clients on {servers} server sessions\n{}",
        bouncer.log()
    );
    assert!(
        transactions >= report.acked.len() as u64,
        "{transactions} transactions through PgBouncer for {} starts",
        report.acked.len()
    );
    drop(workers);
}
