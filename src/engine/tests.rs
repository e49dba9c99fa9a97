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
        result: TaskResult::Failed {
            message: message.to_string(),
            retryable,
            details: None,
        },
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
    assert_eq!(s.input, Some(input));
    assert_eq!(s.scheduled_at, Some(now()));
    assert_eq!(s.output, None);
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
    assert_eq!(step(&d, &state, "call").input, Some(input));
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
    assert_eq!(step(&d, &state, "c").output, Some(json!("a-b-c")));
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
    assert_eq!(s.output, Some(json!({"x": 5, "tag": "n=5"})));
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
    assert_eq!(s.output, Some(Value::Null));
    assert_eq!(s.ended_at, Some(now()));
    assert_eq!(s.attempt, 0);
    assert_eq!(
        step(&d, &state, "after").output,
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
    assert_eq!(s.output, Some(json!({"r": 1})));
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
    assert_eq!(step(&d, &state, "a").output, Some(json!("first")));
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
    assert_eq!(step(&d, &state, "a").output, Some(json!("first")));
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
    assert_eq!(s.output, None);
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
        result: TaskResult::Failed {
            message: "bad".to_string(),
            retryable: true,
            details: Some(json!({"code": 503})),
        },
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
    assert_eq!(s.output, None);
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
    assert_eq!(a.output, Some(error.clone()));
    assert_eq!(a.error, Some(error.clone()));
    assert_eq!(step(&d, &state, "b").output, Some(json!({"why": "boom"})));
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

// ----- unsupported kinds ------------------------------------------------

#[test]
fn unsupported_kinds_fail_the_step_and_instance_instead_of_hanging() {
    let cases = [
        ("sleep", json!({"id": "s", "sleep": "10m"})),
        (
            "sleep",
            json!({"id": "s", "sleep": {"until": "2030-01-31T12:00:00Z"}}),
        ),
        ("signal", json!({"id": "s", "signal": {"name": "approved"}})),
        (
            "workflow",
            json!({"id": "s", "workflow": {"name": "child"}}),
        ),
        (
            "for_each",
            json!({"id": "s", "task": {"queue": "q", "input": "${item}"},
                   "for_each": "${input.items}"}),
        ),
        (
            "for_each",
            json!({"id": "s", "value": "${item}", "for_each": "${input.items}"}),
        ),
    ];
    for (what, s) in cases {
        let d = def(json!({"steps": [s, task("after")]}));
        let (state, decision) = start(&d, json!({"items": [1, 2]}));
        assert_eq!(
            log(&decision),
            ["instance_started", "step_failed:s#0", "instance_failed"],
            "{what}"
        );
        assert_eq!(decision.commands, vec![Command::WithdrawTasks], "{what}");
        assert_eq!(state.status, InstanceStatus::Failed, "{what}");
        let s = &state.steps[0];
        assert_eq!(s.status, StepStatus::Failed, "{what}");
        let step_message = s.error.as_ref().unwrap()["message"].as_str().unwrap();
        assert!(
            step_message.contains(what) && step_message.contains("not supported"),
            "{what}: {step_message}"
        );
        assert_eq!(s.error.as_ref().unwrap()["retryable"], json!(false));
        let message = state.error.as_ref().unwrap()["message"].as_str().unwrap();
        assert!(
            message.contains("step s") && message.contains(what),
            "{what}: {message}"
        );
        assert_eq!(state.steps[1].status, StepStatus::Pending, "{what}");
    }
}

#[test]
fn unsupported_step_fails_when_its_needs_are_met() {
    let d = def(json!({"steps": [task("a"), {"id": "wait", "sleep": "1h"}, task("c")]}));
    let (mut state, d0) = start(&d, json!({}));
    assert_eq!(enqueued(&d, &d0), [en("a", 1)]);
    let decision = run(&d, &mut state, &[ok(0, 1, json!(1))]);
    assert_eq!(
        log(&decision),
        [
            "step_completed:a#1",
            "step_failed:wait#0",
            "instance_failed"
        ]
    );
    assert_eq!(decision.commands, vec![Command::WithdrawTasks]);
    assert_eq!(step(&d, &state, "c").status, StepStatus::Pending);
}

#[test]
fn unsupported_step_with_on_failure_continue_lets_the_workflow_finish() {
    let d = def(json!({"steps": [
        {"id": "wait", "signal": {"name": "go"}, "on_failure": "continue"},
        {"id": "after", "value": "${steps.wait.output.message}"},
    ]}));
    let (state, decision) = start(&d, json!({}));
    assert_eq!(state.status, InstanceStatus::Completed);
    assert_eq!(withdraws(&decision), 0);
    let after = step(&d, &state, "after").output.clone().unwrap();
    assert!(after.as_str().unwrap().contains("signal"), "{after}");
}

#[test]
fn unsupported_step_skipped_by_when_does_not_fail() {
    let d = def(json!({"steps": [
        {"id": "wait", "sleep": "10m", "when": "${input.cool_off}"},
        task("ship"),
    ]}));
    let (state, decision) = start(&d, json!({"cool_off": false}));
    assert_eq!(state.status, InstanceStatus::Running);
    assert_eq!(step(&d, &state, "wait").status, StepStatus::Skipped);
    assert_eq!(enqueued(&d, &decision), [en("ship", 1)]);
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
    assert_eq!(step(&d, &state, "b").output, None);
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
    };
    decide(&d, &mut state, &[Event::Start], &mut ctx);
    assert_eq!(state.steps[0].scheduled_at, Some(later));
    let mut ctx = Context {
        now: later + Duration::minutes(1),
        random: &mut random,
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
