//! What became of one task attempt: its output, or a `TaskFailure`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::AttemptOutcome;

/// Why an attempt failed. This is the JSON stored in `tasks.error` and
/// shown in the API: `{message, retryable, details?, expired?}`. In-process
/// handlers (`TaskError`), external workers (`POST /v1/tasks/{id}/fail`) and
/// the lease reaper all produce one; the engine decides from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TaskFailure {
    pub message: String,
    /// Worth another attempt (subject to the step's retry policy).
    pub retryable: bool,
    /// Anything structured the worker kept with it (an explicit null too).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub details: Option<Value>,
    /// The lease ran out before the worker reported: the reaper ended the
    /// attempt. Only stead sets this; a worker cannot.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expired: bool,
}

impl TaskFailure {
    pub(crate) fn new(message: impl Into<String>, retryable: bool, details: Option<Value>) -> Self {
        TaskFailure {
            message: message.into(),
            retryable,
            details,
            expired: false,
        }
    }

    /// An attempt that ran past the step's `timeout`.
    pub(crate) fn timed_out(timeout_ms: u128) -> Self {
        Self::new(
            format!("attempt timed out after {timeout_ms}ms"),
            true,
            None,
        )
    }

    /// A lease the reaper found expired: the attempt ran past its timeout
    /// (`timed_out_after_ms`), or its worker went silent.
    pub(crate) fn lease_expired(timed_out_after_ms: Option<i64>, worker: Option<&str>) -> Self {
        let mut failure = match timed_out_after_ms {
            Some(ms) => Self::timed_out(ms.max(0) as u128),
            None => Self::new(
                format!(
                    "lease expired (worker {} did not complete or heartbeat in time)",
                    worker.unwrap_or("?")
                ),
                true,
                None,
            ),
        };
        failure.expired = true;
        failure
    }

    pub(crate) fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("a task failure serialises")
    }
}

/// A field that is present, even as JSON null, is `Some`; only a missing
/// one (`default`) is `None`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// The result of one finished attempt.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TaskResult {
    Completed(Value),
    Failed(TaskFailure),
}

impl TaskResult {
    pub(crate) fn outcome(&self) -> AttemptOutcome {
        match self {
            TaskResult::Completed(_) => AttemptOutcome::Completed,
            TaskResult::Failed(f) if f.expired => AttemptOutcome::Expired,
            TaskResult::Failed(_) => AttemptOutcome::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_stored_shape_is_kept() {
        let worker = TaskFailure::new("boom", false, Some(json!({"code": 7})));
        assert_eq!(
            worker.to_json(),
            json!({"message": "boom", "retryable": false, "details": {"code": 7}})
        );
        let reaped = TaskFailure::lease_expired(None, Some("w-1"));
        assert_eq!(
            reaped.to_json(),
            json!({
                "message": "lease expired (worker w-1 did not complete or heartbeat in time)",
                "retryable": true,
                "expired": true,
            })
        );
        assert_eq!(
            TaskFailure::lease_expired(Some(250), None).message,
            "attempt timed out after 250ms"
        );
        let back: TaskFailure = serde_json::from_value(reaped.to_json()).unwrap();
        assert_eq!(back, reaped);
    }

    #[test]
    fn outcomes_tell_expired_leases_apart() {
        assert_eq!(
            TaskResult::Completed(json!(1)).outcome(),
            AttemptOutcome::Completed
        );
        let failed = TaskFailure::new("x", true, None);
        assert_eq!(TaskResult::Failed(failed).outcome(), AttemptOutcome::Failed);
        let expired = TaskFailure::lease_expired(None, None);
        assert_eq!(
            TaskResult::Failed(expired).outcome(),
            AttemptOutcome::Expired
        );
    }

    #[test]
    fn explicit_null_details_are_kept_and_missing_ones_stay_missing() {
        let with_null: TaskFailure =
            serde_json::from_value(json!({"message": "m", "retryable": false, "details": null}))
                .unwrap();
        assert_eq!(with_null.details, Some(Value::Null));
        assert!(with_null
            .to_json()
            .as_object()
            .unwrap()
            .contains_key("details"));
        let without: TaskFailure =
            serde_json::from_value(json!({"message": "m", "retryable": false})).unwrap();
        assert_eq!(without.details, None);
    }

    #[test]
    fn a_failure_without_a_message_is_refused() {
        assert!(serde_json::from_value::<TaskFailure>(json!({"retryable": true})).is_err());
    }
}
