//! Starting and stopping a node: one supervisor owns every background task
//! and drains them on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Tuning, MIN_GAUGE_REFRESH_MS};
use crate::error::Error;
use crate::membership::{Membership, MembershipConfig, Ownership};
use crate::metrics::{ClusterGauges, Metrics, ProcessDuty};
use crate::service::{self, Never, Pacing, Service, Wake};
use crate::store::{FiringLimits, Store, StoreConfig};
use crate::wakeups::Wakeups;
use crate::worker::advancer::{Advancer, AdvancerConfig};
use crate::worker::controls::{Controls, ControlsRefresher};
use crate::worker::executor::{Executor, ExecutorConfig, LocalExecution};
use crate::worker::listener::Listener;
use crate::worker::notifier::{AdvanceNotifier, Notifier};
use crate::worker::reaper::{Reaper, ReaperConfig};
use crate::worker::retention::{Retention, RetentionConfig};
use crate::worker::scheduler::Scheduler;
use crate::worker::{builtin, DefinitionCache};

/// A running node: the API and/or worker members, until `shutdown`.
pub struct Node {
    api_addr: Option<SocketAddr>,
    supervisor: Supervisor,
    shutdown_timeout: Duration,
}

impl Node {
    /// The address the API listens on (if this node serves the API).
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    /// `http://HOST:PORT` of the API (if this node serves the API).
    pub fn api_url(&self) -> Option<String> {
        self.api_addr.map(|a| format!("http://{a}"))
    }

    /// Stops every task: cancels them, waits up to the shutdown timeout for
    /// them to drain, then aborts what is left.
    pub async fn shutdown(self) {
        self.supervisor.shutdown(self.shutdown_timeout).await;
    }
}

/// Runs a node until `shutdown` resolves, then stops it cleanly.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let node = start(config).await?;
    shutdown.await;
    node.shutdown().await;
    Ok(())
}

/// Starts a node: migrates (unless told not to), binds the API and spawns the
/// workers. Returns once the API accepts connections.
pub async fn start(config: Config) -> Result<Node, Error> {
    config.validate()?;
    let tuning = &config.tuning;
    let store = Store::new(store_config(&config))?;
    if config.migrate {
        store
            .migrate(config.slot_count)
            .await
            .map_err(|e| Error::Migrate(Box::new(e)))?;
    }
    store.check_pooled().await?;
    let parts = Parts::new(store, tuning);
    // Known before any attempt could run inline (see `worker::controls`).
    parts.controls.reload(&parts.store).await?;
    let mut supervisor = Supervisor::default();
    spawn_wakeups(&mut supervisor, &parts, tuning);
    let refresher = ControlsRefresher {
        controls: parts.controls.clone(),
        store: parts.store.clone(),
    };
    let refresh_ms = tuning.controls_refresh_ms;
    supervisor.service(refresher, Pacing::every(refresh_ms, refresh_ms), Never);
    // The API is bound first so members can advertise its URL; it starts
    // serving at once.
    let api_addr = match config.api {
        true => Some(serve_api(&mut supervisor, &parts, &config).await?),
        false => None,
    };
    if config.workers > 0 {
        let api_url = api_addr.map(|a| format!("http://{a}"));
        spawn_workers(&mut supervisor, &parts, &config, api_url);
    }
    if let Some(addr) = api_addr {
        println!("stead listening on http://{addr}");
    }
    Ok(Node {
        api_addr,
        supervisor,
        shutdown_timeout: Duration::from_millis(tuning.shutdown_timeout_ms),
    })
}

fn store_config(config: &Config) -> StoreConfig {
    let tuning = &config.tuning;
    StoreConfig {
        database_url: config.database_url.clone(),
        direct_database_url: config.direct_database_url.clone(),
        schema: config.schema.clone(),
        pool_size: tuning.pool_size,
        pool_wait_timeout_ms: tuning.pool_wait_timeout_ms,
        statement_timeout_ms: tuning.statement_timeout_ms,
        idle_in_transaction_timeout_ms: tuning.idle_in_transaction_timeout_ms,
        application_name: format!("stead {}", config.name),
    }
}

/// What every part of a node shares.
struct Parts {
    store: Store,
    metrics: Arc<Metrics>,
    wakeups: Wakeups,
    definitions: DefinitionCache,
    notifier: AdvanceNotifier,
    controls: Controls,
}

