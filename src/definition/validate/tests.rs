//! Unit tests of definition validation: every rule, its JSON path and
//! its message.

use serde_json::json;

use super::*;

fn ok(doc: Value) -> Definition {
    match parse("order", &doc, &Limits::default()) {
        Ok(d) => d,
        Err(ps) => panic!("unexpected problems: {ps:#?}"),
    }
}

fn problems(doc: Value) -> Vec<Problem> {
    parse("order", &doc, &Limits::default()).expect_err("expected problems")
}

/// Exactly one problem, at `path`, whose message contains `msg`.
#[track_caller]
fn one(doc: Value, path: &str, msg: &str) {
    let ps = problems(doc);
    assert_eq!(ps.len(), 1, "expected one problem, got {ps:#?}");
    assert_eq!(ps[0].path, path, "{ps:#?}");
    assert!(
        ps[0].message.contains(msg),
        "message {:?} should contain {msg:?}",
        ps[0].message
    );
}

/// A one-step workflow.
fn step(s: Value) -> Value {
    json!({ "steps": [s] })
}

fn task() -> Value {
    json!({"queue": "q"})
}

fn contract_example() -> Value {
    json!({
      "name": "order",
      "steps": [
        {"id": "reserve", "http": {"method": "POST", "url": "http://inventory/reserve",
                                   "body": "${input}"},
         "retry": {"max_attempts": 5, "initial_interval": "1s", "max_interval": "1m"},
         "timeout": "30s",
         "compensate": {"http": {"method": "POST", "url": "http://inventory/release",
                                 "body": {"reservation": "${steps.reserve.output.id}"}}}},
        {"id": "charge", "task": {"queue": "payments",
                                  "input": {"amount": "${input.amount}"}}},
        {"id": "approval", "signal": {"name": "approved", "timeout": "24h"}},
        {"id": "cool_off", "sleep": "10m", "when": "${input.needs_cool_off}"},
        {"id": "ship", "task": {"queue": "shipping"}, "needs": ["approval", "cool_off"]}
      ],
      "output": {"shipment": "${steps.ship.output}"}
    })
}

// ----- the contract's example ---------------------------------------

