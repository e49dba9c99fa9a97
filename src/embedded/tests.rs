//! These tests run real PostgreSQL servers from the machine's binaries (as
//! the `postgres` user when run as root).

use super::binaries::{major_of, parse_version, REQUIRED_BINARIES};
use super::*;

/// A temporary directory the `postgres` user can traverse (tempfile makes
/// them 0700, which would be unreachable when we are root).
fn tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("stead-embedded-")
        .tempdir()
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Stops a `pg_ctl`-started server when the test ends, even by a panic.
struct StopOnDrop(Cluster);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.stop();
    }
}

fn setup() -> (PgBinaries, RunAs) {
    let bins = PgBinaries::find().expect("PostgreSQL server binaries");
    let run_as = RunAs::detect().expect("a user to run PostgreSQL as");
    (bins, run_as)
}

async fn query_i64(url: &str, sql: &str) -> i64 {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[test]
fn finds_binaries_and_user() {
    let (bins, run_as) = setup();
    for b in REQUIRED_BINARIES {
        assert!(
            is_executable(&bins.bin_dir.join(b)),
            "{b} in {}",
            bins.bin_dir.display()
        );
    }
    assert!(!bins.major_version().unwrap().is_empty());
    if unsafe { libc::geteuid() } == 0 {
        assert!(
            matches!(run_as, RunAs::User { ref name, uid, .. } if name == "postgres" && uid != 0)
        );
    } else {
        assert_eq!(run_as, RunAs::CurrentUser);
    }
}

#[test]
fn find_resolves_symlinks_and_falls_back_to_usr_lib() {
    let real = PgBinaries::find().unwrap();
    // A PATH without initdb: the highest /usr/lib/postgresql/*/bin (or
    // /usr/pgsql-*/bin) is used.
    let fallback = PgBinaries::find_in(Some(std::ffi::OsStr::new("/nonexistent:/bin")));
    let has_usr_lib = ["/usr/lib/postgresql", "/usr"].iter().any(|root| {
        fs::read_dir(root).into_iter().flatten().flatten().any(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            (root.ends_with("postgresql") || n.starts_with("pgsql-"))
                && e.path().join("bin/initdb").exists()
        })
    });
    if has_usr_lib {
        let fallback = fallback.unwrap();
        assert!(fallback.bin_dir.join("initdb").exists());
    } else {
        assert!(matches!(fallback, Err(EmbeddedError::BinariesNotFound)));
    }
    // initdb reached through a symlink: the real directory is used.
    let tmp = tempdir();
    std::os::unix::fs::symlink(real.initdb(), tmp.path().join("initdb")).unwrap();
    let found = PgBinaries::find_in(Some(tmp.path().as_os_str())).unwrap();
    assert_eq!(found.bin_dir, fs::canonicalize(&real.bin_dir).unwrap());
    // A lone initdb without pg_ctl and postgres beside it is skipped.
    let lone = tempdir();
    fs::copy(real.initdb(), lone.path().join("initdb")).unwrap();
    let path = std::env::join_paths([lone.path(), tmp.path()]).unwrap();
    let found = PgBinaries::find_in(Some(&path)).unwrap();
    assert_eq!(found.bin_dir, fs::canonicalize(&real.bin_dir).unwrap());
}

#[test]
fn version_parsing() {
    assert_eq!(major_of("15.18"), "15");
    assert_eq!(major_of("9.6.24"), "9.6");
    assert_eq!(major_of("17beta1"), "17");
    assert_eq!(parse_version("15"), Some(vec![15]));
    assert_eq!(parse_version("9.6"), Some(vec![9, 6]));
    assert_eq!(parse_version("x"), None);
    assert!(parse_version("10").unwrap() > parse_version("9.6").unwrap());
}

#[test]
fn from_dir_names_what_is_missing() {
    let dir = tempdir();
    let err = PgBinaries::from_dir(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("initdb, pg_ctl, postgres"), "{msg}");
}

