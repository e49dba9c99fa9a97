//! Every metric stead exports, defined in this one file. Names carry the
//! `stead_` prefix and base units (seconds, counts); labels are bounded:
//! workflow names, queue names, step kinds, member names, routes, statuses
//! and outcomes, never instance ids.
//!
//! Counters and histograms are per process: a dashboard sums them over the
//! cluster. Gauges that need a query (queue depth, members alive, unowned
//! slots) are set only in the process whose member holds the maintenance
//! duty, so summing or taking the max over the cluster counts them once.

mod gauges;

pub(crate) use gauges::{ClusterGauges, ProcessDuty};

use crate::store::{ClusterCounts, Fired, Purged, QueueDepth};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// A parked long-poll, counted in `stead_http_long_polls_waiting` while it
/// lives.
pub(crate) struct LongPoll(IntGauge);

impl Drop for LongPoll {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What failed when `stead_db_errors_total` counts an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Component {
    Api,
    Advancer,
    Executor,
    Reaper,
    Membership,
    Listener,
    Notifier,
    Retention,
    Scheduler,
    Controls,
}

impl Component {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Component::Api => "api",
            Component::Advancer => "advancer",
            Component::Executor => "executor",
            Component::Reaper => "reaper",
            Component::Membership => "membership",
            Component::Listener => "listener",
            Component::Notifier => "notifier",
            Component::Retention => "retention",
            Component::Scheduler => "scheduler",
            Component::Controls => "controls",
        }
    }

    const ALL: [Component; 10] = [
        Component::Api,
        Component::Advancer,
        Component::Executor,
        Component::Reaper,
        Component::Membership,
        Component::Listener,
        Component::Notifier,
        Component::Retention,
        Component::Scheduler,
        Component::Controls,
    ];
}

/// The `table` labels of `stead_retention_deleted_rows_total`, in the order
/// of `Purged`'s counts.
const RETAINED_TABLES: [&str; 5] = ["instances", "steps", "tasks", "signals", "history"];

/// The final statuses of an instance, pre-created per workflow so a rate()
/// over them has a starting point before the first increment.
const ENDED_STATUSES: [&str; 3] = ["completed", "failed", "cancelled"];

/// The `outcome` labels of `stead_schedule_firings_total`.
const FIRING_OUTCOMES: [&str; 3] = ["started", "skipped", "missed"];

pub(crate) struct Metrics {
    registry: Registry,
    // ---- instances ----
    pub(crate) instances_started: IntCounterVec,
    pub(crate) instances_ended: IntCounterVec,
    pub(crate) instance_duration: HistogramVec,
    // ---- steps ----
    pub(crate) step_attempts: IntCounterVec,
    pub(crate) step_retries: IntCounterVec,
    pub(crate) inline_attempts: IntCounterVec,
    pub(crate) step_duration: HistogramVec,
    // ---- queues and tasks ----
    pub(crate) tasks_claimed: IntCounterVec,
    pub(crate) queue_wait: HistogramVec,
    pub(crate) task_duration: HistogramVec,
    pub(crate) queue_tasks: IntGaugeVec,
    pub(crate) queue_oldest_ready_age: prometheus::GaugeVec,
    pub(crate) queue_controlled: IntGaugeVec,
    pub(crate) queue_paused: IntGaugeVec,
    pub(crate) workflow_paused: IntGaugeVec,
    pub(crate) leases_expired: IntCounter,
    pub(crate) stale_completions: IntCounter,
    // ---- engine ----
    pub(crate) advance_batch_seconds: Histogram,
    // ---- retention ----
    pub(crate) retention_deleted: IntCounterVec,
    pub(crate) oldest_ended_age: prometheus::GaugeVec,
    // ---- schedules ----
    pub(crate) schedule_firings: IntCounterVec,
    pub(crate) schedule_lateness: Histogram,
    // ---- cluster ----
    /// Cluster-wide gauges are vectors without labels so that a process
    /// not holding the maintenance duty can withdraw them (`reset`).
    pub(crate) members_alive: IntGaugeVec,
    pub(crate) members_removed: IntCounter,
    pub(crate) maintenance_duty: IntGauge,
    pub(crate) slots: IntGaugeVec,
    pub(crate) slots_unowned: IntGaugeVec,
    pub(crate) slots_owned: IntGaugeVec,
    pub(crate) slot_rebalances: IntCounter,
    pub(crate) heartbeat_failures: IntCounter,
    pub(crate) failover_seconds: Histogram,
    // ---- database ----
    pub(crate) pool_max: IntGauge,
    pub(crate) pool_size: IntGauge,
    pub(crate) pool_in_use: IntGauge,
    pub(crate) pool_waiting: IntGauge,
    pub(crate) db_errors: IntCounterVec,
    // ---- HTTP API ----
    pub(crate) http_requests: IntCounterVec,
    pub(crate) http_request_duration: HistogramVec,
    pub(crate) long_polls_waiting: IntGaugeVec,
    pub(crate) http_requests_in_flight: IntGauge,
}

