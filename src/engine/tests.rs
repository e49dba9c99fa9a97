//! Unit tests of the pure decision core (contract §2, §6: "each step's result
//! is recorded exactly once"). Every test uses a fixed `now` and a
//! deterministic `random`, so each decision is reproducible.

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde_json::{json, Value};

use super::*;
use crate::definition::{parse, Definition, Limits, RetryPolicy};

const ID: &str = "inst-1";

// ----- helpers ----------------------------------------------------------

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap()
}

fn def(doc: Value) -> Definition {
    parse("wf", &doc, &Limits::default())
        .unwrap_or_else(|ps| panic!("test definition is invalid: {ps:#?}"))
}

/// A fresh, pending instance. `steps` is left empty on purpose: `decide`
/// sizes it to the definition.
fn pending(input: Value) -> InstanceState {
    InstanceState::new(ID, input, 0)
}

/// One decision with `random` always returning `r`.
fn decide_with(def: &Definition, state: &mut InstanceState, events: &[Event], r: f64) -> Decision {
    let mut random = move || r;
    let mut ctx = Context {
        now: now(),
        random: &mut random,
        limits: Default::default(),
        budget_bytes: u64::MAX,
    };
    decide(def, state, events, &mut ctx)
}

fn run(def: &Definition, state: &mut InstanceState, events: &[Event]) -> Decision {
    decide_with(def, state, events, 0.5)
}

/// Starts an instance of `def` with `input`.
fn start(def: &Definition, input: Value) -> (InstanceState, Decision) {
    let mut state = pending(input);
    let d = run(def, &mut state, &[Event::Start]);
    (state, d)
}

fn ok(step: usize, attempt: u32, output: Value) -> Event {
    Event::TaskFinished {
        step,
        item: None,
        purpose: TaskPurpose::Run,
        attempt,
        result: TaskResult::Completed(output),
        started_at: Some(now() - Duration::seconds(2)),
        worker: Some("w1".to_string()),
    }
}

fn fail(step: usize, attempt: u32, message: &str, retryable: bool) -> Event {
    Event::TaskFinished {
        step,
        item: None,
        purpose: TaskPurpose::Run,
        attempt,
        result: TaskResult::Failed(TaskFailure::new(message, retryable, None)),
        started_at: None,
        worker: Some("w1".to_string()),
    }
}

fn ix(def: &Definition, id: &str) -> usize {
    def.step_index(id)
        .unwrap_or_else(|| panic!("no step {id:?}"))
}

fn step<'s>(def: &Definition, state: &'s InstanceState, id: &str) -> &'s StepState {
    &state.steps[ix(def, id)]
}

/// The history as compact strings: `kind`, `kind:step` or `kind:step#attempt`.
fn log(d: &Decision) -> Vec<String> {
    d.history
        .iter()
        .map(|h| match (&h.step_id, h.attempt) {
            (None, None) => h.kind.to_string(),
            (Some(s), None) => format!("{}:{s}", h.kind),
            (Some(s), Some(a)) => format!("{}:{s}#{a}", h.kind),
            (None, Some(a)) => format!("{}#{a}", h.kind),
        })
        .collect()
}

fn entry<'d>(d: &'d Decision, kind: &str) -> &'d HistoryEntry {
    let found: Vec<&HistoryEntry> = d.history.iter().filter(|h| h.kind == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind} in {:?}", log(d));
    found[0]
}

/// `(step id, attempt)` of every EnqueueTask command, in order.
fn enqueued(def: &Definition, d: &Decision) -> Vec<(String, u32)> {
    d.commands
        .iter()
        .filter_map(|c| match c {
            Command::EnqueueTask { step, attempt, .. } => {
                Some((def.steps[*step].id.clone(), *attempt))
            }
            _ => None,
        })
        .collect()
}

fn en(id: &str, attempt: u32) -> (String, u32) {
    (id.to_string(), attempt)
}

/// The single EnqueueTask command of `d`: `(input, delay_ms)`.
fn only_enqueue(d: &Decision) -> (Value, u64) {
    match d.commands.as_slice() {
        [Command::EnqueueTask {
            input, delay_ms, ..
        }] => (input.clone(), *delay_ms),
        other => panic!("expected exactly one EnqueueTask, got {other:?}"),
    }
}

fn withdraws(d: &Decision) -> usize {
    d.commands
        .iter()
        .filter(|c| matches!(c, Command::WithdrawTasks))
        .count()
}

fn changed(def: &Definition, d: &Decision) -> Vec<String> {
    d.changed_steps
        .iter()
        .map(|&i| def.steps[i].id.clone())
        .collect()
}

/// `events` must leave the state untouched and decide nothing.
#[track_caller]
fn assert_ignored(def: &Definition, state: &mut InstanceState, events: &[Event]) {
    let before = state.clone();
    let d = run(def, state, events);
    assert_eq!(d, Decision::default(), "expected no decision, got {d:#?}");
    assert_eq!(*state, before, "state must not change");
}

fn policy(max_attempts: u32, initial: u64, multiplier: f64, max: u64, jitter: bool) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_interval_ms: initial,
        multiplier,
        max_interval_ms: max,
        jitter,
    }
}

fn task(id: &str) -> Value {
    json!({"id": id, "task": {"queue": "q"}})
}

/// `now()` plus `secs` seconds.
fn at(secs: i64) -> DateTime<Utc> {
    now() + Duration::seconds(secs)
}

/// One decision at `when`, with `random` always 0.5.
fn run_at(
    def: &Definition,
    state: &mut InstanceState,
    events: &[Event],
    when: DateTime<Utc>,
) -> Decision {
    let mut random = || 0.5;
    let mut ctx = Context {
        now: when,
        random: &mut random,
        limits: Default::default(),
        budget_bytes: u64::MAX,
    };
    decide(def, state, events, &mut ctx)
}

/// `events` at `when` must leave the state untouched and decide nothing but
/// (possibly) a wake-up time, which is returned.
#[track_caller]
fn assert_quiet_at(
    def: &Definition,
    state: &mut InstanceState,
    events: &[Event],
    when: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let before = state.clone();
    let d = run_at(def, state, events, when);
    assert_eq!(
        Decision {
            wake_at: None,
            ..d.clone()
        },
        Decision::default(),
        "expected no decision, got {d:#?}"
    );
    assert_eq!(*state, before, "state must not change");
    d.wake_at
}

fn finished(
    step: usize,
    item: Option<u32>,
    purpose: TaskPurpose,
    attempt: u32,
    result: TaskResult,
) -> Event {
    Event::TaskFinished {
        step,
        item,
        purpose,
        attempt,
        result,
        started_at: Some(now() - Duration::seconds(2)),
        worker: Some("w1".to_string()),
    }
}

fn failure(message: &str, retryable: bool) -> TaskResult {
    TaskResult::Failed(TaskFailure::new(message, retryable, None))
}

fn item_ok(step: usize, item: u32, attempt: u32, output: Value) -> Event {
    finished(
        step,
        Some(item),
        TaskPurpose::Run,
        attempt,
        TaskResult::Completed(output),
    )
}

fn item_fail(step: usize, item: u32, attempt: u32, message: &str, retryable: bool) -> Event {
    finished(
        step,
        Some(item),
        TaskPurpose::Run,
        attempt,
        failure(message, retryable),
    )
}

fn comp_ok(step: usize, attempt: u32) -> Event {
    finished(
        step,
        None,
        TaskPurpose::Compensate,
        attempt,
        TaskResult::Completed(json!({"undone": true})),
    )
}

fn comp_fail(step: usize, attempt: u32, message: &str, retryable: bool) -> Event {
    finished(
        step,
        None,
        TaskPurpose::Compensate,
        attempt,
        failure(message, retryable),
    )
}

fn signal(id: i64, name: &str, payload: Value) -> Event {
    Event::Signal(PendingSignal {
        id,
        name: name.to_string(),
        payload,
    })
}

fn cancel(reason: &str) -> Event {
    Event::CancelRequested {
        reason: reason.to_string(),
    }
}

fn step_name(def: &Definition, step: usize, item: Option<u32>) -> String {
    match item {
        Some(k) => format!("{}[{k}]", def.steps[step].id),
        None => def.steps[step].id.clone(),
    }
}

/// The commands as compact strings, in order: `withdraw`,
/// `cancel_children`, `enqueue step[item]/purpose#attempt`,
/// `start_child step[item] child_id`, `consume signal_id step`.
fn cmds(def: &Definition, d: &Decision) -> Vec<String> {
    d.commands
        .iter()
        .map(|c| match c {
            Command::EnqueueTask {
                step,
                item,
                purpose,
                attempt,
                ..
            } => format!(
                "enqueue {}/{}#{attempt}",
                step_name(def, *step, *item),
                purpose.as_str()
            ),
            Command::StartChild {
                step,
                item,
                child_id,
                ..
            } => format!("start_child {} {child_id}", step_name(def, *step, *item)),
            Command::WithdrawTasks => "withdraw".to_string(),
            Command::CancelChildren => "cancel_children".to_string(),
            Command::ConsumeSignal { id, step } => {
                format!("consume {id} {}", def.steps[*step].id)
            }
        })
        .collect()
}

/// `(input, delay_ms, idempotency_key)` of every EnqueueTask, in order.
fn enqueued_tasks(d: &Decision) -> Vec<(Value, u64, String)> {
    d.commands
        .iter()
        .filter_map(|c| match c {
            Command::EnqueueTask {
                input,
                delay_ms,
                idempotency_key,
                ..
            } => Some((input.clone(), *delay_ms, idempotency_key.clone())),
            _ => None,
        })
        .collect()
}

fn items(state: &StepState) -> Vec<StepStatus> {
    state
        .items
        .as_ref()
        .expect("a for_each step has items")
        .iter()
        .map(|i| i.status)
        .collect()
}

fn active_items(state: &StepState) -> usize {
    items(state).iter().filter(|s| s.is_active()).count()
}

fn message(error: &Option<Value>) -> String {
    error
        .as_ref()
        .and_then(|e| e["message"].as_str())
        .unwrap_or_else(|| panic!("no error message in {error:?}"))
        .to_string()
}

// ----- start ------------------------------------------------------------

#[test]
fn start_moves_pending_to_running_and_records_instance_started() {
    let d = def(json!({"steps": [task("a")]}));
    let (state, decision) = start(&d, json!({"x": 1}));
    assert_eq!(state.status, InstanceStatus::Running);
    assert_eq!(state.steps.len(), 1, "state is sized to the definition");
    let first = &decision.history[0];
    assert_eq!(first.kind, "instance_started");
    assert_eq!(first.step_id, None);
    assert_eq!(first.attempt, None);
    assert_eq!(first.data, json!({"input": {"x": 1}}));
    assert_eq!(log(&decision), ["instance_started", "step_scheduled:a#1"]);
}

#[test]
fn start_schedules_root_task_with_rendered_input_queue_key_and_timeout() {
    let d = def(json!({"steps": [
        {"id": "charge", "task": {"queue": "payments",
            "input": {"amount": "${input.amount}", "who": "${input.customer.name}",
                      "ref": "order-${input.order}-${instance.id}"}},
         "timeout": "30s"},
        task("ship"),
    ]}));
    let (state, decision) = start(
        &d,
        json!({"amount": 42, "customer": {"name": "ada"}, "order": 7}),
    );
    let input = json!({"amount": 42, "who": "ada", "ref": "order-7-inst-1"});
    assert_eq!(
        decision.commands,
        vec![Command::EnqueueTask {
            step: 0,
            item: None,
            purpose: TaskPurpose::Run,
            attempt: 1,
            kind: TaskKind::Task,
            queue: "payments".to_string(),
            input: input.clone(),
            delay_ms: 0,
            timeout_ms: Some(30_000),
            idempotency_key: "inst-1:charge".to_string(),
        }]
    );
    let scheduled = entry(&decision, "step_scheduled");
    assert_eq!(scheduled.step_id.as_deref(), Some("charge"));
    assert_eq!(scheduled.attempt, Some(1));
    assert_eq!(scheduled.data, json!({"input": input}));

    let s = step(&d, &state, "charge");
    assert_eq!(s.status, StepStatus::Scheduled);
    assert_eq!(s.attempt, 1);
    assert_eq!(s.input.as_ref().map(Doc::to_value), Some(input));
    assert_eq!(s.scheduled_at, Some(now()));
    assert_eq!(s.output.as_ref().map(Doc::to_value), None);
    assert_eq!(step(&d, &state, "ship").status, StepStatus::Pending);
    assert_eq!(changed(&d, &decision), ["charge"]);
}

#[test]
fn task_without_input_or_timeout_is_enqueued_with_null_input_and_no_timeout() {
    let d = def(json!({"steps": [task("a")]}));
    let (_, decision) = start(&d, json!({"x": 1}));
    assert_eq!(
        decision.commands,
        vec![Command::EnqueueTask {
            step: 0,
            item: None,
            purpose: TaskPurpose::Run,
            attempt: 1,
            kind: TaskKind::Task,
            queue: "q".to_string(),
            input: Value::Null,
            delay_ms: 0,
            timeout_ms: None,
            idempotency_key: "inst-1:a".to_string(),
        }]
    );
}

#[test]
fn http_step_is_enqueued_on_internal_queue_with_rendered_call() {
    let d = def(json!({"steps": [
        {"id": "call", "http": {
            "method": "put",
            "url": "https://api.example/orders/${input.order.id}?i=${instance.id}",
            "headers": {"X-Amount": "${input.amount}", "X-Static": "s",
                        "X-Missing": "${input.nope}", "X-Obj": "${input.order}"},
            "body": {"order": "${input.order}", "note": "for ${instance.id}", "n": 3}},
         "timeout": "5s"},
    ]}));
    let (state, decision) = start(&d, json!({"amount": 42, "order": {"id": "o-1"}}));
    let input = json!({
        "method": "PUT",
        "url": "https://api.example/orders/o-1?i=inst-1",
        "headers": {"X-Amount": "42", "X-Static": "s", "X-Missing": "",
                    "X-Obj": "{\"id\":\"o-1\"}"},
        "body": {"order": {"id": "o-1"}, "note": "for inst-1", "n": 3},
    });
    assert_eq!(
        decision.commands,
        vec![Command::EnqueueTask {
            step: 0,
            item: None,
            purpose: TaskPurpose::Run,
            attempt: 1,
            kind: TaskKind::Http,
            queue: HTTP_QUEUE.to_string(),
            input: input.clone(),
            delay_ms: 0,
            timeout_ms: Some(5_000),
            idempotency_key: "inst-1:call".to_string(),
        }]
    );
    assert_eq!(HTTP_QUEUE, "stead.http");
    assert_eq!(
        step(&d, &state, "call").input.as_ref().map(Doc::to_value),
        Some(input)
    );
}

#[test]
fn http_step_without_body_defaults_to_get_with_null_body_and_no_headers() {
    let d = def(json!({"steps": [
        {"id": "ping", "http": {"url": "http://svc/health"}},
    ]}));
    let (_, decision) = start(&d, json!(null));
    let (input, delay) = only_enqueue(&decision);
    assert_eq!(delay, 0);
    assert_eq!(
        input,
        json!({"method": "GET", "url": "http://svc/health", "headers": {}, "body": null})
    );
}

#[test]
fn http_step_with_body_defaults_to_post() {
    let d = def(json!({"steps": [
        {"id": "send", "http": {"url": "http://svc/x", "body": "${input}"}},
    ]}));
    let (_, decision) = start(&d, json!({"k": [1, 2]}));
    let (input, _) = only_enqueue(&decision);
    assert_eq!(input["method"], json!("POST"));
    assert_eq!(input["body"], json!({"k": [1, 2]}));
}

#[test]
fn second_start_on_running_instance_is_ignored() {
    let d = def(json!({"steps": [task("a")]}));
    let (mut state, _) = start(&d, json!({}));
    assert_ignored(&d, &mut state, &[Event::Start]);
}

#[test]
fn deciding_again_without_events_schedules_nothing_twice() {
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "needs": []},
        {"id": "b", "task": {"queue": "q"}, "needs": []},
    ]}));
    let (mut state, _) = start(&d, json!({}));
    assert_ignored(&d, &mut state, &[]);
}

#[test]
fn pending_instance_without_start_does_nothing() {
    let d = def(json!({"steps": [task("a")]}));
    let mut state = pending(json!({}));
    let d1 = run(&d, &mut state, &[]);
    assert_eq!(d1.history, vec![]);
    assert_eq!(d1.commands, vec![]);
    assert_eq!(state.status, InstanceStatus::Pending);
    assert_eq!(state.steps[0].status, StepStatus::Pending);
    // A result for a pending instance is not applied either.
    let d2 = run(&d, &mut state, &[ok(0, 1, json!(1))]);
    assert_eq!(d2.history, vec![]);
    assert_eq!(state.steps[0].status, StepStatus::Pending);
}

// ----- DAG order --------------------------------------------------------

#[test]
fn steps_run_sequentially_by_default() {
    let d = def(json!({"steps": [task("a"), task("b"), task("c")]}));
    let (mut state, d0) = start(&d, json!({}));
    assert_eq!(enqueued(&d, &d0), [en("a", 1)]);
    assert_eq!(step(&d, &state, "b").status, StepStatus::Pending);
    assert_eq!(step(&d, &state, "c").status, StepStatus::Pending);

    let d1 = run(&d, &mut state, &[ok(0, 1, json!("A"))]);
    assert_eq!(enqueued(&d, &d1), [en("b", 1)]);
    assert_eq!(log(&d1), ["step_completed:a#1", "step_scheduled:b#1"]);
    assert_eq!(step(&d, &state, "c").status, StepStatus::Pending);

    let d2 = run(&d, &mut state, &[ok(1, 1, json!("B"))]);
    assert_eq!(enqueued(&d, &d2), [en("c", 1)]);

    let d3 = run(&d, &mut state, &[ok(2, 1, json!("C"))]);
    assert_eq!(d3.commands, vec![]);
    assert_eq!(log(&d3), ["step_completed:c#1", "instance_completed"]);
    assert_eq!(state.status, InstanceStatus::Completed);
    assert_eq!(state.output, Some(json!({"a": "A", "b": "B", "c": "C"})));
}

#[test]
fn empty_needs_makes_parallel_roots() {
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "needs": []},
        {"id": "b", "task": {"queue": "q"}, "needs": []},
        {"id": "c", "task": {"queue": "q"}, "needs": []},
        {"id": "join", "task": {"queue": "q"}, "needs": ["a", "b", "c"]},
    ]}));
    let (state, d0) = start(&d, json!({}));
    assert_eq!(enqueued(&d, &d0), [en("a", 1), en("b", 1), en("c", 1)]);
    assert_eq!(changed(&d, &d0), ["a", "b", "c"]);
    assert_eq!(step(&d, &state, "join").status, StepStatus::Pending);
}

fn diamond() -> Definition {
    def(json!({"steps": [
        task("a"),
        {"id": "b", "task": {"queue": "q"}, "needs": ["a"]},
        {"id": "c", "task": {"queue": "q"}, "needs": ["a"]},
        {"id": "d", "task": {"queue": "q",
            "input": {"b": "${steps.b.output}", "c": "${steps.c.output}"}},
         "needs": ["b", "c"]},
    ]}))
}

