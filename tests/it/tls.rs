//! TLS to PostgreSQL, against a real server with `ssl = on` and a
//! certificate this test makes with openssl (a CA, a server certificate for
//! `localhost`, a client certificate): `verify-full` connects with the right
//! CA and host name and refuses a wrong host or CA; a node's every session
//! (pool, members, listener) is encrypted; a client certificate logs in a
//! user the server admits by certificate only.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use stead::embedded::{Cluster, PgBinaries, RunAs};

use crate::harness::{init_cluster, ClusterDir};
use crate::TestNode;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("running openssl");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// A CA (`{name}.crt`, `{name}.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) {
    let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            &key,
            "-out",
            &crt,
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// A certificate `{name}.crt` / `{name}.key` for `cn`, signed by `ca`,
/// with `san` (e.g. `DNS:localhost`) if given.
fn make_cert(dir: &Path, ca: &str, name: &str, cn: &str, san: Option<&str>) {
    let (key, csr, crt) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    let ext = dir.join(format!("{name}.ext"));
    let mut text =
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n".to_string();
    if let Some(san) = san {
        text.push_str(&format!("subjectAltName={san}\n"));
    }
    std::fs::write(&ext, text).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &crt,
            "-extfile",
            &ext.to_string_lossy(),
        ],
    );
}

/// A PostgreSQL with TLS on: the server certificate names `localhost`
/// (not 127.0.0.1); user `certuser` may log in only with a client
/// certificate. Returns the cluster, its port and the directory of the
/// certificates.
async fn tls_server(dir: &ClusterDir) -> (Cluster, PathBuf) {
    let mut cluster = init_cluster(dir).await;
    let certs = dir.path.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    make_ca(&certs, "ca");
    make_ca(&certs, "other_ca");
    make_cert(&certs, "ca", "server", "localhost", Some("DNS:localhost"));
    make_cert(&certs, "ca", "client", "certuser", None);
    let pgdata = cluster.pgdata();
    for (from, to) in [
        ("server.crt", "server.crt"),
        ("server.key", "server.key"),
        ("ca.crt", "root.crt"),
    ] {
        std::fs::copy(certs.join(from), pgdata.join(to)).unwrap();
    }
    let owner = std::fs::metadata(&pgdata).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for file in ["server.crt", "server.key", "root.crt"] {
        let p = pgdata.join(file);
        std::os::unix::fs::chown(&p, Some(owner.uid()), Some(owner.gid())).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // The client key is read by this process.
    std::fs::set_permissions(
        certs.join("client.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let conf = pgdata.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'root.crt'\n");
    std::fs::write(&conf, text).unwrap();
    let hba = pgdata.join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "hostssl all certuser 127.0.0.1/32 cert\nhost all certuser 127.0.0.1/32 reject\n{text}"
        ),
    )
    .unwrap();
    cluster.start().await.expect("pg_ctl start");
    (cluster, certs)
}

fn url(host: &str, port: u16, user: &str, params: &str) -> String {
    format!("postgresql://{user}@{host}:{port}/stead?{params}")
}

