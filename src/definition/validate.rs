//! Validation of a workflow definition document (contract §2).
//!
//! [`parse`] checks everything and reports every problem at once, each with
//! the JSON path of the offending value. Problems come out in a fixed,
//! deterministic order that follows the document's structure: top level
//! `name`, `description`, `timeout`, `retry`, then `steps` one step after the
//! other, then `output`, then unknown top-level fields. Inside a step: `id`,
//! the kind, `needs`, `when`, `for_each`, `max_parallel`, `retry`, `timeout`,
//! `compensate`, `on_failure`, `description`, unknown fields. (Key order
//! inside a JSON object is not used: serde_json does not keep it by default.)

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde_json::{Map, Value};

use crate::definition::duration::{format_duration_ms, parse_duration_ms};
use crate::definition::model::{
    Compensation, CompensationAction, Definition, ForEach, HttpCall, Limits, OnFailure, Problem,
    RetryPolicy, SleepSpec, Step, StepKind,
};
use crate::definition::template::{self, Ref};

const TOP_LEVEL_KEYS: &[&str] = &["name", "description", "steps", "output", "timeout", "retry"];
const KINDS: &[&str] = &["task", "http", "sleep", "signal", "value", "workflow"];
const STEP_KEYS: &[&str] = &[
    "id",
    "task",
    "http",
    "sleep",
    "signal",
    "value",
    "workflow",
    "needs",
    "when",
    "retry",
    "timeout",
    "compensate",
    "on_failure",
    "for_each",
    "max_parallel",
    "description",
];
const RETRY_KEYS: &[&str] = &[
    "max_attempts",
    "initial_interval",
    "max_interval",
    "multiplier",
    "jitter",
];
const HTTP_METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];
const MAX_ATTEMPTS_LIMIT: u64 = 1000;
const NAME_RULE: &str = "1 to 200 characters of A-Z a-z 0-9 . _ : @ -";
const STEP_ID_RULE: &str = "1 to 64 characters of a-z 0-9 _";

/// Parses and validates a workflow definition registered under `url_name`.
///
/// Returns the validated [`Definition`], or every problem found (never just
/// the first), each with a JSON path such as `$.steps[2].retry.max_attempts`.
pub(crate) fn parse(
    url_name: &str,
    doc: &Value,
    limits: &Limits,
) -> Result<Definition, Vec<Problem>> {
    let mut v = Validator::default();
    let definition = v.definition(url_name, doc, limits);
    match definition {
        Some(d) if v.problems.is_empty() => Ok(d),
        _ => {
            debug_assert!(
                !v.problems.is_empty(),
                "no definition but no problem either"
            );
            Err(v.problems)
        }
    }
}

/// Fields of a `retry` object; `None` = not set here (inherited).
#[derive(Debug, Default, Clone, Copy)]
struct RetryPatch {
    max_attempts: Option<u32>,
    initial_interval_ms: Option<u64>,
    max_interval_ms: Option<u64>,
    multiplier: Option<f64>,
    jitter: Option<bool>,
}

/// Which references a template may make.
#[derive(Debug, Clone, Copy)]
struct RefRules {
    /// The step owning the template: `steps.X` must be one of its ancestors.
    /// `None` (workflow output): any existing step.
    step: Option<usize>,
    /// `steps.<own id>` is allowed (compensations).
    allow_self: bool,
    /// `item` and `index` are allowed (for_each steps).
    allow_item: bool,
}

const OUTPUT_RULES: RefRules = RefRules {
    step: None,
    allow_self: false,
    allow_item: false,
};

#[derive(Default)]
struct Validator<'d> {
    problems: Vec<Problem>,
    /// Step id → index of its first occurrence (any string id, even invalid).
    ids: HashMap<&'d str, usize>,
    /// The id of each step, when it is a string.
    step_ids: Vec<Option<&'d str>>,
    /// Resolved dependencies of each step (unknown ids and self left out).
    deps: Vec<Vec<usize>>,
    /// Lazily computed transitive dependencies of each step.
    ancestors: Vec<Option<Vec<bool>>>,
    /// Cycle messages to report at `$.steps[i].needs`, by step index.
    cycles: HashMap<usize, Vec<String>>,
}

impl<'d> Validator<'d> {
    fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    // ----- the whole document -------------------------------------------