#[test]
fn diamond_schedules_join_once_after_both_branches_finish() {
    let d = diamond();
    let (mut state, d0) = start(&d, json!({}));
    assert_eq!(enqueued(&d, &d0), [en("a", 1)]);

    let d1 = run(&d, &mut state, &[ok(0, 1, json!("A"))]);
    assert_eq!(enqueued(&d, &d1), [en("b", 1), en("c", 1)]);

    let d2 = run(&d, &mut state, &[ok(1, 1, json!("B"))]);
    assert_eq!(enqueued(&d, &d2), []);
    assert_eq!(step(&d, &state, "d").status, StepStatus::Pending);

    let d3 = run(&d, &mut state, &[ok(2, 1, json!("C"))]);
    assert_eq!(enqueued(&d, &d3), [en("d", 1)]);
    let (input, _) = only_enqueue(&d3);
    assert_eq!(input, json!({"b": "B", "c": "C"}));

    // Nothing more is scheduled later, and d completes the instance.
    assert_ignored(&d, &mut state, &[]);
    let d4 = run(&d, &mut state, &[ok(3, 1, json!("D"))]);
    assert_eq!(enqueued(&d, &d4), []);
    assert_eq!(state.status, InstanceStatus::Completed);
}

#[test]
fn diamond_branches_finishing_in_one_batch_schedule_join_exactly_once() {
    let d = diamond();
    let (mut state, _) = start(&d, json!({}));
    run(&d, &mut state, &[ok(0, 1, json!("A"))]);
    let decision = run(
        &d,
        &mut state,
        &[ok(2, 1, json!("C")), ok(1, 1, json!("B"))],
    );
    assert_eq!(enqueued(&d, &decision), [en("d", 1)]);
    assert_eq!(
        log(&decision),
        [
            "step_completed:c#1",
            "step_completed:b#1",
            "step_scheduled:d#1"
        ]
    );
    assert_eq!(changed(&d, &decision), ["b", "c", "d"]);
}

#[test]
fn steps_listed_before_their_needs_still_run_in_dependency_order() {
    let d = def(json!({"steps": [
        {"id": "c", "value": "${steps.b.output}-c", "needs": ["b"]},
        {"id": "b", "value": "${steps.a.output}-b", "needs": ["a"]},
        {"id": "a", "value": "a", "needs": []},
    ]}));
    let (state, decision) = start(&d, json!({}));
    assert_eq!(state.status, InstanceStatus::Completed);
    assert_eq!(
        log(&decision),
        [
            "instance_started",
            "step_completed:a#1",
            "step_completed:b#1",
            "step_completed:c#1",
            "instance_completed"
        ]
    );
    assert_eq!(
        step(&d, &state, "c").output.as_ref().map(Doc::to_value),
        Some(json!("a-b-c"))
    );
}

// ----- value steps ------------------------------------------------------

#[test]
fn value_step_completes_inline_and_unlocks_dependents_in_same_decision() {
    let d = def(json!({"steps": [
        {"id": "shape", "value": {"x": "${input.n}", "tag": "n=${input.n}"}},
        {"id": "work", "task": {"queue": "q", "input": "${steps.shape.output.x}"}},
    ]}));
    let (state, decision) = start(&d, json!({"n": 5}));
    assert_eq!(
        log(&decision),
        [
            "instance_started",
            "step_completed:shape#1",
            "step_scheduled:work#1"
        ]
    );
    assert_eq!(
        entry(&decision, "step_completed").data,
        json!({"output": {"x": 5, "tag": "n=5"}})
    );
    let (input, _) = only_enqueue(&decision);
    assert_eq!(input, json!(5));

    let s = step(&d, &state, "shape");
    assert_eq!(s.status, StepStatus::Completed);
    assert_eq!(s.attempt, 1);
    assert_eq!(
        s.output.as_ref().map(Doc::to_value),
        Some(json!({"x": 5, "tag": "n=5"}))
    );
    assert_eq!(s.scheduled_at, Some(now()));
    assert_eq!(s.started_at, Some(now()));
    assert_eq!(s.ended_at, Some(now()));
    assert_eq!(changed(&d, &decision), ["shape", "work"]);
    assert_eq!(state.status, InstanceStatus::Running);
}

#[test]
fn value_only_workflow_completes_in_one_decide_with_output_template() {
    let d = def(json!({
        "steps": [
            {"id": "a", "value": "${input.x}"},
            {"id": "b", "value": {"sum": ["${steps.a.output}", 2]}},
        ],
        "output": {"result": "${steps.b.output.sum}", "id": "${instance.id}", "a": "${steps.a.output}"},
    }));
    let (state, decision) = start(&d, json!({"x": 1}));
    let want = json!({"result": [1, 2], "id": "inst-1", "a": 1});
    assert_eq!(state.status, InstanceStatus::Completed);
    assert_eq!(state.output, Some(want.clone()));
    assert_eq!(state.error, None);
    assert_eq!(
        log(&decision),
        [
            "instance_started",
            "step_completed:a#1",
            "step_completed:b#1",
            "instance_completed"
        ]
    );
    assert_eq!(
        entry(&decision, "instance_completed").data,
        json!({"output": want})
    );
    assert_eq!(decision.commands, vec![], "nothing to enqueue or withdraw");
}

#[test]
fn default_output_is_object_of_every_step_output() {
    let d = def(json!({"steps": [
        {"id": "a", "value": "${input}"},
        {"id": "skipped", "value": 1, "when": false},
        {"id": "t", "task": {"queue": "q"}, "needs": ["a"]},
    ]}));
    let (mut state, _) = start(&d, json!({"k": "v"}));
    run(&d, &mut state, &[ok(2, 1, json!([1, 2, 3]))]);
    assert_eq!(state.status, InstanceStatus::Completed);
    assert_eq!(
        state.output,
        Some(json!({"a": {"k": "v"}, "skipped": null, "t": [1, 2, 3]}))
    );
}

// ----- when -------------------------------------------------------------

#[test]
fn when_false_skips_step_with_null_output_and_dependents_run() {
    let d = def(json!({"steps": [
        {"id": "maybe", "task": {"queue": "q"}, "when": false},
        {"id": "after", "value": {"prev": "${steps.maybe.output}"}},
    ]}));
    let (state, decision) = start(&d, json!({}));
    assert_eq!(
        log(&decision),
        [
            "instance_started",
            "step_skipped:maybe",
            "step_completed:after#1",
            "instance_completed"
        ]
    );
    assert_eq!(
        entry(&decision, "step_skipped").data,
        json!({"when": false})
    );
    assert_eq!(
        enqueued(&d, &decision),
        [],
        "a skipped task is not enqueued"
    );
    let s = step(&d, &state, "maybe");
    assert_eq!(s.status, StepStatus::Skipped);
    assert_eq!(s.output.as_ref().map(Doc::to_value), Some(Value::Null));
    assert_eq!(s.ended_at, Some(now()));
    assert_eq!(s.attempt, 0);
    assert_eq!(
        step(&d, &state, "after").output.as_ref().map(Doc::to_value),
        Some(json!({"prev": null}))
    );
    assert_eq!(state.status, InstanceStatus::Completed);
    assert_eq!(
        state.output,
        Some(json!({"maybe": null, "after": {"prev": null}}))
    );
}

#[test]
fn when_template_rendering_null_or_missing_skips() {
    let d = def(json!({"steps": [
        {"id": "maybe", "task": {"queue": "q"}, "when": "${input.flag}"},
        task("after"),
    ]}));
    for input in [
        json!({"flag": null}),
        json!({}),
        json!({"flag": false}),
        json!(null),
    ] {
        let (state, decision) = start(&d, input.clone());
        assert_eq!(
            step(&d, &state, "maybe").status,
            StepStatus::Skipped,
            "input {input}"
        );
        assert_eq!(
            enqueued(&d, &decision),
            [en("after", 1)],
            "input {input}: the dependent runs"
        );
    }
}

#[test]
fn when_true_or_truthy_runs_the_step() {
    let literal = def(json!({"steps": [
        {"id": "s", "task": {"queue": "q"}, "when": true},
    ]}));
    let (state, decision) = start(&literal, json!({}));
    assert_eq!(state.steps[0].status, StepStatus::Scheduled);
    assert_eq!(enqueued(&literal, &decision), [en("s", 1)]);

    let templated = def(json!({"steps": [
        {"id": "s", "task": {"queue": "q"}, "when": "${input.flag}"},
    ]}));
    // Only null and false skip: 0, "" and objects run.
    for flag in [
        json!(true),
        json!(0),
        json!(""),
        json!({"a": 1}),
        json!("no"),
    ] {
        let (state, decision) = start(&templated, json!({ "flag": flag }));
        assert_eq!(state.steps[0].status, StepStatus::Scheduled, "flag {flag}");
        assert_eq!(enqueued(&templated, &decision), [en("s", 1)], "flag {flag}");
    }
}

#[test]
fn when_can_depend_on_an_earlier_step_output() {
    let d = def(json!({"steps": [
        task("check"),
        {"id": "act", "task": {"queue": "q"}, "when": "${steps.check.output.go}"},
    ]}));
    let (mut yes, _) = start(&d, json!({}));
    let d1 = run(&d, &mut yes, &[ok(0, 1, json!({"go": true}))]);
    assert_eq!(enqueued(&d, &d1), [en("act", 1)]);

    let (mut no, _) = start(&d, json!({}));
    let d2 = run(&d, &mut no, &[ok(0, 1, json!({"go": false}))]);
    assert_eq!(enqueued(&d, &d2), []);
    assert_eq!(
        log(&d2),
        [
            "step_completed:check#1",
            "step_skipped:act",
            "instance_completed"
        ]
    );
    assert_eq!(no.status, InstanceStatus::Completed);
}

#[test]
fn all_steps_skipped_completes_the_instance() {
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "when": false},
        {"id": "b", "http": {"url": "http://x"}, "when": "${input.no}"},
    ]}));
    let (state, decision) = start(&d, json!({}));
    assert_eq!(state.status, InstanceStatus::Completed);
    assert_eq!(state.output, Some(json!({"a": null, "b": null})));
    assert_eq!(decision.commands, vec![]);
}

// ----- templates --------------------------------------------------------

#[test]
fn templates_resolve_input_nested_step_outputs_and_instance_id() {
    let d = def(json!({"steps": [
        task("fetch"),
        {"id": "use", "task": {"queue": "q", "input": {
            "customer": "${input.order.customer.name}",
            "first_line": "${input.order.lines.0}",
            "sku": "${steps.fetch.output.items.1.sku}",
            "whole": "${steps.fetch.output}",
            "missing": "${steps.fetch.output.nope.deeper}",
            "inst": "${instance.id}",
            "text": "${instance.id}/${steps.fetch.output.items.0.sku} x${input.order.lines.0.qty}",
            "static": [1, true, null],
        }}},
    ]}));
    let input = json!({"order": {"customer": {"name": "ada"}, "lines": [{"qty": 2}]}});
    let fetched = json!({"items": [{"sku": "a1"}, {"sku": "b2"}]});
    let (mut state, _) = start(&d, input);
    let decision = run(&d, &mut state, &[ok(0, 1, fetched.clone())]);
    let (rendered, _) = only_enqueue(&decision);
    assert_eq!(
        rendered,
        json!({
            "customer": "ada",
            "first_line": {"qty": 2},
            "sku": "b2",
            "whole": fetched,
            "missing": null,
            "inst": "inst-1",
            "text": "inst-1/a1 x2",
            "static": [1, true, null],
        })
    );
}

// ----- task results -----------------------------------------------------

#[test]
fn task_result_for_current_attempt_completes_the_step() {
    let d = def(json!({"steps": [task("a"), task("b")]}));
    let (mut state, _) = start(&d, json!({}));
    let started = now() - Duration::seconds(2);
    let decision = run(&d, &mut state, &[ok(0, 1, json!({"r": 1}))]);
    let done = entry(&decision, "step_completed");
    assert_eq!(done.step_id.as_deref(), Some("a"));
    assert_eq!(done.attempt, Some(1));
    assert_eq!(done.data["output"], json!({"r": 1}));
    assert_eq!(done.data["worker"], json!("w1"));
    assert_eq!(done.data["started_at"], json!(started));

    let s = step(&d, &state, "a");
    assert_eq!(s.status, StepStatus::Completed);
    assert_eq!(s.output.as_ref().map(Doc::to_value), Some(json!({"r": 1})));
    assert_eq!(s.error, None);
    assert_eq!(s.started_at, Some(started));
    assert_eq!(s.ended_at, Some(now()));
    assert_eq!(changed(&d, &decision), ["a", "b"]);
}

#[test]
fn duplicate_result_for_completed_step_is_ignored() {
    let d = def(json!({"steps": [task("a"), task("b")]}));
    let (mut state, _) = start(&d, json!({}));
    run(&d, &mut state, &[ok(0, 1, json!("first"))]);
    assert_ignored(&d, &mut state, &[ok(0, 1, json!("second"))]);
    assert_ignored(&d, &mut state, &[fail(0, 1, "late failure", false)]);
    assert_eq!(
        step(&d, &state, "a").output.as_ref().map(Doc::to_value),
        Some(json!("first"))
    );
}

#[test]
fn duplicate_results_in_one_batch_are_recorded_once() {
    let d = def(json!({"steps": [task("a"), task("b")]}));
    let (mut state, _) = start(&d, json!({}));
    let decision = run(
        &d,
        &mut state,
        &[
            ok(0, 1, json!("first")),
            ok(0, 1, json!("again")),
            fail(0, 1, "x", true),
        ],
    );
    assert_eq!(log(&decision), ["step_completed:a#1", "step_scheduled:b#1"]);
    assert_eq!(
        step(&d, &state, "a").output.as_ref().map(Doc::to_value),
        Some(json!("first"))
    );
    assert_eq!(enqueued(&d, &decision), [en("b", 1)]);
}

#[test]
fn result_for_a_superseded_attempt_is_ignored() {
    let d = def(json!({"steps": [task("a")]}));
    let (mut state, _) = start(&d, json!({}));
    run(&d, &mut state, &[fail(0, 1, "flaky", true)]);
    assert_eq!(state.steps[0].attempt, 2);
    // Attempt 1 reports again (e.g. its lease expired but it finished).
    assert_ignored(&d, &mut state, &[ok(0, 1, json!("old"))]);
    assert_ignored(&d, &mut state, &[fail(0, 1, "old", true)]);
    // The current attempt still completes the step.
    let decision = run(&d, &mut state, &[ok(0, 2, json!("new"))]);
    assert_eq!(log(&decision), ["step_completed:a#2", "instance_completed"]);
    assert_eq!(state.output, Some(json!({"a": "new"})));
}

#[test]
fn result_for_a_future_attempt_is_ignored() {
    let d = def(json!({"steps": [task("a")]}));
    let (mut state, _) = start(&d, json!({}));
    assert_ignored(&d, &mut state, &[ok(0, 2, json!("?"))]);
    assert_ignored(&d, &mut state, &[ok(0, 0, json!("?"))]);
}

#[test]
fn result_for_unscheduled_or_unknown_step_is_ignored() {
    let d = def(json!({"steps": [task("a"), task("b")]}));
    let (mut state, _) = start(&d, json!({}));
    assert_ignored(&d, &mut state, &[ok(1, 1, json!("b too early"))]);
    assert_ignored(&d, &mut state, &[ok(1, 0, json!("b too early"))]);
    assert_ignored(&d, &mut state, &[ok(99, 1, json!("no such step"))]);
}

#[test]
fn result_for_skipped_or_value_step_is_ignored() {
    let d = def(json!({"steps": [
        {"id": "v", "value": 1, "needs": []},
        {"id": "s", "task": {"queue": "q"}, "when": false, "needs": []},
        {"id": "t", "task": {"queue": "q"}, "needs": []},
    ]}));
    let (mut state, _) = start(&d, json!({}));
    assert_ignored(&d, &mut state, &[ok(0, 1, json!(2))]);
    assert_ignored(&d, &mut state, &[ok(1, 0, json!(2)), ok(1, 1, json!(2))]);
}

// ----- retries ----------------------------------------------------------

#[test]
fn retryable_failure_with_attempts_left_reschedules_next_attempt_with_backoff() {
    // Default policy: 3 attempts, 1s initial, x2, jitter on.
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q", "input": {"n": "${input.n}"}}, "timeout": "10s"},
    ]}));
    let (mut state, _) = start(&d, json!({"n": 1}));
    let decision = run(&d, &mut state, &[fail(0, 1, "flaky", true)]);
    // random 0.5 → factor exactly 1.0.
    assert_eq!(
        decision.commands,
        vec![Command::EnqueueTask {
            step: 0,
            item: None,
            purpose: TaskPurpose::Run,
            attempt: 2,
            kind: TaskKind::Task,
            queue: "q".to_string(),
            input: json!({"n": 1}),
            delay_ms: 1_000,
            timeout_ms: Some(10_000),
            idempotency_key: "inst-1:a".to_string(),
        }]
    );
    assert_eq!(log(&decision), ["step_attempt_failed:a#1"]);
    let error = json!({"message": "flaky", "retryable": true, "attempt": 1});
    assert_eq!(
        decision.history[0].data,
        json!({"error": error, "retry_in_ms": 1000, "worker": "w1"})
    );
    let s = &state.steps[0];
    assert_eq!(s.status, StepStatus::Scheduled);
    assert_eq!(s.attempt, 2);
    assert_eq!(s.error, Some(error));
    assert_eq!(s.started_at, None);
    assert_eq!(s.ended_at, None);
    assert_eq!(s.output.as_ref().map(Doc::to_value), None);
    assert_eq!(state.status, InstanceStatus::Running);
    assert_eq!(withdraws(&decision), 0);
    assert_eq!(changed(&d, &decision), ["a"]);
}

#[test]
fn retry_delay_uses_the_context_random_for_jitter() {
    let d = def(json!({"steps": [task("a")]}));
    let (mut low, _) = start(&d, json!({}));
    let d_low = decide_with(&d, &mut low, &[fail(0, 1, "x", true)], 0.0);
    assert_eq!(only_enqueue(&d_low).1, 800);
    let (mut high, _) = start(&d, json!({}));
    let d_high = decide_with(&d, &mut high, &[fail(0, 1, "x", true)], 0.999);
    assert_eq!(only_enqueue(&d_high).1, 1_199);
}

#[test]
fn retries_back_off_exponentially_until_attempts_run_out() {
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"},
         "retry": {"max_attempts": 4, "initial_interval": "1s", "multiplier": 3,
                   "max_interval": "5s", "jitter": false}},
    ]}));
    let (mut state, _) = start(&d, json!({}));
    let mut delays = Vec::new();
    for attempt in 1..=3 {
        let decision = run(&d, &mut state, &[fail(0, attempt, "flaky", true)]);
        assert_eq!(enqueued(&d, &decision), [en("a", attempt + 1)]);
        delays.push(only_enqueue(&decision).1);
    }
    assert_eq!(delays, [1_000, 3_000, 5_000], "x3, capped at 5s");
    let last = run(&d, &mut state, &[fail(0, 4, "flaky", true)]);
    assert_eq!(log(&last), ["step_failed:a#4", "instance_failed"]);
    assert_eq!(enqueued(&d, &last), []);
    assert_eq!(state.status, InstanceStatus::Failed);
}

#[test]
fn workflow_retry_default_applies_to_steps() {
    let d = def(json!({
        "retry": {"max_attempts": 2, "initial_interval": "2s", "jitter": false},
        "steps": [task("a")],
    }));
    let (mut state, _) = start(&d, json!({}));
    let d1 = run(&d, &mut state, &[fail(0, 1, "x", true)]);
    assert_eq!(only_enqueue(&d1).1, 2_000);
    let d2 = run(&d, &mut state, &[fail(0, 2, "x", true)]);
    assert_eq!(log(&d2), ["step_failed:a#2", "instance_failed"]);
}

#[test]
fn failure_details_are_kept_in_the_error() {
    let d = def(json!({"steps": [task("a")]}));
    let (mut state, _) = start(&d, json!({}));
    let event = Event::TaskFinished {
        step: 0,
        item: None,
        purpose: TaskPurpose::Run,
        attempt: 1,
        result: TaskResult::Failed(TaskFailure::new("bad", true, Some(json!({"code": 503})))),
        started_at: None,
        worker: None,
    };
    run(&d, &mut state, &[event]);
    assert_eq!(
        state.steps[0].error,
        Some(json!({"message": "bad", "retryable": true, "attempt": 1, "details": {"code": 503}}))
    );
}