impl Parts {
    fn new(store: Store, tuning: &Tuning) -> Self {
        let metrics = Arc::new(Metrics::new());
        metrics.pool_max.set(tuning.pool_size.max(1) as i64);
        let wakeups = Wakeups::default();
        Parts {
            store,
            controls: Controls::new(metrics.clone()),
            metrics,
            notifier: AdvanceNotifier::new(wakeups.clone()),
            wakeups,
            definitions: DefinitionCache::default(),
        }
    }
}

/// The LISTEN session, and the notifier that coalesces this process's
/// wake-ups for the others.
fn spawn_wakeups(sup: &mut Supervisor, parts: &Parts, tuning: &Tuning) {
    let reconnect = Pacing {
        interval_ms: None,
        settle_ms: 0,
        backoff_min_ms: tuning.reconnect_min_ms,
        backoff_max_ms: tuning.reconnect_max_ms,
    };
    let listener = Listener {
        store: parts.store.clone(),
        wakeups: parts.wakeups.clone(),
        metrics: parts.metrics.clone(),
        cancel: sup.token(),
    };
    sup.service(listener, reconnect, Never);
    let coalesce = Pacing {
        interval_ms: None,
        settle_ms: tuning.notify_coalesce_ms,
        // Never used: a failed NOTIFY is not a failed run.
        backoff_min_ms: tuning.notify_coalesce_ms,
        backoff_max_ms: tuning.notify_coalesce_ms,
    };
    let notifier = Notifier {
        store: parts.store.clone(),
        metrics: parts.metrics.clone(),
    };
    sup.service(notifier, coalesce, parts.notifier.requests());
}

async fn serve_api(
    sup: &mut Supervisor,
    parts: &Parts,
    config: &Config,
) -> Result<SocketAddr, Error> {
    let bind_error = |source| Error::Bind {
        addr: config.listen.clone(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    let shared = crate::api::Shared {
        store: parts.store.clone(),
        definitions: parts.definitions.clone(),
        wakeups: parts.wakeups.clone(),
        notifier: parts.notifier.clone(),
        controls: parts.controls.clone(),
        metrics: parts.metrics.clone(),
        limits: config.limits.clone(),
        tuning: config.tuning.clone(),
        auth: config.auth,
        metrics_auth: config.metrics_auth,
        admission: Arc::new(tokio::sync::Semaphore::new(
            config.limits.max_concurrent_requests,
        )),
        grafana_url: config.grafana_url.clone(),
    };
    let router = crate::api::router(shared.into());
    let cancel = sup.token();
    sup.spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "API server failed");
        }
    });
    Ok(addr)
}

/// The cluster gauges (for the process), and per worker member its
/// membership, advancer, reaper and executor.
fn spawn_workers(sup: &mut Supervisor, parts: &Parts, config: &Config, api_url: Option<String>) {
    let tuning = &config.tuning;
    let process_duty = ProcessDuty::default();
    let gauges = ClusterGauges {
        store: parts.store.clone(),
        process_duty: process_duty.clone(),
        metrics: parts.metrics.clone(),
    };
    let refresh_ms = tuning.gauge_refresh_ms.max(MIN_GAUGE_REFRESH_MS);
    // After a failure the gauges wait their interval: their last values stay.
    sup.service(gauges, Pacing::every(refresh_ms, refresh_ms), Never);
    let retention = Retention {
        config: RetentionConfig {
            default_ms: tuning.retention_ms,
            batch_size: tuning.retention_batch_size,
            pause_ms: tuning.retention_pause_ms,
        },
        store: parts.store.clone(),
        process_duty: process_duty.clone(),
        metrics: parts.metrics.clone(),
    };
    let retention_ms = tuning.retention_interval_ms;
    sup.service(retention, Pacing::every(retention_ms, retention_ms), Never);
    let scheduler = Scheduler {
        limits: FiringLimits {
            schedules: tuning.schedule_batch_size as i64,
            firings: tuning.schedule_max_firings,
            grace_ms: tuning.schedule_grace_ms,
        },
        interval_ms: tuning.schedule_interval_ms,
        store: parts.store.clone(),
        process_duty: process_duty.clone(),
        metrics: parts.metrics.clone(),
        notifier: parts.notifier.clone(),
    };
    // The scheduler paces itself (`Scheduler::next`); after a failure it
    // backs off for the error backoff.
    let firing = Pacing::every(tuning.schedule_interval_ms, tuning.error_backoff_ms);
    sup.service(scheduler, firing, Never);
    let mut handlers = config.handlers.clone();
    builtin::install(
        &mut handlers,
        &builtin::HttpSteps {
            default_timeout_ms: tuning.http_step_timeout_ms,
            max_response_bytes: tuning.http_max_response_bytes,
            max_redirects: tuning.http_max_redirects,
            // Checked by `Config::validate` before the node starts.
            allow: crate::worker::HttpAllow::parse(&config.http_allow).unwrap_or_default(),
        },
    );
    for n in 0..config.workers {
        let name = if config.workers == 1 {
            config.name.clone()
        } else {
            format!("{}-{}", config.name, n + 1)
        };
        let ownership = Ownership::default();
        let membership = Membership::new(
            MembershipConfig {
                name: name.clone(),
                ttl_ms: tuning.member_ttl_ms,
                api_url: api_url.clone(),
                inline_quarantine_ms: tuning.inline_quarantine_ms,
            },
            parts.store.clone(),
            ownership.clone(),
            parts.wakeups.clone(),
            parts.metrics.clone(),
            process_duty.clone(),
        );
        let heartbeats = Pacing {
            interval_ms: Some(tuning.heartbeat_ms),
            settle_ms: 0,
            backoff_min_ms: tuning.reconnect_min_ms,
            backoff_max_ms: tuning.reconnect_max_ms,
        };
        sup.service(membership, heartbeats, Never);
        let local = spawn_executor(sup, parts, tuning, name.clone(), handlers.clone());
        spawn_engine(
            sup,
            parts,
            tuning,
            &name,
            ownership,
            local,
            config.limits.engine(),
        );
    }
}