    fn definition(
        &mut self,
        url_name: &str,
        doc: &'d Value,
        limits: &Limits,
    ) -> Option<Definition> {
        let url_name_ok = is_name(url_name);
        if !url_name_ok {
            self.problem(
                "$.name",
                format!("invalid workflow name {url_name:?} in the URL: expected {NAME_RULE}"),
            );
        }
        let Some(obj) = doc.as_object() else {
            self.problem(
                "$",
                format!(
                    "a workflow definition must be a JSON object, got {}",
                    type_name(doc)
                ),
            );
            return None;
        };

        if let Some(name) = obj.get("name") {
            match name.as_str() {
                None => self.type_problem("$.name", "a string", name),
                Some(n) if n != url_name && url_name_ok => self.problem(
                    "$.name",
                    format!("name {n:?} does not match the name in the URL ({url_name:?})"),
                ),
                Some(_) => {}
            }
        }
        if let Some(d) = obj.get("description") {
            self.expect_str(d, "$.description");
        }
        let timeout_ms = obj
            .get("timeout")
            .and_then(|t| self.duration(t, "$.timeout", true));
        let retry = match obj.get("retry") {
            Some(r) => {
                let patch = self.retry_patch(r, "$.retry");
                self.merge_retry(&RetryPolicy::default(), &patch, "$.retry", "the default")
            }
            None => RetryPolicy::default(),
        };

        let steps = self.steps(obj.get("steps"), limits, &retry);

        let output = obj.get("output").map(|o| {
            self.template(o, "$.output", OUTPUT_RULES);
            o.clone()
        });

        self.unknown_keys(obj, "$", TOP_LEVEL_KEYS, "a workflow definition");

        Some(Definition {
            name: url_name.to_string(),
            steps: steps?,
            output,
            timeout_ms,
            retry,
        })
    }

    fn steps(
        &mut self,
        steps: Option<&'d Value>,
        limits: &Limits,
        wf_retry: &RetryPolicy,
    ) -> Option<Vec<Step>> {
        let Some(steps) = steps else {
            self.problem("$.steps", "required: a non-empty array of steps");
            return None;
        };
        let Some(items) = steps.as_array() else {
            self.type_problem("$.steps", "a non-empty array of steps", steps);
            return None;
        };
        if items.is_empty() {
            self.problem("$.steps", "a workflow needs at least one step");
            return None;
        }
        let items = if items.len() > limits.max_steps {
            self.problem(
                "$.steps",
                format!(
                    "too many steps: {}, at most {} are allowed",
                    items.len(),
                    limits.max_steps
                ),
            );
            &items[..limits.max_steps]
        } else {
            &items[..]
        };

        self.resolve_graph(items);

        let mut out = Vec::with_capacity(items.len());
        let mut all_ok = true;
        for (i, item) in items.iter().enumerate() {
            match self.step(i, item, wf_retry) {
                Some(s) => out.push(s),
                None => all_ok = false,
            }
        }
        all_ok.then_some(out)
    }

    // ----- dependency graph ---------------------------------------------

    /// First pass over the steps: ids, resolved `needs` (ignoring anything
    /// malformed, which the second pass reports) and cycles.
    fn resolve_graph(&mut self, items: &'d [Value]) {
        let n = items.len();
        self.step_ids = items
            .iter()
            .map(|s| s.get("id").and_then(Value::as_str))
            .collect();
        for (i, id) in self.step_ids.iter().enumerate() {
            if let Some(id) = id {
                self.ids.entry(id).or_insert(i);
            }
        }
        self.deps = items
            .iter()
            .enumerate()
            .map(|(i, s)| match s.get("needs") {
                None => {
                    if i > 0 {
                        vec![i - 1]
                    } else {
                        vec![]
                    }
                }
                Some(Value::Array(needs)) => {
                    let mut deps = Vec::new();
                    for need in needs {
                        if let Some(&j) = need.as_str().and_then(|id| self.ids.get(id)) {
                            if j != i && !deps.contains(&j) {
                                deps.push(j);
                            }
                        }
                    }
                    deps
                }
                Some(_) => vec![],
            })
            .collect();
        self.ancestors = vec![None; n];

        for scc in strongly_connected(&self.deps) {
            if scc.len() < 2 {
                continue; // self-needs are reported on their own
            }
            let start = *scc.iter().min().expect("non-empty");
            let cycle = shortest_cycle(&self.deps, &scc, start);
            let name = |i: &usize| match self.step_ids[*i] {
                Some(id) => format!("`{id}`"),
                None => format!("steps[{i}]"),
            };
            let mut message = format!(
                "needs form a cycle: {} (each step needs the next one)",
                cycle.iter().map(name).collect::<Vec<_>>().join(" -> ")
            );
            if scc.len() + 1 > cycle.len() {
                let mut members = scc.clone();
                members.sort_unstable();
                message.push_str(&format!(
                    "; steps caught in cycles here: {}",
                    members.iter().map(name).collect::<Vec<_>>().join(", ")
                ));
            }
            self.cycles.entry(start).or_default().push(message);
        }
    }

