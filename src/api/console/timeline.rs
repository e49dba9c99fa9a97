//! The attempts of an instance's steps, read off its history: when each was
//! scheduled, started and ended, on which worker, and how it ended. Pure: the
//! page hands it the events (and the leases held now, for attempts that have
//! not ended).

use chrono::{DateTime, Duration, Utc};
use serde_json::Value;

use crate::model::EventType;
use crate::store::{EventRecord, LeasedTask};

/// What became of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Waiting for a worker (or its retry delay).
    Scheduled,
    /// A worker holds its lease.
    Running,
    Completed,
    Failed,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Scheduled => "scheduled",
            Outcome::Running => "running",
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
        }
    }
}

/// One attempt of a step, of an element of a `for_each` step, or of a
/// step's compensation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Attempt {
    pub step_id: String,
    pub item: Option<u64>,
    pub compensation: bool,
    /// Which run of the instance: 0, then one more after each retry of the
    /// instance (a retried step counts its attempts from 1 again).
    pub run: u32,
    pub attempt: i32,
    pub scheduled_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub worker: Option<String>,
    pub outcome: Outcome,
    /// The error's message, for a failed attempt.
    pub error: Option<String>,
}

/// Every attempt the events record, in the order each was first seen; an
/// attempt that has not ended takes its start and worker from `leases`.
pub(crate) fn attempts(events: &[EventRecord], leases: &[LeasedTask]) -> Vec<Attempt> {
    let mut out: Vec<Attempt> = Vec::new();
    let mut run = 0;
    for e in events {
        if e.kind == EventType::InstanceRetried {
            run += 1;
            continue;
        }
        let Some(step_id) = e.step_id.as_deref() else {
            continue;
        };
        let Some(what) = Seen::of(e.kind) else {
            continue;
        };
        let item = e.data.get("item").and_then(Value::as_u64);
        let attempt = e.attempt.unwrap_or(1);
        let key = Key {
            step_id,
            item,
            compensation: what.compensation,
            run,
        };
        let at = find_or_add(&mut out, &key, attempt);
        apply(&mut out[at], what, e);
        if let (Outcome::Failed, Some(delay)) = (what.outcome, retry_delay(&e.data)) {
            // The next attempt is scheduled when the retry delay ends.
            let next = find_or_add(&mut out, &key, attempt + 1);
            out[next].scheduled_at = Some(e.created_at + delay);
        }
    }
    // Leases are held only on the current run's attempts.
    for a in out
        .iter_mut()
        .filter(|a| a.ended_at.is_none() && a.run == run)
    {
        if let Some(lease) = leases.iter().find(|l| held_for(l, a)) {
            a.outcome = Outcome::Running;
            a.started_at = lease.leased_at;
            a.worker = lease.worker.clone();
        }
    }
    out
}

/// How an event bears on its attempt.
#[derive(Clone, Copy)]
struct Seen {
    compensation: bool,
    outcome: Outcome,
    /// It ends the attempt.
    ends: bool,
}

impl Seen {
    fn of(kind: EventType) -> Option<Seen> {
        use EventType as E;
        let (compensation, outcome, ends) = match kind {
            E::StepScheduled => (false, Outcome::Scheduled, false),
            E::StepStarted | E::ChildStarted => (false, Outcome::Running, false),
            E::StepCompleted | E::ItemCompleted => (false, Outcome::Completed, true),
            E::StepAttemptFailed | E::ItemAttemptFailed | E::StepFailed | E::ItemFailed => {
                (false, Outcome::Failed, true)
            }
            E::CompensationScheduled => (true, Outcome::Scheduled, false),
            E::CompensationCompleted => (true, Outcome::Completed, true),
            E::CompensationAttemptFailed | E::CompensationFailed => (true, Outcome::Failed, true),
            _ => return None,
        };
        Some(Seen {
            compensation,
            outcome,
            ends,
        })
    }
}

fn apply(a: &mut Attempt, what: Seen, e: &EventRecord) {
    if what.outcome == Outcome::Scheduled {
        a.scheduled_at.get_or_insert(e.created_at);
        return;
    }
    if what.outcome == Outcome::Running {
        a.started_at.get_or_insert(e.created_at);
        a.outcome = Outcome::Running;
        return;
    }
    // A step's final failure follows its last attempt's failure: keep the
    // attempt's own end.
    if a.ended_at.is_some() {
        return;
    }
    a.outcome = what.outcome;
    if what.ends {
        a.ended_at = Some(e.created_at);
    }
    if let Some(started) = e
        .data
        .get("started_at")
        .and_then(Value::as_str)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
    {
        a.started_at = Some(started.with_timezone(&Utc));
    }
    if let Some(worker) = e.data.get("worker").and_then(Value::as_str) {
        a.worker = Some(worker.to_string());
    }
    a.error = e
        .data
        .get("error")
        .map(|err| match err.get("message").and_then(Value::as_str) {
            Some(m) => m.to_string(),
            None => err.to_string(),
        });
}

fn retry_delay(data: &Value) -> Option<Duration> {
    let ms = data.get("retry_in_ms")?.as_i64()?;
    Some(Duration::milliseconds(ms))
}

/// What an attempt is of.
struct Key<'a> {
    step_id: &'a str,
    item: Option<u64>,
    compensation: bool,
    run: u32,
}

