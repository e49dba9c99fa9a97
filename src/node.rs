//! Starting and stopping a node: one supervisor owns every background task
//! and drains them on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::membership::{
    ClusterGaugesConfig, ClusterGaugesLoop, Membership, MembershipConfig, Ownership, ProcessDuty,
};
use crate::metrics::Metrics;
use crate::store::{Store, StoreConfig};
use crate::worker::advancer::{Advancer, AdvancerConfig};
use crate::worker::executor::{Executor, ExecutorConfig};
use crate::worker::listener::{Listener, ListenerConfig};
use crate::worker::notifier::{AdvanceNotifier, Notifier, NotifierConfig};
use crate::worker::reaper::{Reaper, ReaperConfig};
use crate::worker::{builtin, DefinitionCache, Wakeups};

/// A running node.
pub struct Node {
    api_addr: Option<SocketAddr>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
    shutdown_timeout: Duration,
    store: Store,
}

impl Node {
    /// The address the API listens on (if this node serves the API).
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    pub fn api_url(&self) -> Option<String> {
        self.api_addr.map(|a| format!("http://{a}"))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Stops every task: cancels them, waits up to the shutdown timeout for
    /// them to drain, then aborts what is left.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        let drained = tokio::time::timeout(self.shutdown_timeout, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("shutdown timeout reached; aborting remaining tasks");
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
    }
}

/// Runs a node until `shutdown` resolves, then stops it cleanly.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let node = start(config).await?;
    shutdown.await;
    node.shutdown().await;
    Ok(())
}

/// Starts a node: migrates (unless told not to), binds the API and spawns the
/// workers. Returns once the API accepts connections.
pub async fn start(config: Config) -> anyhow::Result<Node> {
    let tuning = &config.tuning;
    if tuning.member_ttl_ms < 2 * tuning.heartbeat_ms.max(1) {
        anyhow::bail!(
            "--member-ttl-ms ({}) must be at least twice --heartbeat-ms ({})",
            tuning.member_ttl_ms,
            tuning.heartbeat_ms
        );
    }
    let store = Store::new(StoreConfig {
        database_url: config.database_url.clone(),
        schema: config.schema.clone(),
        pool_size: tuning.pool_size,
        pool_wait_timeout_ms: tuning.pool_wait_timeout_ms,
        statement_timeout_ms: tuning.statement_timeout_ms,
        idle_in_transaction_timeout_ms: tuning.idle_in_transaction_timeout_ms,
        application_name: format!("stead {}", config.name),
    })?;
    if config.migrate {
        store
            .migrate(config.slot_count)
            .await
            .context("applying migrations")?;
    }

    let metrics = Arc::new(Metrics::new());
    metrics.pool_max.set(tuning.pool_size.max(1) as i64);
    let wakeups = Wakeups::default();
    let definitions = DefinitionCache::default();
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();

    tasks.spawn(
        Listener {
            config: ListenerConfig {
                reconnect_min_ms: 100,
                reconnect_max_ms: 5_000,
            },
            store: store.clone(),
            wakeups: wakeups.clone(),
            metrics: metrics.clone(),
        }
        .run(cancel.child_token()),
    );

    let notifier = AdvanceNotifier::new(wakeups.clone());
    tasks.spawn(
        Notifier {
            config: NotifierConfig { coalesce_ms: 5 },
            store: store.clone(),
            handle: notifier.clone(),
            metrics: metrics.clone(),
        }
        .run(cancel.child_token()),
    );

    // The API is bound first so members can advertise its URL; it starts
    // serving at once.
    let mut api_addr = None;
    if config.api {
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .with_context(|| format!("binding the API to {}", config.listen))?;
        let addr = listener.local_addr()?;
        api_addr = Some(addr);
        let state = crate::api::AppState::new(
            store.clone(),
            definitions.clone(),
            wakeups.clone(),
            notifier.clone(),
            metrics.clone(),
            config.limits.clone(),
            config.tuning.clone(),
        );
        let router = crate::api::router(state);
        let api_cancel = cancel.child_token();
        tasks.spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async move { api_cancel.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "API server failed");
            }
        });
    }

    let mut handlers = config.handlers.clone();
    builtin::install(&mut handlers, tuning.http_step_timeout_ms);
    let api_url = api_addr.map(|a| format!("http://{a}"));
    let process_duty = ProcessDuty::default();
    if config.workers > 0 {
        tasks.spawn(
            ClusterGaugesLoop {
                config: ClusterGaugesConfig {
                    interval_ms: tuning.gauge_refresh_ms.max(100),
                },
                store: store.clone(),
                process_duty: process_duty.clone(),
                metrics: metrics.clone(),
            }
            .run(cancel.child_token()),
        );
    }
    for n in 0..config.workers {
        let worker_name = if config.workers == 1 {
            config.name.clone()
        } else {
            format!("{}-{}", config.name, n + 1)
        };
        let ownership = Ownership::default();
        tasks.spawn(
            Membership {
                config: MembershipConfig {
                    name: worker_name.clone(),
                    heartbeat_ms: tuning.heartbeat_ms,
                    ttl_ms: tuning.member_ttl_ms,
                    api_url: api_url.clone(),
                    reconnect_max_ms: 5_000,
                },
                store: store.clone(),
                ownership: ownership.clone(),
                wakeups: wakeups.clone(),
                metrics: metrics.clone(),
                failover_since: Default::default(),
                holds_maintenance: Default::default(),
                process_duty: process_duty.clone(),
            }
            .run(cancel.child_token()),
        );
        tasks.spawn(
            Advancer {
                config: AdvancerConfig {
                    batch_size: tuning.advance_batch_size,
                    poll_interval_ms: tuning.poll_interval_ms,
                    error_backoff_ms: 500,
                },
                store: store.clone(),
                definitions: definitions.clone(),
                wakeups: wakeups.clone(),
                ownership: ownership.clone(),
                metrics: metrics.clone(),
            }
            .run(cancel.child_token()),
        );
        tasks.spawn(
            Reaper {
                config: ReaperConfig {
                    interval_ms: tuning.reap_interval_ms,
                    batch_size: 1000,
                },
                store: store.clone(),
                ownership,
                metrics: metrics.clone(),
            }
            .run(cancel.child_token()),
        );
        tasks.spawn(
            Executor {
                config: ExecutorConfig {
                    worker_name,
                    claim_batch_size: tuning.claim_batch_size,
                    concurrency: tuning.worker_concurrency,
                    lease_ms: tuning.lease_ms,
                    poll_interval_ms: tuning.poll_interval_ms,
                    completion_batch_size: tuning.completion_batch_size,
                    error_backoff_ms: 500,
                    shutdown_timeout_ms: tuning.shutdown_timeout_ms,
                },
                store: store.clone(),
                handlers: handlers.clone(),
                wakeups: wakeups.clone(),
                notifier: notifier.clone(),
                metrics: metrics.clone(),
            }
            .run(cancel.child_token()),
        );
    }
    if let Some(addr) = api_addr {
        println!("stead listening on http://{addr}");
    }

    Ok(Node {
        api_addr,
        cancel,
        tasks,
        shutdown_timeout: Duration::from_millis(tuning.shutdown_timeout_ms),
        store,
    })
}