    fn is_ancestor(&mut self, step: usize, of: usize) -> bool {
        if self.ancestors[of].is_none() {
            let mut seen = vec![false; self.deps.len()];
            let mut stack: Vec<usize> = self.deps[of].clone();
            while let Some(j) = stack.pop() {
                if !seen[j] {
                    seen[j] = true;
                    stack.extend(self.deps[j].iter().copied().filter(|&k| !seen[k]));
                }
            }
            self.ancestors[of] = Some(seen);
        }
        self.ancestors[of].as_ref().is_some_and(|a| a[step])
    }

    // ----- one step -----------------------------------------------------

    fn step(&mut self, i: usize, step: &'d Value, wf_retry: &RetryPolicy) -> Option<Step> {
        let path = format!("$.steps[{i}]");
        let Some(obj) = step.as_object() else {
            self.type_problem(&path, "an object (a step)", step);
            return None;
        };
        let before = self.problems.len();

        // id
        let id_path = format!("{path}.id");
        let id = match obj.get("id") {
            None => {
                self.problem(&id_path, format!("required: the step id ({STEP_ID_RULE})"));
                None
            }
            Some(v) => match v.as_str() {
                None => {
                    self.type_problem(&id_path, "a string", v);
                    None
                }
                Some(s) if !is_step_id(s) => {
                    self.problem(
                        &id_path,
                        format!("invalid step id {s:?}: expected {STEP_ID_RULE}"),
                    );
                    None
                }
                Some(s) => {
                    if self.ids.get(s) != Some(&i) {
                        self.problem(&id_path, format!("duplicate step id {s:?}"));
                    }
                    Some(s.to_string())
                }
            },
        };

        let has_for_each = obj.contains_key("for_each");
        let own = RefRules {
            step: Some(i),
            allow_self: false,
            allow_item: has_for_each,
        };

        // kind
        let kinds: Vec<&str> = KINDS
            .iter()
            .copied()
            .filter(|k| obj.contains_key(*k))
            .collect();
        match kinds.len() {
            0 => self.problem(
                &path,
                format!(
                    "a step needs exactly one kind: one of the fields {}",
                    KINDS.join(", ")
                ),
            ),
            1 => {}
            _ => self.problem(
                &path,
                format!(
                    "a step has exactly one kind, but this one has {}",
                    kinds.join(", ")
                ),
            ),
        }
        let mut kind = None;
        for k in &kinds {
            kind = self.kind(k, &obj[*k], &format!("{path}.{k}"), own);
        }

        // needs
        if let Some(needs) = obj.get("needs") {
            self.needs(i, needs, &format!("{path}.needs"));
        }
        if let Some(messages) = self.cycles.remove(&i) {
            for m in messages {
                self.problem(format!("{path}.needs"), m);
            }
        }

        // when
        let when = obj.get("when").map(|w| {
            let when_path = format!("{path}.when");
            match w {
                Value::Bool(_) => {}
                Value::String(s) if template::has_template(s) => {
                    self.template(w, &when_path, RefRules { allow_item: false, ..own });
                }
                Value::String(s) => self.problem(
                    &when_path,
                    format!(
                        "{s:?} is not a template: `when` is a boolean or a template such as \"${{input.enabled}}\""
                    ),
                ),
                other => self.type_problem(&when_path, "a boolean or a template string", other),
            }
            w.clone()
        });

        // for_each, max_parallel
        let for_each_items = obj
            .get("for_each")
            .and_then(|f| self.for_each(f, &format!("{path}.for_each"), own));
        if has_for_each {
            for kind in ["sleep", "signal"] {
                if obj.contains_key(kind) {
                    self.problem(
                        format!("{path}.for_each"),
                        format!(
                            "for_each runs task, http, value and workflow steps, not {kind} steps"
                        ),
                    );
                }
            }
        }
        let max_parallel = obj.get("max_parallel").and_then(|m| {
            let mp_path = format!("{path}.max_parallel");
            if !has_for_each {
                self.problem(
                    &mp_path,
                    "max_parallel is only allowed together with for_each",
                );
                return None;
            }
            self.integer(m, &mp_path, 1, u64::from(u32::MAX))
                .map(|n| n as u32)
        });

        // retry, timeout
        let retry = match obj.get("retry") {
            Some(r) => {
                let retry_path = format!("{path}.retry");
                let patch = self.retry_patch(r, &retry_path);
                self.merge_retry(wf_retry, &patch, &retry_path, "inherited")
            }
            None => *wf_retry,
        };
        let timeout_ms = obj
            .get("timeout")
            .and_then(|t| self.duration(t, &format!("{path}.timeout"), true));

        // compensate
        let compensate = obj.get("compensate").and_then(|c| {
            // A compensation runs once per step, after all its items: it
            // sees the step's whole output (`steps.<id>.output`), not items.
            let rules = RefRules {
                allow_self: true,
                allow_item: false,
                ..own
            };
            self.compensation(c, &format!("{path}.compensate"), rules, wf_retry)
        });

        // on_failure
        let on_failure = match obj.get("on_failure") {
            None => OnFailure::Fail,
            Some(v) => match v.as_str() {
                Some("fail") => OnFailure::Fail,
                Some("continue") => OnFailure::Continue,
                _ => {
                    self.problem(
                        format!("{path}.on_failure"),
                        format!("must be \"fail\" or \"continue\", got {}", short(v)),
                    );
                    OnFailure::Fail
                }
            },
        };

        if let Some(d) = obj.get("description") {
            self.expect_str(d, &format!("{path}.description"));
        }
        self.unknown_keys(obj, &path, STEP_KEYS, "a step");

        if self.problems.len() > before {
            return None;
        }
        Some(Step {
            id: id?,
            kind: kind?,
            needs: self.deps[i].clone(),
            when,
            retry,
            timeout_ms,
            compensate,
            on_failure,
            for_each: for_each_items.map(|items| ForEach {
                items,
                max_parallel,
            }),
        })
    }