// ----- backoff_ms -------------------------------------------------------

#[test]
fn backoff_grows_exponentially_without_jitter() {
    let p = policy(10, 1_000, 2.0, 300_000, false);
    let delays: Vec<u64> = (1..=6).map(|a| backoff_ms(&p, a, 0.5)).collect();
    assert_eq!(delays, [1_000, 2_000, 4_000, 8_000, 16_000, 32_000]);
}

#[test]
fn backoff_uses_the_multiplier() {
    let p = policy(10, 1_000, 1.5, 300_000, false);
    let delays: Vec<u64> = (1..=4).map(|a| backoff_ms(&p, a, 0.5)).collect();
    assert_eq!(delays, [1_000, 1_500, 2_250, 3_375]);
    let flat = policy(10, 700, 1.0, 300_000, false);
    for a in 1..=20 {
        assert_eq!(backoff_ms(&flat, a, 0.5), 700);
    }
}

#[test]
fn backoff_is_capped_at_max_interval() {
    let p = policy(10, 1_000, 2.0, 5_000, false);
    assert_eq!(backoff_ms(&p, 3, 0.5), 4_000);
    assert_eq!(backoff_ms(&p, 4, 0.5), 5_000);
    assert_eq!(backoff_ms(&p, 10, 0.5), 5_000);
    assert_eq!(backoff_ms(&p, 1_000, 0.5), 5_000);
    assert_eq!(backoff_ms(&p, u32::MAX, 0.5), 5_000);
    let huge = policy(1_000, 3_600_000, 1_000.0, 36_500 * 86_400_000, false);
    assert_eq!(backoff_ms(&huge, 999, 0.5), 36_500 * 86_400_000);
}

#[test]
fn backoff_attempt_zero_is_treated_as_first() {
    let p = policy(3, 1_000, 2.0, 300_000, false);
    assert_eq!(backoff_ms(&p, 0, 0.5), 1_000);
}

#[test]
fn backoff_jitter_spreads_within_twenty_percent() {
    let p = policy(10, 1_000, 2.0, 300_000, true);
    assert_eq!(backoff_ms(&p, 1, 0.0), 800);
    assert_eq!(backoff_ms(&p, 1, 0.5), 1_000);
    assert_eq!(backoff_ms(&p, 1, 0.999), 1_199);
    assert_eq!(backoff_ms(&p, 3, 0.0), 3_200);
    assert_eq!(backoff_ms(&p, 3, 0.999), 4_798);
    for i in 0..1000 {
        let r = f64::from(i) / 1000.0;
        let delay = backoff_ms(&p, 2, r);
        assert!((1_600..2_400).contains(&delay), "random {r}: {delay}");
    }
}

#[test]
fn backoff_jitter_never_exceeds_max_interval() {
    let p = policy(10, 1_000, 2.0, 5_000, true);
    assert_eq!(backoff_ms(&p, 10, 0.999), 5_000);
    assert_eq!(backoff_ms(&p, 10, 0.0), 4_000);
    for i in 0..1000 {
        let r = f64::from(i) / 1000.0;
        for attempt in 1..=12 {
            assert!(backoff_ms(&p, attempt, r) <= 5_000);
        }
    }
}

#[test]
fn backoff_without_jitter_ignores_random() {
    let p = policy(10, 1_000, 2.0, 300_000, false);
    for attempt in 1..=5 {
        let expected = backoff_ms(&p, attempt, 0.5);
        assert_eq!(backoff_ms(&p, attempt, 0.0), expected);
        assert_eq!(backoff_ms(&p, attempt, 0.999), expected);
    }
}

#[test]
fn backoff_clamps_out_of_range_random() {
    let p = policy(10, 1_000, 2.0, 300_000, true);
    assert_eq!(backoff_ms(&p, 1, -3.0), 800);
    assert_eq!(backoff_ms(&p, 1, 7.0), 1_200);
    assert!(backoff_ms(&p, 1, f64::NAN) <= 300_000);
}

// ----- permanent failures -----------------------------------------------

#[test]
fn exhausted_retries_fail_the_step_and_the_instance() {
    let d = def(json!({"steps": [
        {"id": "pay", "task": {"queue": "q"}, "retry": {"max_attempts": 2}},
        task("ship"),
    ]}));
    let (mut state, _) = start(&d, json!({}));
    run(&d, &mut state, &[fail(0, 1, "card declined", true)]);
    let decision = run(&d, &mut state, &[fail(0, 2, "card declined", true)]);

    assert_eq!(log(&decision), ["step_failed:pay#2", "instance_failed"]);
    assert_eq!(decision.commands, vec![Command::WithdrawTasks]);
    let step_error = json!({"message": "card declined", "retryable": true, "attempt": 2});
    assert_eq!(
        entry(&decision, "step_failed").data,
        json!({"error": step_error, "continue": false})
    );

    assert_eq!(state.status, InstanceStatus::Failed);
    assert_eq!(state.output, None);
    let error = state.error.clone().expect("instance error");
    let message = error["message"].as_str().expect("error message");
    assert!(message.contains("pay"), "{message}");
    assert!(message.contains("card declined"), "{message}");
    assert_eq!(error["step"], json!("pay"));
    assert_eq!(error["error"], step_error);
    assert_eq!(
        entry(&decision, "instance_failed").data,
        json!({ "error": error })
    );

    let s = step(&d, &state, "pay");
    assert_eq!(s.status, StepStatus::Failed);
    assert_eq!(s.error, Some(step_error));
    assert_eq!(s.ended_at, Some(now()));
    assert_eq!(s.output.as_ref().map(Doc::to_value), None);
    assert_eq!(
        step(&d, &state, "ship").status,
        StepStatus::Pending,
        "nothing after a failure is scheduled"
    );
    assert_eq!(changed(&d, &decision), ["pay"]);
}

#[test]
fn non_retryable_failure_fails_at_once_even_with_attempts_left() {
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "retry": {"max_attempts": 10}},
        task("b"),
    ]}));
    let (mut state, _) = start(&d, json!({}));
    let decision = run(&d, &mut state, &[fail(0, 1, "invalid card", false)]);
    assert_eq!(log(&decision), ["step_failed:a#1", "instance_failed"]);
    assert_eq!(decision.commands, vec![Command::WithdrawTasks]);
    assert_eq!(state.status, InstanceStatus::Failed);
    assert_eq!(state.steps[0].attempt, 1);
    assert!(state.error.as_ref().unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("invalid card"));
}

#[test]
fn max_attempts_one_means_no_retry() {
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "retry": {"max_attempts": 1}},
    ]}));
    let (mut state, _) = start(&d, json!({}));
    let decision = run(&d, &mut state, &[fail(0, 1, "x", true)]);
    assert_eq!(log(&decision), ["step_failed:a#1", "instance_failed"]);
    assert_eq!(enqueued(&d, &decision), []);
}

#[test]
fn failure_in_one_branch_withdraws_tasks_and_ignores_later_results() {
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "needs": []},
        {"id": "b", "task": {"queue": "q"}, "needs": [], "retry": {"max_attempts": 1}},
        {"id": "c", "task": {"queue": "q"}, "needs": ["a", "b"]},
    ]}));
    let (mut state, _) = start(&d, json!({}));
    let decision = run(&d, &mut state, &[fail(1, 1, "boom", true)]);
    assert_eq!(decision.commands, vec![Command::WithdrawTasks]);
    assert_eq!(state.status, InstanceStatus::Failed);

    // The sibling finishing later changes nothing and unlocks nothing.
    assert_ignored(&d, &mut state, &[ok(0, 1, json!("late"))]);
    assert_ignored(&d, &mut state, &[fail(0, 1, "late", true)]);
    assert_ignored(&d, &mut state, &[ok(1, 1, json!("late"))]);
    assert_eq!(step(&d, &state, "c").status, StepStatus::Pending);
}

#[test]
fn failure_and_sibling_success_in_same_batch() {
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "needs": []},
        {"id": "b", "task": {"queue": "q"}, "needs": [], "retry": {"max_attempts": 1}},
        {"id": "c", "task": {"queue": "q"}, "needs": ["a"]},
    ]}));
    let (mut state, _) = start(&d, json!({}));
    let decision = run(
        &d,
        &mut state,
        &[fail(1, 1, "boom", false), ok(0, 1, json!("A"))],
    );
    assert_eq!(log(&decision), ["step_failed:b#1", "instance_failed"]);
    assert_eq!(decision.commands, vec![Command::WithdrawTasks]);
    // a's result came after the failure in the batch: a was in flight when
    // the instance failed, so it is cancelled, not completed.
    assert_eq!(step(&d, &state, "a").status, StepStatus::Cancelled);
    assert_eq!(step(&d, &state, "c").status, StepStatus::Pending);
}

// ----- on_failure: continue ---------------------------------------------

#[test]
fn on_failure_continue_uses_error_as_output_and_lets_dependents_run() {
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "on_failure": "continue",
         "retry": {"max_attempts": 1}},
        {"id": "b", "value": {"why": "${steps.a.output.message}"}},
    ]}));
    let (mut state, _) = start(&d, json!({}));
    let decision = run(&d, &mut state, &[fail(0, 1, "boom", false)]);
    let error = json!({"message": "boom", "retryable": false, "attempt": 1});
    assert_eq!(
        log(&decision),
        [
            "step_failed:a#1",
            "step_completed:b#1",
            "instance_completed"
        ]
    );
    assert_eq!(
        entry(&decision, "step_failed").data,
        json!({"error": error, "continue": true})
    );
    assert_eq!(withdraws(&decision), 0);
    let a = step(&d, &state, "a");
    assert_eq!(a.status, StepStatus::Failed);
    assert_eq!(a.output.as_ref().map(Doc::to_value), Some(error.clone()));
    assert_eq!(a.error, Some(error.clone()));
    assert_eq!(
        step(&d, &state, "b").output.as_ref().map(Doc::to_value),
        Some(json!({"why": "boom"}))
    );
    assert_eq!(state.status, InstanceStatus::Completed);
    assert_eq!(state.error, None);
    assert_eq!(
        state.output,
        Some(json!({"a": error, "b": {"why": "boom"}}))
    );
}

#[test]
fn on_failure_continue_still_retries_first() {
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "on_failure": "continue",
         "retry": {"max_attempts": 2, "jitter": false}},
        task("b"),
    ]}));
    let (mut state, _) = start(&d, json!({}));
    let d1 = run(&d, &mut state, &[fail(0, 1, "flaky", true)]);
    assert_eq!(enqueued(&d, &d1), [en("a", 2)]);
    assert_eq!(step(&d, &state, "b").status, StepStatus::Pending);
    let d2 = run(&d, &mut state, &[fail(0, 2, "flaky", true)]);
    assert_eq!(log(&d2), ["step_failed:a#2", "step_scheduled:b#1"]);
    assert_eq!(enqueued(&d, &d2), [en("b", 1)]);
    assert_eq!(state.status, InstanceStatus::Running);
    // The failed step's result is final.
    assert_ignored(&d, &mut state, &[ok(0, 2, json!("late"))]);
}

#[test]
fn on_failure_fail_is_the_default_and_explicit_fail_behaves_the_same() {
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "on_failure": "fail"},
        task("b"),
    ]}));
    let (mut state, _) = start(&d, json!({}));
    let decision = run(&d, &mut state, &[fail(0, 1, "no", false)]);
    assert_eq!(log(&decision), ["step_failed:a#1", "instance_failed"]);
    assert_eq!(step(&d, &state, "b").status, StepStatus::Pending);
}

// ----- ended instances --------------------------------------------------

#[test]
fn results_after_the_instance_completed_are_ignored() {
    let d = def(json!({"steps": [task("a")]}));
    let (mut state, _) = start(&d, json!({}));
    run(&d, &mut state, &[ok(0, 1, json!("done"))]);
    assert_eq!(state.status, InstanceStatus::Completed);
    assert_ignored(&d, &mut state, &[ok(0, 1, json!("again"))]);
    assert_ignored(&d, &mut state, &[fail(0, 1, "late", true)]);
    assert_ignored(&d, &mut state, &[Event::Start]);
    assert_eq!(state.output, Some(json!({"a": "done"})));
}

#[test]
fn results_for_a_cancelled_or_failed_instance_are_ignored() {
    let d = def(json!({"steps": [task("a"), task("b")]}));
    for status in [InstanceStatus::Cancelled, InstanceStatus::Failed] {
        let (mut state, _) = start(&d, json!({}));
        state.status = status;
        assert_ignored(&d, &mut state, &[ok(0, 1, json!("x"))]);
        assert_ignored(&d, &mut state, &[fail(0, 1, "x", true)]);
        assert_ignored(&d, &mut state, &[Event::Start]);
        assert_ignored(&d, &mut state, &[]);
    }
}

// ----- sleep ------------------------------------------------------------

fn nap() -> Definition {
    def(json!({"steps": [
        {"id": "nap", "sleep": "10m"},
        {"id": "after", "task": {"queue": "q", "input": "${steps.nap.output}"}},
    ]}))
}

#[test]
fn sleep_duration_waits_until_now_plus_the_duration() {
    let d = nap();
    let (state, decision) = start(&d, json!({}));
    let wake = now() + Duration::minutes(10);
    assert_eq!(log(&decision), ["instance_started", "step_waiting:nap#1"]);
    assert_eq!(
        entry(&decision, "step_waiting").data,
        json!({"until": wake})
    );
    assert_eq!(decision.commands, vec![], "a timer needs no task");
    assert_eq!(decision.wake_at, Some(wake));
    assert_eq!(changed(&d, &decision), ["nap"]);
    let s = step(&d, &state, "nap");
    assert_eq!(s.status, StepStatus::Waiting);
    assert_eq!(s.wake_at, Some(wake));
    assert_eq!(s.attempt, 1);
    assert_eq!(s.scheduled_at, Some(now()));
    assert_eq!(s.started_at, Some(now()));
    assert_eq!(s.ended_at, None);
    assert_eq!(s.output.as_ref().map(Doc::to_value), None);
    assert_eq!(step(&d, &state, "after").status, StepStatus::Pending);
    assert_eq!(state.status, InstanceStatus::Running);
}

#[test]
fn sleep_changes_nothing_before_its_wake_time() {
    let d = nap();
    let (mut state, _) = start(&d, json!({}));
    let wake = now() + Duration::minutes(10);
    for when in [
        now(),
        at(1),
        at(9 * 60 + 59),
        wake - Duration::milliseconds(1),
    ] {
        assert_eq!(
            assert_quiet_at(&d, &mut state, &[], when),
            Some(wake),
            "at {when}"
        );
    }
    assert_eq!(step(&d, &state, "nap").status, StepStatus::Waiting);
}

#[test]
fn sleep_completes_at_its_wake_time_with_null_output_and_unlocks_dependents() {
    let d = nap();
    let (mut state, _) = start(&d, json!({}));
    let wake = now() + Duration::minutes(10);
    let decision = run_at(&d, &mut state, &[], wake);
    assert_eq!(
        log(&decision),
        ["step_completed:nap#1", "step_scheduled:after#1"]
    );
    assert_eq!(
        entry(&decision, "step_completed").data,
        json!({"slept_until": wake, "output": null})
    );
    assert_eq!(cmds(&d, &decision), ["enqueue after/run#1"]);
    assert_eq!(only_enqueue(&decision).0, Value::Null);
    assert_eq!(decision.wake_at, None);
    assert_eq!(changed(&d, &decision), ["nap", "after"]);
    let s = step(&d, &state, "nap");
    assert_eq!(s.status, StepStatus::Completed);
    assert_eq!(s.output.as_ref().map(Doc::to_value), Some(Value::Null));
    assert_eq!(s.wake_at, None);
    assert_eq!(s.ended_at, Some(wake));
    assert_eq!(s.completion_order, Some(1));
    assert_eq!(step(&d, &state, "after").scheduled_at, Some(wake));
}

#[test]
fn sleep_woken_late_completes_once() {
    let d = nap();
    let (mut state, _) = start(&d, json!({}));
    let late = at(3 * 3600);
    let decision = run_at(&d, &mut state, &[], late);
    assert_eq!(
        log(&decision),
        ["step_completed:nap#1", "step_scheduled:after#1"]
    );
    assert_eq!(step(&d, &state, "nap").ended_at, Some(late));
    // Looking again later fires nothing a second time.
    assert_eq!(assert_quiet_at(&d, &mut state, &[], at(4 * 3600)), None);
}

#[test]
fn sleep_until_a_literal_timestamp() {
    let d = def(json!({"steps": [
        {"id": "nap", "sleep": {"until": "2030-01-31T12:00:00Z"}},
        task("after"),
    ]}));
    let (mut state, decision) = start(&d, json!({}));
    let wake = Utc.with_ymd_and_hms(2030, 1, 31, 12, 0, 0).unwrap();
    assert_eq!(decision.wake_at, Some(wake));
    assert_eq!(step(&d, &state, "nap").wake_at, Some(wake));
    assert_eq!(step(&d, &state, "nap").status, StepStatus::Waiting);
    assert_quiet_at(&d, &mut state, &[], wake - Duration::seconds(1));
    let woke = run_at(&d, &mut state, &[], wake);
    assert_eq!(
        log(&woke),
        ["step_completed:nap#1", "step_scheduled:after#1"]
    );
}

#[test]
fn sleep_until_a_template_is_rendered_and_converted_to_utc() {
    let d = def(json!({"steps": [
        task("plan"),
        {"id": "nap", "sleep": {"until": "${steps.plan.output.at}"}},
        task("after"),
    ]}));
    let (mut state, _) = start(&d, json!({}));
    let decision = run(
        &d,
        &mut state,
        &[ok(0, 1, json!({"at": "2030-01-02T07:04:05+02:00"}))],
    );
    // 07:04:05+02:00 is 05:04:05Z: two hours after now().
    let wake = at(2 * 3600);
    assert_eq!(
        log(&decision),
        ["step_completed:plan#1", "step_waiting:nap#1"]
    );
    assert_eq!(step(&d, &state, "nap").wake_at, Some(wake));
    assert_eq!(decision.wake_at, Some(wake));
}

#[test]
fn sleep_until_a_past_time_completes_in_the_same_decision() {
    let d = def(json!({"steps": [
        {"id": "nap", "sleep": {"until": "${input.at}"}},
        task("after"),
    ]}));
    let (state, decision) = start(&d, json!({"at": "2001-01-01T00:00:00Z"}));
    assert_eq!(
        log(&decision),
        [
            "instance_started",
            "step_waiting:nap#1",
            "step_completed:nap#1",
            "step_scheduled:after#1"
        ]
    );
    assert_eq!(step(&d, &state, "nap").status, StepStatus::Completed);
    assert_eq!(decision.wake_at, None);
}

#[test]
fn sleep_until_a_bad_template_value_fails_the_step_and_instance() {
    let d = def(json!({"steps": [
        {"id": "nap", "sleep": {"until": "${input.at}"}},
        task("after"),
    ]}));
    for at_value in [
        json!("tomorrow"),
        json!(42),
        json!(null),
        json!("2030-01-02"),
    ] {
        let (state, decision) = start(&d, json!({ "at": at_value }));
        assert_eq!(
            log(&decision),
            ["instance_started", "step_failed:nap#1", "instance_failed"],
            "until {at_value}"
        );
        assert_eq!(decision.commands, vec![Command::WithdrawTasks]);
        assert_eq!(decision.wake_at, None);
        assert_eq!(state.status, InstanceStatus::Failed);
        let s = step(&d, &state, "nap");
        assert_eq!(s.status, StepStatus::Failed);
        assert_eq!(s.wake_at, None);
        assert_eq!(s.error.as_ref().unwrap()["retryable"], json!(false));
        let m = message(&s.error);
        assert!(m.contains("RFC 3339"), "{m}");
        assert!(message(&state.error).contains("step nap failed"));
        assert_eq!(step(&d, &state, "after").status, StepStatus::Pending);
    }
}