#[tokio::test]
async fn init_start_stop_restart_keeps_data() {
    let (bins, run_as) = setup();
    let tmp = tempdir();
    let data_dir = tmp.path().join("data");

    let mut cluster = Cluster::init(&bins, &run_as, &data_dir).unwrap();
    let _stop = StopOnDrop(cluster.clone());
    assert_eq!(cluster.superuser, "stead");
    assert!(cluster.pgdata().join("PG_VERSION").exists());
    let url = cluster.start().await.unwrap();
    let port = cluster.port;
    assert_ne!(port, 0);
    assert_eq!(url, format!("postgresql://stead@127.0.0.1:{port}/stead"));
    assert_eq!(url, cluster.url("stead"));
    assert_eq!(
        cluster.psql_command("stead"),
        format!("psql postgresql://stead@127.0.0.1:{port}/stead")
    );
    assert_eq!(
        fs::read_to_string(data_dir.join("port")).unwrap().trim(),
        port.to_string()
    );
    assert!(cluster.is_running().unwrap());

    {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42);")
            .await
            .unwrap();
        // UTF8, locale C, superuser stead, listening on 127.0.0.1 only, no socket.
        let row = client
            .query_one(
                "SELECT pg_encoding_to_char(encoding), datcollate, current_user::text, \
                 current_setting('listen_addresses'), current_setting('unix_socket_directories') \
                 FROM pg_database WHERE datname = current_database()",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "UTF8");
        assert_eq!(row.get::<_, String>(1), "C");
        assert_eq!(row.get::<_, String>(2), "stead");
        assert_eq!(row.get::<_, String>(3), "127.0.0.1");
        assert_eq!(row.get::<_, String>(4), "");
    }

    // A second start while it runs reuses the running server.
    let mut again = Cluster::init(&bins, &run_as, &data_dir).unwrap();
    assert_eq!(again.port, port, "init reads the saved port");
    assert_eq!(again.start().await.unwrap(), url);

    cluster.stop().unwrap();
    assert!(!cluster.is_running().unwrap());
    assert!(tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .is_err());
    cluster.stop().unwrap(); // stopping a stopped server is fine

    // Restart: same data, same (saved, free) port.
    let mut cluster = Cluster::init(&bins, &run_as, &data_dir).unwrap();
    let url2 = cluster.start().await.unwrap();
    assert_eq!(url2, url);
    assert_eq!(query_i64(&url2, "SELECT sum(v)::int8 FROM kept").await, 42);
    cluster.stop().unwrap();
}

#[tokio::test]
async fn start_picks_another_port_when_the_saved_one_is_taken() {
    let (bins, run_as) = setup();
    let tmp = tempdir();
    let data_dir = tmp.path().join("data");
    let mut cluster = Cluster::init(&bins, &run_as, &data_dir).unwrap();
    let _stop = StopOnDrop(cluster.clone());
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    fs::write(data_dir.join("port"), format!("{taken_port}\n")).unwrap();
    let url = cluster.start().await.unwrap();
    assert_ne!(cluster.port, taken_port);
    assert_eq!(
        fs::read_to_string(data_dir.join("port")).unwrap().trim(),
        cluster.port.to_string()
    );
    assert_eq!(query_i64(&url, "SELECT 1::int8").await, 1);
    cluster.stop().unwrap();
}

#[tokio::test]
async fn start_child_runs_and_stops_and_runs_again() {
    let (bins, run_as) = setup();
    let tmp = tempdir();
    let data_dir = tmp.path().join("data");
    for round in 0..2 {
        let mut cluster = Cluster::init(&bins, &run_as, &data_dir).unwrap();
        let url = cluster.start_child().await.unwrap();
        assert_eq!(url, cluster.url("postgres"));
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let row = client
            .query_one(
                "SELECT current_setting('fsync'), current_setting('max_connections'), \
                 current_setting('full_page_writes')",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "off");
        assert_eq!(row.get::<_, String>(1), "400");
        assert_eq!(row.get::<_, String>(2), "off");
        client
            .batch_execute(&format!("CREATE DATABASE round_{round}"))
            .await
            .unwrap();
        assert!(cluster.is_running().unwrap());
        cluster.stop().unwrap();
        assert!(!cluster.is_running().unwrap());
        assert!(!data_dir.join("pgdata/postmaster.pid").exists());
    }
}