    fn needs(&mut self, i: usize, needs: &Value, path: &str) {
        let Some(list) = needs.as_array() else {
            self.type_problem(path, "an array of step ids", needs);
            return;
        };
        let mut seen: Vec<&str> = Vec::new();
        for (k, need) in list.iter().enumerate() {
            let need_path = format!("{path}[{k}]");
            let Some(id) = need.as_str() else {
                self.type_problem(&need_path, "a string (a step id)", need);
                continue;
            };
            if seen.contains(&id) {
                self.problem(&need_path, format!("step {id:?} is listed more than once"));
                continue;
            }
            seen.push(id);
            match self.ids.get(id) {
                None => self.problem(&need_path, format!("unknown step {id:?}")),
                Some(&j) if j == i => self.problem(&need_path, "a step cannot need itself"),
                Some(_) => {}
            }
        }
    }

    fn kind(&mut self, kind: &str, v: &'d Value, path: &str, rules: RefRules) -> Option<StepKind> {
        match kind {
            "task" => self
                .task(v, path, rules)
                .map(|(queue, input)| StepKind::Task { queue, input }),
            "http" => self.http(v, path, rules).map(StepKind::Http),
            "sleep" => self.sleep(v, path, rules).map(StepKind::Sleep),
            "signal" => self.signal(v, path),
            "value" => {
                self.template(v, path, rules);
                Some(StepKind::Value(v.clone()))
            }
            "workflow" => self.child_workflow(v, path, rules),
            _ => unreachable!("unknown kind {kind}"),
        }
    }

    fn task(&mut self, v: &Value, path: &str, rules: RefRules) -> Option<(String, Option<Value>)> {
        let Some(obj) = v.as_object() else {
            self.type_problem(path, "an object {\"queue\": ..., \"input\": ...}", v);
            return None;
        };
        let queue = self.required_name(obj, "queue", path, "queue name");
        let input = obj.get("input").map(|i| {
            self.template(i, &format!("{path}.input"), rules);
            i.clone()
        });
        self.unknown_keys(obj, path, &["queue", "input"], "a task");
        Some((queue?, input))
    }

