//! Every metric stead exports, defined in this one file. Names carry the
//! `stead_` prefix and base units; labels are bounded (workflow names, queue
//! names, step kinds, routes, statuses; never instance ids).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub instances_started: IntCounterVec,
    pub instances_ended: IntCounterVec,
    pub tasks_claimed: IntCounterVec,
    pub task_duration: HistogramVec,
    pub leases_expired: IntCounter,
    pub stale_completions: IntCounter,
    pub db_errors: IntCounter,
    pub advance_batch_seconds: Histogram,
    pub http_requests: IntCounterVec,
    pub http_request_duration: HistogramVec,
    pub pool_size: IntGauge,
    pub pool_available: IntGauge,
    pub pool_waiting: IntGauge,
    pub queue_depth: IntGaugeVec,
    pub members_alive: IntGauge,
    pub members_removed: IntCounter,
    pub slots_owned: IntGaugeVec,
    pub slot_rebalances: IntCounter,
    pub heartbeat_failures: IntCounter,
    pub failover_seconds: Histogram,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("valid metric");
                registry
                    .register(Box::new(m.clone()))
                    .expect("unique metric");
                m
            }};
        }
        Metrics {
            instances_started: reg!(IntCounterVec::new(
                Opts::new(
                    "stead_instances_started_total",
                    "Instances that began running."
                ),
                &["workflow"]
            )),
            instances_ended: reg!(IntCounterVec::new(
                Opts::new(
                    "stead_instances_ended_total",
                    "Instances that ended, by final status."
                ),
                &["workflow", "status"]
            )),
            tasks_claimed: reg!(IntCounterVec::new(
                Opts::new(
                    "stead_tasks_claimed_total",
                    "Task attempts claimed by in-process workers."
                ),
                &["queue"]
            )),
            task_duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "stead_task_duration_seconds",
                    "Run time of in-process task attempts."
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["queue", "outcome"]
            )),
            leases_expired: reg!(IntCounter::new(
                "stead_leases_expired_total",
                "Task leases that expired and were handed back to the engine."
            )),
            stale_completions: reg!(IntCounter::new(
                "stead_stale_completions_total",
                "Task results refused because the lease was no longer held."
            )),
            db_errors: reg!(IntCounter::new(
                "stead_db_errors_total",
                "Database operations of background loops that failed."
            )),
            advance_batch_seconds: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "stead_advance_batch_seconds",
                    "Time to advance one batch of instances."
                )
                .buckets(LATENCY_BUCKETS.to_vec())
            )),
            http_requests: reg!(IntCounterVec::new(
                Opts::new(
                    "stead_http_requests_total",
                    "API requests by route and status."
                ),
                &["method", "route", "status"]
            )),
            http_request_duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "stead_http_request_duration_seconds",
                    "API request latency by route."
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["method", "route"]
            )),
            pool_size: reg!(IntGauge::new(
                "stead_db_pool_connections",
                "Connections the database pool holds."
            )),
            pool_available: reg!(IntGauge::new(
                "stead_db_pool_available_connections",
                "Idle connections in the database pool."
            )),
            pool_waiting: reg!(IntGauge::new(
                "stead_db_pool_waiters",
                "Callers waiting for a database connection."
            )),
            queue_depth: reg!(IntGaugeVec::new(
                Opts::new(
                    "stead_queue_tasks",
                    "Tasks per queue and state (ready, leased, delayed)."
                ),
                &["queue", "state"]
            )),
            members_alive: reg!(IntGauge::new(
                "stead_members_alive",
                "Live members as this process last saw them."
            )),
            members_removed: reg!(IntCounter::new(
                "stead_members_removed_total",
                "Dead members this process removed from the cluster."
            )),
            slots_owned: reg!(IntGaugeVec::new(
                Opts::new(
                    "stead_slots_owned",
                    "Slots each member of this process holds."
                ),
                &["member"]
            )),
            slot_rebalances: reg!(IntCounter::new(
                "stead_slot_rebalances_total",
                "Times a member of this process released or acquired slots."
            )),
            heartbeat_failures: reg!(IntCounter::new(
                "stead_heartbeat_failures_total",
                "Membership heartbeats or joins that failed."
            )),
            failover_seconds: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "stead_failover_seconds",
                    "From a dead member's last heartbeat until this process held the slots it took over."
                )
                .buckets(vec![0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0])
            )),
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("encoding metrics");
        String::from_utf8(buffer).expect("metrics are UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