/// The child gets SIGINT when the process that started it dies: run this
/// test binary again as a child that starts a server and prints its pid,
/// SIGKILL that process, and watch the server go away.
#[test]
fn start_child_dies_with_its_parent() {
    if let Ok(dir) = std::env::var("STEAD_EMBEDDED_CHILD_DIR") {
        let (bins, run_as) = setup();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut cluster = Cluster::init(&bins, &run_as, Path::new(&dir)).unwrap();
        rt.block_on(cluster.start_child()).unwrap();
        println!("POSTGRES_PID {}", cluster.child.as_ref().unwrap().pid);
        // Wait to be killed.
        std::thread::sleep(Duration::from_secs(600));
        return;
    }
    let tmp = tempdir();
    let data_dir = tmp.path().join("data");
    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "embedded::tests::start_child_dies_with_its_parent",
            "--nocapture",
        ])
        .env("STEAD_EMBEDDED_CHILD_DIR", &data_dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = io::BufReader::new(helper.stdout.take().unwrap());
    let mut pid = None;
    let mut line = String::new();
    while io::BufRead::read_line(&mut out, &mut line).unwrap() > 0 {
        if let Some(p) = line.trim().strip_prefix("POSTGRES_PID ") {
            pid = Some(p.parse::<i32>().unwrap());
            break;
        }
        line.clear();
    }
    let pid = pid.expect("helper printed the postgres pid");
    assert_eq!(unsafe { libc::kill(pid, 0) }, 0, "postgres runs");
    helper.kill().unwrap();
    helper.wait().unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while unsafe { libc::kill(pid, 0) } == 0 {
        assert!(Instant::now() < until, "postgres {pid} outlived its parent");
        std::thread::sleep(Duration::from_millis(20));
    }
    // It shut down cleanly enough that the directory can be used again.
    let until = Instant::now() + Duration::from_secs(30);
    while data_dir.join("pgdata/postmaster.pid").exists() {
        assert!(Instant::now() < until, "postmaster.pid left behind");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// As root, the server runs as `postgres`, which cannot enter a directory
/// private to root: the error says what to do. As anyone else, the server
/// runs as ourselves, so our own private directory is no obstacle.
#[test]
fn unreachable_data_dir_says_what_to_do() {
    let (bins, run_as) = setup();
    let tmp = tempdir();
    let private = tmp.path().join("private");
    fs::create_dir(&private).unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
    let init = Cluster::init(&bins, &run_as, &private.join("data"));
    if run_as == RunAs::CurrentUser {
        let cluster = init.expect("our own private directory is reachable");
        assert!(cluster.pgdata().join("PG_VERSION").exists());
        return;
    }
    let err = init.unwrap_err();
    assert!(
        matches!(err, EmbeddedError::DataDirUnreachable { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("--data-dir") && msg.contains("/tmp/stead"),
        "{msg}"
    );
}

#[test]
fn non_cluster_directory_is_refused() {
    let (bins, run_as) = setup();
    let tmp = tempdir();
    let data_dir = tmp.path().join("data");
    fs::create_dir_all(data_dir.join("pgdata")).unwrap();
    fs::write(data_dir.join("pgdata/something"), "x").unwrap();
    let err = Cluster::init(&bins, &run_as, &data_dir).unwrap_err();
    assert!(matches!(err, EmbeddedError::NotACluster { .. }), "{err:?}");
}

#[test]
fn shell_quoting() {
    assert_eq!(
        shell_quote("postgresql://stead@127.0.0.1:5/x"),
        "postgresql://stead@127.0.0.1:5/x"
    );
    assert_eq!(shell_quote("/opt/my pg/psql"), "'/opt/my pg/psql'");
    assert_eq!(shell_quote("it's"), r"'it'\''s'");
}

#[test]
fn missing_binaries_name_the_command_that_installs_them() {
    let message = EmbeddedError::BinariesNotFound.to_string();
    assert!(message.contains(&install_command()), "{message}");
    if std::path::Path::new("/etc/debian_version").exists() {
        assert!(
            install_command().ends_with("apt-get install postgresql"),
            "{}",
            install_command()
        );
    }
}