    fn http(&mut self, v: &Value, path: &str, rules: RefRules) -> Option<HttpCall> {
        let Some(obj) = v.as_object() else {
            self.type_problem(
                path,
                "an object {\"method\", \"url\", \"headers\", \"body\"}",
                v,
            );
            return None;
        };
        let body = obj.get("body").filter(|b| !b.is_null()).cloned();

        let method = match obj.get("method") {
            None => Some(if body.is_some() { "POST" } else { "GET" }.to_string()),
            Some(m) => {
                let upper = m.as_str().map(str::to_ascii_uppercase);
                match upper {
                    Some(u) if HTTP_METHODS.contains(&u.as_str()) => Some(u),
                    _ => {
                        self.problem(
                            format!("{path}.method"),
                            format!(
                                "must be one of {}, got {}",
                                HTTP_METHODS.join(", "),
                                short(m)
                            ),
                        );
                        None
                    }
                }
            }
        };

        let url_path = format!("{path}.url");
        let url = match obj.get("url") {
            None => {
                self.problem(&url_path, "required: the URL to call");
                None
            }
            Some(u) => match u.as_str() {
                None => {
                    self.type_problem(&url_path, "a string", u);
                    None
                }
                Some(s) => {
                    if template::has_template(s) {
                        let prefix = &s[..s.find("${").unwrap_or(0)].to_ascii_lowercase();
                        let plausible = ["http://", "https://"]
                            .iter()
                            .any(|scheme| prefix.starts_with(scheme) || scheme.starts_with(prefix));
                        if !plausible {
                            self.problem(
                                &url_path,
                                format!("URL {s:?} must start with http:// or https://"),
                            );
                        }
                        self.template(u, &url_path, rules);
                    } else if !is_http_url(s) {
                        self.problem(
                            &url_path,
                            format!("URL {s:?} must start with http:// or https://"),
                        );
                    }
                    Some(u.clone())
                }
            },
        };

        let mut headers = BTreeMap::new();
        if let Some(h) = obj.get("headers") {
            let headers_path = format!("{path}.headers");
            match h.as_object() {
                None => self.type_problem(&headers_path, "an object of header name to value", h),
                Some(map) => {
                    for (name, value) in map {
                        let header_path = template::key_path(&headers_path, name);
                        if !is_header_name(name) {
                            self.problem(&header_path, format!("invalid header name {name:?}"));
                        }
                        match value.as_str() {
                            None => self.type_problem(&header_path, "a string", value),
                            Some(s) if s.contains(['\r', '\n']) => self
                                .problem(&header_path, "header values cannot contain line breaks"),
                            Some(_) => self.template(value, &header_path, rules),
                        }
                        headers.insert(name.clone(), value.clone());
                    }
                }
            }
        }

        if let Some(b) = &body {
            self.template(b, &format!("{path}.body"), rules);
        }
        self.unknown_keys(
            obj,
            path,
            &["method", "url", "headers", "body"],
            "an http call",
        );

        Some(HttpCall {
            method: method?,
            url: url?,
            headers,
            body,
        })
    }

    fn sleep(&mut self, v: &Value, path: &str, rules: RefRules) -> Option<SleepSpec> {
        match v {
            Value::String(_) => self
                .duration(v, path, false)
                .map(|ms| SleepSpec::Duration { ms }),
            Value::Object(obj) => {
                let until_path = format!("{path}.until");
                let until = match obj.get("until") {
                    None => {
                        self.problem(&until_path, "required: an RFC 3339 timestamp or a template");
                        None
                    }
                    Some(u) => match u.as_str() {
                        None => {
                            self.type_problem(&until_path, "a string (RFC 3339 timestamp)", u);
                            None
                        }
                        Some(s) if template::has_template(s) => {
                            self.template(u, &until_path, rules);
                            Some(u.clone())
                        }
                        Some(s) => match chrono::DateTime::parse_from_rfc3339(s) {
                            Ok(_) => Some(u.clone()),
                            Err(e) => {
                                self.problem(
                                    &until_path,
                                    format!(
                                        "{s:?} is not an RFC 3339 timestamp \
                                         (like \"2030-01-31T12:00:00Z\"): {e}"
                                    ),
                                );
                                None
                            }
                        },
                    },
                };
                self.unknown_keys(obj, path, &["until"], "a sleep");
                until.map(SleepSpec::Until)
            }
            other => {
                self.type_problem(
                    path,
                    "a duration string like \"10m\" or an object {\"until\": timestamp}",
                    other,
                );
                None
            }
        }
    }

    fn signal(&mut self, v: &Value, path: &str) -> Option<StepKind> {
        let Some(obj) = v.as_object() else {
            self.type_problem(path, "an object {\"name\": ..., \"timeout\": ...}", v);
            return None;
        };
        let name = self.required_name(obj, "name", path, "signal name");
        let timeout_ms = obj
            .get("timeout")
            .and_then(|t| self.duration(t, &format!("{path}.timeout"), true));
        self.unknown_keys(obj, path, &["name", "timeout"], "a signal");
        Some(StepKind::Signal {
            name: name?,
            timeout_ms,
        })
    }

    fn child_workflow(&mut self, v: &Value, path: &str, rules: RefRules) -> Option<StepKind> {
        let Some(obj) = v.as_object() else {
            self.type_problem(path, "an object {\"name\", \"version\", \"input\"}", v);
            return None;
        };
        let name = self.required_name(obj, "name", path, "workflow name");
        let version = obj.get("version").and_then(|n| {
            self.integer(n, &format!("{path}.version"), 1, i32::MAX as u64)
                .map(|n| n as i32)
        });
        let input = obj.get("input").map(|i| {
            self.template(i, &format!("{path}.input"), rules);
            i.clone()
        });
        self.unknown_keys(obj, path, &["name", "version", "input"], "a child workflow");
        Some(StepKind::Workflow {
            name: name?,
            version,
            input,
        })
    }