#[test]
fn contract_example_parses() {
    let d = ok(contract_example());
    assert_eq!(d.name, "order");
    assert_eq!(d.steps.len(), 5);
    assert_eq!(d.retry, RetryPolicy::default());
    assert_eq!(d.timeout_ms, None);
    assert_eq!(d.output, Some(json!({"shipment": "${steps.ship.output}"})));
    assert_eq!(d.step_index("approval"), Some(2));

    let reserve = &d.steps[0];
    assert_eq!(reserve.id, "reserve");
    assert_eq!(
        reserve.kind,
        StepKind::Http(HttpCall {
            method: "POST".into(),
            url: json!("http://inventory/reserve"),
            headers: BTreeMap::new(),
            body: Some(json!("${input}")),
        })
    );
    assert_eq!(reserve.needs, Vec::<usize>::new());
    assert_eq!(
        reserve.retry,
        RetryPolicy {
            max_attempts: 5,
            initial_interval_ms: 1_000,
            multiplier: 2.0,
            max_interval_ms: 60_000,
            jitter: true,
        }
    );
    assert_eq!(reserve.timeout_ms, Some(30_000));
    let comp = reserve.compensate.as_ref().unwrap();
    assert_eq!(comp.retry, RetryPolicy::default());
    assert_eq!(comp.timeout_ms, None);
    match &comp.action {
        CompensationAction::Http(h) => {
            assert_eq!(h.method, "POST");
            assert_eq!(h.url, json!("http://inventory/release"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(reserve.on_failure, OnFailure::Fail);
    assert_eq!(reserve.for_each, None);
    assert_eq!(reserve.when, None);

    assert_eq!(
        d.steps[1].kind,
        StepKind::Task {
            queue: "payments".into(),
            input: Some(json!({"amount": "${input.amount}"}))
        }
    );
    assert_eq!(d.steps[1].needs, vec![0]);
    assert_eq!(d.steps[1].retry, RetryPolicy::default());
    assert_eq!(
        d.steps[2].kind,
        StepKind::Signal {
            name: "approved".into(),
            timeout_ms: Some(86_400_000)
        }
    );
    assert_eq!(d.steps[2].needs, vec![1]);
    assert_eq!(
        d.steps[3].kind,
        StepKind::Sleep(SleepSpec::Duration { ms: 600_000 })
    );
    assert_eq!(d.steps[3].when, Some(json!("${input.needs_cool_off}")));
    assert_eq!(d.steps[3].needs, vec![2]);
    assert_eq!(
        d.steps[4].kind,
        StepKind::Task {
            queue: "shipping".into(),
            input: None
        }
    );
    assert_eq!(d.steps[4].needs, vec![2, 3]);
}

#[test]
fn three_mistakes_reported_together() {
    let mut doc = contract_example();
    doc["steps"][0]["retry"]["max_attempts"] = json!(0);
    doc["steps"][2]["id"] = json!("Approval");
    doc["steps"][4]["task"]["queue"] = json!(7);
    let ps = problems(doc);
    let paths: Vec<&str> = ps.iter().map(|p| p.path.as_str()).collect();
    // "Approval" is invalid but still resolvable, so `ship`'s needs
    // ["approval", ...] is reported as an unknown step too.
    assert_eq!(
        paths,
        vec![
            "$.steps[0].retry.max_attempts",
            "$.steps[2].id",
            "$.steps[4].task.queue",
            "$.steps[4].needs[0]",
        ]
    );
    assert!(ps[0].message.contains("from 1 to 1000"), "{ps:#?}");
    assert!(ps[2].message.contains("must be a string, got a number"));
    assert!(ps[3].message.contains("unknown step \"approval\""));
}

#[test]
fn three_independent_mistakes() {
    let ps = problems(json!({
        "name": "other",
        "steps": [
            {"id": "a", "task": {"queue": "q"}, "timeout": "soon"},
            {"id": "b", "sleep": 5}
        ]
    }));
    let paths: Vec<&str> = ps.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        vec!["$.name", "$.steps[0].timeout", "$.steps[1].sleep"]
    );
}

#[test]
fn problems_are_in_document_order() {
    let ps = problems(json!({
        "bogus": 1,
        "timeout": "x",
        "output": "${nope}",
        "steps": [
            {"id": "a", "value": 1, "zzz": 1, "on_failure": "maybe", "needs": ["b"]},
            {"id": "B", "value": "${steps.c.output}"},
        ],
        "name": 3,
    }));
    let paths: Vec<&str> = ps.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "$.name",
            "$.timeout",
            "$.steps[0].needs[0]",
            "$.steps[0].on_failure",
            "$.steps[0].zzz",
            "$.steps[1].id",
            "$.steps[1].value",
            "$.output",
            "$.bogus",
        ]
    );
    // Stable: the same document gives the same list.
    let again = problems(json!({
        "bogus": 1, "timeout": "x", "output": "${nope}", "name": 3,
        "steps": [
            {"id": "a", "value": 1, "zzz": 1, "on_failure": "maybe", "needs": ["b"]},
            {"id": "B", "value": "${steps.c.output}"},
        ],
    }));
    assert_eq!(ps, again);
}

// ----- top level ----------------------------------------------------

#[test]
fn document_must_be_an_object() {
    one(json!([1]), "$", "must be a JSON object, got an array");
    one(json!(null), "$", "got null");
}

#[test]
fn unknown_top_level_field() {
    let mut doc = step(json!({"id": "a", "value": 1}));
    doc["stepz"] = json!([]);
    one(doc, "$.stepz", "unknown field \"stepz\"");
}

#[test]
fn top_level_optional_fields() {
    let d = ok(json!({
        "name": "order",
        "description": "takes orders",
        "timeout": "1h",
        "steps": [{"id": "a", "value": 1}],
    }));
    assert_eq!(d.timeout_ms, Some(3_600_000));
    assert_eq!(d.output, None);
    one(
        json!({"description": 1, "steps": [{"id": "a", "value": 1}]}),
        "$.description",
        "must be a string",
    );
    one(
        json!({"timeout": "0s", "steps": [{"id": "a", "value": 1}]}),
        "$.timeout",
        "longer than zero",
    );
    one(
        json!({"timeout": "1 hour", "steps": [{"id": "a", "value": 1}]}),
        "$.timeout",
        "ms, s, m, h or d",
    );
    one(
        json!({"timeout": 60, "steps": [{"id": "a", "value": 1}]}),
        "$.timeout",
        "duration string",
    );
}

#[test]
fn name_must_match_url() {
    one(
        json!({"name": "shop", "steps": [{"id": "a", "value": 1}]}),
        "$.name",
        "does not match the name in the URL",
    );
    one(
        json!({"name": ["order"], "steps": [{"id": "a", "value": 1}]}),
        "$.name",
        "must be a string, got an array",
    );
    // Absent is fine; the URL name is used.
    assert_eq!(ok(step(json!({"id": "a", "value": 1}))).name, "order");
}

#[test]
fn url_name_is_checked() {
    let doc = step(json!({"id": "a", "value": 1}));
    for bad in ["", "has space", "slash/name", &"x".repeat(201)] {
        let ps = parse(bad, &doc, &Limits::default()).unwrap_err();
        assert_eq!(ps.len(), 1, "{bad:?}: {ps:#?}");
        assert_eq!(ps[0].path, "$.name");
        assert!(ps[0].message.contains("A-Z a-z 0-9"));
    }
    for good in ["a", "billing.v2:eu@prod-1_x", &"x".repeat(200)] {
        assert!(parse(good, &doc, &Limits::default()).is_ok(), "{good:?}");
    }
    // A bad URL name is reported once, not again as a mismatch.
    let ps = parse(
        "a b",
        &json!({"name": "a b", "steps": [{"id": "a", "value": 1}]}),
        &Limits::default(),
    )
    .unwrap_err();
    assert_eq!(ps.len(), 1);
}

#[test]
fn steps_shape() {
    one(json!({}), "$.steps", "required");
    one(
        json!({"steps": {}}),
        "$.steps",
        "must be a non-empty array of steps, got an object",
    );
    one(json!({"steps": []}), "$.steps", "at least one step");
    one(
        json!({"steps": [5]}),
        "$.steps[0]",
        "must be an object (a step), got a number",
    );
}

#[test]
fn too_many_steps() {
    let limits = Limits { max_steps: 2 };
    let doc = json!({"steps": [
        {"id": "a", "value": 1},
        {"id": "b", "value": 2},
        {"id": "c", "bogus": true}
    ]});
    let ps = parse("order", &doc, &limits).unwrap_err();
    assert_eq!(
        ps,
        vec![Problem {
            path: "$.steps".into(),
            message: "too many steps: 3, at most 2 are allowed".into()
        }]
    );
}

#[test]
fn many_steps_are_fast() {
    // 1000 steps in a chain, each referencing the first one.
    let mut steps = vec![json!({"id": "s0", "value": 0})];
    for i in 1..1000 {
        steps.push(json!({"id": format!("s{i}"), "value": "${steps.s0.output}"}));
    }
    let start = std::time::Instant::now();
    let d = ok(json!({ "steps": steps }));
    assert_eq!(d.steps.len(), 1000);
    assert_eq!(d.steps[999].needs, vec![998]);
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
}

// ----- step basics --------------------------------------------------

#[test]
fn step_id_rules() {
    one(step(json!({"value": 1})), "$.steps[0].id", "required");
    one(
        step(json!({"id": 1, "value": 1})),
        "$.steps[0].id",
        "must be a string",
    );
    one(
        step(json!({"id": "Reserve", "value": 1})),
        "$.steps[0].id",
        "invalid step id",
    );
    one(
        step(json!({"id": "a-b", "value": 1})),
        "$.steps[0].id",
        "a-z 0-9 _",
    );
    one(
        step(json!({"id": "", "value": 1})),
        "$.steps[0].id",
        "invalid step id",
    );
    one(
        step(json!({"id": "x".repeat(65), "value": 1})),
        "$.steps[0].id",
        "invalid",
    );
    ok(step(json!({"id": "x".repeat(64), "value": 1})));
    ok(step(json!({"id": "a_1", "value": 1})));
}

#[test]
fn duplicate_id_reported_at_the_later_step() {
    one(
        json!({"steps": [
            {"id": "a", "value": 1},
            {"id": "b", "value": 2},
            {"id": "a", "value": 3}
        ]}),
        "$.steps[2].id",
        "duplicate step id \"a\"",
    );
}

#[test]
fn exactly_one_kind() {
    one(
        step(json!({"id": "a"})),
        "$.steps[0]",
        "task, http, sleep, signal, value, workflow",
    );
    one(
        step(json!({"id": "a", "task": {"queue": "q"}, "value": 1})),
        "$.steps[0]",
        "task, value",
    );
}

#[test]
fn unknown_step_field() {
    one(
        step(json!({"id": "a", "value": 1, "retries": 3})),
        "$.steps[0].retries",
        "unknown field \"retries\" in a step",
    );
    one(
        step(json!({"id": "a", "value": 1, "description": false})),
        "$.steps[0].description",
        "must be a string",
    );
    ok(step(json!({"id": "a", "value": 1, "description": "hi"})));
}

// ----- kinds --------------------------------------------------------

#[test]
fn task_rules() {
    one(
        step(json!({"id": "a", "task": "q"})),
        "$.steps[0].task",
        "must be an object",
    );
    one(
        step(json!({"id": "a", "task": {}})),
        "$.steps[0].task.queue",
        "required",
    );
    one(
        step(json!({"id": "a", "task": {"queue": "a b"}})),
        "$.steps[0].task.queue",
        "invalid queue name",
    );
    one(
        step(json!({"id": "a", "task": {"queue": "x".repeat(201)}})),
        "$.steps[0].task.queue",
        "invalid queue name",
    );
    one(
        step(json!({"id": "a", "task": {"queue": "q", "payload": 1}})),
        "$.steps[0].task.payload",
        "unknown field",
    );
    one(
        step(json!({"id": "a", "task": {"queue": "q", "input": {"x": ["${inptu.x}"]}}})),
        "$.steps[0].task.input.x[0]",
        "unknown root `inptu`",
    );
    let d = ok(step(
        json!({"id": "a", "task": {"queue": "pay.v1:eu@x-y_z", "input": null}}),
    ));
    assert_eq!(
        d.steps[0].kind,
        StepKind::Task {
            queue: "pay.v1:eu@x-y_z".into(),
            input: Some(Value::Null)
        }
    );
}

#[test]
fn http_rules() {
    let http = |h: Value| step(json!({"id": "a", "http": h}));
    one(
        http(json!("http://x")),
        "$.steps[0].http",
        "must be an object",
    );
    one(http(json!({})), "$.steps[0].http.url", "required");
    one(
        http(json!({"url": 5})),
        "$.steps[0].http.url",
        "must be a string",
    );
    one(
        http(json!({"url": "ftp://x"})),
        "$.steps[0].http.url",
        "http:// or https://",
    );
    one(
        http(json!({"url": "inventory/reserve"})),
        "$.steps[0].http.url",
        "http://",
    );
    one(
        http(json!({"url": "http://"})),
        "$.steps[0].http.url",
        "http://",
    );
    one(
        http(json!({"url": "ftp://${input.host}"})),
        "$.steps[0].http.url",
        "http://",
    );
    one(
        http(json!({"url": "http://${inpt.host}"})),
        "$.steps[0].http.url",
        "unknown root",
    );
    one(
        http(json!({"url": "http://x", "method": "FETCH"})),
        "$.steps[0].http.method",
        "must be one of GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS, got \"FETCH\"",
    );
    one(
        http(json!({"url": "http://x", "method": 1})),
        "$.steps[0].http.method",
        "got 1",
    );
    one(
        http(json!({"url": "http://x", "headers": ["a"]})),
        "$.steps[0].http.headers",
        "must be an object",
    );
    one(
        http(json!({"url": "http://x", "headers": {"X-N": 5}})),
        "$.steps[0].http.headers[\"X-N\"]",
        "must be a string, got a number",
    );
    one(
        http(json!({"url": "http://x", "headers": {"bad name": "v"}})),
        "$.steps[0].http.headers[\"bad name\"]",
        "invalid header name",
    );
    one(
        http(json!({"url": "http://x", "headers": {"X": "a\r\nB: c"}})),
        "$.steps[0].http.headers.X",
        "line breaks",
    );
    one(
        http(json!({"url": "http://x", "headers": {"X": "${nope}"}})),
        "$.steps[0].http.headers.X",
        "unknown root",
    );
    one(
        http(json!({"url": "http://x", "body": {"amount": "${input.amount"}})),
        "$.steps[0].http.body.amount",
        "unterminated",
    );
    one(
        http(json!({"url": "http://x", "timeout": "1s"})),
        "$.steps[0].http.timeout",
        "unknown field",
    );
}

#[test]
fn http_method_defaults_and_case() {
    let method = |h: Value| match ok(step(json!({"id": "a", "http": h}))).steps[0]
        .kind
        .clone()
    {
        StepKind::Http(h) => h,
        other => panic!("{other:?}"),
    };
    assert_eq!(method(json!({"url": "http://x"})).method, "GET");
    assert_eq!(
        method(json!({"url": "http://x", "body": {"a": 1}})).method,
        "POST"
    );
    assert_eq!(method(json!({"url": "http://x", "body": null})).body, None);
    assert_eq!(
        method(json!({"url": "http://x", "body": null})).method,
        "GET"
    );
    assert_eq!(
        method(json!({"url": "HTTPS://x", "method": "patch"})).method,
        "PATCH"
    );
    assert_eq!(
        method(json!({"url": "https://x", "method": "Delete"})).method,
        "DELETE"
    );
    let h = method(json!({
        "url": "${input.url}",
        "headers": {"Authorization": "Bearer ${input.token}", "X-Id": "${instance.id}"},
        "body": "${input}"
    }));
    assert_eq!(h.url, json!("${input.url}"));
    assert_eq!(h.headers.len(), 2);
    assert_eq!(h.headers["Authorization"], json!("Bearer ${input.token}"));
    ok(step(
        json!({"id": "a", "http": {"url": "https://${input.host}/x"}}),
    ));
    ok(step(
        json!({"id": "a", "http": {"url": "http${input.s}://x"}}),
    ));
}

#[test]
fn sleep_rules() {
    one(
        step(json!({"id": "a", "sleep": "10 minutes"})),
        "$.steps[0].sleep",
        "ms, s, m, h or d",
    );
    one(
        step(json!({"id": "a", "sleep": 600})),
        "$.steps[0].sleep",
        "duration string",
    );
    one(
        step(json!({"id": "a", "sleep": {}})),
        "$.steps[0].sleep.until",
        "required",
    );
    one(
        step(json!({"id": "a", "sleep": {"until": "tomorrow"}})),
        "$.steps[0].sleep.until",
        "RFC 3339",
    );
    one(
        step(json!({"id": "a", "sleep": {"until": 1700000000}})),
        "$.steps[0].sleep.until",
        "must be a string",
    );
    one(
        step(json!({"id": "a", "sleep": {"until": "${inptu.at}"}})),
        "$.steps[0].sleep.until",
        "unknown root",
    );
    one(
        step(json!({"id": "a", "sleep": {"until": "2030-01-01T00:00:00Z", "tz": "x"}})),
        "$.steps[0].sleep.tz",
        "unknown field",
    );
    let kind = |s: Value| {
        ok(step(json!({"id": "a", "sleep": s}))).steps[0]
            .kind
            .clone()
    };
    assert_eq!(
        kind(json!("0s")),
        StepKind::Sleep(SleepSpec::Duration { ms: 0 })
    );
    assert_eq!(
        kind(json!("1h30m")),
        StepKind::Sleep(SleepSpec::Duration { ms: 5_400_000 })
    );
    assert_eq!(
        kind(json!({"until": "2030-01-31T12:00:00+02:00"})),
        StepKind::Sleep(SleepSpec::Until(json!("2030-01-31T12:00:00+02:00")))
    );
    assert_eq!(
        kind(json!({"until": "${input.wake_at}"})),
        StepKind::Sleep(SleepSpec::Until(json!("${input.wake_at}")))
    );
}

#[test]
fn signal_rules() {
    one(
        step(json!({"id": "a", "signal": "approved"})),
        "$.steps[0].signal",
        "must be an object",
    );
    one(
        step(json!({"id": "a", "signal": {}})),
        "$.steps[0].signal.name",
        "required",
    );
    one(
        step(json!({"id": "a", "signal": {"name": "ok?"}})),
        "$.steps[0].signal.name",
        "invalid signal name",
    );
    one(
        step(json!({"id": "a", "signal": {"name": "ok", "timeout": "0ms"}})),
        "$.steps[0].signal.timeout",
        "longer than zero",
    );
    one(
        step(json!({"id": "a", "signal": {"name": "ok", "timeout": "1y"}})),
        "$.steps[0].signal.timeout",
        "ms, s, m, h or d",
    );
    one(
        step(json!({"id": "a", "signal": {"name": "ok", "payload": {}}})),
        "$.steps[0].signal.payload",
        "unknown field",
    );
    assert_eq!(
        ok(step(json!({"id": "a", "signal": {"name": "ok"}}))).steps[0].kind,
        StepKind::Signal {
            name: "ok".into(),
            timeout_ms: None
        }
    );
}

#[test]
fn value_rules() {
    one(
        step(json!({"id": "a", "value": {"list": [1, "${index}"]}})),
        "$.steps[0].value.list[1]",
        "${index} can only be used in a step with for_each",
    );
    for v in [
        json!(null),
        json!(1),
        json!("${input.x}"),
        json!({"a": [true, "t ${instance.id}"]}),
    ] {
        assert_eq!(
            ok(step(json!({"id": "a", "value": v.clone()}))).steps[0].kind,
            StepKind::Value(v)
        );
    }
}

#[test]
fn workflow_rules() {
    let wf = |w: Value| step(json!({"id": "a", "workflow": w}));
    one(
        wf(json!("child")),
        "$.steps[0].workflow",
        "must be an object",
    );
    one(wf(json!({})), "$.steps[0].workflow.name", "required");
    one(
        wf(json!({"name": "a/b"})),
        "$.steps[0].workflow.name",
        "invalid workflow name",
    );
    one(
        wf(json!({"name": "c", "version": 0})),
        "$.steps[0].workflow.version",
        "at least 1",
    );
    one(
        wf(json!({"name": "c", "version": -1})),
        "$.steps[0].workflow.version",
        "got -1",
    );
    one(
        wf(json!({"name": "c", "version": 1.5})),
        "$.steps[0].workflow.version",
        "integer",
    );
    one(
        wf(json!({"name": "c", "version": "2"})),
        "$.steps[0].workflow.version",
        "integer",
    );
    one(
        wf(json!({"name": "c", "version": 2_147_483_648u64})),
        "$.steps[0].workflow.version",
        "integer",
    );
    one(
        wf(json!({"name": "c", "input": "${bad}"})),
        "$.steps[0].workflow.input",
        "unknown root",
    );
    one(
        wf(json!({"name": "c", "id": "x"})),
        "$.steps[0].workflow.id",
        "unknown field",
    );
    assert_eq!(
        ok(wf(
            json!({"name": "child", "version": 3, "input": {"x": "${input.x}"}})
        ))
        .steps[0]
            .kind,
        StepKind::Workflow {
            name: "child".into(),
            version: Some(3),
            input: Some(json!({"x": "${input.x}"}))
        }
    );
}

// ----- needs and cycles ---------------------------------------------

#[test]
fn needs_defaults() {
    let d = ok(json!({"steps": [
        {"id": "a", "value": 1},
        {"id": "b", "value": 2},
        {"id": "c", "value": 3, "needs": []},
        {"id": "d", "value": 4, "needs": ["a", "c"]},
        {"id": "e", "value": 5, "needs": ["f"]},
        {"id": "f", "value": 6, "needs": []},
        {"id": "g", "value": 7},
    ]}));
    let needs: Vec<Vec<usize>> = d.steps.iter().map(|s| s.needs.clone()).collect();
    assert_eq!(
        needs,
        vec![
            vec![],
            vec![0],
            vec![],
            vec![0, 2],
            vec![5],
            vec![],
            vec![5]
        ]
    );
    // A forward need plus the implicit "previous step" makes a cycle.
    one(
        json!({"steps": [
            {"id": "e", "value": 5, "needs": ["f"]},
            {"id": "f", "value": 6},
        ]}),
        "$.steps[0].needs",
        "`e` -> `f` -> `e`",
    );
}

#[test]
fn needs_rules() {
    let two = |needs: Value| json!({"steps": [{"id": "a", "value": 1}, {"id": "b", "value": 2, "needs": needs}]});
    one(
        two(json!("a")),
        "$.steps[1].needs",
        "must be an array of step ids, got a string",
    );
    one(two(json!([1])), "$.steps[1].needs[0]", "must be a string");
    one(
        two(json!(["a", "zz"])),
        "$.steps[1].needs[1]",
        "unknown step \"zz\"",
    );
    one(
        two(json!(["a", "a"])),
        "$.steps[1].needs[1]",
        "more than once",
    );
    one(
        two(json!(["b"])),
        "$.steps[1].needs[0]",
        "cannot need itself",
    );
}

#[test]
fn self_need_is_not_also_a_cycle() {
    one(
        step(json!({"id": "a", "value": 1, "needs": ["a"]})),
        "$.steps[0].needs[0]",
        "cannot need itself",
    );
}

#[test]
fn two_cycle() {
    one(
        json!({"steps": [
            {"id": "a", "value": 1, "needs": ["b"]},
            {"id": "b", "value": 2},
        ]}),
        "$.steps[0].needs",
        "needs form a cycle: `a` -> `b` -> `a`",
    );
}

#[test]
fn three_cycle_reported_once() {
    let ps = problems(json!({"steps": [
        {"id": "start", "value": 0},
        {"id": "a", "value": 1, "needs": ["c"]},
        {"id": "b", "value": 2, "needs": ["a"]},
        {"id": "c", "value": 3, "needs": ["b"]},
        {"id": "after", "value": 4},
    ]}));
    assert_eq!(ps.len(), 1, "{ps:#?}");
    assert_eq!(ps[0].path, "$.steps[1].needs");
    assert!(
        ps[0].message.contains("`a` -> `c` -> `b` -> `a`"),
        "{}",
        ps[0].message
    );
}

#[test]
fn separate_cycles_each_reported() {
    let ps = problems(json!({"steps": [
        {"id": "a", "value": 1, "needs": ["b"]},
        {"id": "b", "value": 2, "needs": ["a"]},
        {"id": "c", "value": 3, "needs": ["d"]},
        {"id": "d", "value": 4, "needs": ["c"]},
    ]}));
    let paths: Vec<&str> = ps.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, vec!["$.steps[0].needs", "$.steps[2].needs"]);
    assert!(ps[1].message.contains("`c` -> `d` -> `c`"));
}

