//! The `stead` binary: every role and client command, over the library's
//! public API (see `cli/`).

mod cli;

use clap::Parser;
use cli::{Cli, LogFormat};

/// The engine allocates and frees many small JSON values per step, across
/// threads; glibc's allocator spent a fifth of the process's CPU on that in
/// `stead bench --prefill`, mimalloc a fraction of it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // A benchmark prints its own report; the nodes it runs only warn.
    let default_level = match cli.command {
        cli::Command::Bench(_) => "warn",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("STEAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    match cli::execute(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stead: {}", stead::Chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