#[test]
fn zero_sleep_completes_in_the_same_decision() {
    let d = def(json!({"steps": [{"id": "nap", "sleep": "0s"}, task("after")]}));
    let (state, decision) = start(&d, json!({}));
    assert_eq!(
        log(&decision),
        [
            "instance_started",
            "step_waiting:nap#1",
            "step_completed:nap#1",
            "step_scheduled:after#1"
        ]
    );
    assert_eq!(enqueued(&d, &decision), [en("after", 1)]);
    assert_eq!(step(&d, &state, "nap").status, StepStatus::Completed);
    assert_eq!(
        step(&d, &state, "nap").output.as_ref().map(Doc::to_value),
        Some(Value::Null)
    );
    assert_eq!(decision.wake_at, None);
}

#[test]
fn sleep_step_skipped_by_when_does_not_wait() {
    let d = def(json!({"steps": [
        {"id": "wait", "sleep": "10m", "when": "${input.cool_off}"},
        task("ship"),
    ]}));
    let (state, decision) = start(&d, json!({"cool_off": false}));
    assert_eq!(state.status, InstanceStatus::Running);
    assert_eq!(step(&d, &state, "wait").status, StepStatus::Skipped);
    assert_eq!(step(&d, &state, "wait").wake_at, None);
    assert_eq!(enqueued(&d, &decision), [en("ship", 1)]);
    assert_eq!(decision.wake_at, None);
}

#[test]
fn results_for_timer_and_signal_steps_are_ignored() {
    // Sleep and signal steps have no task, so no result for them can be
    // genuine: it must not complete them early.
    let d = def(json!({"steps": [
        {"id": "nap", "sleep": "10m", "needs": []},
        {"id": "approval", "signal": {"name": "approved"}, "needs": []},
    ]}));
    let (mut state, _) = start(&d, json!({}));
    let wake = now() + Duration::minutes(10);
    assert_eq!(
        assert_quiet_at(&d, &mut state, &[ok(0, 1, json!("early"))], now()),
        Some(wake)
    );
    assert_eq!(
        assert_quiet_at(&d, &mut state, &[ok(1, 1, json!("forged"))], now()),
        Some(wake)
    );
    assert_eq!(
        assert_quiet_at(&d, &mut state, &[fail(1, 1, "forged", false)], now()),
        Some(wake)
    );
}

// ----- signals ----------------------------------------------------------

fn approval() -> Definition {
    def(json!({"steps": [
        {"id": "approval", "signal": {"name": "approved"}},
        {"id": "ship", "task": {"queue": "q", "input": "${steps.approval.output}"}},
    ]}))
}

#[test]
fn signal_step_waits_without_a_timer() {
    let d = approval();
    let (mut state, decision) = start(&d, json!({}));
    assert_eq!(
        log(&decision),
        ["instance_started", "step_waiting:approval#1"]
    );
    assert_eq!(
        entry(&decision, "step_waiting").data,
        json!({"signal": "approved", "timeout_at": null})
    );
    assert_eq!(decision.commands, vec![]);
    assert_eq!(decision.wake_at, None, "no timeout, so no timer");
    let s = step(&d, &state, "approval");
    assert_eq!(s.status, StepStatus::Waiting);
    assert_eq!(s.wake_at, None);
    assert_eq!(s.attempt, 1);
    // Time alone changes nothing.
    assert_eq!(assert_quiet_at(&d, &mut state, &[], at(365 * 86_400)), None);
}

#[test]
fn matching_signal_completes_the_step_with_its_payload_and_is_consumed() {
    let d = approval();
    let (mut state, _) = start(&d, json!({}));
    let decision = run(
        &d,
        &mut state,
        &[signal(7, "approved", json!({"by": "ada"}))],
    );
    assert_eq!(
        log(&decision),
        ["step_completed:approval#1", "step_scheduled:ship#1"]
    );
    assert_eq!(
        entry(&decision, "step_completed").data,
        json!({"signal": "approved", "signal_id": 7, "output": {"by": "ada"}})
    );
    assert_eq!(
        cmds(&d, &decision),
        ["consume 7 approval", "enqueue ship/run#1"]
    );
    assert_eq!(
        decision.commands[0],
        Command::ConsumeSignal { id: 7, step: 0 }
    );
    assert_eq!(only_enqueue_of(&decision).0, json!({"by": "ada"}));
    let s = step(&d, &state, "approval");
    assert_eq!(s.status, StepStatus::Completed);
    assert_eq!(
        s.output.as_ref().map(Doc::to_value),
        Some(json!({"by": "ada"}))
    );
    assert_eq!(s.ended_at, Some(now()));
    // The driver re-delivers only unconsumed signals; a repeat changes nothing.
    assert_ignored(
        &d,
        &mut state,
        &[signal(7, "approved", json!({"by": "ada"}))],
    );
}

/// The single EnqueueTask among `d`'s commands: `(input, delay_ms)`.
fn only_enqueue_of(d: &Decision) -> (Value, u64) {
    let all = enqueued_tasks(d);
    assert_eq!(all.len(), 1, "expected one EnqueueTask in {:?}", d.commands);
    (all[0].0.clone(), all[0].1)
}

#[test]
fn signal_with_another_name_is_not_consumed() {
    let d = approval();
    let (mut state, _) = start(&d, json!({}));
    assert_ignored(&d, &mut state, &[signal(1, "rejected", json!(1))]);
    let decision = run(
        &d,
        &mut state,
        &[
            signal(1, "rejected", json!(1)),
            signal(2, "approved", json!(2)),
        ],
    );
    assert_eq!(
        cmds(&d, &decision),
        ["consume 2 approval", "enqueue ship/run#1"]
    );
    assert_eq!(
        step(&d, &state, "approval")
            .output
            .as_ref()
            .map(Doc::to_value),
        Some(json!(2))
    );
}

#[test]
fn signal_sent_before_the_step_waits_is_consumed_once_it_waits() {
    let d = def(json!({"steps": [
        task("prepare"),
        {"id": "approval", "signal": {"name": "approved"}},
        task("ship"),
    ]}));
    let early = signal(5, "approved", json!("yes"));

    // Buffered: while the step is pending the signal stays unconsumed.
    let (mut state, _) = start(&d, json!({}));
    assert_ignored(&d, &mut state, std::slice::from_ref(&early));
    assert_eq!(step(&d, &state, "approval").status, StepStatus::Pending);
    // The driver delivers it again with the result that unblocks the step.
    let decision = run(&d, &mut state, &[ok(0, 1, json!("ready")), early.clone()]);
    assert_eq!(
        log(&decision),
        [
            "step_completed:prepare#1",
            "step_waiting:approval#1",
            "step_completed:approval#1",
            "step_scheduled:ship#1"
        ]
    );
    assert_eq!(
        cmds(&d, &decision),
        ["consume 5 approval", "enqueue ship/run#1"]
    );

    // Or in a later decision, once the step waits.
    let (mut state, _) = start(&d, json!({}));
    assert_ignored(&d, &mut state, std::slice::from_ref(&early));
    let d1 = run(&d, &mut state, &[ok(0, 1, json!("ready"))]);
    assert_eq!(d1.commands, vec![]);
    assert_eq!(step(&d, &state, "approval").status, StepStatus::Waiting);
    let d2 = run(&d, &mut state, &[early]);
    assert_eq!(cmds(&d, &d2), ["consume 5 approval", "enqueue ship/run#1"]);
    assert_eq!(
        step(&d, &state, "approval")
            .output
            .as_ref()
            .map(Doc::to_value),
        Some(json!("yes"))
    );
}

#[test]
fn two_waiting_steps_with_the_same_name_take_one_signal_each_in_id_order() {
    let d = def(json!({"steps": [
        {"id": "first", "signal": {"name": "go"}, "needs": []},
        {"id": "second", "signal": {"name": "go"}, "needs": []},
        {"id": "join", "value": ["${steps.first.output}", "${steps.second.output}"],
         "needs": ["first", "second"]},
    ]}));
    // Both signals at once.
    let (mut state, _) = start(&d, json!({}));
    let decision = run(
        &d,
        &mut state,
        &[signal(3, "go", json!("a")), signal(4, "go", json!("b"))],
    );
    assert_eq!(cmds(&d, &decision), ["consume 3 first", "consume 4 second"]);
    assert_eq!(
        step(&d, &state, "join").output.as_ref().map(Doc::to_value),
        Some(json!(["a", "b"]))
    );
    assert_eq!(state.status, InstanceStatus::Completed);

    // One at a time: each signal is consumed by one step only.
    let (mut state, _) = start(&d, json!({}));
    let d1 = run(&d, &mut state, &[signal(3, "go", json!("a"))]);
    assert_eq!(cmds(&d, &d1), ["consume 3 first"]);
    assert_eq!(step(&d, &state, "second").status, StepStatus::Waiting);
    let d2 = run(&d, &mut state, &[signal(4, "go", json!("b"))]);
    assert_eq!(cmds(&d, &d2), ["consume 4 second"]);
    assert_eq!(
        step(&d, &state, "join").output.as_ref().map(Doc::to_value),
        Some(json!(["a", "b"]))
    );
}

#[test]
fn one_waiting_step_consumes_only_the_oldest_of_several_signals() {
    let d = approval();
    let (mut state, _) = start(&d, json!({}));
    let decision = run(
        &d,
        &mut state,
        &[
            signal(10, "approved", json!("old")),
            signal(11, "approved", json!("new")),
        ],
    );
    assert_eq!(
        cmds(&d, &decision),
        ["consume 10 approval", "enqueue ship/run#1"]
    );
    assert_eq!(
        step(&d, &state, "approval")
            .output
            .as_ref()
            .map(Doc::to_value),
        Some(json!("old"))
    );
    // The other one stays in the database and is never consumed here.
    assert_ignored(&d, &mut state, &[signal(11, "approved", json!("new"))]);
}

#[test]
fn signal_timeout_fails_the_step_and_winds_the_instance_down() {
    let d = def(json!({"steps": [
        {"id": "reserve", "task": {"queue": "q"},
         "compensate": {"task": {"queue": "undo"}}},
        {"id": "approval", "signal": {"name": "approved", "timeout": "1h"},
         "retry": {"max_attempts": 5}},
        task("ship"),
    ]}));
    let (mut state, _) = start(&d, json!({}));
    let d1 = run(&d, &mut state, &[ok(0, 1, json!("r"))]);
    let timeout_at = at(3600);
    assert_eq!(
        entry(&d1, "step_waiting").data,
        json!({"signal": "approved", "timeout_at": timeout_at})
    );
    assert_eq!(step(&d, &state, "approval").wake_at, Some(timeout_at));
    assert_eq!(d1.wake_at, Some(timeout_at));
    assert_eq!(
        assert_quiet_at(&d, &mut state, &[], at(3599)),
        Some(timeout_at)
    );

    let d2 = run_at(&d, &mut state, &[], timeout_at);
    assert_eq!(
        log(&d2),
        ["step_failed:approval#1", "compensation_scheduled:reserve#1"]
    );
    assert_eq!(cmds(&d, &d2), ["withdraw", "enqueue reserve/compensate#1"]);
    assert_eq!(d2.wake_at, None);
    let s = step(&d, &state, "approval");
    assert_eq!(s.status, StepStatus::Failed);
    assert_eq!(s.wake_at, None);
    assert_eq!(s.ended_at, Some(timeout_at));
    let error = s.error.clone().unwrap();
    assert_eq!(error["retryable"], json!(false), "a timeout is not retried");
    assert_eq!(error["timeout"], json!(true));
    let m = message(&s.error);
    assert!(m.contains("timed out") && m.contains("approved"), "{m}");
    assert_eq!(state.ending, Some(Ending::Failed));
    assert_eq!(state.status, InstanceStatus::Running);

    // A signal arriving now is too late and is not consumed.
    assert_quiet_at(&d, &mut state, &[signal(1, "approved", json!(1))], at(3601));
    let d3 = run_at(&d, &mut state, &[comp_ok(0, 1)], at(3602));
    assert_eq!(
        log(&d3),
        ["compensation_completed:reserve#1", "instance_failed"]
    );
    assert_eq!(state.status, InstanceStatus::Failed);
    assert!(message(&state.error).contains("step approval failed"));
}

#[test]
fn signal_before_the_timeout_clears_the_timer() {
    let d = def(json!({"steps": [
        {"id": "approval", "signal": {"name": "approved", "timeout": "1h"}},
        task("ship"),
    ]}));
    let (mut state, d0) = start(&d, json!({}));
    assert_eq!(d0.wake_at, Some(at(3600)));
    let decision = run_at(
        &d,
        &mut state,
        &[signal(1, "approved", json!(true))],
        at(600),
    );
    assert_eq!(
        cmds(&d, &decision),
        ["consume 1 approval", "enqueue ship/run#1"]
    );
    assert_eq!(step(&d, &state, "approval").wake_at, None);
    assert_eq!(decision.wake_at, None);
    // The old timeout no longer fires.
    assert_eq!(assert_quiet_at(&d, &mut state, &[], at(7200)), None);
    assert_eq!(step(&d, &state, "approval").status, StepStatus::Completed);
}

#[test]
fn signal_timeout_with_on_failure_continue_lets_the_workflow_finish() {
    let d = def(json!({"steps": [
        {"id": "wait", "signal": {"name": "go", "timeout": "5m"}, "on_failure": "continue"},
        {"id": "after", "value": "${steps.wait.output.message}"},
    ]}));
    let (mut state, _) = start(&d, json!({}));
    let decision = run_at(&d, &mut state, &[], at(300));
    assert_eq!(
        log(&decision),
        [
            "step_failed:wait#1",
            "step_completed:after#1",
            "instance_completed"
        ]
    );
    assert_eq!(withdraws(&decision), 0);
    assert_eq!(state.status, InstanceStatus::Completed);
    let after = step(&d, &state, "after")
        .output
        .as_ref()
        .unwrap()
        .to_value();
    assert!(after.as_str().unwrap().contains("timed out"), "{after}");
}

// ----- cancel -----------------------------------------------------------

/// a, b, n and x run in parallel; a and b can be undone, n cannot; `last`
/// joins them.
fn undoable() -> Definition {
    def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "needs": [],
         "compensate": {"task": {"queue": "undo", "input": {"undo": "${steps.a.output}"}}}},
        {"id": "b", "task": {"queue": "q"}, "needs": [],
         "compensate": {"task": {"queue": "undo", "input": "${steps.b.output}"}, "timeout": "5s"}},
        {"id": "n", "task": {"queue": "q"}, "needs": []},
        {"id": "x", "task": {"queue": "q"}, "needs": [],
         "compensate": {"task": {"queue": "undo"}}},
        {"id": "last", "task": {"queue": "q"}, "needs": ["a", "b", "n", "x"]},
    ]}))
}

#[test]
fn cancel_withdraws_work_and_compensates_in_reverse_completion_order() {
    let d = undoable();
    let (mut state, _) = start(&d, json!({}));
    // Completion order: b, a, n. x is still in flight.
    run(&d, &mut state, &[ok(1, 1, json!("B"))]);
    run(&d, &mut state, &[ok(0, 1, json!("A"))]);
    run(&d, &mut state, &[ok(2, 1, json!("N"))]);
    assert_eq!(step(&d, &state, "b").completion_order, Some(1));
    assert_eq!(step(&d, &state, "a").completion_order, Some(2));
    assert_eq!(step(&d, &state, "n").completion_order, Some(3));

    let d1 = run(&d, &mut state, &[cancel("user asked")]);
    assert_eq!(
        log(&d1),
        ["instance_cancel_requested", "compensation_scheduled:a#1"]
    );
    assert_eq!(
        entry(&d1, "instance_cancel_requested").data,
        json!({"reason": "user asked"})
    );
    assert_eq!(
        entry(&d1, "compensation_scheduled").data,
        json!({"input": {"undo": "A"}})
    );
    // Withdrawal comes first, so it cannot remove the new compensation task.
    assert_eq!(
        d1.commands,
        vec![
            Command::WithdrawTasks,
            Command::EnqueueTask {
                step: 0,
                item: None,
                purpose: TaskPurpose::Compensate,
                attempt: 1,
                kind: TaskKind::Task,
                queue: "undo".to_string(),
                input: json!({"undo": "A"}),
                delay_ms: 0,
                timeout_ms: None,
                idempotency_key: "inst-1:a:compensate".to_string(),
            }
        ]
    );
    assert_eq!(d1.wake_at, None);
    assert_eq!(changed(&d, &d1), ["a", "x"]);
    let x = step(&d, &state, "x");
    assert_eq!(x.status, StepStatus::Cancelled, "the in-flight step");
    assert_eq!(x.ended_at, Some(now()));
    assert_eq!(x.compensation, None, "a cancelled step is not compensated");
    assert_eq!(
        step(&d, &state, "a").compensation,
        Some(CompensationState {
            status: StepStatus::Scheduled,
            attempt: 1,
            input: json!({"undo": "A"}),
            output: None,
            error: None,
        })
    );
    assert_eq!(state.status, InstanceStatus::Running, "still winding down");
    assert_eq!(state.ending, Some(Ending::Cancelled));
    assert_eq!(
        state.error,
        Some(json!({"message": "cancelled: user asked", "reason": "user asked"}))
    );

    // While a compensation runs: late results, a second cancel, a result for
    // a compensation that has not begun and plain looks change nothing.
    assert_ignored(&d, &mut state, &[ok(3, 1, json!("late"))]);
    assert_ignored(&d, &mut state, &[fail(3, 1, "late", true)]);
    assert_ignored(&d, &mut state, &[cancel("again")]);
    assert_ignored(&d, &mut state, &[comp_ok(1, 1)]);
    assert_ignored(&d, &mut state, &[comp_ok(0, 2)]);
    assert_ignored(&d, &mut state, &[]);

    // Only after a's compensation finished does b's begin.
    let d2 = run(&d, &mut state, &[comp_ok(0, 1)]);
    assert_eq!(
        log(&d2),
        ["compensation_completed:a#1", "compensation_scheduled:b#1"]
    );
    assert_eq!(
        entry(&d2, "compensation_completed").data,
        json!({"output": {"undone": true}})
    );
    assert_eq!(cmds(&d, &d2), ["enqueue b/compensate#1"]);
    assert_eq!(
        enqueued_tasks(&d2),
        [(json!("B"), 0, "inst-1:b:compensate".to_string())]
    );
    assert!(matches!(
        d2.commands[0],
        Command::EnqueueTask {
            timeout_ms: Some(5_000),
            ..
        }
    ));
    let a = step(&d, &state, "a");
    assert_eq!(a.status, StepStatus::Compensated);
    assert_eq!(
        a.output.as_ref().map(Doc::to_value),
        Some(json!("A")),
        "the step's own output is kept"
    );
    let comp = a.compensation.clone().unwrap();
    assert_eq!(comp.status, StepStatus::Completed);
    assert_eq!(comp.output, Some(json!({"undone": true})));

    let d3 = run(&d, &mut state, &[comp_ok(1, 1)]);
    assert_eq!(
        log(&d3),
        ["compensation_completed:b#1", "instance_cancelled"]
    );
    assert_eq!(d3.commands, vec![]);
    assert_eq!(
        entry(&d3, "instance_cancelled").data,
        json!({"error": {"message": "cancelled: user asked", "reason": "user asked"}})
    );
    assert_eq!(state.status, InstanceStatus::Cancelled);
    assert_eq!(state.ending, None);
    assert_eq!(state.output, None);
    assert_eq!(step(&d, &state, "b").status, StepStatus::Compensated);
    assert_eq!(step(&d, &state, "n").status, StepStatus::Completed);
    assert_eq!(step(&d, &state, "last").status, StepStatus::Pending);

    // After the end everything is ignored.
    assert_ignored(&d, &mut state, &[comp_ok(1, 1)]);
    assert_ignored(&d, &mut state, &[ok(3, 1, json!("late"))]);
    assert_ignored(&d, &mut state, &[cancel("again")]);
}