#[test]
fn tangled_cycles_name_every_step() {
    // a <-> b and b <-> c: one strongly connected knot.
    let ps = problems(json!({"steps": [
        {"id": "a", "value": 1, "needs": ["b"]},
        {"id": "b", "value": 2, "needs": ["a", "c"]},
        {"id": "c", "value": 3, "needs": ["b"]},
    ]}));
    assert_eq!(ps.len(), 1, "{ps:#?}");
    assert!(ps[0].message.contains("`a` -> `b` -> `a`"));
    assert!(ps[0].message.contains("`a`, `b`, `c`"));
}

// ----- when, for_each ----------------------------------------------

#[test]
fn when_rules() {
    let d = ok(json!({"steps": [
        {"id": "a", "value": 1, "when": true},
        {"id": "b", "value": 1, "when": "${input.go}"},
        {"id": "c", "value": 1, "when": "${steps.b.output.ok}"},
    ]}));
    assert_eq!(d.steps[0].when, Some(json!(true)));
    assert_eq!(d.steps[1].when, Some(json!("${input.go}")));
    one(
        step(json!({"id": "a", "value": 1, "when": "input.go"})),
        "$.steps[0].when",
        "not a template",
    );
    one(
        step(json!({"id": "a", "value": 1, "when": 1})),
        "$.steps[0].when",
        "boolean or a template string",
    );
    one(
        step(json!({"id": "a", "value": 1, "when": "${input.go"})),
        "$.steps[0].when",
        "unterminated",
    );
}

