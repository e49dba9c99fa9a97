//! The advancer's translations, without a database: rows → engine inputs,
//! and decisions → writes and observations.

use chrono::{Duration, TimeZone, Utc};
use serde_json::{json, Value};

use super::*;
use crate::definition::{parse, Limits};
use crate::engine::HistoryEntry;
use crate::model::{
    AttemptOutcome, Ending, EventType, StepKindName, StepState, TaskFailure, TaskKind, TaskResult,
};
use crate::store::{RowAt, SignalRow, StoredStep};

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap()
}

/// `a` (a task on queue `q`) then `b` (a value).
fn def() -> Definition {
    let doc = json!({"steps": [
        {"id": "a", "task": {"queue": "q", "input": "${input}"}},
        {"id": "b", "value": "${steps.a.output}"}
    ]});
    parse("wf", &doc, &Limits::default()).unwrap()
}

fn due(status: InstanceStatus) -> DueInstance {
    DueInstance {
        id: "i-1".into(),
        workflow_name: "wf".into(),
        workflow_version: 1,
        slot: 7,
        status,
        input: json!({"n": 1}),
        output: None,
        error: None,
        state_version: 4,
        event_seq: 2,
        ending: None,
        deadline_at: None,
        cancel_requested: None,
        retry_requested: false,
        created_at: now() - Duration::seconds(3),
        is_child: false,
        row_at: RowAt("(0,1)".into()),
        stored_bytes: 0,
        concurrency_key: None,
        priority: 0,
        steps: Vec::new(),
        results: Vec::new(),
        signals: Vec::new(),
    }
}

fn scheduled(attempt: u32) -> StepState {
    StepState {
        status: StepStatus::Scheduled,
        attempt,
        input: Some(json!({"n": 1}).into()),
        scheduled_at: Some(now() - Duration::seconds(2)),
        ..StepState::default()
    }
}

fn result(step: &str, attempt: u32, result: TaskResult) -> FinishedTask {
    FinishedTask {
        task_id: 99,
        step_id: step.into(),
        attempt,
        item: None,
        purpose: TaskPurpose::Run,
        queue: "q".into(),
        result,
        leased_at: Some(now() - Duration::seconds(1)),
        leased_by: Some("w-1".into()),
    }
}

/// A running instance whose step `a` waits for its first attempt, which
/// finished as `results` say.
fn awaiting_a(results: Vec<FinishedTask>) -> DueInstance {
    let mut d = due(InstanceStatus::Running);
    d.steps = vec![StoredStep {
        step_id: "a".into(),
        state: scheduled(1),
    }];
    d.results = results;
    d
}

fn planned(def: &Definition, due: &DueInstance) -> Plan {
    let mut plan = Plan::new(now(), "m-1");
    let mut random = || 0.5;
    let mut ctx = Context {
        now: now(),
        random: &mut random,
        limits: Default::default(),
        budget_bytes: u64::MAX,
    };
    plan.decide(def, due, &mut ctx);
    plan.finish();
    plan
}

// ---- rows → engine inputs -----------------------------------------------------

#[test]
fn a_pending_instance_without_rows_starts_with_every_step_pending() {
    let (state, events) = engine_inputs(&def(), &mut due(InstanceStatus::Pending));
    assert_eq!(state.id, "i-1");
    assert_eq!(state.status, InstanceStatus::Pending);
    assert_eq!(state.input, json!({"n": 1}));
    assert_eq!(state.steps, vec![StepState::default(); 2]);
    assert_eq!(events, vec![Event::Start]);
}

