//! The one shutdown signal of every long-running subcommand.

async fn ctrl_c() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c().await;
}