/// The label values of a vector without labels.
const NO_LABELS: &[&str] = &[];

/// Request and attempt latencies: 1 ms to 1 minute.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Whole instances and steps (which may sleep or wait for signals): 10 ms
/// to a day.
const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
    21600.0, 86400.0,
];

impl Metrics {
    pub(crate) fn new() -> Self {
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
        fn histogram(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
            HistogramOpts::new(name, help).buckets(buckets.to_vec())
        }
        let build_info = reg!(IntGaugeVec::new(
            Opts::new(
                "stead_build_info",
                "Always 1; the version label says which stead runs."
            ),
            &["version"]
        ));
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let metrics = Metrics {
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
                    "Instances that ended, by final status (completed, failed, cancelled)."
                ),
                &["workflow", "status"]
            )),
            instance_duration: reg!(HistogramVec::new(
                histogram(
                    "stead_instance_duration_seconds",
                    "End-to-end duration of ended instances, from submission to end.",
                    DURATION_BUCKETS
                ),
                &["workflow", "status"]
            )),
            step_attempts: reg!(IntCounterVec::new(
                Opts::new(
                    "stead_step_attempts_total",
                    "Finished step attempts (tasks, http calls, child workflows) by outcome \
                     (completed, failed, expired)."
                ),
                &["workflow", "kind", "queue", "outcome"]
            )),
            step_retries: reg!(IntCounterVec::new(
                Opts::new(
                    "stead_step_retries_total",
                    "Step attempts scheduled after a failed attempt (attempt 2 and later)."
                ),
                &["workflow", "kind", "queue"]
            )),
            inline_attempts: reg!(IntCounterVec::new(
                Opts::new(
                    "stead_inline_attempts_total",
                    "In-process attempts run inline by the advancer, by outcome: recorded (the \
                     result committed with the batch) or handed_over (still running at the \
                     inline budget, handed to the queue as a leased task)."
                ),
                &["workflow", "kind", "queue", "outcome"]
            )),
            step_duration: reg!(HistogramVec::new(
                histogram(
                    "stead_step_duration_seconds",
                    "Duration of ended steps, first attempt to end (retries, sleeps and waits \
                     included), by final status (completed, failed).",
                    DURATION_BUCKETS
                ),
                &["workflow", "kind", "queue", "status"]
            )),
            tasks_claimed: reg!(IntCounterVec::new(
                Opts::new(
                    "stead_tasks_claimed_total",
                    "Task attempts claimed, by in-process workers and over the API."
                ),
                &["queue"]
            )),
            queue_wait: reg!(HistogramVec::new(
                histogram(
                    "stead_queue_wait_seconds",
                    "Schedule-to-start delay: from when a task became ready until it was claimed.",
                    LATENCY_BUCKETS
                ),
                &["queue"]
            )),
            task_duration: reg!(HistogramVec::new(
                histogram(
                    "stead_task_duration_seconds",
                    "Run time of in-process task attempts (handlers and http calls).",
                    LATENCY_BUCKETS
                ),
                &["queue", "outcome"]
            )),
            queue_tasks: reg!(IntGaugeVec::new(
                Opts::new(
                    "stead_queue_tasks",
                    "Tasks per queue and state (ready, leased, delayed); exported by the \
                     maintenance-duty holder."
                ),
                &["queue", "state"]
            )),
            queue_controlled: reg!(IntGaugeVec::new(
                Opts::new(
                    "stead_queue_controlled",
                    "1 for each queue with limits or paused, as this process last read them \
                     (every --controls-refresh-ms)."
                ),
                &["queue"]
            )),
            queue_paused: reg!(IntGaugeVec::new(
                Opts::new(
                    "stead_queue_paused",
                    "1 for each paused queue, as this process last read them."
                ),
                &["queue"]
            )),
            workflow_paused: reg!(IntGaugeVec::new(
                Opts::new(
                    "stead_workflow_paused",
                    "1 for each workflow whose new instances are held, as this process last \
                     read them."
                ),
                &["workflow"]
            )),
            queue_oldest_ready_age: reg!(prometheus::GaugeVec::new(
                Opts::new(
                    "stead_queue_oldest_ready_age_seconds",
                    "Age of the oldest ready task per queue (0 when none is ready); exported by \
                     the maintenance-duty holder."
                ),
                &["queue"]
            )),
            leases_expired: reg!(IntCounter::new(
                "stead_leases_expired_total",
                "Task leases that expired and were handed back to the engine as failed attempts."
            )),
            stale_completions: reg!(IntCounter::new(
                "stead_stale_completions_total",
                "Task results refused because the lease was no longer held."
            )),
            advance_batch_seconds: reg!(Histogram::with_opts(histogram(
                "stead_advance_batch_seconds",
                "Time to advance one batch of instances (lock, decide, write, commit).",
                LATENCY_BUCKETS
            ))),
            retention_deleted: reg!(IntCounterVec::new(
                Opts::new(
                    "stead_retention_deleted_rows_total",
                    "Rows deleted by retention, by table (instances, steps, tasks, signals, \
                     history)."
                ),
                &["table"]
            )),
            schedule_firings: reg!(IntCounterVec::new(
                Opts::new(
                    "stead_schedule_firings_total",
                    "Schedule firings by outcome: started (an instance), skipped (the overlap \
                     policy), missed (older than the schedule's catchup); counted by the \
                     maintenance-duty holder."
                ),
                &["outcome"]
            )),
            schedule_lateness: reg!(Histogram::with_opts(histogram(
                "stead_schedule_lateness_seconds",
                "How long after its time a schedule's firing started its instance.",
                LATENCY_BUCKETS
            ))),
            oldest_ended_age: reg!(prometheus::GaugeVec::new(
                Opts::new(
                    "stead_oldest_ended_instance_age_seconds",
                    "Time since the oldest stored ended instance ended (0 when none is stored); \
                     exported by the maintenance-duty holder."
                ),
                &[]
            )),
            members_alive: reg!(IntGaugeVec::new(
                Opts::new(
                    "stead_members_alive",
                    "Live members of the cluster; exported by the maintenance-duty holder."
                ),
                &[]
            )),
            members_removed: reg!(IntCounter::new(
                "stead_members_removed_total",
                "Dead members this process removed from the cluster."
            )),
            maintenance_duty: reg!(IntGauge::new(
                "stead_maintenance_duty",
                "1 if a member of this process holds the maintenance duty, else 0."
            )),
            slots: reg!(IntGaugeVec::new(
                Opts::new(
                    "stead_slots",
                    "Slots instances are spread over; exported by the maintenance-duty holder."
                ),
                &[]
            )),
            slots_unowned: reg!(IntGaugeVec::new(
                Opts::new(
                    "stead_slots_unowned",
                    "Slots no live member holds (their instances do not advance); exported by the \
                     maintenance-duty holder."
                ),
                &[]
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
            failover_seconds: reg!(Histogram::with_opts(histogram(
                "stead_failover_seconds",
                "From a dead member's last heartbeat until this process held the slots it took \
                 over.",
                &[0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0]
            ))),
            pool_max: reg!(IntGauge::new(
                "stead_db_pool_max_connections",
                "The most connections the database pool may hold."
            )),
            pool_size: reg!(IntGauge::new(
                "stead_db_pool_connections",
                "Connections the database pool holds."
            )),
            pool_in_use: reg!(IntGauge::new(
                "stead_db_pool_in_use_connections",
                "Pool connections currently lent out."
            )),
            pool_waiting: reg!(IntGauge::new(
                "stead_db_pool_waiters",
                "Callers waiting for a database connection."
            )),
            db_errors: reg!(IntCounterVec::new(
                Opts::new(
                    "stead_db_errors_total",
                    "Database operations that failed, by the component that ran them."
                ),
                &["component"]
            )),
            http_requests: reg!(IntCounterVec::new(
                Opts::new(
                    "stead_http_requests_total",
                    "API requests by method, route template and status."
                ),
                &["method", "route", "status"]
            )),
            http_request_duration: reg!(HistogramVec::new(
                histogram(
                    "stead_http_request_duration_seconds",
                    "API request latency by method and route template.",
                    LATENCY_BUCKETS
                ),
                &["method", "route"]
            )),
            long_polls_waiting: reg!(IntGaugeVec::new(
                Opts::new(
                    "stead_http_long_polls_waiting",
                    "Long-polls of this process parked, waiting for their event: claims \
                     (kind claim) and instance waits (kind instance)."
                ),
                &["kind"]
            )),
            http_requests_in_flight: reg!(IntGauge::new(
                "stead_http_requests_in_flight",
                "API requests being served now, of at most --max-concurrent-requests \
                 (the health checks and /metrics are not counted)."
            )),
            registry,
        };
        // Every component's error counter exists from the start at 0, and
        // both kinds of long-poll.
        for component in Component::ALL {
            metrics.db_errors.with_label_values(&[component.as_str()]);
        }
        for kind in ["claim", "instance"] {
            metrics.long_polls_waiting.with_label_values(&[kind]);
        }
        for table in RETAINED_TABLES {
            metrics.retention_deleted.with_label_values(&[table]);
        }
        for outcome in FIRING_OUTCOMES {
            metrics.schedule_firings.with_label_values(&[outcome]);
        }
        metrics
    }

    /// Counts a long-poll of `kind` as parked until the guard drops.
    pub(crate) fn long_poll(&self, kind: &'static str) -> LongPoll {
        let gauge = self.long_polls_waiting.with_label_values(&[kind]);
        gauge.inc();
        LongPoll(gauge)
    }

    /// Counts one failed database operation of `component`.
    pub(crate) fn db_error(&self, component: Component) {
        self.db_errors
            .with_label_values(&[component.as_str()])
            .inc();
    }

    /// Counts an instance that began, and creates its end counters at 0.
    pub(crate) fn instance_started(&self, workflow: &str) {
        self.instances_started.with_label_values(&[workflow]).inc();
        for status in ENDED_STATUSES {
            self.instances_ended.with_label_values(&[workflow, status]);
        }
    }

    /// Sets the cluster-wide gauges (the maintenance-duty holder calls this).
    pub(crate) fn set_cluster(&self, counts: &ClusterCounts, queues: &[QueueDepth]) {
        self.maintenance_duty.set(1);
        self.members_alive
            .with_label_values(NO_LABELS)
            .set(counts.members_alive);
        self.slots.with_label_values(NO_LABELS).set(counts.slots);
        self.slots_unowned
            .with_label_values(NO_LABELS)
            .set((counts.slots - counts.slots_owned).max(0));
        // Queues that emptied out disappear rather than linger.
        self.queue_tasks.reset();
        self.queue_oldest_ready_age.reset();
        for q in queues {
            let states = [
                ("ready", q.ready),
                ("leased", q.leased),
                ("delayed", q.delayed),
            ];
            for (state, n) in states {
                self.queue_tasks
                    .with_label_values(&[&q.queue, state])
                    .set(n);
            }
            self.queue_oldest_ready_age
                .with_label_values(&[&q.queue])
                .set(q.oldest_ready_age_seconds);
        }
    }

    /// Counts a claimed attempt and how long it waited to be claimed.
    pub(crate) fn task_claimed(&self, queue: &str, queue_wait_seconds: f64) {
        self.tasks_claimed.with_label_values(&[queue]).inc();
        self.queue_wait
            .with_label_values(&[queue])
            .observe(queue_wait_seconds);
    }

    /// Withdraws the cluster-wide gauges when this process loses the duty,
    /// so two processes never both export them.
    pub(crate) fn clear_cluster(&self) {
        self.maintenance_duty.set(0);
        self.queue_tasks.reset();
        self.queue_oldest_ready_age.reset();
        self.members_alive.reset();
        self.slots.reset();
        self.slots_unowned.reset();
        self.oldest_ended_age.reset();
    }

    /// Counts what one retention batch deleted.
    pub(crate) fn retention_deleted(&self, purged: &Purged) {
        let counts = [
            purged.instances,
            purged.steps,
            purged.tasks,
            purged.signals,
            purged.history,
        ];
        for (table, n) in RETAINED_TABLES.into_iter().zip(counts) {
            if n > 0 {
                self.retention_deleted.with_label_values(&[table]).inc_by(n);
            }
        }
    }

    /// Counts what one scheduler run did.
    pub(crate) fn schedules_fired(&self, fired: &Fired) {
        for (outcome, n) in
            FIRING_OUTCOMES
                .into_iter()
                .zip([fired.started, fired.skipped, fired.missed])
        {
            self.schedule_firings
                .with_label_values(&[outcome])
                .inc_by(n);
        }
        for late in &fired.lateness_s {
            self.schedule_lateness.observe(late.max(0.0));
        }
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn render(&self) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_prefixed_and_documented() {
        let metrics = Metrics::new();
        metrics.instance_started("w");
        for family in metrics.registry.gather() {
            assert!(family.name().starts_with("stead_"), "{}", family.name());
            assert!(!family.help().is_empty(), "{}", family.name());
        }
    }

    #[test]
    fn cluster_gauges_replace_old_queues_and_clear() {
        let metrics = Metrics::new();
        let queue = |name: &str| QueueDepth {
            queue: name.into(),
            ready: 2,
            leased: 1,
            delayed: 0,
            oldest_ready_age_seconds: 1.5,
        };
        let counts = |members_alive, slots_owned| ClusterCounts {
            members_alive,
            slots: 256,
            slots_owned,
        };
        metrics.set_cluster(&counts(3, 256), &[queue("a")]);
        metrics.set_cluster(&counts(2, 252), &[queue("b")]);
        let text = metrics.render();
        assert!(text.contains("stead_queue_tasks{queue=\"b\",state=\"ready\"} 2"));
        assert!(!text.contains("queue=\"a\""));
        assert!(text.contains("stead_slots_unowned 4"));
        assert!(text.contains("stead_maintenance_duty 1"));
        metrics.clear_cluster();
        let text = metrics.render();
        assert!(!text.contains("stead_queue_tasks{"));
        assert!(text.contains("stead_maintenance_duty 0"));
        assert!(!text.contains("stead_slots_unowned"));
        assert!(!text.contains("stead_members_alive"));
    }
}