    fn for_each(&mut self, v: &Value, path: &str, own: RefRules) -> Option<Value> {
        let rules = RefRules {
            allow_item: false,
            ..own
        };
        let Some(s) = v.as_str() else {
            self.type_problem(path, "a template string like \"${input.items}\"", v);
            return None;
        };
        match template::exact_expr(s) {
            None => {
                self.problem(
                    path,
                    format!(
                        "{s:?} must be exactly one template expression naming an array, \
                         like \"${{input.items}}\""
                    ),
                );
                if template::has_template(s) {
                    self.template(v, path, rules);
                }
                None
            }
            Some(_) => {
                let before = self.problems.len();
                self.template(v, path, rules);
                if self.problems.len() == before {
                    if let Ok(refs) = template::references(v, path) {
                        if refs == [Ref::InstanceId] {
                            self.problem(
                                path,
                                "for_each needs an array, and instance.id is a string",
                            );
                        }
                    }
                }
                Some(v.clone())
            }
        }
    }

    fn compensation(
        &mut self,
        v: &Value,
        path: &str,
        rules: RefRules,
        wf_retry: &RetryPolicy,
    ) -> Option<Compensation> {
        let Some(obj) = v.as_object() else {
            self.type_problem(
                path,
                "an object with \"http\" or \"task\" (and optional \"retry\", \"timeout\")",
                v,
            );
            return None;
        };
        let actions: Vec<&str> = ["http", "task"]
            .into_iter()
            .filter(|k| obj.contains_key(*k))
            .collect();
        match actions.len() {
            0 => self.problem(
                path,
                "a compensation needs exactly one of \"http\" or \"task\"",
            ),
            1 => {}
            _ => self.problem(
                path,
                "a compensation has exactly one action, but this one has both http and task",
            ),
        }
        let mut action = None;
        for a in actions {
            let a_path = format!("{path}.{a}");
            action = match a {
                "http" => self
                    .http(&obj[a], &a_path, rules)
                    .map(CompensationAction::Http),
                _ => self
                    .task(&obj[a], &a_path, rules)
                    .map(|(queue, input)| CompensationAction::Task { queue, input }),
            };
        }
        let retry = match obj.get("retry") {
            Some(r) => {
                let retry_path = format!("{path}.retry");
                let patch = self.retry_patch(r, &retry_path);
                self.merge_retry(wf_retry, &patch, &retry_path, "inherited")
            }
            None => *wf_retry,
        };
        let timeout_ms = obj
            .get("timeout")
            .and_then(|t| self.duration(t, &format!("{path}.timeout"), true));
        self.unknown_keys(
            obj,
            path,
            &["http", "task", "retry", "timeout"],
            "a compensation",
        );
        Some(Compensation {
            action: action?,
            retry,
            timeout_ms,
        })
    }

    // ----- retry --------------------------------------------------------

    fn retry_patch(&mut self, v: &Value, path: &str) -> RetryPatch {
        let mut patch = RetryPatch::default();
        let Some(obj) = v.as_object() else {
            self.type_problem(
                path,
                "an object {max_attempts, initial_interval, max_interval, multiplier, jitter}",
                v,
            );
            return patch;
        };
        if let Some(n) = obj.get("max_attempts") {
            patch.max_attempts = self
                .integer(n, &format!("{path}.max_attempts"), 1, MAX_ATTEMPTS_LIMIT)
                .map(|n| n as u32);
        }
        if let Some(d) = obj.get("initial_interval") {
            patch.initial_interval_ms =
                self.duration(d, &format!("{path}.initial_interval"), false);
        }
        if let Some(d) = obj.get("max_interval") {
            patch.max_interval_ms = self.duration(d, &format!("{path}.max_interval"), false);
        }
        if let Some(m) = obj.get("multiplier") {
            match m.as_f64() {
                Some(x) if m.is_number() && x >= 1.0 && x.is_finite() => patch.multiplier = Some(x),
                _ => self.problem(
                    format!("{path}.multiplier"),
                    format!("must be a number of at least 1, got {}", short(m)),
                ),
            }
        }
        if let Some(j) = obj.get("jitter") {
            match j.as_bool() {
                Some(b) => patch.jitter = Some(b),
                None => self.type_problem(&format!("{path}.jitter"), "a boolean", j),
            }
        }
        self.unknown_keys(obj, path, RETRY_KEYS, "a retry policy");
        patch
    }