#[test]
fn cancel_with_nothing_to_compensate_ends_in_the_same_decision() {
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "needs": []},
        {"id": "b", "task": {"queue": "q"}, "needs": []},
        task("c"),
    ]}));
    let (mut state, _) = start(&d, json!({}));
    let decision = run(&d, &mut state, &[cancel("stop")]);
    assert_eq!(
        log(&decision),
        ["instance_cancel_requested", "instance_cancelled"]
    );
    assert_eq!(decision.commands, vec![Command::WithdrawTasks]);
    assert_eq!(state.status, InstanceStatus::Cancelled);
    assert_eq!(state.ending, None);
    assert_eq!(step(&d, &state, "a").status, StepStatus::Cancelled);
    assert_eq!(step(&d, &state, "b").status, StepStatus::Cancelled);
    assert_eq!(step(&d, &state, "c").status, StepStatus::Pending);
    assert_eq!(changed(&d, &decision), ["a", "b"]);
    assert_ignored(&d, &mut state, &[ok(0, 1, json!("late"))]);
}

#[test]
fn cancel_requested_twice_in_one_batch_is_handled_once() {
    let d = def(json!({"steps": [task("a")]}));
    let (mut state, _) = start(&d, json!({}));
    let decision = run(&d, &mut state, &[cancel("one"), cancel("two")]);
    assert_eq!(
        log(&decision),
        ["instance_cancel_requested", "instance_cancelled"]
    );
    assert_eq!(withdraws(&decision), 1);
    assert_eq!(state.error.as_ref().unwrap()["reason"], json!("one"));
}

#[test]
fn result_in_the_same_batch_before_the_cancel_counts_and_is_compensated() {
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "compensate": {"task": {"queue": "undo"}}},
        task("b"),
    ]}));
    let (mut state, _) = start(&d, json!({}));
    // The driver puts results before the cancel request.
    let decision = run(&d, &mut state, &[ok(0, 1, json!("A")), cancel("stop")]);
    assert_eq!(
        log(&decision),
        [
            "step_completed:a#1",
            "instance_cancel_requested",
            "compensation_scheduled:a#1"
        ]
    );
    assert_eq!(cmds(&d, &decision), ["withdraw", "enqueue a/compensate#1"]);
    assert_eq!(step(&d, &state, "b").status, StepStatus::Pending);
}

#[test]
fn cancel_of_an_ended_instance_does_nothing() {
    let d = def(json!({"steps": [task("a")]}));
    let (mut completed, _) = start(&d, json!({}));
    run(&d, &mut completed, &[ok(0, 1, json!(1))]);
    assert_eq!(completed.status, InstanceStatus::Completed);
    assert_ignored(&d, &mut completed, &[cancel("too late")]);

    let (mut failed, _) = start(&d, json!({}));
    run(&d, &mut failed, &[fail(0, 1, "no", false)]);
    assert_eq!(failed.status, InstanceStatus::Failed);
    assert_ignored(&d, &mut failed, &[cancel("too late")]);

    let (mut cancelled, _) = start(&d, json!({}));
    run(&d, &mut cancelled, &[cancel("first")]);
    assert_eq!(cancelled.status, InstanceStatus::Cancelled);
    assert_ignored(&d, &mut cancelled, &[cancel("second")]);
    assert_eq!(cancelled.error.as_ref().unwrap()["reason"], json!("first"));
}

#[test]
fn cancel_of_an_instance_winding_down_after_a_failure_keeps_it_failing() {
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "compensate": {"task": {"queue": "undo"}}},
        {"id": "b", "task": {"queue": "q"}, "retry": {"max_attempts": 1}},
    ]}));
    let (mut state, _) = start(&d, json!({}));
    run(&d, &mut state, &[ok(0, 1, json!("A"))]);
    run(&d, &mut state, &[fail(1, 1, "boom", false)]);
    assert_eq!(state.ending, Some(Ending::Failed));
    assert_ignored(&d, &mut state, &[cancel("meanwhile")]);
    let decision = run(&d, &mut state, &[comp_ok(0, 1)]);
    assert_eq!(
        log(&decision),
        ["compensation_completed:a#1", "instance_failed"]
    );
    assert_eq!(state.status, InstanceStatus::Failed);
}

#[test]
fn cancel_of_a_pending_instance_in_its_first_decision() {
    // The driver passes Start for a pending instance, before the request:
    // nothing gets scheduled.
    let d = def(json!({"steps": [task("a")]}));
    let mut state = pending(json!({}));
    let decision = run(&d, &mut state, &[Event::Start, cancel("never mind")]);
    assert_eq!(
        log(&decision),
        [
            "instance_started",
            "instance_cancel_requested",
            "instance_cancelled"
        ]
    );
    assert_eq!(cmds(&d, &decision), ["withdraw"]);
    assert_eq!(state.status, InstanceStatus::Cancelled);
    assert_eq!(step(&d, &state, "a").status, StepStatus::Pending);
}

#[test]
fn cancel_while_waiting_stops_timers_and_leaves_signals_unconsumed() {
    let d = def(json!({
        "timeout": "1d",
        "steps": [
            {"id": "nap", "sleep": "10m", "needs": []},
            {"id": "approval", "signal": {"name": "approved", "timeout": "1h"}, "needs": []},
        ],
    }));
    let (mut state, d0) = start(&d, json!({}));
    assert_eq!(d0.wake_at, Some(at(600)));
    let decision = run(
        &d,
        &mut state,
        &[signal(1, "other", json!(null)), cancel("stop")],
    );
    assert_eq!(
        log(&decision),
        ["instance_cancel_requested", "instance_cancelled"]
    );
    assert_eq!(decision.commands, vec![Command::WithdrawTasks]);
    assert_eq!(decision.wake_at, None);
    for id in ["nap", "approval"] {
        assert_eq!(step(&d, &state, id).status, StepStatus::Cancelled, "{id}");
        assert_eq!(step(&d, &state, id).wake_at, None, "{id}");
    }
    // Neither the timers nor a matching signal do anything now.
    assert_eq!(
        assert_quiet_at(&d, &mut state, &[signal(2, "approved", json!(1))], at(7200)),
        None
    );
}

// ----- compensation on failure ------------------------------------------

fn four_steps() -> Definition {
    def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"},
         "compensate": {"task": {"queue": "undo", "input": {"step": "a", "out": "${steps.a.output}"}}}},
        {"id": "b", "task": {"queue": "q"},
         "compensate": {"http": {"method": "DELETE",
                                 "url": "http://svc/reservations/${steps.b.output.id}",
                                 "headers": {"X-For": "${instance.id}"}},
                        "timeout": "7s"}},
        {"id": "c", "task": {"queue": "q"}, "retry": {"max_attempts": 1}},
        task("d"),
    ]}))
}

#[test]
fn permanent_failure_compensates_completed_steps_in_reverse_order_then_fails() {
    let d = four_steps();
    let (mut state, _) = start(&d, json!({}));
    run(&d, &mut state, &[ok(0, 1, json!("A"))]);
    run(&d, &mut state, &[ok(1, 1, json!({"id": "r-9"}))]);
    let d1 = run(&d, &mut state, &[fail(2, 1, "boom", true)]);
    // instance_failed comes only after the compensations.
    assert_eq!(log(&d1), ["step_failed:c#1", "compensation_scheduled:b#1"]);
    let call = json!({"method": "DELETE", "url": "http://svc/reservations/r-9",
                      "headers": {"X-For": "inst-1"}, "body": null});
    assert_eq!(
        d1.commands,
        vec![
            Command::WithdrawTasks,
            Command::EnqueueTask {
                step: 1,
                item: None,
                purpose: TaskPurpose::Compensate,
                attempt: 1,
                kind: TaskKind::Http,
                queue: HTTP_QUEUE.to_string(),
                input: call,
                delay_ms: 0,
                timeout_ms: Some(7_000),
                idempotency_key: "inst-1:b:compensate".to_string(),
            }
        ]
    );
    assert_eq!(state.status, InstanceStatus::Running);
    assert_eq!(state.ending, Some(Ending::Failed));
    assert!(message(&state.error).contains("step c failed: boom"));
    assert_eq!(d1.wake_at, None);

    let d2 = run(&d, &mut state, &[comp_ok(1, 1)]);
    assert_eq!(
        log(&d2),
        ["compensation_completed:b#1", "compensation_scheduled:a#1"]
    );
    assert_eq!(
        enqueued_tasks(&d2),
        [(
            json!({"step": "a", "out": "A"}),
            0,
            "inst-1:a:compensate".to_string()
        )]
    );
    assert_eq!(state.status, InstanceStatus::Running);

    let d3 = run(&d, &mut state, &[comp_ok(0, 1)]);
    assert_eq!(log(&d3), ["compensation_completed:a#1", "instance_failed"]);
    assert_eq!(d3.commands, vec![]);
    assert_eq!(state.status, InstanceStatus::Failed);
    assert_eq!(state.ending, None);
    let error = state.error.clone().unwrap();
    assert_eq!(entry(&d3, "instance_failed").data, json!({"error": error}));
    assert_eq!(error.get("compensation_failures"), None);
    assert_eq!(step(&d, &state, "a").status, StepStatus::Compensated);
    assert_eq!(step(&d, &state, "b").status, StepStatus::Compensated);
    assert_eq!(step(&d, &state, "c").status, StepStatus::Failed);
    assert_eq!(step(&d, &state, "d").status, StepStatus::Pending);
}

#[test]
fn compensations_follow_completion_order_not_definition_order() {
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "needs": [],
         "compensate": {"task": {"queue": "undo"}}},
        {"id": "b", "task": {"queue": "q"}, "needs": [],
         "compensate": {"task": {"queue": "undo"}}},
        {"id": "c", "task": {"queue": "q"}, "needs": ["a", "b"]},
    ]}));
    let (mut state, _) = start(&d, json!({}));
    // b finishes before a, in the same batch.
    run(
        &d,
        &mut state,
        &[ok(1, 1, json!("B")), ok(0, 1, json!("A"))],
    );
    assert_eq!(step(&d, &state, "b").completion_order, Some(1));
    assert_eq!(step(&d, &state, "a").completion_order, Some(2));
    let d1 = run(&d, &mut state, &[fail(2, 1, "no", false)]);
    assert_eq!(cmds(&d, &d1), ["withdraw", "enqueue a/compensate#1"]);
    let d2 = run(&d, &mut state, &[comp_ok(0, 1)]);
    assert_eq!(cmds(&d, &d2), ["enqueue b/compensate#1"]);
    let d3 = run(&d, &mut state, &[comp_ok(1, 1)]);
    assert_eq!(log(&d3), ["compensation_completed:b#1", "instance_failed"]);
}

#[test]
fn each_compensation_retries_with_its_own_policy_and_failures_are_listed() {
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "retry": {"max_attempts": 5},
         "compensate": {"task": {"queue": "undo"},
                        "retry": {"max_attempts": 2, "initial_interval": "3s", "jitter": false}}},
        {"id": "b", "task": {"queue": "q"}, "retry": {"max_attempts": 1},
         "compensate": {"task": {"queue": "undo", "input": "${steps.b.output}"}}},
        {"id": "c", "task": {"queue": "q"}, "retry": {"max_attempts": 1}},
    ]}));
    let (mut state, _) = start(&d, json!({}));
    run(&d, &mut state, &[ok(0, 1, json!("A"))]);
    run(&d, &mut state, &[ok(1, 1, json!("B"))]);
    let d1 = run(&d, &mut state, &[fail(2, 1, "boom", false)]);
    assert_eq!(cmds(&d, &d1), ["withdraw", "enqueue b/compensate#1"]);

    // b's compensation uses the workflow default (3 attempts, 1s, jitter;
    // random 0.5 → exactly 1s), not b's own step policy of 1 attempt.
    let d2 = run(&d, &mut state, &[comp_fail(1, 1, "undo down", true)]);
    assert_eq!(log(&d2), ["compensation_attempt_failed:b#1"]);
    let error = json!({"message": "undo down", "retryable": true, "attempt": 1});
    assert_eq!(
        entry(&d2, "compensation_attempt_failed").data,
        json!({"error": error, "retry_in_ms": 1000})
    );
    assert_eq!(cmds(&d, &d2), ["enqueue b/compensate#2"]);
    assert_eq!(
        enqueued_tasks(&d2),
        [(json!("B"), 1_000, "inst-1:b:compensate".to_string())]
    );
    let comp = step(&d, &state, "b").compensation.clone().unwrap();
    assert_eq!(comp.status, StepStatus::Scheduled);
    assert_eq!(comp.attempt, 2);
    assert_eq!(comp.error, Some(error));
    // The superseded attempt reporting again changes nothing.
    assert_ignored(&d, &mut state, &[comp_ok(1, 1)]);

    let d3 = run(&d, &mut state, &[comp_ok(1, 2)]);
    assert_eq!(
        log(&d3),
        ["compensation_completed:b#2", "compensation_scheduled:a#1"]
    );
    assert_eq!(step(&d, &state, "b").status, StepStatus::Compensated);

    // a's compensation has 2 attempts, 3s apart, whatever a's step policy.
    let d4 = run(&d, &mut state, &[comp_fail(0, 1, "nope", true)]);
    assert_eq!(cmds(&d, &d4), ["enqueue a/compensate#2"]);
    assert_eq!(enqueued_tasks(&d4)[0].1, 3_000);
    let d5 = run(&d, &mut state, &[comp_fail(0, 2, "nope", true)]);
    // Exhausted: recorded, and the wind-down goes on (here: to the end).
    assert_eq!(log(&d5), ["compensation_failed:a#2", "instance_failed"]);
    let a_error = json!({"message": "nope", "retryable": true, "attempt": 2});
    assert_eq!(
        entry(&d5, "compensation_failed").data,
        json!({"error": a_error})
    );
    let a = step(&d, &state, "a");
    assert_eq!(a.status, StepStatus::Completed, "its effect was not undone");
    assert_eq!(a.compensation.as_ref().unwrap().status, StepStatus::Failed);
    assert_eq!(
        a.compensation.as_ref().unwrap().error,
        Some(a_error.clone())
    );
    assert_eq!(state.status, InstanceStatus::Failed);
    let instance_error = state.error.clone().unwrap();
    assert_eq!(
        instance_error["compensation_failures"],
        json!([{"step": "a", "error": a_error}])
    );
    assert!(message(&state.error).contains("step c failed: boom"));
    assert_eq!(
        entry(&d5, "instance_failed").data,
        json!({"error": instance_error})
    );
}

#[test]
fn failed_compensation_does_not_stop_the_next_one() {
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "compensate": {"task": {"queue": "undo"}}},
        {"id": "b", "task": {"queue": "q"}, "compensate": {"task": {"queue": "undo"}}},
        {"id": "c", "task": {"queue": "q"}},
    ]}));
    let (mut state, _) = start(&d, json!({}));
    run(&d, &mut state, &[ok(0, 1, json!("A"))]);
    run(&d, &mut state, &[ok(1, 1, json!("B"))]);
    run(&d, &mut state, &[fail(2, 1, "boom", false)]);
    // Not retryable: final at once, though attempts are left.
    let d1 = run(&d, &mut state, &[comp_fail(1, 1, "gone", false)]);
    assert_eq!(
        log(&d1),
        ["compensation_failed:b#1", "compensation_scheduled:a#1"]
    );
    assert_eq!(cmds(&d, &d1), ["enqueue a/compensate#1"]);
    let d2 = run(&d, &mut state, &[comp_ok(0, 1)]);
    assert_eq!(log(&d2), ["compensation_completed:a#1", "instance_failed"]);
    assert_eq!(step(&d, &state, "a").status, StepStatus::Compensated);
    assert_eq!(step(&d, &state, "b").status, StepStatus::Completed);
    assert_eq!(
        state.error.as_ref().unwrap()["compensation_failures"],
        json!([{"step": "b", "error": {"message": "gone", "retryable": false, "attempt": 1}}])
    );
}

#[test]
fn compensation_failures_are_listed_for_a_cancelled_instance_too() {
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "compensate": {"task": {"queue": "undo"}}},
        task("b"),
    ]}));
    let (mut state, _) = start(&d, json!({}));
    run(&d, &mut state, &[ok(0, 1, json!("A"))]);
    run(&d, &mut state, &[cancel("stop")]);
    let decision = run(&d, &mut state, &[comp_fail(0, 1, "gone", false)]);
    assert_eq!(
        log(&decision),
        ["compensation_failed:a#1", "instance_cancelled"]
    );
    assert_eq!(state.status, InstanceStatus::Cancelled);
    let error = state.error.clone().unwrap();
    assert_eq!(error["reason"], json!("stop"));
    assert_eq!(error["compensation_failures"][0]["step"], json!("a"));
}

#[test]
fn only_completed_steps_are_compensated() {
    let d = def(json!({"steps": [
        {"id": "skipped", "task": {"queue": "q"}, "when": false, "needs": [],
         "compensate": {"task": {"queue": "undo"}}},
        {"id": "tolerated", "task": {"queue": "q"}, "on_failure": "continue", "needs": [],
         "compensate": {"task": {"queue": "undo"}}},
        {"id": "inflight", "task": {"queue": "q"}, "needs": [],
         "compensate": {"task": {"queue": "undo"}}},
        {"id": "bad", "task": {"queue": "q"}, "needs": [],
         "compensate": {"task": {"queue": "undo"}}},
    ]}));
    let (mut state, _) = start(&d, json!({}));
    run(&d, &mut state, &[fail(1, 1, "meh", false)]);
    assert_eq!(step(&d, &state, "tolerated").status, StepStatus::Failed);
    let decision = run(&d, &mut state, &[fail(3, 1, "boom", false)]);
    assert_eq!(log(&decision), ["step_failed:bad#1", "instance_failed"]);
    assert_eq!(decision.commands, vec![Command::WithdrawTasks]);
    for s in &state.steps {
        assert_eq!(s.compensation, None);
    }
}

#[test]
fn compensation_results_while_running_normally_are_ignored() {
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "compensate": {"task": {"queue": "undo"}}},
        task("b"),
    ]}));
    let (mut state, _) = start(&d, json!({}));
    run(&d, &mut state, &[ok(0, 1, json!("A"))]);
    assert_ignored(&d, &mut state, &[comp_ok(0, 1)]);
    assert_ignored(&d, &mut state, &[comp_fail(0, 1, "x", false)]);
    assert_eq!(step(&d, &state, "a").status, StepStatus::Completed);
}

#[test]
fn on_failure_continue_does_not_wind_down() {
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "compensate": {"task": {"queue": "undo"}}},
        {"id": "b", "task": {"queue": "q"}, "on_failure": "continue",
         "compensate": {"task": {"queue": "undo"}}},
        task("c"),
    ]}));
    let (mut state, _) = start(&d, json!({}));
    run(&d, &mut state, &[ok(0, 1, json!("A"))]);
    let decision = run(&d, &mut state, &[fail(1, 1, "meh", false)]);
    assert_eq!(log(&decision), ["step_failed:b#1", "step_scheduled:c#1"]);
    assert_eq!(cmds(&d, &decision), ["enqueue c/run#1"]);
    assert_eq!(state.ending, None);
    assert_eq!(state.status, InstanceStatus::Running);
    run(&d, &mut state, &[ok(2, 1, json!("C"))]);
    assert_eq!(state.status, InstanceStatus::Completed);
    assert_eq!(step(&d, &state, "a").compensation, None);
}

// ----- workflow deadline ------------------------------------------------