#[test]
fn for_each_rules() {
    let d = ok(json!({"steps": [{
        "id": "a",
        "for_each": "${ input.items }",
        "max_parallel": 4,
        "task": {"queue": "q", "input": {"item": "${item}", "i": "${index}", "sku": "${item.sku}"}},
        "compensate": {"task": {"queue": "undo", "input": ["${steps.a.output}"]}},
    }]}));
    assert_eq!(
        d.steps[0].for_each,
        Some(ForEach {
            items: json!("${ input.items }"),
            max_parallel: Some(4)
        })
    );
    let d = ok(step(
        json!({"id": "a", "for_each": "${input.items}", "value": "${item}"}),
    ));
    assert_eq!(d.steps[0].for_each.as_ref().unwrap().max_parallel, None);

    one(
        step(json!({"id": "a", "for_each": "items: ${input.items}", "value": 1})),
        "$.steps[0].for_each",
        "exactly one template expression",
    );
    one(
        step(json!({"id": "a", "for_each": ["x"], "value": 1})),
        "$.steps[0].for_each",
        "must be a template string",
    );
    one(
        step(json!({"id": "a", "for_each": "${item}", "value": 1})),
        "$.steps[0].for_each",
        "${item} can only be used",
    );
    one(
        step(json!({"id": "a", "for_each": "${instance.id}", "value": 1})),
        "$.steps[0].for_each",
        "needs an array",
    );
    one(
        step(json!({"id": "a", "value": 1, "max_parallel": 2})),
        "$.steps[0].max_parallel",
        "only allowed together with for_each",
    );
    one(
        step(json!({"id": "a", "for_each": "${input.x}", "value": 1, "max_parallel": 0})),
        "$.steps[0].max_parallel",
        "at least 1",
    );
    one(
        step(json!({"id": "a", "for_each": "${input.x}", "value": 1, "when": "${item.ok}"})),
        "$.steps[0].when",
        "not in when, for_each or compensate",
    );
    one(
        step(json!({"id": "a", "for_each": "${input.x}", "value": 1,
                    "compensate": {"task": {"queue": "undo", "input": "${item}"}}})),
        "$.steps[0].compensate.task.input",
        "not in when, for_each or compensate",
    );
}