#[test]
fn rows_land_on_their_steps_and_become_events_in_order() {
    let mut d = due(InstanceStatus::Running);
    d.ending = Some(Ending::Failed);
    d.steps = vec![
        StoredStep {
            step_id: "a".into(),
            state: scheduled(2),
        },
        // A step the definition no longer has is not the engine's business.
        StoredStep {
            step_id: "gone".into(),
            state: scheduled(1),
        },
    ];
    let failure = TaskFailure::lease_expired(None, Some("w-1"));
    d.results = vec![
        result("a", 2, TaskResult::Failed(failure.clone())),
        result("gone", 1, TaskResult::Completed(json!(1))),
    ];
    d.signals = vec![SignalRow {
        id: 5,
        name: "go".into(),
        payload: json!({"ok": true}),
    }];
    d.cancel_requested = Some("enough".into());
    d.retry_requested = true;
    let (state, events) = engine_inputs(&def(), &mut d.clone());
    assert_eq!(state.ending, Some(Ending::Failed));
    assert_eq!(state.steps[0], scheduled(2));
    assert_eq!(state.steps[1], StepState::default());
    assert_eq!(
        events,
        vec![
            Event::TaskFinished {
                step: 0,
                item: None,
                purpose: TaskPurpose::Run,
                attempt: 2,
                result: TaskResult::Failed(failure),
                started_at: Some(now() - Duration::seconds(1)),
                worker: Some("w-1".into()),
            },
            Event::Signal(PendingSignal {
                id: 5,
                name: "go".into(),
                payload: json!({"ok": true}),
            }),
            Event::CancelRequested {
                reason: "enough".into()
            },
            Event::RetryRequested,
        ]
    );
}

// ---- decisions → writes -------------------------------------------------------

#[test]
fn a_start_writes_the_first_task_its_step_history_and_a_fenced_update() {
    let plan = planned(&def(), &due(InstanceStatus::Pending));
    let w = &plan.writes;
    assert_eq!((w.now, w.member.as_str()), (now(), "m-1"));
    assert_eq!(w.tasks.len(), 1);
    let task = &w.tasks[0];
    assert_eq!(
        (task.queue.as_str(), task.kind, task.slot, task.attempt),
        ("q", TaskKind::Task, 7, 1)
    );
    assert_eq!(task.idempotency_key, "i-1:a");
    assert_eq!(task.input, json!({"n": 1}));
    assert_eq!(w.notify_queues, vec!["q".to_string()]);
    assert_eq!(w.steps.len(), 1);
    let step = &w.steps[0];
    assert_eq!(
        (step.step_id.as_str(), step.position, step.kind),
        ("a", 0, StepKindName::Task)
    );
    assert_eq!(step.state.status, StepStatus::Scheduled);
    let kinds: Vec<EventType> = w.events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [EventType::InstanceStarted, EventType::StepScheduled]
    );
    assert_eq!(
        w.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [3, 4],
        "numbered after the instance's last event"
    );
    let update = &w.instances[0];
    assert_eq!(update.expected_version, 4);
    assert_eq!(update.status, InstanceStatus::Running);
    assert_eq!(update.event_seq, 4);
    assert_eq!(plan.observed.started, vec!["wf".to_string()]);
    assert!(w.ended_instances.is_empty());
}

#[test]
fn a_completed_result_is_consumed_ends_the_instance_and_is_counted() {
    let d = awaiting_a(vec![result("a", 1, TaskResult::Completed(json!("out")))]);
    let plan = planned(&def(), &d);
    let w = &plan.writes;
    assert_eq!(w.consumed_tasks, vec![99]);
    assert_eq!(w.instances[0].status, InstanceStatus::Completed);
    assert_eq!(w.instances[0].output, Some(json!({"a": "out", "b": "out"})));
    assert_eq!(w.ended_instances, vec!["i-1".to_string()]);
    let statuses: Vec<_> = w
        .steps
        .iter()
        .map(|s| (s.step_id.as_str(), s.state.status))
        .collect();
    assert_eq!(
        statuses,
        [("a", StepStatus::Completed), ("b", StepStatus::Completed)]
    );
    let o = &plan.observed;
    assert_eq!(o.attempts.len(), 1);
    assert_eq!(o.attempts[0].outcome, AttemptOutcome::Completed);
    assert_eq!(o.attempts[0].labels.queue, "q");
    assert_eq!(o.attempts[0].failure, None);
    assert_eq!(o.steps_ended.len(), 2);
    assert_eq!(o.steps_ended[0].seconds, 2.0, "from scheduling to the end");
    assert_eq!(o.steps_ended[1].labels.queue, "none");
    assert_eq!(o.ended.len(), 1);
    assert_eq!(o.ended[0].seconds, 3.0, "from submission to the end");
    assert!(o.started.is_empty());
    assert!(w.ended_children.is_empty(), "no parent to tell");
}