#[test]
fn workflow_timeout_sets_the_deadline_at_start() {
    let d = def(json!({"timeout": "1h", "steps": [task("a")]}));
    let (mut state, decision) = start(&d, json!({}));
    assert_eq!(state.deadline_at, Some(at(3600)));
    assert_eq!(decision.wake_at, Some(at(3600)));
    // Looking again before the deadline changes nothing but keeps the wake-up.
    assert_eq!(
        assert_quiet_at(&d, &mut state, &[], at(3599)),
        Some(at(3600))
    );
    // A result keeps it too.
    let d1 = run_at(&d, &mut state, &[ok(0, 1, json!(1))], at(10));
    assert_eq!(d1.wake_at, None, "the instance completed");
    assert_eq!(state.status, InstanceStatus::Completed);

    let no_timeout = def(json!({"steps": [task("a")]}));
    let (state, decision) = start(&no_timeout, json!({}));
    assert_eq!(state.deadline_at, None);
    assert_eq!(decision.wake_at, None);
}

#[test]
fn deadline_is_measured_from_the_start_decision() {
    let d = def(json!({"timeout": "30m", "steps": [task("a")]}));
    let mut state = pending(json!({}));
    let d0 = run_at(&d, &mut state, &[Event::Start], at(100));
    assert_eq!(state.deadline_at, Some(at(100 + 1800)));
    assert_eq!(d0.wake_at, Some(at(1900)));
}

#[test]
fn passing_the_deadline_fails_the_instance_after_its_compensations() {
    let d = def(json!({"timeout": "1h", "steps": [
        {"id": "a", "task": {"queue": "q"}, "compensate": {"task": {"queue": "undo"}}},
        task("b"),
    ]}));
    let (mut state, _) = start(&d, json!({}));
    let d1 = run_at(&d, &mut state, &[ok(0, 1, json!("A"))], at(60));
    assert_eq!(d1.wake_at, Some(at(3600)));
    assert_quiet_at(&d, &mut state, &[], at(3599));

    let d2 = run_at(&d, &mut state, &[], at(3600));
    assert_eq!(
        log(&d2),
        ["instance_timed_out", "compensation_scheduled:a#1"]
    );
    assert_eq!(
        entry(&d2, "instance_timed_out").data,
        json!({"deadline": at(3600)})
    );
    assert_eq!(cmds(&d, &d2), ["withdraw", "enqueue a/compensate#1"]);
    assert_eq!(d2.wake_at, None);
    assert_eq!(step(&d, &state, "b").status, StepStatus::Cancelled);
    assert_eq!(state.status, InstanceStatus::Running);
    assert_eq!(state.ending, Some(Ending::Failed));
    // The deadline does not fire again while compensating.
    assert_ignored(&d, &mut state, &[]);
    assert_quiet_at(&d, &mut state, &[], at(7200));

    let d3 = run_at(&d, &mut state, &[comp_ok(0, 1)], at(3700));
    assert_eq!(log(&d3), ["compensation_completed:a#1", "instance_failed"]);
    assert_eq!(state.status, InstanceStatus::Failed);
    let error = state.error.clone().unwrap();
    assert_eq!(error["timeout"], json!(true));
    let m = message(&state.error);
    assert!(m.contains("timed out") && m.contains("1h"), "{m}");
}

#[test]
fn passing_the_deadline_with_nothing_to_compensate_fails_at_once() {
    let d = def(json!({"timeout": "10m", "steps": [
        {"id": "nap", "sleep": "1h", "needs": []},
        {"id": "a", "task": {"queue": "q"}, "needs": []},
    ]}));
    let (mut state, d0) = start(&d, json!({}));
    assert_eq!(d0.wake_at, Some(at(600)), "the deadline comes first");
    let decision = run_at(&d, &mut state, &[], at(601));
    assert_eq!(log(&decision), ["instance_timed_out", "instance_failed"]);
    assert_eq!(decision.commands, vec![Command::WithdrawTasks]);
    assert_eq!(decision.wake_at, None);
    assert_eq!(state.status, InstanceStatus::Failed);
    assert_eq!(state.error.as_ref().unwrap()["timeout"], json!(true));
    assert_eq!(step(&d, &state, "nap").status, StepStatus::Cancelled);
    assert_eq!(step(&d, &state, "nap").wake_at, None);
    assert_eq!(step(&d, &state, "a").status, StepStatus::Cancelled);
}

// ----- Decision.wake_at -------------------------------------------------

#[test]
fn wake_at_is_the_earliest_timer_or_deadline() {
    let d = def(json!({"timeout": "1h", "steps": [
        {"id": "short", "sleep": "10m", "needs": []},
        {"id": "sig", "signal": {"name": "go", "timeout": "2h"}, "needs": []},
        {"id": "long", "sleep": "3h", "needs": []},
        {"id": "untimed", "signal": {"name": "other"}, "needs": []},
    ]}));
    let (mut state, d0) = start(&d, json!({}));
    assert_eq!(d0.wake_at, Some(at(600)));
    let d1 = run_at(&d, &mut state, &[], at(600));
    assert_eq!(log(&d1), ["step_completed:short#1"]);
    assert_eq!(d1.wake_at, Some(at(3600)), "now the deadline");

    let no_deadline = def(json!({"steps": [
        {"id": "sig", "signal": {"name": "go", "timeout": "2h"}, "needs": []},
        {"id": "long", "sleep": "3h", "needs": []},
    ]}));
    let (mut state, d0) = start(&no_deadline, json!({}));
    assert_eq!(d0.wake_at, Some(at(7200)));
    let d1 = run_at(
        &no_deadline,
        &mut state,
        &[signal(1, "go", json!(1))],
        at(60),
    );
    assert_eq!(
        d1.wake_at,
        Some(at(3 * 3600)),
        "the consumed signal's timer is gone"
    );
}

#[test]
fn wake_at_is_none_while_winding_down_and_after_the_end() {
    let d = def(json!({"timeout": "1d", "steps": [
        {"id": "a", "task": {"queue": "q"}, "needs": [],
         "compensate": {"task": {"queue": "undo"}}},
        {"id": "nap", "sleep": "1h", "needs": []},
    ]}));
    let (mut state, d0) = start(&d, json!({}));
    assert_eq!(d0.wake_at, Some(at(3600)));
    let d1 = run(&d, &mut state, &[ok(0, 1, json!("A"))]);
    assert_eq!(d1.wake_at, Some(at(3600)));
    let d2 = run(&d, &mut state, &[cancel("stop")]);
    assert_eq!(state.ending, Some(Ending::Cancelled));
    assert_eq!(d2.wake_at, None);
    assert_eq!(assert_quiet_at(&d, &mut state, &[], at(60)), None);
    let d3 = run(&d, &mut state, &[comp_ok(0, 1)]);
    assert_eq!(state.status, InstanceStatus::Cancelled);
    assert_eq!(d3.wake_at, None);
    assert_eq!(assert_quiet_at(&d, &mut state, &[], at(86_400 * 2)), None);
}

// ----- for_each ---------------------------------------------------------

#[test]
fn for_each_enqueues_one_task_per_item_with_item_and_index() {
    let d = def(json!({"steps": [
        {"id": "each", "for_each": "${input.orders}", "timeout": "9s",
         "task": {"queue": "orders", "input": {"order": "${item.id}", "pos": "${index}",
                                              "label": "#${index}: ${item.id}"}}},
        {"id": "after", "value": "${steps.each.output}"},
    ]}));
    let (state, decision) = start(
        &d,
        json!({"orders": [{"id": "o1"}, {"id": "o2"}, {"id": "o3"}]}),
    );
    assert_eq!(log(&decision), ["instance_started", "step_started:each#1"]);
    assert_eq!(entry(&decision, "step_started").data, json!({"items": 3}));
    assert_eq!(
        cmds(&d, &decision),
        [
            "enqueue each[0]/run#1",
            "enqueue each[1]/run#1",
            "enqueue each[2]/run#1"
        ]
    );
    assert_eq!(
        decision.commands[1],
        Command::EnqueueTask {
            step: 0,
            item: Some(1),
            purpose: TaskPurpose::Run,
            attempt: 1,
            kind: TaskKind::Task,
            queue: "orders".to_string(),
            input: json!({"order": "o2", "pos": 1, "label": "#1: o2"}),
            delay_ms: 0,
            timeout_ms: Some(9_000),
            idempotency_key: "inst-1:each:1".to_string(),
        }
    );
    let keys: Vec<String> = enqueued_tasks(&decision).into_iter().map(|t| t.2).collect();
    assert_eq!(keys, ["inst-1:each:0", "inst-1:each:1", "inst-1:each:2"]);
    let s = step(&d, &state, "each");
    assert_eq!(s.status, StepStatus::Running);
    assert_eq!(s.started_at, Some(now()));
    assert_eq!(items(s), [StepStatus::Scheduled; 3]);
    let first = &s.items.as_ref().unwrap()[0];
    assert_eq!(first.attempt, 1);
    assert_eq!(
        first.input,
        json!({"order": "o1", "pos": 0, "label": "#0: o1"})
    );
}

#[test]
fn for_each_output_is_in_input_order_whatever_the_completion_order() {
    let d = def(json!({"steps": [
        {"id": "each", "for_each": "${input.xs}", "task": {"queue": "q", "input": "${item}"}},
        {"id": "after", "value": "${steps.each.output}"},
    ]}));
    let (mut state, _) = start(&d, json!({"xs": ["a", "b", "c"]}));
    let d1 = run(&d, &mut state, &[item_ok(0, 2, 1, json!("C"))]);
    assert_eq!(log(&d1), ["item_completed:each#1"]);
    assert_eq!(
        entry(&d1, "item_completed").data,
        json!({"item": 2, "output": "C", "worker": "w1",
               "started_at": now() - Duration::seconds(2)})
    );
    assert_eq!(d1.commands, vec![]);
    assert_eq!(changed(&d, &d1), ["each"]);
    assert_eq!(step(&d, &state, "each").status, StepStatus::Running);
    // A duplicate of a finished item changes nothing.
    assert_ignored(&d, &mut state, &[item_ok(0, 2, 1, json!("again"))]);
    let d2 = run(
        &d,
        &mut state,
        &[item_ok(0, 0, 1, json!("A")), item_ok(0, 1, 1, json!("B"))],
    );
    assert_eq!(
        log(&d2),
        [
            "item_completed:each#1",
            "item_completed:each#1",
            "step_completed:each#1",
            "step_completed:after#1",
            "instance_completed"
        ]
    );
    assert_eq!(
        step(&d, &state, "each").output.as_ref().map(Doc::to_value),
        Some(json!(["A", "B", "C"]))
    );
    assert_eq!(
        step(&d, &state, "after").output.as_ref().map(Doc::to_value),
        Some(json!(["A", "B", "C"]))
    );
    assert_eq!(state.status, InstanceStatus::Completed);
}

#[test]
fn for_each_max_parallel_caps_the_items_in_flight() {
    let d = def(json!({"steps": [
        {"id": "each", "for_each": "${input.xs}", "max_parallel": 2,
         "retry": {"max_attempts": 3, "jitter": false},
         "task": {"queue": "q", "input": "${item}"}},
    ]}));
    let (mut state, d0) = start(&d, json!({"xs": [10, 11, 12, 13, 14]}));
    assert_eq!(
        cmds(&d, &d0),
        ["enqueue each[0]/run#1", "enqueue each[1]/run#1"]
    );
    let s = step(&d, &state, "each");
    assert_eq!(
        items(s),
        [
            StepStatus::Scheduled,
            StepStatus::Scheduled,
            StepStatus::Pending,
            StepStatus::Pending,
            StepStatus::Pending
        ]
    );
    // One finishes: one more starts.
    let d1 = run(&d, &mut state, &[item_ok(0, 1, 1, json!(1))]);
    assert_eq!(cmds(&d, &d1), ["enqueue each[2]/run#1"]);
    assert_eq!(enqueued_tasks(&d1)[0].0, json!(12));
    assert_eq!(active_items(step(&d, &state, "each")), 2);
    // Two finish together: two more start.
    let d2 = run(
        &d,
        &mut state,
        &[item_ok(0, 0, 1, json!(0)), item_ok(0, 2, 1, json!(2))],
    );
    assert_eq!(
        cmds(&d, &d2),
        ["enqueue each[3]/run#1", "enqueue each[4]/run#1"]
    );
    assert_eq!(active_items(step(&d, &state, "each")), 2);
    // A retry keeps its slot: nothing else starts.
    let d3 = run(&d, &mut state, &[item_fail(0, 3, 1, "flaky", true)]);
    assert_eq!(cmds(&d, &d3), ["enqueue each[3]/run#2"]);
    assert_eq!(active_items(step(&d, &state, "each")), 2);
    run(&d, &mut state, &[item_ok(0, 4, 1, json!(4))]);
    let last = run(&d, &mut state, &[item_ok(0, 3, 2, json!(3))]);
    assert_eq!(
        log(&last),
        [
            "item_completed:each#2",
            "step_completed:each#1",
            "instance_completed"
        ]
    );
    assert_eq!(state.output, Some(json!({"each": [0, 1, 2, 3, 4]})));
}

#[test]
fn for_each_items_retry_with_backoff_under_their_own_key() {
    let d = def(json!({"steps": [
        {"id": "each", "for_each": "${input.xs}",
         "retry": {"max_attempts": 3, "initial_interval": "2s", "jitter": false},
         "task": {"queue": "q", "input": {"x": "${item}"}}},
    ]}));
    let (mut state, _) = start(&d, json!({"xs": ["p", "q"]}));
    let d1 = run(&d, &mut state, &[item_fail(0, 0, 1, "flaky", true)]);
    assert_eq!(log(&d1), ["item_attempt_failed:each#1"]);
    let error = json!({"message": "flaky", "retryable": true, "attempt": 1});
    assert_eq!(
        entry(&d1, "item_attempt_failed").data,
        json!({"item": 0, "error": error, "retry_in_ms": 2000, "worker": "w1"})
    );
    assert_eq!(cmds(&d, &d1), ["enqueue each[0]/run#2"]);
    assert_eq!(
        enqueued_tasks(&d1),
        [(json!({"x": "p"}), 2_000, "inst-1:each:0".to_string())]
    );
    let item = &step(&d, &state, "each").items.as_ref().unwrap()[0];
    assert_eq!(item.status, StepStatus::Scheduled);
    assert_eq!(item.attempt, 2);
    assert_eq!(item.error, Some(error));
    // The superseded attempt is stale.
    assert_ignored(&d, &mut state, &[item_ok(0, 0, 1, json!("old"))]);
    let d2 = run(&d, &mut state, &[item_fail(0, 0, 2, "flaky", true)]);
    assert_eq!(enqueued_tasks(&d2)[0].1, 4_000);
    run(&d, &mut state, &[item_ok(0, 0, 3, json!("P"))]);
    run(&d, &mut state, &[item_ok(0, 1, 1, json!("Q"))]);
    assert_eq!(state.output, Some(json!({"each": ["P", "Q"]})));
}

#[test]
fn permanently_failing_item_fails_the_step_and_the_instance() {
    let d = def(json!({"steps": [
        {"id": "each", "for_each": "${input.xs}", "retry": {"max_attempts": 2},
         "task": {"queue": "q", "input": "${item}"}},
        task("after"),
    ]}));
    let (mut state, _) = start(&d, json!({"xs": [1, 2, 3]}));
    run(&d, &mut state, &[item_ok(0, 0, 1, json!("one"))]);
    let decision = run(&d, &mut state, &[item_fail(0, 1, 1, "bad item", false)]);
    assert_eq!(
        log(&decision),
        [
            "item_failed:each#1",
            "step_failed:each#1",
            "instance_failed"
        ]
    );
    assert_eq!(decision.commands, vec![Command::WithdrawTasks]);
    let item_error = json!({"message": "bad item", "retryable": false, "attempt": 1});
    let s = step(&d, &state, "each");
    assert_eq!(s.status, StepStatus::Failed);
    assert_eq!(
        s.error,
        Some(
            json!({"message": "item 1 failed: bad item", "retryable": false,
                    "item": 1, "error": item_error})
        )
    );
    assert_eq!(
        items(s),
        [
            StepStatus::Completed,
            StepStatus::Failed,
            StepStatus::Cancelled
        ]
    );
    assert_eq!(state.status, InstanceStatus::Failed);
    assert!(message(&state.error).contains("step each failed: item 1 failed: bad item"));
    // The sibling still in flight reports late: ignored.
    assert_ignored(&d, &mut state, &[item_ok(0, 2, 1, json!("late"))]);
}

#[test]
fn item_with_retries_exhausted_fails_the_step() {
    let d = def(json!({"steps": [
        {"id": "each", "for_each": "${input.xs}", "retry": {"max_attempts": 2},
         "task": {"queue": "q"}},
    ]}));
    let (mut state, _) = start(&d, json!({"xs": [1]}));
    run(&d, &mut state, &[item_fail(0, 0, 1, "flaky", true)]);
    let decision = run(&d, &mut state, &[item_fail(0, 0, 2, "flaky", true)]);
    assert_eq!(
        log(&decision),
        [
            "item_failed:each#2",
            "step_failed:each#2",
            "instance_failed"
        ]
    );
}

#[test]
fn failing_item_with_on_failure_continue_becomes_its_array_element() {
    let d = def(json!({"steps": [
        {"id": "each", "for_each": "${input.xs}", "on_failure": "continue",
         "retry": {"max_attempts": 1}, "task": {"queue": "q", "input": "${item}"}},
        {"id": "after", "value": "${steps.each.output}"},
    ]}));
    let (mut state, _) = start(&d, json!({"xs": ["a", "b"]}));
    let d1 = run(&d, &mut state, &[item_fail(0, 0, 1, "bad", true)]);
    assert_eq!(log(&d1), ["item_failed:each#1"]);
    assert_eq!(withdraws(&d1), 0);
    assert_eq!(state.status, InstanceStatus::Running);
    assert_eq!(state.ending, None);
    run(&d, &mut state, &[item_ok(0, 1, 1, json!("B"))]);
    let error = json!({"message": "bad", "retryable": true, "attempt": 1});
    assert_eq!(step(&d, &state, "each").status, StepStatus::Completed);
    assert_eq!(
        step(&d, &state, "each").output.as_ref().map(Doc::to_value),
        Some(json!([error, "B"]))
    );
    assert_eq!(state.status, InstanceStatus::Completed);
    assert_eq!(
        step(&d, &state, "after").output.as_ref().map(Doc::to_value),
        Some(json!([error, "B"]))
    );
}

#[test]
fn value_for_each_completes_inline() {
    for max_parallel in [json!(null), json!(1)] {
        let mut s = json!({"id": "sq", "for_each": "${input.xs}",
                           "value": {"x": "${item}", "i": "${index}", "t": "${index}:${item}"}});
        if !max_parallel.is_null() {
            s["max_parallel"] = max_parallel.clone();
        }
        let d = def(json!({"steps": [s, task("after")]}));
        let (state, decision) = start(&d, json!({"xs": [10, 20, 30]}));
        assert_eq!(
            log(&decision),
            [
                "instance_started",
                "step_started:sq#1",
                "step_completed:sq#1",
                "step_scheduled:after#1"
            ],
            "max_parallel {max_parallel}"
        );
        assert_eq!(cmds(&d, &decision), ["enqueue after/run#1"]);
        let sq = step(&d, &state, "sq");
        assert_eq!(sq.status, StepStatus::Completed);
        assert_eq!(items(sq), [StepStatus::Completed; 3]);
        assert_eq!(
            sq.output.as_ref().map(Doc::to_value),
            Some(json!([
                {"x": 10, "i": 0, "t": "0:10"},
                {"x": 20, "i": 1, "t": "1:20"},
                {"x": 30, "i": 2, "t": "2:30"},
            ]))
        );
    }
}