#[test]
fn item_and_index_only_in_for_each_steps() {
    one(
        step(json!({"id": "a", "value": "${item}"})),
        "$.steps[0].value",
        "${item} can only",
    );
    one(
        step(
            json!({"id": "a", "value": 1, "compensate": {"task": {"queue": "q", "input": "${index}"}}}),
        ),
        "$.steps[0].compensate.task.input",
        "${index} can only",
    );
    one(
        json!({"steps": [{"id": "a", "value": 1}], "output": "${item}"}),
        "$.output",
        "${item} can only be used in a step with for_each",
    );
}

// ----- references ---------------------------------------------------

#[test]
fn step_references_must_be_ancestors() {
    // b depends on a through the implicit needs; c on b; so c may use a.
    ok(json!({"steps": [
        {"id": "a", "value": 1},
        {"id": "b", "value": 2},
        {"id": "c", "value": "${steps.a.output}"},
    ]}));
    // A sibling that runs in parallel may not have finished.
    one(
        json!({"steps": [
            {"id": "a", "value": 1},
            {"id": "b", "value": {"x": "${steps.a.output.x}"}, "needs": []},
        ]}),
        "$.steps[1].value.x",
        "may not have finished",
    );
    // A later step.
    one(
        json!({"steps": [
            {"id": "a", "value": "${steps.b.output}"},
            {"id": "b", "value": 1},
        ]}),
        "$.steps[0].value",
        "may not have finished",
    );
    // Unknown step.
    one(
        step(json!({"id": "a", "task": {"queue": "q", "input": "${steps.nope.output}"}})),
        "$.steps[0].task.input",
        "does not exist",
    );
    // Own output outside compensate.
    one(
        step(json!({"id": "a", "value": "${steps.a.output}"})),
        "$.steps[0].value",
        "cannot use its own output",
    );
    // `.output` is required.
    one(
        json!({"steps": [{"id": "a", "value": 1}, {"id": "b", "value": "${steps.a}"}]}),
        "$.steps[1].value",
        "steps.a.output",
    );
}