#[test]
fn an_ended_child_is_reported_to_its_parent() {
    let mut d = awaiting_a(vec![result("a", 1, TaskResult::Completed(json!("out")))]);
    d.is_child = true;
    let plan = planned(&def(), &d);
    assert_eq!(plan.writes.ended_instances, vec!["i-1".to_string()]);
    assert_eq!(plan.writes.ended_children, vec!["i-1".to_string()]);
}

#[test]
fn an_expired_lease_is_retried_counted_as_expired_and_as_a_retry() {
    let failure = TaskFailure::lease_expired(None, Some("w-1"));
    let d = awaiting_a(vec![result("a", 1, TaskResult::Failed(failure.clone()))]);
    let plan = planned(&def(), &d);
    let w = &plan.writes;
    assert_eq!(w.tasks.len(), 1);
    assert_eq!(w.tasks[0].attempt, 2);
    assert!(w.tasks[0].delay_ms > 0, "the retry waits for its backoff");
    let o = &plan.observed;
    assert_eq!(o.attempts[0].outcome, AttemptOutcome::Expired);
    let logged = o.attempts[0].failure.as_ref().unwrap();
    assert_eq!(
        (logged.0.as_str(), logged.1.as_str(), logged.2),
        ("i-1", "a", 1)
    );
    assert_eq!(logged.3, failure.to_json());
    assert_eq!(o.retries.len(), 1);
    assert_eq!(o.retries[0].kind, "task");
}

#[test]
fn a_result_for_an_unknown_step_is_consumed_but_not_counted() {
    let d = awaiting_a(vec![result("gone", 1, TaskResult::Completed(Value::Null))]);
    let plan = planned(&def(), &d);
    assert_eq!(plan.writes.consumed_tasks, vec![99]);
    assert!(plan.observed.attempts.is_empty());
    assert_eq!(plan.writes.instances[0].status, InstanceStatus::Running);
}

#[test]
fn commands_become_their_rows() {
    let def = def();
    let d = due(InstanceStatus::Running);
    let state = engine_inputs(&def, &mut d.clone()).0;
    let decision = Decision {
        commands: vec![
            Command::StartChild {
                step: 1,
                item: Some(3),
                child_id: "i-1:b:3".into(),
                workflow: "child".into(),
                version: Some(2),
                input: json!("x"),
            },
            Command::WithdrawTasks,
            Command::CancelChildren,
            Command::ConsumeSignal { id: 8, step: 0 },
        ],
        history: vec![HistoryEntry {
            kind: EventType::InstanceCancelRequested,
            step_id: None,
            attempt: None,
            data: json!({"reason": "r"}),
        }],
        changed_steps: Vec::new(),
        wake_at: Some(now() + Duration::minutes(5)),
        added_bytes: 0,
        paused: false,
    };
    let mut plan = Plan::new(now(), "m-1");
    plan.record(
        &def,
        &d,
        &[StepStatus::Pending; 2],
        state,
        decision,
        Inline::default(),
    );
    let w = &plan.writes;
    assert_eq!(
        w.children,
        vec![NewChild {
            parent_id: "i-1".into(),
            parent_slot: 7,
            step_id: "b".into(),
            item: Some(3),
            child_id: "i-1:b:3".into(),
            workflow: "child".into(),
            version: Some(2),
            input: json!("x"),
        }]
    );
    assert_eq!(w.withdraw_instances, vec!["i-1".to_string()]);
    assert_eq!(w.cancel_children_of, vec!["i-1".to_string()]);
    assert_eq!(w.consumed_signals, vec![(8, "a".to_string())]);
    assert_eq!(w.events[0].seq, 3);
    assert_eq!(w.instances[0].wake_at, Some(now() + Duration::minutes(5)));
    assert_eq!(w.instances[0].event_seq, 3);
}