fn port_of(cluster: &Cluster) -> u16 {
    let url = cluster.url("stead");
    url.rsplit_once(':')
        .unwrap()
        .1
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_connects_with_the_right_ca_and_host_and_refuses_others() {
    let dir = ClusterDir::new("tls");
    let (cluster, certs) = tls_server(&dir).await;
    let port = port_of(&cluster);
    let ca = certs.join("ca.crt").to_string_lossy().into_owned();
    let other = certs.join("other_ca.crt").to_string_lossy().into_owned();
    let full = |host: &str, root: &str| {
        url(
            host,
            port,
            "stead",
            &format!("sslmode=verify-full&sslrootcert={root}"),
        )
    };

    stead::migrate(&full("localhost", &ca), "stead", 16)
        .await
        .expect("verify-full with the right CA and host name");
    for (why, bad) in [
        (
            "a host name the certificate does not name",
            full("127.0.0.1", &ca),
        ),
        ("a CA that did not sign it", full("localhost", &other)),
    ] {
        let refused = stead::migrate(&bad, "stead", 16).await;
        let text = format!(
            "{:?}",
            refused.err().unwrap_or_else(|| panic!("{why}: connected"))
        );
        assert!(text.to_lowercase().contains("certificate"), "{why}: {text}");
    }
    // verify-ca checks the CA, not the name.
    let ca_only = url(
        "127.0.0.1",
        port,
        "stead",
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    );
    stead::migrate(&ca_only, "stead", 16)
        .await
        .expect("verify-ca");
    let refused = url(
        "127.0.0.1",
        port,
        "stead",
        &format!("sslmode=verify-ca&sslrootcert={other}"),
    );
    assert!(stead::migrate(&refused, "stead", 16).await.is_err());

    // A whole node over verify-full: every one of its sessions is encrypted.
    let mut config = TestNode::config_for(&full("localhost", &ca), "tls");
    config.workers = 1;
    let node = TestNode::start_with(config).await;
    node.put_workflow(
        "w",
        json!({"steps": [{"id": "a", "task": {"queue": "stead.echo"}}]}),
    )
    .await;
    let id = node.start_instance("w", json!(1)).await;
    assert_eq!(node.wait_ended(&id).await["status"], "completed");
    let (client, conn) = tokio_postgres::connect(&cluster.url("stead"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name LIKE 'stead%'",
            &[],
        )
        .await
        .unwrap();
    let sessions: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for kind in [
        "stead test-tls",
        "stead test-tls listener",
        "stead member test-tls",
    ] {
        assert!(
            sessions.iter().any(|(name, _)| name == kind),
            "{kind} in {sessions:?}"
        );
    }
    assert!(
        sessions.iter().all(|(_, ssl)| *ssl),
        "all encrypted: {sessions:?}"
    );
    node.shutdown().await;

    // A client certificate logs in the user admitted by certificate only.
    client
        .batch_execute("CREATE ROLE certuser LOGIN SUPERUSER")
        .await
        .unwrap();
    let (cert, key) = (certs.join("client.crt"), certs.join("client.key"));
    let with_cert = url(
        "localhost",
        port,
        "certuser",
        &format!(
            "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
            cert.display(),
            key.display()
        ),
    );
    stead::migrate(&with_cert, "stead", 16)
        .await
        .expect("a client certificate");
    let without = url(
        "localhost",
        port,
        "certuser",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    assert!(
        stead::migrate(&without, "stead", 16).await.is_err(),
        "no certificate, no login"
    );
    cluster.stop().unwrap();
}

/// `pg_ctl start` of `cluster` listening on a Unix-domain socket in its
/// data directory only (as `../shared/bench/pg.sh` runs its server).
fn start_on_socket(cluster: &Cluster, port: u16) {
    let pgdata = cluster.pgdata();
    let options = format!("-p {port} -k {} -c listen_addresses=''", pgdata.display());
    let pg_ctl = PgBinaries::find().unwrap().pg_ctl();
    let mut cmd = match RunAs::detect().unwrap() {
        RunAs::User { name, .. } => {
            let mut c = Command::new("runuser");
            c.args(["-u", &name, "--"]).arg(pg_ctl);
            c
        }
        RunAs::CurrentUser => Command::new(pg_ctl),
    };
    let out = cmd
        .arg("-D")
        .arg(&pgdata)
        .args(["-o", &options, "-w", "start"])
        .arg("-l")
        .arg(cluster.log_path())
        .output()
        .unwrap();
    assert!(out.status.success(), "pg_ctl start: {out:?}");
}

#[tokio::test]
async fn a_url_naming_a_unix_socket_connects_without_tls() {
    let dir = ClusterDir::new("socket");
    let cluster = init_cluster(&dir).await;
    start_on_socket(&cluster, 5432);
    let socket_dir = cluster.pgdata().to_string_lossy().replace('/', "%2F");
    // The default sslmode (prefer) and even require: libpq uses no TLS on a
    // socket, and neither does stead.
    for params in ["", "?sslmode=require"] {
        let url = format!("postgresql://stead@{socket_dir}:5432/postgres{params}");
        stead::migrate(&url, "stead", 16)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e:?}"));
    }
}