#[test]
fn for_each_over_an_empty_array_completes_with_an_empty_array() {
    let d = def(json!({"steps": [
        {"id": "each", "for_each": "${input.xs}", "task": {"queue": "q"}},
        task("after"),
    ]}));
    let (state, decision) = start(&d, json!({"xs": []}));
    assert_eq!(
        log(&decision),
        [
            "instance_started",
            "step_started:each#1",
            "step_completed:each#1",
            "step_scheduled:after#1"
        ]
    );
    assert_eq!(cmds(&d, &decision), ["enqueue after/run#1"]);
    assert_eq!(
        step(&d, &state, "each").output.as_ref().map(Doc::to_value),
        Some(json!([]))
    );
    assert_eq!(step(&d, &state, "each").status, StepStatus::Completed);
}

#[test]
fn for_each_over_a_non_array_fails_the_step() {
    let d = def(json!({"steps": [
        {"id": "each", "for_each": "${input.xs}", "task": {"queue": "q"}},
        task("after"),
    ]}));
    for (xs, what) in [
        (json!({"a": 1}), "an object"),
        (json!("abc"), "a string"),
        (json!(3), "a number"),
        (json!(null), "null"),
    ] {
        let (state, decision) = start(&d, json!({ "xs": xs }));
        assert_eq!(
            log(&decision),
            ["instance_started", "step_failed:each#0", "instance_failed"],
            "{xs}"
        );
        assert_eq!(decision.commands, vec![Command::WithdrawTasks]);
        let s = step(&d, &state, "each");
        assert_eq!(s.status, StepStatus::Failed);
        assert_eq!(s.error.as_ref().unwrap()["retryable"], json!(false));
        let m = message(&s.error);
        assert!(m.contains("array") && m.contains(what), "{m}");
        assert_eq!(state.status, InstanceStatus::Failed);
    }
    // With on_failure continue the workflow goes on.
    let d = def(json!({"steps": [
        {"id": "each", "for_each": "${input.xs}", "task": {"queue": "q"},
         "on_failure": "continue"},
        task("after"),
    ]}));
    let (state, decision) = start(&d, json!({"xs": "abc"}));
    assert_eq!(cmds(&d, &decision), ["enqueue after/run#1"]);
    assert_eq!(state.status, InstanceStatus::Running);
}

#[test]
fn for_each_http_items_render_item_and_index() {
    let d = def(json!({"steps": [
        {"id": "ping", "for_each": "${input.hosts}",
         "http": {"url": "http://${item.host}/ping", "headers": {"X-Index": "${index}"}}},
    ]}));
    let (_, decision) = start(&d, json!({"hosts": [{"host": "a"}, {"host": "b"}]}));
    assert_eq!(
        enqueued_tasks(&decision),
        [
            (
                json!({"method": "GET", "url": "http://a/ping", "headers": {"X-Index": "0"}, "body": null}),
                0,
                "inst-1:ping:0".to_string()
            ),
            (
                json!({"method": "GET", "url": "http://b/ping", "headers": {"X-Index": "1"}, "body": null}),
                0,
                "inst-1:ping:1".to_string()
            ),
        ]
    );
    assert!(matches!(
        decision.commands[0],
        Command::EnqueueTask {
            kind: TaskKind::Http,
            ..
        }
    ));
}

#[test]
fn mismatched_item_results_are_ignored() {
    let d = def(json!({"steps": [
        {"id": "each", "for_each": "${input.xs}", "task": {"queue": "q"}, "needs": []},
        {"id": "plain", "task": {"queue": "q"}, "needs": []},
    ]}));
    let (mut state, _) = start(&d, json!({"xs": [1, 2]}));
    // A whole-step result for a for_each step, an item result for a plain
    // step, an item that does not exist, an item attempt not yet scheduled.
    assert_ignored(&d, &mut state, &[ok(0, 1, json!("whole"))]);
    assert_ignored(&d, &mut state, &[item_ok(1, 0, 1, json!("item"))]);
    assert_ignored(&d, &mut state, &[item_ok(0, 2, 1, json!("nope"))]);
    assert_ignored(&d, &mut state, &[item_ok(0, 0, 2, json!("future"))]);
}

#[test]
fn cancel_during_for_each_cancels_items_in_flight() {
    let d = def(json!({"steps": [
        {"id": "each", "for_each": "${input.xs}", "max_parallel": 2, "task": {"queue": "q"}},
    ]}));
    let (mut state, _) = start(&d, json!({"xs": [1, 2, 3]}));
    run(&d, &mut state, &[item_ok(0, 0, 1, json!("one"))]);
    let decision = run(&d, &mut state, &[cancel("stop")]);
    assert_eq!(
        log(&decision),
        ["instance_cancel_requested", "instance_cancelled"]
    );
    assert_eq!(cmds(&d, &decision), ["withdraw"]);
    let s = step(&d, &state, "each");
    assert_eq!(s.status, StepStatus::Cancelled);
    assert_eq!(
        items(s),
        [
            StepStatus::Completed,
            StepStatus::Cancelled,
            StepStatus::Cancelled
        ]
    );
    assert_ignored(&d, &mut state, &[item_ok(0, 1, 1, json!("late"))]);
}

#[test]
fn compensation_of_a_for_each_step_sees_each_item() {
    // Registration accepts ${item} in the compensate of a for_each step, so
    // undoing the step must undo every completed item with its own ${item}
    // (not one action in which ${item} renders null). Rejecting such a
    // definition at registration would be consistent too.
    let doc = json!({"steps": [
        {"id": "book", "for_each": "${input.rooms}",
         "task": {"queue": "q", "input": "${item}"},
         "compensate": {"task": {"queue": "undo", "input": {"room": "${item}"}}}},
        {"id": "pay", "task": {"queue": "q"}, "retry": {"max_attempts": 1}},
    ]});
    let d = match parse("wf", &doc, &Limits::default()) {
        Ok(d) => d,
        Err(problems) => {
            assert!(
                problems.iter().any(|p| p.path.contains("compensate")),
                "{problems:?}"
            );
            return;
        }
    };
    let (mut state, _) = start(&d, json!({"rooms": ["r1", "r2"]}));
    run(
        &d,
        &mut state,
        &[item_ok(0, 0, 1, json!("b1")), item_ok(0, 1, 1, json!("b2"))],
    );
    let mut decision = run(&d, &mut state, &[fail(1, 1, "declined", false)]);
    let mut inputs = Vec::new();
    for _ in 0..10 {
        let mut done = Vec::new();
        for c in &decision.commands {
            if let Command::EnqueueTask {
                step,
                item,
                purpose: TaskPurpose::Compensate,
                attempt,
                input,
                ..
            } = c
            {
                inputs.push(input.clone());
                done.push(finished(
                    *step,
                    *item,
                    TaskPurpose::Compensate,
                    *attempt,
                    TaskResult::Completed(json!(null)),
                ));
            }
        }
        if done.is_empty() {
            break;
        }
        decision = run(&d, &mut state, &done);
    }
    assert_eq!(state.status, InstanceStatus::Failed);
    assert!(
        inputs.contains(&json!({"room": "r1"})) && inputs.contains(&json!({"room": "r2"})),
        "compensation inputs: {inputs:?}"
    );
}

// ----- child workflows --------------------------------------------------

#[test]
fn workflow_step_starts_a_child_with_its_rendered_input() {
    let d = def(json!({"steps": [
        {"id": "sub", "workflow": {"name": "billing", "version": 2,
                                   "input": {"amount": "${input.amount}", "parent": "${instance.id}"}}},
        {"id": "after", "task": {"queue": "q", "input": "${steps.sub.output}"}},
    ]}));
    let (mut state, decision) = start(&d, json!({"amount": 5}));
    let input = json!({"amount": 5, "parent": "inst-1"});
    assert_eq!(
        decision.commands,
        vec![Command::StartChild {
            step: 0,
            item: None,
            child_id: child_id(ID, "sub", None),
            workflow: "billing".to_string(),
            version: Some(2),
            input: input.clone(),
        }]
    );
    assert_eq!(child_id(ID, "sub", None), "inst-1:sub");
    assert_eq!(log(&decision), ["instance_started", "child_started:sub#1"]);
    assert_eq!(
        entry(&decision, "child_started").data,
        json!({"child_id": "inst-1:sub", "workflow": "billing"})
    );
    let s = step(&d, &state, "sub");
    assert_eq!(s.status, StepStatus::Running);
    assert_eq!(s.attempt, 1);
    assert_eq!(s.input.as_ref().map(Doc::to_value), Some(input));
    assert_eq!(decision.wake_at, None);

    // The child's end comes back as the result of attempt 1.
    let d1 = run(&d, &mut state, &[ok(0, 1, json!({"paid": true}))]);
    assert_eq!(log(&d1), ["step_completed:sub#1", "step_scheduled:after#1"]);
    assert_eq!(
        step(&d, &state, "sub").output.as_ref().map(Doc::to_value),
        Some(json!({"paid": true}))
    );
    assert_eq!(only_enqueue(&d1).0, json!({"paid": true}));
    assert_ignored(&d, &mut state, &[ok(0, 1, json!("again"))]);
}

#[test]
fn workflow_step_without_input_or_version() {
    let d = def(json!({"steps": [{"id": "sub", "workflow": {"name": "child"}}]}));
    let (_, decision) = start(&d, json!({"x": 1}));
    assert_eq!(
        decision.commands,
        vec![Command::StartChild {
            step: 0,
            item: None,
            child_id: "inst-1:sub".to_string(),
            workflow: "child".to_string(),
            version: None,
            input: Value::Null,
        }]
    );
}

#[test]
fn failed_child_fails_the_step_without_retry_even_if_retryable() {
    let d = def(json!({"steps": [
        {"id": "sub", "workflow": {"name": "child"}, "retry": {"max_attempts": 5}},
        task("after"),
    ]}));
    let (mut state, _) = start(&d, json!({}));
    let decision = run(&d, &mut state, &[fail(0, 1, "child failed", true)]);
    assert_eq!(log(&decision), ["step_failed:sub#1", "instance_failed"]);
    // The child already ended: nothing to start again or cancel.
    assert_eq!(cmds(&d, &decision), ["withdraw"]);
    assert_eq!(step(&d, &state, "sub").status, StepStatus::Failed);
    assert_eq!(state.status, InstanceStatus::Failed);
}

#[test]
fn ending_the_parent_cancels_running_children() {
    let d = def(json!({"steps": [
        {"id": "sub", "workflow": {"name": "child"}, "needs": []},
        {"id": "other", "task": {"queue": "q"}, "needs": [], "retry": {"max_attempts": 1}},
    ]}));
    // By a cancel.
    let (mut state, _) = start(&d, json!({}));
    let decision = run(&d, &mut state, &[cancel("stop")]);
    assert_eq!(cmds(&d, &decision), ["withdraw", "cancel_children"]);
    assert_eq!(step(&d, &state, "sub").status, StepStatus::Cancelled);
    assert_eq!(state.status, InstanceStatus::Cancelled);
    // The child's late end is ignored.
    assert_ignored(&d, &mut state, &[ok(0, 1, json!("late"))]);

    // By a sibling's failure.
    let (mut state, _) = start(&d, json!({}));
    let decision = run(&d, &mut state, &[fail(1, 1, "boom", false)]);
    assert_eq!(cmds(&d, &decision), ["withdraw", "cancel_children"]);

    // A child that already finished is not cancelled.
    let (mut state, _) = start(&d, json!({}));
    run(&d, &mut state, &[ok(0, 1, json!("done"))]);
    let decision = run(&d, &mut state, &[cancel("stop")]);
    assert_eq!(cmds(&d, &decision), ["withdraw"]);
}

#[test]
fn for_each_workflow_starts_one_child_per_item() {
    let d = def(json!({"steps": [
        {"id": "kids", "for_each": "${input.xs}", "max_parallel": 2,
         "retry": {"max_attempts": 4},
         "workflow": {"name": "child", "input": {"x": "${item}", "i": "${index}"}}},
    ]}));
    let (mut state, d0) = start(&d, json!({"xs": ["a", "b", "c"]}));
    assert_eq!(
        cmds(&d, &d0),
        [
            "start_child kids[0] inst-1:kids:0",
            "start_child kids[1] inst-1:kids:1"
        ]
    );
    assert_eq!(
        d0.commands[1],
        Command::StartChild {
            step: 0,
            item: Some(1),
            child_id: child_id(ID, "kids", Some(1)),
            workflow: "child".to_string(),
            version: None,
            input: json!({"x": "b", "i": 1}),
        }
    );
    let d1 = run(&d, &mut state, &[item_ok(0, 0, 1, json!("A"))]);
    assert_eq!(cmds(&d, &d1), ["start_child kids[2] inst-1:kids:2"]);
    // A failed child is not retried: the item and the step fail.
    let d2 = run(&d, &mut state, &[item_fail(0, 1, 1, "child failed", true)]);
    assert_eq!(
        log(&d2),
        [
            "item_failed:kids#1",
            "step_failed:kids#1",
            "instance_failed"
        ]
    );
    // Item 2's child is still running and gets cancelled.
    assert_eq!(cmds(&d, &d2), ["withdraw", "cancel_children"]);
}

#[test]
fn child_id_is_readable_when_short_and_a_stable_digest_when_long() {
    use sha2::{Digest, Sha256};
    assert_eq!(child_id("p", "s", None), "p:s");
    assert_eq!(child_id("p", "s", Some(3)), "p:s:3");
    // Exactly 200 characters stay readable.
    let parent = "x".repeat(198);
    assert_eq!(child_id(&parent, "s", None), format!("{parent}:s"));
    assert_eq!(child_id(&parent, "s", None).len(), 200);
    // One more falls back to a digest of the readable form.
    let parent = "x".repeat(199);
    let long = child_id(&parent, "s", None);
    let hex: String = Sha256::digest(format!("{parent}:s").as_bytes())
        .iter()
        .take(20)
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(long, format!("child-{hex}"));
    assert_eq!(long.len(), 46);
    assert_eq!(child_id(&parent, "s", None), long, "stable");
    let with_item = child_id(&parent, "s", Some(0));
    assert!(with_item.starts_with("child-"));
    assert_ne!(with_item, long);
    assert_ne!(with_item, child_id(&parent, "s", Some(1)));
    // An item can push a readable id over the limit too.
    let parent = "x".repeat(196);
    assert_eq!(child_id(&parent, "s", Some(1)).len(), 200);
    assert!(child_id(&parent, "s", Some(10)).starts_with("child-"));
}

#[test]
fn workflow_step_of_a_long_parent_id_uses_the_digest_child_id() {
    let d = def(json!({"steps": [{"id": "sub", "workflow": {"name": "child"}}]}));
    let long_id = "i".repeat(199);
    let mut state = InstanceState::new(&long_id, json!({}), 1);
    let decision = run(&d, &mut state, &[Event::Start]);
    let want = child_id(&long_id, "sub", None);
    assert!(want.starts_with("child-"));
    assert!(matches!(
        &decision.commands[..],
        [Command::StartChild { child_id, .. }] if *child_id == want
    ));
}

// ----- retry of a failed instance ---------------------------------------

#[test]
fn retry_restarts_the_failed_step_and_keeps_completed_ones() {
    let d = def(json!({"steps": [
        task("a"),
        {"id": "b", "task": {"queue": "q", "input": "${steps.a.output}"},
         "retry": {"max_attempts": 1}},
        task("c"),
    ]}));
    let (mut state, _) = start(&d, json!({}));
    run(&d, &mut state, &[ok(0, 1, json!("A"))]);
    run(&d, &mut state, &[fail(1, 1, "down", true)]);
    assert_eq!(state.status, InstanceStatus::Failed);

    let decision = run_at(&d, &mut state, &[Event::RetryRequested], at(3600));
    assert_eq!(log(&decision), ["instance_retried", "step_scheduled:b#1"]);
    assert_eq!(
        entry(&decision, "instance_retried").data,
        json!({"steps": ["b"]})
    );
    assert_eq!(cmds(&d, &decision), ["enqueue b/run#1"]);
    assert_eq!(only_enqueue(&decision).0, json!("A"));
    assert_eq!(changed(&d, &decision), ["b"]);
    assert_eq!(state.status, InstanceStatus::Running);
    assert_eq!(state.error, None);
    assert_eq!(state.ending, None);
    let a = step(&d, &state, "a");
    assert_eq!(a.status, StepStatus::Completed);
    assert_eq!(a.output.as_ref().map(Doc::to_value), Some(json!("A")));
    assert_eq!(a.ended_at, Some(now()), "untouched");
    let b = step(&d, &state, "b");
    assert_eq!(b.status, StepStatus::Scheduled);
    assert_eq!(b.attempt, 1);
    assert_eq!(b.error, None);
    assert_eq!(b.scheduled_at, Some(at(3600)));
    assert_eq!(step(&d, &state, "c").status, StepStatus::Pending);

    run(&d, &mut state, &[ok(1, 1, json!("B"))]);
    run(&d, &mut state, &[ok(2, 1, json!("C"))]);
    assert_eq!(state.status, InstanceStatus::Completed);
    assert_eq!(state.output, Some(json!({"a": "A", "b": "B", "c": "C"})));
}

#[test]
fn retry_resets_cancelled_and_compensated_steps_too() {
    let d = def(json!({"timeout": "1h", "steps": [
        {"id": "a", "task": {"queue": "q"}, "needs": [],
         "compensate": {"task": {"queue": "undo"}}},
        {"id": "x", "task": {"queue": "q"}, "needs": []},
        {"id": "keep", "task": {"queue": "q"}, "needs": []},
        {"id": "c", "task": {"queue": "q"}, "needs": ["a"], "retry": {"max_attempts": 1}},
    ]}));
    let (mut state, _) = start(&d, json!({}));
    run(
        &d,
        &mut state,
        &[ok(0, 1, json!("A")), ok(2, 1, json!("K"))],
    );
    run(&d, &mut state, &[fail(3, 1, "boom", false)]);
    run(&d, &mut state, &[comp_ok(0, 1)]);
    assert_eq!(state.status, InstanceStatus::Failed);
    assert_eq!(step(&d, &state, "a").status, StepStatus::Compensated);
    assert_eq!(step(&d, &state, "x").status, StepStatus::Cancelled);

    let decision = run_at(&d, &mut state, &[Event::RetryRequested], at(7200));
    assert_eq!(
        entry(&decision, "instance_retried").data,
        json!({"steps": ["a", "x", "c"]})
    );
    assert_eq!(cmds(&d, &decision), ["enqueue a/run#1", "enqueue x/run#1"]);
    let a = step(&d, &state, "a");
    assert_eq!(a.status, StepStatus::Scheduled);
    assert_eq!(a.compensation, None);
    assert_eq!(a.completion_order, None);
    assert_eq!(a.output.as_ref().map(Doc::to_value), None);
    assert_eq!(step(&d, &state, "c").status, StepStatus::Pending);
    assert_eq!(step(&d, &state, "c").error, None);
    assert_eq!(step(&d, &state, "keep").status, StepStatus::Completed);
    // A new deadline, measured from the retry.
    assert_eq!(state.deadline_at, Some(at(7200 + 3600)));
    assert_eq!(decision.wake_at, Some(at(7200 + 3600)));
}

#[test]
fn retry_on_an_instance_that_is_not_failed_does_nothing() {
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "compensate": {"task": {"queue": "undo"}}},
        task("b"),
    ]}));
    // Running.
    let (mut state, _) = start(&d, json!({}));
    assert_ignored(&d, &mut state, &[Event::RetryRequested]);
    // Winding down towards failed.
    run(&d, &mut state, &[ok(0, 1, json!("A"))]);
    run(&d, &mut state, &[fail(1, 1, "boom", false)]);
    assert_eq!(state.ending, Some(Ending::Failed));
    assert_ignored(&d, &mut state, &[Event::RetryRequested]);
    // Completed.
    let (mut state, _) = start(&d, json!({}));
    run(&d, &mut state, &[ok(0, 1, json!("A"))]);
    run(&d, &mut state, &[ok(1, 1, json!("B"))]);
    assert_eq!(state.status, InstanceStatus::Completed);
    assert_ignored(&d, &mut state, &[Event::RetryRequested]);
    // Pending (never started).
    let mut state = pending(json!({}));
    let decision = run(&d, &mut state, &[Event::RetryRequested]);
    assert_eq!(decision.history, vec![]);
    assert_eq!(state.status, InstanceStatus::Pending);
}