fn find_or_add(out: &mut Vec<Attempt>, key: &Key, attempt: i32) -> usize {
    if let Some(i) = out.iter().position(|a| {
        a.step_id == key.step_id
            && a.item == key.item
            && a.compensation == key.compensation
            && a.run == key.run
            && a.attempt == attempt
    }) {
        return i;
    }
    out.push(Attempt {
        step_id: key.step_id.to_string(),
        item: key.item,
        compensation: key.compensation,
        run: key.run,
        attempt,
        scheduled_at: None,
        started_at: None,
        ended_at: None,
        worker: None,
        outcome: Outcome::Scheduled,
        error: None,
    });
    out.len() - 1
}

/// Whether `lease` is the lease of attempt `a`.
fn held_for(lease: &LeasedTask, a: &Attempt) -> bool {
    lease.step_id == a.step_id
        && lease.attempt == a.attempt
        && lease.item.map(|i| i as u64) == a.item
        && lease.compensation == a.compensation
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(kind: EventType, step: &str, attempt: i32, data: Value, at_s: i64) -> EventRecord {
        EventRecord {
            seq: 0,
            kind,
            step_id: Some(step.into()),
            attempt: Some(attempt),
            data,
            created_at: DateTime::from_timestamp(1_700_000_000 + at_s, 0).unwrap(),
            member: None,
        }
    }

    fn t(at_s: i64) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp(1_700_000_000 + at_s, 0)
    }

    #[test]
    fn a_retried_step_shows_each_attempt_with_its_worker_and_times() {
        let events = [
            event(EventType::StepScheduled, "charge", 1, json!({}), 0),
            event(
                EventType::StepAttemptFailed,
                "charge",
                1,
                json!({"error": {"message": "card declined"}, "retry_in_ms": 2000, "worker": "w1"}),
                3,
            ),
            event(
                EventType::StepCompleted,
                "charge",
                2,
                json!({"worker": "w2", "started_at": "2023-11-14T22:13:26Z"}),
                7,
            ),
        ];
        let got = attempts(&events, &[]);
        assert_eq!(got.len(), 2);
        assert_eq!(
            (
                got[0].outcome,
                got[0].worker.as_deref(),
                got[0].error.as_deref()
            ),
            (Outcome::Failed, Some("w1"), Some("card declined"))
        );
        assert_eq!((got[0].scheduled_at, got[0].ended_at), (t(0), t(3)));
        assert_eq!(
            got[1].scheduled_at,
            t(5),
            "scheduled when the retry delay ends"
        );
        assert_eq!(got[1].started_at, t(6));
        assert_eq!(
            (got[1].outcome, got[1].worker.as_deref()),
            (Outcome::Completed, Some("w2"))
        );
    }

    #[test]
    fn a_retried_instance_runs_its_steps_again_as_attempts_of_their_own() {
        let retried = EventRecord {
            kind: EventType::InstanceRetried,
            step_id: None,
            attempt: None,
            ..event(EventType::InstanceRetried, "x", 0, json!({}), 4)
        };
        let events = [
            event(EventType::StepScheduled, "call", 1, json!({}), 0),
            event(
                EventType::StepFailed,
                "call",
                1,
                json!({"error": {"message": "down"}}),
                1,
            ),
            retried,
            event(EventType::StepScheduled, "call", 1, json!({}), 5),
            event(
                EventType::StepCompleted,
                "call",
                1,
                json!({"worker": "w2"}),
                6,
            ),
        ];
        let got = attempts(&events, &[]);
        let shape: Vec<_> = got
            .iter()
            .map(|a| (a.run, a.outcome, a.scheduled_at))
            .collect();
        assert_eq!(
            shape,
            [(0, Outcome::Failed, t(0)), (1, Outcome::Completed, t(5))]
        );
    }

    #[test]
    fn an_attempt_not_ended_takes_its_worker_from_the_lease() {
        let events = [event(EventType::StepScheduled, "ship", 1, json!({}), 0)];
        let lease = LeasedTask {
            id: 1,
            queue: "q".into(),
            instance_id: "i".into(),
            step_id: "ship".into(),
            attempt: 1,
            item: None,
            compensation: false,
            worker: Some("w9".into()),
            leased_at: t(1),
            lease_expires_at: t(31),
            expires_in_s: Some(30.0),
        };
        let got = attempts(&events, &[lease]);
        assert_eq!(
            (got[0].outcome, got[0].worker.as_deref(), got[0].started_at),
            (Outcome::Running, Some("w9"), t(1))
        );
    }

    #[test]
    fn elements_and_compensations_are_attempts_of_their_own() {
        let events = [
            event(EventType::StepStarted, "each", 1, json!({"items": 2}), 0),
            event(
                EventType::ItemCompleted,
                "each",
                1,
                json!({"item": 0, "worker": "w1"}),
                1,
            ),
            event(
                EventType::ItemFailed,
                "each",
                1,
                json!({"item": 1, "error": "x"}),
                2,
            ),
            event(EventType::CompensationScheduled, "each", 1, json!({}), 3),
            event(EventType::CompensationCompleted, "each", 1, json!({}), 4),
        ];
        let got = attempts(&events, &[]);
        let shape: Vec<_> = got
            .iter()
            .map(|a| (a.item, a.compensation, a.outcome))
            .collect();
        assert_eq!(
            shape,
            [
                (None, false, Outcome::Running),
                (Some(0), false, Outcome::Completed),
                (Some(1), false, Outcome::Failed),
                (None, true, Outcome::Completed),
            ]
        );
    }
}
