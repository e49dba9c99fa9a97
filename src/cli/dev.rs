//! `stead dev`: a private PostgreSQL from the machine's server binaries, the
//! API and two workers, all in one process.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use stead::embedded::{Cluster, PgBinaries, RunAs};

use super::options::NodeArgs;
use super::shutdown;

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Where the private PostgreSQL cluster lives.
    #[arg(long, env = "STEAD_DATA_DIR", default_value = ".stead")]
    pub data_dir: PathBuf,
    /// Worker members to run in this process.
    #[arg(long, env = "STEAD_WORKERS", default_value_t = 2)]
    pub workers: usize,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// Starts the private cluster in `data_dir` and returns it with the URL of
/// its `stead` database.
pub async fn start_cluster(data_dir: &std::path::Path) -> anyhow::Result<(Cluster, String)> {
    // Without server binaries this stops here, naming the install command.
    let bins = PgBinaries::find()?;
    let run_as = RunAs::detect()?;
    // init creates the directory itself (owned by the postgres user when we
    // are root) and makes the path absolute.
    let mut cluster = Cluster::init(&bins, &run_as, data_dir)
        .with_context(|| format!("preparing PostgreSQL in {}", data_dir.display()))?;
    let url = cluster.start().await?;
    Ok((cluster, url))
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let (cluster, url) = start_cluster(&args.data_dir).await?;
    let mut config = args.node.to_config(url);
    config.workers = args.workers;
    // Open on loopback only: anywhere else the API needs keys, as `serve`.
    let open = is_loopback(&config.listen);
    if open {
        config.auth = stead::Auth::None;
    }
    // On a laptop, `http` steps call local services.
    config
        .http_allow
        .extend(["127.0.0.0/8".to_string(), "::1".to_string()]);
    let node = match stead::start(config).await {
        Ok(node) => node,
        Err(e) => {
            let _ = cluster.stop();
            return Err(e.into());
        }
    };
    let api = node.api_url().unwrap_or_default();
    println!();
    println!("  console:  {api}/");
    println!("  API:      {api}/v1/workflows");
    println!("  metrics:  {api}/metrics");
    if open {
        println!("  auth:     none: the API is open to anyone on this machine (loopback only)");
        println!("  http:     steps may call loopback (127.0.0.0/8, ::1); other private ranges stay closed");
    } else {
        println!(
            "  auth:     API keys (not on loopback); make one with: stead key create --role admin \\
             --name me --database-url '{url_hint}'",
            url_hint = cluster.url("stead")
        );
    }
    println!("  database: {}", cluster.psql_command("stead"));
    println!(
        "            (then e.g. SELECT * FROM {}.instance_overview;)",
        args.node.schema
    );
    println!(
        "  Ctrl-C stops stead and its PostgreSQL; the data stays in {}",
        args.data_dir.display()
    );
    shutdown::signal().await;
    println!("stopping...");
    node.shutdown().await;
    cluster.stop()?;
    Ok(())
}

/// Whether a `--listen` address is a loopback one.
fn is_loopback(listen: &str) -> bool {
    let host = listen.rsplit_once(':').map_or(listen, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn only_loopback_addresses_run_open() {
        for open in ["127.0.0.1:8080", "localhost:0", "[::1]:8080", "127.1.2.3:9"] {
            assert!(is_loopback(open), "{open}");
        }
        for keyed in ["0.0.0.0:8080", "[::]:8080", "10.0.0.5:80", "example.com:80"] {
            assert!(!is_loopback(keyed), "{keyed}");
        }
    }
}