#[test]
fn retry_of_a_for_each_step_runs_all_its_items_again() {
    let d = def(json!({"steps": [
        {"id": "each", "for_each": "${input.xs}", "retry": {"max_attempts": 1},
         "task": {"queue": "q"}},
    ]}));
    let (mut state, _) = start(&d, json!({"xs": [1, 2]}));
    run(&d, &mut state, &[item_ok(0, 0, 1, json!("one"))]);
    run(&d, &mut state, &[item_fail(0, 1, 1, "bad", true)]);
    assert_eq!(state.status, InstanceStatus::Failed);
    let decision = run(&d, &mut state, &[Event::RetryRequested]);
    assert_eq!(
        cmds(&d, &decision),
        ["enqueue each[0]/run#1", "enqueue each[1]/run#1"]
    );
    assert_eq!(items(step(&d, &state, "each")), [StepStatus::Scheduled; 2]);
}

#[test]
fn a_retried_instance_that_fails_again_compensates_again() {
    // a's compensation failed in the first wind-down, so its effect is still
    // in place; the retry keeps a completed, and a second failure must try
    // to undo it again.
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"},
         "compensate": {"task": {"queue": "undo"}, "retry": {"max_attempts": 1}}},
        {"id": "b", "task": {"queue": "q"}, "retry": {"max_attempts": 1}},
    ]}));
    let (mut state, _) = start(&d, json!({}));
    run(&d, &mut state, &[ok(0, 1, json!("A"))]);
    run(&d, &mut state, &[fail(1, 1, "boom", false)]);
    run(&d, &mut state, &[comp_fail(0, 1, "undo down", true)]);
    assert_eq!(state.status, InstanceStatus::Failed);
    assert_eq!(step(&d, &state, "a").status, StepStatus::Completed);

    run(&d, &mut state, &[Event::RetryRequested]);
    assert_eq!(state.status, InstanceStatus::Running);
    assert_eq!(step(&d, &state, "a").status, StepStatus::Completed);
    let decision = run(&d, &mut state, &[fail(1, 1, "boom again", false)]);
    assert_eq!(
        log(&decision),
        ["step_failed:b#1", "compensation_scheduled:a#1"]
    );
    assert_eq!(cmds(&d, &decision), ["withdraw", "enqueue a/compensate#1"]);
}

// ----- determinism ------------------------------------------------------

fn mixed_workflow() -> Definition {
    def(json!({
        "steps": [
            {"id": "shape", "value": {"n": "${input.n}", "id": "${instance.id}"}},
            {"id": "left", "task": {"queue": "q", "input": "${steps.shape.output}"}},
            {"id": "right", "http": {"url": "http://svc/${steps.shape.output.n}",
                                     "headers": {"X-Id": "${instance.id}"},
                                     "body": {"n": "${steps.shape.output.n}"}},
             "needs": ["shape"]},
            {"id": "maybe", "task": {"queue": "q"}, "when": "${input.flag}", "needs": ["shape"]},
            {"id": "join", "value": ["${steps.left.output}", "${steps.right.output}"],
             "needs": ["left", "right", "maybe"]},
        ],
    }))
}

#[test]
fn same_inputs_give_the_same_decision() {
    let d = mixed_workflow();
    let script: Vec<Vec<Event>> = vec![
        vec![Event::Start],
        vec![fail(1, 1, "flaky", true), ok(2, 1, json!({"status": 200}))],
        vec![ok(1, 1, json!("stale"))],
        vec![ok(1, 2, json!("L"))],
    ];
    let play = || {
        let mut state = pending(json!({"n": 3, "flag": null}));
        let mut draws = 0.0;
        let decisions: Vec<Decision> = script
            .iter()
            .map(|events| {
                // A deterministic sequence of "random" numbers.
                let mut random = || {
                    draws += 0.37;
                    draws % 1.0
                };
                let mut ctx = Context {
                    now: now(),
                    random: &mut random,
                    limits: Default::default(),
                    budget_bytes: u64::MAX,
                };
                decide(&d, &mut state, events, &mut ctx)
            })
            .collect();
        (state, decisions)
    };
    let (state1, decisions1) = play();
    let (state2, decisions2) = play();
    assert_eq!(decisions1, decisions2);
    assert_eq!(state1, state2);
    // Byte-for-byte identical documents, not merely equal maps.
    assert_eq!(
        serde_json::to_string(&state1.output).unwrap(),
        serde_json::to_string(&state2.output).unwrap()
    );
    for (a, b) in decisions1.iter().zip(&decisions2) {
        for (x, y) in a.history.iter().zip(&b.history) {
            assert_eq!(x.data.to_string(), y.data.to_string());
        }
    }
    assert_eq!(state1.status, InstanceStatus::Completed);
    assert_eq!(
        state1.output,
        Some(json!({
            "shape": {"n": 3, "id": "inst-1"},
            "left": "L",
            "right": {"status": 200},
            "maybe": null,
            "join": ["L", {"status": 200}],
        }))
    );
}

#[test]
fn results_for_steps_not_yet_scheduled_in_the_same_batch_are_ignored() {
    let d = diamond();
    let (mut state, _) = start(&d, json!({}));
    // b and c are still pending while this batch is applied (a's result
    // unlocks them only afterwards), so their results cannot be genuine.
    let decision = run(
        &d,
        &mut state,
        &[
            ok(0, 1, json!("A")),
            ok(1, 1, json!("B")),
            ok(2, 1, json!("C")),
        ],
    );
    assert_eq!(
        log(&decision),
        [
            "step_completed:a#1",
            "step_scheduled:b#1",
            "step_scheduled:c#1"
        ]
    );
    assert_eq!(enqueued(&d, &decision), [en("b", 1), en("c", 1)]);
    assert_eq!(
        step(&d, &state, "b").output.as_ref().map(Doc::to_value),
        None
    );
    assert_eq!(step(&d, &state, "d").status, StepStatus::Pending);
}

#[test]
fn timestamps_come_from_the_context_clock() {
    let d = def(json!({"steps": [task("a")]}));
    let mut state = pending(json!({}));
    let later = now() + Duration::hours(5);
    let mut random = || 0.5;
    let mut ctx = Context {
        now: later,
        random: &mut random,
        limits: Default::default(),
        budget_bytes: u64::MAX,
    };
    decide(&d, &mut state, &[Event::Start], &mut ctx);
    assert_eq!(state.steps[0].scheduled_at, Some(later));
    let mut ctx = Context {
        now: later + Duration::minutes(1),
        random: &mut random,
        limits: Default::default(),
        budget_bytes: u64::MAX,
    };
    decide(&d, &mut state, &[ok(0, 1, json!(1))], &mut ctx);
    assert_eq!(state.steps[0].ended_at, Some(later + Duration::minutes(1)));
}

#[test]
fn a_failed_step_without_continue_never_unlocks_dependents() {
    // Normally unreachable (such a failure ends the instance at once), but a
    // restored or hand-edited state must not let dependents run past it.
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "needs": []},
        {"id": "b", "task": {"queue": "q"}, "needs": []},
        {"id": "c", "task": {"queue": "q"}, "needs": ["a"]},
    ]}));
    let (mut state, _) = start(&d, json!({}));
    state.steps[0].status = StepStatus::Failed;
    let decision = run(&d, &mut state, &[ok(1, 1, json!("B"))]);
    assert_eq!(log(&decision), ["step_completed:b#1"]);
    assert_eq!(enqueued(&d, &decision), []);
    assert_eq!(step(&d, &state, "c").status, StepStatus::Pending);
    assert_eq!(state.status, InstanceStatus::Running);
}

#[test]
fn failing_instance_cancels_steps_still_in_flight() {
    let d = def(json!({"steps": [
        {"id": "a", "task": {"queue": "q"}, "needs": [], "retry": {"max_attempts": 1}},
        {"id": "b", "task": {"queue": "q"}, "needs": []},
    ]}));
    let (mut state, _) = start(&d, json!({}));
    let decision = run(&d, &mut state, &[fail(0, 1, "boom", false)]);
    assert_eq!(state.status, InstanceStatus::Failed);
    assert_eq!(step(&d, &state, "b").status, StepStatus::Cancelled);
    assert_eq!(step(&d, &state, "b").ended_at, Some(now()));
    assert!(changed(&d, &decision).contains(&"b".to_string()));
    assert_eq!(withdraws(&decision), 1);
}

// ---- limits -------------------------------------------------------------------

/// One decision under `limits`, with a byte budget of `budget_bytes`.
fn run_bounded(
    def: &Definition,
    state: &mut InstanceState,
    events: &[Event],
    limits: EngineLimits,
    budget_bytes: u64,
) -> Decision {
    let mut random = || 0.5;
    let mut ctx = Context {
        now: now(),
        random: &mut random,
        limits,
        budget_bytes,
    };
    decide(def, state, events, &mut ctx)
}

/// One decision under `limits`.
fn run_limited(
    def: &Definition,
    state: &mut InstanceState,
    events: &[Event],
    limits: EngineLimits,
) -> Decision {
    run_bounded(def, state, events, limits, u64::MAX)
}

/// One decision with a byte budget of `budget_bytes`.
fn run_budgeted(
    def: &Definition,
    state: &mut InstanceState,
    events: &[Event],
    budget_bytes: u64,
) -> Decision {
    run_bounded(def, state, events, EngineLimits::default(), budget_bytes)
}

fn output_limit(bytes: usize) -> EngineLimits {
    EngineLimits {
        max_step_output_bytes: bytes,
        ..EngineLimits::default()
    }
}

fn limit_of(step: &StepState) -> (&str, bool) {
    let error = step.error.as_ref().expect("an error");
    (
        error["limit"].as_str().unwrap_or_default(),
        error["retryable"].as_bool().unwrap_or(true),
    )
}

#[test]
fn a_value_step_output_at_the_limit_completes_and_one_byte_over_fails_the_instance() {
    // "xxxxxxxx" is 10 bytes as JSON.
    let d = def(json!({"steps": [{"id": "v", "value": "${input}"}]}));
    let mut state = pending(json!("xxxxxxxx"));
    run_limited(&d, &mut state, &[Event::Start], output_limit(10));
    assert_eq!(state.steps[0].status, StepStatus::Completed);

    let mut state = pending(json!("xxxxxxxxx"));
    run_limited(&d, &mut state, &[Event::Start], output_limit(10));
    assert_eq!(state.steps[0].status, StepStatus::Failed);
    assert_eq!(limit_of(&state.steps[0]), ("max_step_output_bytes", false));
    assert_eq!(state.status, InstanceStatus::Failed);
    let message = state.steps[0].error.as_ref().unwrap()["message"].to_string();
    assert!(
        message.contains("11 bytes, over the limit of 10"),
        "{message}"
    );
}

#[test]
fn a_task_result_over_the_limit_fails_for_good_whatever_the_retry_policy() {
    let d = def(json!({"steps": [{"id": "t", "task": {"queue": "q"},
                                   "retry": {"max_attempts": 5}}]}));
    let mut state = pending(json!(null));
    run_limited(&d, &mut state, &[Event::Start], output_limit(10));
    let decision = run_limited(
        &d,
        &mut state,
        &[ok(0, 1, json!("0123456789"))],
        output_limit(10),
    );
    assert_eq!(state.steps[0].status, StepStatus::Failed);
    assert_eq!(limit_of(&state.steps[0]), ("max_step_output_bytes", false));
    assert!(
        !decision
            .commands
            .iter()
            .any(|c| matches!(c, Command::EnqueueTask { .. })),
        "not retried"
    );
}

#[test]
fn a_for_each_of_the_limit_runs_and_one_element_more_fails_the_step() {
    let d = def(json!({"steps": [{"id": "each", "for_each": "${input}", "value": "${item}"}]}));
    let limits = EngineLimits {
        max_for_each_items: 3,
        ..EngineLimits::default()
    };
    let mut state = pending(json!([1, 2, 3]));
    run_limited(&d, &mut state, &[Event::Start], limits);
    assert_eq!(state.steps[0].status, StepStatus::Completed);
    let mut state = pending(json!([1, 2, 3, 4]));
    run_limited(&d, &mut state, &[Event::Start], limits);
    assert_eq!(state.steps[0].status, StepStatus::Failed);
    assert_eq!(limit_of(&state.steps[0]), ("max_for_each_items", false));
}

#[test]
fn an_element_result_over_the_limit_fails_its_for_each_step() {
    let d = def(json!({"steps": [{"id": "each", "for_each": "${input}",
                                   "task": {"queue": "q", "input": "${item}"}}]}));
    let mut state = pending(json!([1, 2]));
    run_limited(&d, &mut state, &[Event::Start], output_limit(10));
    run_limited(
        &d,
        &mut state,
        &[item_ok(0, 0, 1, json!(1))],
        output_limit(10),
    );
    assert_eq!(
        state.steps[0].status,
        StepStatus::Running,
        "a small result is taken"
    );
    run_limited(
        &d,
        &mut state,
        &[item_ok(0, 1, 1, json!("0123456789"))],
        output_limit(10),
    );
    assert_eq!(state.steps[0].status, StepStatus::Failed);
    let items = state.steps[0].items.as_ref().unwrap();
    assert_eq!(items[1].status, StepStatus::Failed);
}

fn instance_limit(bytes: u64) -> EngineLimits {
    EngineLimits {
        max_instance_bytes: bytes,
        ..EngineLimits::default()
    }
}

#[test]
fn steps_store_up_to_the_instance_limit_and_the_step_past_it_fails_the_instance() {
    // Each output "xxxxxxxx" is 10 bytes as JSON; the output `true` is 4.
    let d = def(json!({"output": true, "steps": [
        {"id": "a", "value": "${input}"},
        {"id": "b", "value": "${input}"},
        {"id": "c", "value": "${input}", "needs": ["a", "b"]}]}));
    let mut state = pending(json!("xxxxxxxx"));
    run_limited(&d, &mut state, &[Event::Start], instance_limit(34));
    assert_eq!(state.status, InstanceStatus::Completed);
    assert_eq!(state.stored_bytes, 34, "what the steps and the output hold");
    assert_eq!(state.stored_bytes, stored_bytes(&state));

    let mut state = pending(json!("xxxxxxxx"));
    run_limited(&d, &mut state, &[Event::Start], instance_limit(33));
    assert_eq!(
        state.status,
        InstanceStatus::Failed,
        "the output is one too many"
    );
    assert_eq!(state.error.as_ref().unwrap()["limit"], "max_instance_bytes");

    let mut state = pending(json!("xxxxxxxx"));
    run_limited(&d, &mut state, &[Event::Start], instance_limit(29));
    assert_eq!(step(&d, &state, "c").status, StepStatus::Failed);
    assert_eq!(
        limit_of(step(&d, &state, "c")),
        ("max_instance_bytes", false)
    );
    assert_eq!(state.status, InstanceStatus::Failed);
    let message = step(&d, &state, "c").error.as_ref().unwrap()["message"].to_string();
    assert!(
        message.contains("to 30 bytes, over the limit of 29"),
        "{message}"
    );
}

#[test]
fn a_task_input_past_the_instance_limit_fails_the_step_before_it_is_queued() {
    let d = def(json!({"steps": [{"id": "t", "task": {"queue": "q", "input": "${input}"}}]}));
    let mut state = pending(json!("xxxxxxxx"));
    let decision = run_limited(&d, &mut state, &[Event::Start], instance_limit(10));
    assert_eq!(state.steps[0].status, StepStatus::Scheduled, "at the limit");

    let mut state = pending(json!("xxxxxxxx"));
    let decision_past = run_limited(&d, &mut state, &[Event::Start], instance_limit(9));
    assert_eq!(limit_of(&state.steps[0]), ("max_instance_bytes", false));
    let queued = |d: &Decision| {
        d.commands
            .iter()
            .filter(|c| matches!(c, Command::EnqueueTask { .. }))
            .count()
    };
    assert_eq!((queued(&decision), queued(&decision_past)), (1, 0));
}

#[test]
fn what_an_instance_stores_is_counted_anew_after_each_decision() {
    // A retried instance replaces its failed step's input: no double count.
    let d = def(json!({"steps": [{"id": "t", "task": {"queue": "q", "input": "${input}"}}]}));
    let (mut state, _) = start(&d, json!("xxxxxxxx"));
    assert_eq!(state.stored_bytes, 10);
    run(&d, &mut state, &[fail(0, 1, "boom", false)]);
    assert_eq!(state.status, InstanceStatus::Failed);
    run(&d, &mut state, &[Event::RetryRequested]);
    assert_eq!(state.stored_bytes, stored_bytes(&state));
}

fn history_limit(events: u32) -> EngineLimits {
    EngineLimits {
        max_history_events: events,
        ..EngineLimits::default()
    }
}

#[test]
fn an_instance_below_the_history_limit_goes_on_and_one_at_it_fails_at_its_next_decision() {
    let d = def(json!({"steps": [{"id": "approval", "signal": {"name": "approved"}}]}));
    let (waiting, first) = start(&d, json!(null));
    let recorded = waiting.recorded_events;
    assert_eq!(recorded as usize, first.history.len());
    assert!(recorded > 0);

    let mut state = waiting.clone();
    let events = [signal(1, "approved", json!(true))];
    run_limited(&d, &mut state, &events, history_limit(recorded + 1));
    assert_eq!(state.status, InstanceStatus::Completed);

    let mut state = waiting;
    run_limited(&d, &mut state, &events, history_limit(recorded));
    assert_eq!(state.status, InstanceStatus::Failed);
    assert_eq!(state.error.as_ref().unwrap()["limit"], "max_history_events");
    assert_eq!(step(&d, &state, "approval").status, StepStatus::Cancelled);
}

#[test]
fn a_decision_that_spent_its_byte_budget_leaves_the_next_steps_for_one_woken_at_once() {
    // Each output is 10 bytes; the instance's output `true` 4.
    let d = def(json!({"output": true, "steps": [
        {"id": "a", "value": "${input}"},
        {"id": "b", "value": "${input}"},
        {"id": "c", "value": "${input}"}]}));
    let mut state = pending(json!("xxxxxxxx"));
    let first = run_budgeted(&d, &mut state, &[Event::Start], 15);
    let statuses = |s: &InstanceState| s.steps.iter().map(|s| s.status).collect::<Vec<_>>();
    use StepStatus::{Completed, Pending};
    assert_eq!(statuses(&state), [Completed, Completed, Pending]);
    assert_eq!((first.added_bytes, first.wake_at), (20, Some(now())));

    let second = run_budgeted(&d, &mut state, &[], 15);
    assert_eq!(state.status, InstanceStatus::Completed);
    assert_eq!((second.added_bytes, second.wake_at), (14, None));
}

#[test]
fn a_decision_that_reaches_its_byte_budget_with_nothing_left_to_start_does_not_pause() {
    // The last step starts below the budget and takes the decision past it.
    let d = def(json!({"output": true, "steps": [
        {"id": "a", "value": "${input}"},
        {"id": "b", "value": "${input}"}]}));
    let mut state = pending(json!("xxxxxxxx"));
    let decision = run_budgeted(&d, &mut state, &[Event::Start], 15);
    assert_eq!(state.status, InstanceStatus::Completed);
    assert!(!decision.paused);
    assert_eq!(decision.wake_at, None);
}
