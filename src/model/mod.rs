//! The typed vocabulary every layer shares: the statuses of instances, steps
//! and tasks, why a task exists and where it runs, how a winding-down
//! instance will end, the history's event types, and the stored shapes of a
//! step (`StepState`) and of a task failure (`TaskFailure`).
//!
//! This module sits below both the engine and the store. The database holds
//! each enum as readable text (`as_str`); the store turns text back into the
//! enum with `parse` and treats a value it does not know as a permanent
//! error that names the column, never as a default.

mod doc;
mod step;
mod task;

pub(crate) use doc::Doc;
pub(crate) use step::{CompensationState, ItemState, StepState};
pub(crate) use task::{TaskFailure, TaskResult};

/// An enum stored as text: one spelling per variant, both ways.
pub(crate) trait Vocabulary: Copy + Sized + 'static {
    /// Every variant, in declaration order.
    const ALL: &'static [Self];
    fn as_str(self) -> &'static str;

    fn parse(text: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.as_str() == text)
    }
}

/// Declares a `Vocabulary` enum with its text forms, `Display`, serde as
/// that text, and comparison with `&str` (so tests read naturally).
macro_rules! vocabulary {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub(crate) enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $crate::model::Vocabulary for $name {
            const ALL: &'static [Self] = &[$($name::$variant,)+];
            fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl $name {
            pub(crate) fn as_str(self) -> &'static str {
                $crate::model::Vocabulary::as_str(self)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        /// In the API's OpenAPI document: a string, one of the vocabulary.
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .enum_values(Some([$($text,)+]))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                <$name as $crate::model::Vocabulary>::parse(&text).ok_or_else(|| {
                    serde::de::Error::unknown_variant(&text, &[$($text,)+])
                })
            }
        }
    };
}