#[test]
fn output_may_reference_any_step() {
    ok(json!({
        "steps": [
            {"id": "a", "value": 1},
            {"id": "b", "value": 2, "needs": []},
        ],
        "output": {"a": "${steps.a.output}", "b": "${steps.b.output}", "id": "${instance.id}"}
    }));
    one(
        json!({"steps": [{"id": "a", "value": 1}], "output": {"x": "${steps.z.output}"}}),
        "$.output.x",
        "does not exist",
    );
}

// ----- retry --------------------------------------------------------

#[test]
fn retry_rules() {
    let r = |retry: Value| step(json!({"id": "a", "value": 1, "retry": retry}));
    one(r(json!(3)), "$.steps[0].retry", "must be an object");
    one(
        r(json!({"max_attempts": 0})),
        "$.steps[0].retry.max_attempts",
        "from 1 to 1000, got 0",
    );
    one(
        r(json!({"max_attempts": 1001})),
        "$.steps[0].retry.max_attempts",
        "from 1 to 1000",
    );
    one(
        r(json!({"max_attempts": "3"})),
        "$.steps[0].retry.max_attempts",
        "got \"3\"",
    );
    one(
        r(json!({"max_attempts": 2.5})),
        "$.steps[0].retry.max_attempts",
        "integer",
    );
    one(
        r(json!({"initial_interval": "fast"})),
        "$.steps[0].retry.initial_interval",
        "ms, s",
    );
    one(
        r(json!({"max_interval": 10})),
        "$.steps[0].retry.max_interval",
        "duration string",
    );
    one(
        r(json!({"multiplier": 0.5})),
        "$.steps[0].retry.multiplier",
        "at least 1",
    );
    one(
        r(json!({"multiplier": "2"})),
        "$.steps[0].retry.multiplier",
        "number",
    );
    one(
        r(json!({"jitter": "yes"})),
        "$.steps[0].retry.jitter",
        "must be a boolean",
    );
    one(
        r(json!({"backoff": "exp"})),
        "$.steps[0].retry.backoff",
        "unknown field",
    );
    one(
        r(json!({"initial_interval": "10s", "max_interval": "5s"})),
        "$.steps[0].retry.max_interval",
        "max_interval 5s is shorter than initial_interval 10s",
    );
    // Inherited max_interval (5m default) shorter than the step's initial.
    one(
        r(json!({"initial_interval": "10m"})),
        "$.steps[0].retry.initial_interval",
        "set max_interval too",
    );
    // Inherited initial_interval (1s default) longer than the step's max.
    one(
        r(json!({"max_interval": "500ms"})),
        "$.steps[0].retry.max_interval",
        "(inherited)",
    );
    one(
        json!({"retry": {"max_interval": "1ms"}, "steps": [{"id": "a", "value": 1}]}),
        "$.retry.max_interval",
        "shorter than initial_interval 1s (the default)",
    );
    ok(r(json!({
        "max_attempts": 1000, "initial_interval": "0s", "max_interval": "0s",
        "multiplier": 1, "jitter": false
    })));
}