    /// `patch` over `base`; checks that the effective `max_interval` is not
    /// shorter than the effective `initial_interval`.
    fn merge_retry(
        &mut self,
        base: &RetryPolicy,
        patch: &RetryPatch,
        path: &str,
        base_name: &str,
    ) -> RetryPolicy {
        let merged = RetryPolicy {
            max_attempts: patch.max_attempts.unwrap_or(base.max_attempts),
            initial_interval_ms: patch
                .initial_interval_ms
                .unwrap_or(base.initial_interval_ms),
            multiplier: patch.multiplier.unwrap_or(base.multiplier),
            max_interval_ms: patch.max_interval_ms.unwrap_or(base.max_interval_ms),
            jitter: patch.jitter.unwrap_or(base.jitter),
        };
        if merged.max_interval_ms < merged.initial_interval_ms {
            let initial = format_duration_ms(merged.initial_interval_ms);
            let max = format_duration_ms(merged.max_interval_ms);
            match (patch.initial_interval_ms, patch.max_interval_ms) {
                (_, Some(_)) => self.problem(
                    format!("{path}.max_interval"),
                    format!(
                        "max_interval {max} is shorter than initial_interval {initial}{}",
                        if patch.initial_interval_ms.is_some() {
                            String::new()
                        } else {
                            format!(" ({base_name})")
                        }
                    ),
                ),
                (Some(_), None) => self.problem(
                    format!("{path}.initial_interval"),
                    format!(
                        "initial_interval {initial} is longer than max_interval {max} \
                         ({base_name}); set max_interval too"
                    ),
                ),
                // Both inherited: already reported where they were set.
                (None, None) => {}
            }
        }
        merged
    }

    // ----- templates ----------------------------------------------------

    fn template(&mut self, v: &Value, path: &str, rules: RefRules) {
        for found in template::scan(v, path) {
            let (r, ref_path) = match found {
                Ok(x) => x,
                Err(p) => {
                    self.problems.push(p);
                    continue;
                }
            };
            match r {
                Ref::Input(_) | Ref::InstanceId => {}
                Ref::Item(_) | Ref::Index if rules.allow_item => {}
                Ref::Item(_) | Ref::Index => {
                    let which = if r == Ref::Index { "index" } else { "item" };
                    let message = if rules.step.is_some() {
                        format!(
                            "${{{which}}} can only be used in a step with for_each \
                             (in its task, http, value and workflow), \
                             not in when, for_each or compensate"
                        )
                    } else {
                        format!("${{{which}}} can only be used in a step with for_each")
                    };
                    self.problem(ref_path, message);
                }
                Ref::StepOutput { step, .. } => {
                    let Some(&j) = self.ids.get(step.as_str()) else {
                        self.problem(
                            ref_path,
                            format!("`steps.{step}` refers to a step that does not exist"),
                        );
                        continue;
                    };
                    let Some(i) = rules.step else { continue };
                    if i == j {
                        if !rules.allow_self {
                            self.problem(
                                ref_path,
                                format!(
                                    "step {step:?} cannot use its own output \
                                     (only its compensate can)"
                                ),
                            );
                        }
                    } else if !self.is_ancestor(j, i) {
                        let me = self.step_ids[i].unwrap_or("this step");
                        self.problem(
                            ref_path,
                            format!(
                                "step {step:?} may not have finished when {me:?} runs: \
                                 it is not among the steps {me:?} needs, directly or \
                                 indirectly; add it to needs"
                            ),
                        );
                    }
                }
            }
        }
    }

    // ----- scalar helpers -----------------------------------------------

    fn type_problem(&mut self, path: &str, expected: &str, got: &Value) {
        self.problem(path, format!("must be {expected}, got {}", type_name(got)));
    }