/// A member's advancer and reaper, working the slots it owns (the advancer
/// runs attempts inline through the member's executor, if it has one).
fn spawn_engine(
    sup: &mut Supervisor,
    parts: &Parts,
    tuning: &Tuning,
    member: &str,
    ownership: Ownership,
    local: Option<LocalExecution>,
    engine_limits: crate::engine::EngineLimits,
) {
    let advancer = Advancer {
        config: AdvancerConfig {
            member: member.to_string(),
            batch_size: tuning.advance_batch_size,
            batch_max_bytes: tuning.advance_batch_max_bytes,
            inline_budget_ms: tuning.inline_budget_ms,
            limits: engine_limits,
        },
        local,
        store: parts.store.clone(),
        definitions: parts.definitions.clone(),
        ownership: ownership.clone(),
        metrics: parts.metrics.clone(),
        wakeups: parts.wakeups.clone(),
        controls: parts.controls.clone(),
    };
    let polling = Pacing::every(tuning.poll_interval_ms, tuning.error_backoff_ms);
    sup.service(advancer, polling, parts.wakeups.advance.subscribe());
    let reaper = Reaper {
        config: ReaperConfig {
            batch_size: tuning.reap_batch_size,
        },
        store: parts.store.clone(),
        ownership,
        metrics: parts.metrics.clone(),
    };
    let reaping = Pacing::every(tuning.reap_interval_ms, tuning.reap_interval_ms);
    sup.service(reaper, reaping, Never);
}

fn spawn_executor(
    sup: &mut Supervisor,
    parts: &Parts,
    tuning: &Tuning,
    worker_name: String,
    handlers: crate::Handlers,
) -> Option<LocalExecution> {
    if handlers.is_empty() {
        return None;
    }
    let config = ExecutorConfig {
        worker_name,
        claim_batch_size: tuning.claim_batch_size,
        concurrency: tuning.worker_concurrency,
        lease_ms: tuning.lease_ms,
        completion_batch_size: tuning.completion_batch_size,
        shutdown_timeout_ms: tuning.shutdown_timeout_ms,
    };
    let executor = Executor::new(
        config,
        parts.store.clone(),
        handlers,
        parts.notifier.clone(),
        parts.controls.clone(),
        parts.metrics.clone(),
        sup.token(),
    );
    let local = executor.local();
    let polling = Pacing::every(tuning.poll_interval_ms, tuning.error_backoff_ms);
    sup.service(executor, polling, parts.wakeups.tasks.subscribe());
    Some(local)
}

/// Owns every background task of a node; cancels and drains them together.
#[derive(Default)]
struct Supervisor {
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

impl Supervisor {
    /// A token cancelled when the node stops.
    fn token(&self) -> CancellationToken {
        self.cancel.child_token()
    }

    fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    fn service<S: Service>(&mut self, service: S, pacing: Pacing, wake: impl Wake + 'static) {
        let cancel = self.token();
        self.tasks
            .spawn(service::run(service, pacing, wake, cancel));
    }

    /// Cancels every task, waits up to `timeout` for them to drain, then
    /// aborts what is left.
    async fn shutdown(mut self, timeout: Duration) {
        self.cancel.cancel();
        let drained = tokio::time::timeout(timeout, async {
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