#[test]
fn retry_merging() {
    let d = ok(json!({
        "retry": {"max_attempts": 7, "jitter": false, "max_interval": "1h"},
        "steps": [
            {"id": "a", "value": 1},
            {"id": "b", "value": 2, "retry": {"initial_interval": "2s", "multiplier": 1.5}},
            {"id": "c", "value": 3, "retry": {"max_attempts": 1, "jitter": true},
             "compensate": {"task": {"queue": "undo"}, "retry": {"max_attempts": 20}, "timeout": "5s"}},
            {"id": "d", "value": 4,
             "compensate": {"task": {"queue": "undo"}}},
        ]
    }));
    let wf = RetryPolicy {
        max_attempts: 7,
        initial_interval_ms: 1_000,
        multiplier: 2.0,
        max_interval_ms: 3_600_000,
        jitter: false,
    };
    assert_eq!(d.retry, wf);
    assert_eq!(d.steps[0].retry, wf);
    assert_eq!(
        d.steps[1].retry,
        RetryPolicy {
            initial_interval_ms: 2_000,
            multiplier: 1.5,
            ..wf
        }
    );
    assert_eq!(
        d.steps[2].retry,
        RetryPolicy {
            max_attempts: 1,
            jitter: true,
            ..wf
        }
    );
    // A compensation's retry is merged over the workflow's, not the step's.
    let comp = d.steps[2].compensate.as_ref().unwrap();
    assert_eq!(
        comp.retry,
        RetryPolicy {
            max_attempts: 20,
            ..wf
        }
    );
    assert_eq!(comp.timeout_ms, Some(5_000));
    assert_eq!(d.steps[3].compensate.as_ref().unwrap().retry, wf);
    // No retry anywhere: the built-in defaults.
    let d = ok(step(json!({"id": "a", "value": 1})));
    assert_eq!(d.retry, RetryPolicy::default());
    assert_eq!(d.steps[0].retry, RetryPolicy::default());
}