vocabulary! {
    /// Where an instance is in its life (`instances.status`).
    InstanceStatus {
        Pending = "pending",
        Running = "running",
        Completed = "completed",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

impl InstanceStatus {
    pub(crate) fn is_terminal(self) -> bool {
        matches!(
            self,
            InstanceStatus::Completed | InstanceStatus::Failed | InstanceStatus::Cancelled
        )
    }
}

vocabulary! {
    /// Where a step (or a `for_each` item, or a compensation) is
    /// (`steps.status`).
    StepStatus {
        Pending = "pending",
        Scheduled = "scheduled",
        Running = "running",
        Waiting = "waiting",
        Completed = "completed",
        Failed = "failed",
        Skipped = "skipped",
        Cancelled = "cancelled",
        Compensated = "compensated",
    }
}

impl StepStatus {
    /// Still able to produce a result.
    pub(crate) fn is_active(self) -> bool {
        matches!(
            self,
            StepStatus::Scheduled | StepStatus::Running | StepStatus::Waiting
        )
    }

    /// Ended for good (the metrics' "step ended").
    pub(crate) fn is_ended(self) -> bool {
        matches!(self, StepStatus::Completed | StepStatus::Failed)
    }
}

vocabulary! {
    /// Why a pending instance does not start (`instances.held`).
    HeldReason {
        /// Its workflow is paused.
        Paused = "paused",
        /// Its concurrency key is at the workflow's limit.
        Concurrency = "concurrency",
    }
}

vocabulary! {
    /// What a schedule's firing does while the instance of the one before
    /// still runs (`schedules.overlap`).
    Overlap {
        Skip = "skip",
        Allow = "allow",
        CancelPrevious = "cancel_previous",
    }
}

vocabulary! {
    /// The kind of a step, as the definition names it (`steps.kind`).
    StepKindName {
        Task = "task",
        Http = "http",
        Sleep = "sleep",
        Signal = "signal",
        Value = "value",
        Workflow = "workflow",
    }
}

vocabulary! {
    /// Where a row of the queue is (`tasks.status`).
    TaskStatus {
        /// Waiting for a worker (from `run_at` on).
        Ready = "ready",
        /// A worker holds its lease.
        Leased = "leased",
        /// Finished; the engine has not recorded the result yet.
        Completed = "completed",
        Failed = "failed",
    }
}

vocabulary! {
    /// Why a task row exists (`tasks.purpose`).
    TaskPurpose {
        /// An attempt of the step itself (a child workflow for `workflow` steps).
        Run = "run",
        /// An attempt of the step's compensation.
        Compensate = "compensate",
    }
}

vocabulary! {
    /// Who carries out a task (`tasks.kind`).
    TaskKind {
        /// A worker of the task's queue (external, or an in-process handler).
        Task = "task",
        /// stead itself, on the `stead.http` queue.
        Http = "http",
        /// A child instance: the row stays leased until the child ends.
        Workflow = "workflow",
    }
}

vocabulary! {
    /// How an instance that is winding down will end, once its
    /// compensations have run (`instances.ending`).
    Ending {
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

impl Ending {
    /// The instance status this ending leads to.
    pub(crate) fn status(self) -> InstanceStatus {
        match self {
            Ending::Failed => InstanceStatus::Failed,
            Ending::Cancelled => InstanceStatus::Cancelled,
        }
    }
}

vocabulary! {
    /// The type of an entry in an instance's history (`events.type`).
    EventType {
        InstanceStarted = "instance_started",
        InstanceCancelRequested = "instance_cancel_requested",
        InstanceRetried = "instance_retried",
        InstanceTimedOut = "instance_timed_out",
        InstanceCompleted = "instance_completed",
        InstanceFailed = "instance_failed",
        InstanceCancelled = "instance_cancelled",
        StepScheduled = "step_scheduled",
        StepStarted = "step_started",
        StepWaiting = "step_waiting",
        StepSkipped = "step_skipped",
        StepCompleted = "step_completed",
        StepAttemptFailed = "step_attempt_failed",
        StepFailed = "step_failed",
        ChildStarted = "child_started",
        ItemCompleted = "item_completed",
        ItemAttemptFailed = "item_attempt_failed",
        ItemFailed = "item_failed",
        CompensationScheduled = "compensation_scheduled",
        CompensationCompleted = "compensation_completed",
        CompensationAttemptFailed = "compensation_attempt_failed",
        CompensationFailed = "compensation_failed",
    }
}

vocabulary! {
    /// How one attempt ended, as the metrics count it.
    AttemptOutcome {
        Completed = "completed",
        Failed = "failed",
        /// The lease ran out before the worker reported.
        Expired = "expired",
    }
}

vocabulary! {
    /// What a start did with one item of a batch
    /// (`start_instances(...).outcome`).
    StartOutcome {
        /// Inserted now.
        Created = "created",
        /// Already there with the same workflow and input.
        Existing = "existing",
        /// Already there with a different workflow, version or input.
        Conflict = "conflict",
        /// The id is not 1-200 characters of `[A-Za-z0-9._:@-]`.
        Invalid = "invalid",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trips<T: Vocabulary + PartialEq + std::fmt::Debug>() {
        for &v in T::ALL {
            assert_eq!(T::parse(v.as_str()), Some(v));
        }
        assert_eq!(T::parse("no-such-value"), None);
    }

    #[test]
    fn every_variant_round_trips_through_its_text() {
        round_trips::<InstanceStatus>();
        round_trips::<StepStatus>();
        round_trips::<StepKindName>();
        round_trips::<TaskStatus>();
        round_trips::<TaskPurpose>();
        round_trips::<TaskKind>();
        round_trips::<Ending>();
        round_trips::<EventType>();
        round_trips::<AttemptOutcome>();
        round_trips::<StartOutcome>();
        assert_eq!(EventType::ALL.len(), 22);
    }

    #[test]
    fn serde_uses_the_text_and_refuses_unknown_values() {
        assert_eq!(
            serde_json::to_value(StepStatus::Compensated).unwrap(),
            "compensated"
        );
        let parsed: StepStatus = serde_json::from_value("waiting".into()).unwrap();
        assert_eq!(parsed, StepStatus::Waiting);
        let err = serde_json::from_value::<StepStatus>("paused".into()).unwrap_err();
        assert!(err.to_string().contains("paused"), "{err}");
    }
}
