//! What a batch did, for the metrics and the debug log. Collected while the
//! batch is planned, applied only once it commits: a batch that rolled back
//! changed nothing and counts nothing.

use serde_json::Value;

use crate::metrics::Metrics;
use crate::model::{AttemptOutcome, InstanceStatus, StepStatus};

/// The labels of a step's attempts: workflow, kind (or `compensation`) and
/// queue (`none` for steps that run no task).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct StepLabels {
    pub workflow: String,
    pub kind: &'static str,
    pub queue: String,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Attempt {
    pub labels: StepLabels,
    pub outcome: AttemptOutcome,
    /// For the log line of a failed attempt: instance, step, attempt, error.
    pub failure: Option<(String, String, u32, Value)>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct StepEnded {
    pub labels: StepLabels,
    pub status: StepStatus,
    /// From the first attempt to the end.
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct InstanceEnded {
    pub id: String,
    pub workflow: String,
    pub status: InstanceStatus,
    /// From submission to the end.
    pub seconds: f64,
}

/// What became of an attempt run inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum InlineOutcome {
    /// Finished within the budget: its result is recorded in the batch.
    Recorded,
    /// Still running at the budget: handed over as a leased task row.
    HandedOver,
}

impl InlineOutcome {
    fn as_str(self) -> &'static str {
        match self {
            InlineOutcome::Recorded => "recorded",
            InlineOutcome::HandedOver => "handed_over",
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct Observations {
    /// Workflow of each instance that began.
    pub started: Vec<String>,
    pub ended: Vec<InstanceEnded>,
    /// Every finished attempt the batch read.
    pub attempts: Vec<Attempt>,
    /// Attempts scheduled after a failed one.
    pub retries: Vec<StepLabels>,
    pub steps_ended: Vec<StepEnded>,
    /// Attempts run inline, and what became of each.
    pub inline: Vec<(StepLabels, InlineOutcome)>,
}

impl Observations {
    pub(super) fn apply(self, m: &Metrics) {
        for workflow in &self.started {
            m.instance_started(workflow);
        }
        for e in &self.ended {
            let (workflow, status) = (e.workflow.as_str(), e.status.as_str());
            tracing::debug!(instance = %e.id, workflow, status, seconds = e.seconds, "instance ended");
            m.instances_ended
                .with_label_values(&[workflow, status])
                .inc();
            m.instance_duration
                .with_label_values(&[workflow, status])
                .observe(e.seconds);
        }
        for a in &self.attempts {
            if let Some((instance, step, attempt, error)) = &a.failure {
                let outcome = a.outcome.as_str();
                tracing::debug!(instance = %instance, step = %step, attempt, outcome, error = %error, "step attempt failed");
            }
            let l = &a.labels;
            m.step_attempts
                .with_label_values(&[&l.workflow, l.kind, &l.queue, a.outcome.as_str()])
                .inc();
        }
        for l in &self.retries {
            m.step_retries
                .with_label_values(&[&l.workflow, l.kind, &l.queue])
                .inc();
        }
        for (l, outcome) in &self.inline {
            m.inline_attempts
                .with_label_values(&[&l.workflow, l.kind, &l.queue, outcome.as_str()])
                .inc();
        }
        for s in &self.steps_ended {
            let l = &s.labels;
            m.step_duration
                .with_label_values(&[&l.workflow, l.kind, &l.queue, s.status.as_str()])
                .observe(s.seconds);
        }
    }
}