    fn expect_str<'v>(&mut self, v: &'v Value, path: &str) -> Option<&'v str> {
        let s = v.as_str();
        if s.is_none() {
            self.type_problem(path, "a string", v);
        }
        s
    }

    /// A required `[A-Za-z0-9._:@-]{1,200}` string field of `obj`.
    fn required_name(
        &mut self,
        obj: &Map<String, Value>,
        key: &str,
        path: &str,
        what: &str,
    ) -> Option<String> {
        let field_path = format!("{path}.{key}");
        let Some(v) = obj.get(key) else {
            self.problem(&field_path, format!("required: the {what} ({NAME_RULE})"));
            return None;
        };
        let s = self.expect_str(v, &field_path)?;
        if !is_name(s) {
            self.problem(
                &field_path,
                format!("invalid {what} {s:?}: expected {NAME_RULE}"),
            );
            return None;
        }
        Some(s.to_string())
    }

    fn integer(&mut self, v: &Value, path: &str, min: u64, max: u64) -> Option<u64> {
        match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                let expected = if max == u64::from(u32::MAX) || max == i32::MAX as u64 {
                    format!("an integer of at least {min}")
                } else {
                    format!("an integer from {min} to {max}")
                };
                self.problem(path, format!("must be {expected}, got {}", short(v)));
                None
            }
        }
    }

    /// A duration string; `positive` rejects zero (timeouts).
    fn duration(&mut self, v: &Value, path: &str, positive: bool) -> Option<u64> {
        let Some(s) = v.as_str() else {
            self.type_problem(path, "a duration string like \"30s\" or \"1h30m\"", v);
            return None;
        };
        match parse_duration_ms(s) {
            Ok(0) if positive => {
                self.problem(path, "must be longer than zero");
                None
            }
            Ok(ms) => Some(ms),
            Err(e) => {
                self.problem(path, e);
                None
            }
        }
    }

    fn unknown_keys(&mut self, obj: &Map<String, Value>, path: &str, allowed: &[&str], what: &str) {
        for key in obj.keys() {
            if !allowed.contains(&key.as_str()) {
                self.problem(
                    template::key_path(path, key),
                    format!(
                        "unknown field {key:?} in {what}; allowed fields: {}",
                        allowed.join(", ")
                    ),
                );
            }
        }
    }
}

// ----- free helpers -----------------------------------------------------

/// `[A-Za-z0-9._:@-]{1,200}`: workflow, queue and signal names.
fn is_name(s: &str) -> bool {
    (1..=200).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b))
}

/// `[a-z0-9_]{1,64}`: step ids.
fn is_step_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// An RFC 9110 token.
fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_http_url(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    ["http://", "https://"].iter().any(|scheme| {
        lower.starts_with(scheme) && s.len() > scheme.len() && !s.contains(char::is_whitespace)
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value for a message: scalars as JSON, containers by type.
fn short(v: &Value) -> String {
    match v {
        Value::Array(_) | Value::Object(_) => type_name(v).to_string(),
        Value::String(s) if s.chars().count() > 60 => {
            format!("{:?}...", s.chars().take(60).collect::<String>())
        }
        other => other.to_string(),
    }
}

/// Tarjan's strongly connected components, iterative (no deep recursion for
/// long chains of steps).
fn strongly_connected(adj: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let n = adj.len();
    let mut index = vec![usize::MAX; n];
    let mut low = vec![0; n];
    let mut on_stack = vec![false; n];
    let mut stack = Vec::new();
    let mut next = 0;
    let mut out = Vec::new();
    for root in 0..n {
        if index[root] != usize::MAX {
            continue;
        }
        let mut calls: Vec<(usize, usize)> = vec![(root, 0)];
        index[root] = next;
        low[root] = next;
        next += 1;
        stack.push(root);
        on_stack[root] = true;
        while let Some(&mut (v, ref mut edge)) = calls.last_mut() {
            if let Some(&w) = adj[v].get(*edge) {
                *edge += 1;
                if index[w] == usize::MAX {
                    index[w] = next;
                    low[w] = next;
                    next += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    calls.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
            } else {
                calls.pop();
                if let Some(&(u, _)) = calls.last() {
                    low[u] = low[u].min(low[v]);
                }
                if low[v] == index[v] {
                    let mut scc = Vec::new();
                    loop {
                        let w = stack.pop().expect("tarjan stack");
                        on_stack[w] = false;
                        scc.push(w);
                        if w == v {
                            break;
                        }
                    }
                    out.push(scc);
                }
            }
        }
    }
    out
}

/// The shortest cycle through `start` inside `scc`, as step indices starting
/// and ending with `start`.
fn shortest_cycle(adj: &[Vec<usize>], scc: &[usize], start: usize) -> Vec<usize> {
    let mut member = vec![false; adj.len()];
    for &v in scc {
        member[v] = true;
    }
    let mut parent: HashMap<usize, usize> = HashMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for &w in &adj[v] {
            if !member[w] {
                continue;
            }
            if w == start {
                // Walk back from v to start, then read it forwards.
                let mut back = Vec::new();
                let mut cur = v;
                while cur != start {
                    back.push(cur);
                    cur = parent[&cur];
                }
                let mut path = vec![start];
                path.extend(back.into_iter().rev());
                path.push(start);
                return path;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = parent.entry(w) {
                e.insert(v);
                queue.push_back(w);
            }
        }
    }
    vec![start, start]
}

#[cfg(test)]
mod tests {
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
}