#[test]
fn workflow_retry_problems() {
    one(
        json!({"retry": {"max_attempts": 0}, "steps": [{"id": "a", "value": 1}]}),
        "$.retry.max_attempts",
        "from 1 to 1000",
    );
    one(
        json!({"retry": [], "steps": [{"id": "a", "value": 1}]}),
        "$.retry",
        "must be an object",
    );
}

// ----- timeout, on_failure, compensate -----------------------------

#[test]
fn step_timeout() {
    assert_eq!(
        ok(step(json!({"id": "a", "value": 1, "timeout": "1m30s"}))).steps[0].timeout_ms,
        Some(90_000)
    );
    one(
        step(json!({"id": "a", "value": 1, "timeout": "0s"})),
        "$.steps[0].timeout",
        "longer than zero",
    );
    one(
        step(json!({"id": "a", "value": 1, "timeout": "-1s"})),
        "$.steps[0].timeout",
        "invalid duration",
    );
    one(
        step(json!({"id": "a", "value": 1, "timeout": null})),
        "$.steps[0].timeout",
        "got null",
    );
}

#[test]
fn on_failure_rules() {
    let d = ok(json!({"steps": [
        {"id": "a", "value": 1, "on_failure": "continue"},
        {"id": "b", "value": 1, "on_failure": "fail"},
    ]}));
    assert_eq!(d.steps[0].on_failure, OnFailure::Continue);
    assert_eq!(d.steps[1].on_failure, OnFailure::Fail);
    one(
        step(json!({"id": "a", "value": 1, "on_failure": "ignore"})),
        "$.steps[0].on_failure",
        "must be \"fail\" or \"continue\", got \"ignore\"",
    );
    one(
        step(json!({"id": "a", "value": 1, "on_failure": true})),
        "$.steps[0].on_failure",
        "got true",
    );
}

#[test]
fn compensate_rules() {
    let c = |comp: Value| step(json!({"id": "a", "task": task(), "compensate": comp}));
    one(
        c(json!("undo")),
        "$.steps[0].compensate",
        "must be an object",
    );
    one(
        c(json!({})),
        "$.steps[0].compensate",
        "exactly one of \"http\" or \"task\"",
    );
    one(
        c(json!({"task": {"queue": "q"}, "http": {"url": "http://x"}})),
        "$.steps[0].compensate",
        "both http and task",
    );
    let ps = problems(c(json!({"value": 1})));
    let paths: Vec<&str> = ps.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        vec!["$.steps[0].compensate", "$.steps[0].compensate.value"]
    );
    assert!(ps[0].message.contains("exactly one of"));
    one(
        c(json!({"task": {"queue": "q"}, "when": "${input.x}"})),
        "$.steps[0].compensate.when",
        "unknown field",
    );
    one(
        c(json!({"http": {"url": "http://x", "method": "YELL"}})),
        "$.steps[0].compensate.http.method",
        "must be one of",
    );
    one(
        c(json!({"task": {"queue": "q"}, "timeout": "0s"})),
        "$.steps[0].compensate.timeout",
        "longer than zero",
    );
    one(
        c(json!({"task": {"queue": "q"}, "retry": {"jitter": 1}})),
        "$.steps[0].compensate.retry.jitter",
        "boolean",
    );
    // The compensation may use the step's own output.
    let d = ok(c(
        json!({"task": {"queue": "undo", "input": "${steps.a.output.id}"}}),
    ));
    assert_eq!(
        d.steps[0].compensate.as_ref().unwrap().action,
        CompensationAction::Task {
            queue: "undo".into(),
            input: Some(json!("${steps.a.output.id}"))
        }
    );
    // ... but not a step that is not an ancestor.
    one(
        json!({"steps": [
            {"id": "a", "task": task(), "compensate": {"task": {"queue": "q", "input": "${steps.b.output}"}}},
            {"id": "b", "value": 1},
        ]}),
        "$.steps[0].compensate.task.input",
        "may not have finished",
    );
}

#[test]
fn a_concurrency_limit_parses_and_renders_its_key_from_the_input() {
    let def = ok(json!({
        "concurrency": {"key": "customer-${input.customer}", "limit": 2},
        "steps": [{"id": "a", "value": 1}]
    }));
    let c = def.concurrency.expect("a limit");
    assert_eq!(c.limit, 2);
    assert_eq!(c.key_of(&json!({"customer": 7}), "i-1"), "customer-7");
}

#[test]
fn a_concurrency_limit_names_what_is_wrong_with_it() {
    let with = |c: Value| json!({"concurrency": c, "steps": [{"id": "a", "value": 1}]});
    one(
        with(json!({"key": "${input.c}", "limit": 0})),
        "$.concurrency.limit",
        "from 1 to 10000",
    );
    one(with(json!({"limit": 2})), "$.concurrency.key", "required");
    one(
        with(json!({"key": "${steps.a.output}", "limit": 2})),
        "$.concurrency.key",
        "only ${input...}",
    );
    one(with(json!("two")), "$.concurrency", "an object");
    one(
        with(json!({"key": "k", "limit": 2, "extra": 1})),
        "$.concurrency.extra",
        "",
    );
}
