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

mod graph;

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value};

use crate::definition::duration::{format_duration_ms, parse_duration_ms};
use crate::definition::model::{
    Compensation, CompensationAction, Concurrency, Definition, ForEach, HttpCall, Limits,
    OnFailure, Problem, RetryPolicy, SleepSpec, Step, StepKind,
};
use crate::definition::template::{self, type_name, Ref};
use graph::{shortest_cycle, strongly_connected};

const TOP_LEVEL_KEYS: &[&str] = &[
    "name",
    "description",
    "steps",
    "output",
    "timeout",
    "retry",
    "retention",
    "concurrency",
];
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
        // "0s" keeps this workflow's instances for ever, as `--retention 0`.
        let retention_ms = obj
            .get("retention")
            .and_then(|t| self.duration(t, "$.retention", false));
        let retry = match obj.get("retry") {
            Some(r) => {
                let patch = self.retry_patch(r, "$.retry");
                self.merge_retry(&RetryPolicy::default(), &patch, "$.retry", "the default")
            }
            None => RetryPolicy::default(),
        };

        let steps = self.steps(obj.get("steps"), limits, &retry);
        let concurrency = obj
            .get("concurrency")
            .and_then(|c| self.concurrency(c, "$.concurrency"));

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
            retention_ms,
            retry,
            concurrency,
        })
    }

    /// `{"key": "${input.customer}", "limit": 2}`: the key a template over
    /// the input and the instance id only (it is rendered before any step
    /// runs), the limit 1 to 10000.
    fn concurrency(&mut self, v: &Value, path: &str) -> Option<Concurrency> {
        let Some(obj) = v.as_object() else {
            self.type_problem(path, "an object {\"key\": ..., \"limit\": N}", v);
            return None;
        };
        self.unknown_keys(obj, path, &["key", "limit"], "a concurrency limit");
        let key_path = format!("{path}.key");
        let key = match obj.get("key") {
            None => {
                self.problem(
                    &key_path,
                    "required: a template such as \"${input.customer}\"",
                );
                None
            }
            Some(k) => {
                let before = self.problems.len();
                self.expect_str(k, &key_path);
                for found in template::scan(k, &key_path) {
                    match found {
                        Err(p) => self.problems.push(p),
                        Ok((Ref::Input(_) | Ref::InstanceId, _)) => {}
                        Ok((_, ref_path)) => self.problem(
                            ref_path,
                            "a concurrency key may use only ${input...} and ${instance.id}: \
                             it is rendered before any step runs",
                        ),
                    }
                }
                (self.problems.len() == before).then(|| k.clone())
            }
        };
        let limit_path = format!("{path}.limit");
        let limit = match obj.get("limit") {
            None => {
                self.problem(&limit_path, "required: an integer from 1 to 10000");
                None
            }
            Some(l) => self.integer(l, &limit_path, 1, 10_000),
        };
        Some(Concurrency {
            key: key?,
            limit: limit? as u32,
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

        let (retry, timeout_ms) = self.retry_and_timeout(obj, &path, wf_retry);

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
        let (retry, timeout_ms) = self.retry_and_timeout(obj, path, wf_retry);
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

    /// A step's (or a compensation's) `retry`, merged over the workflow's,
    /// and its per-attempt `timeout`.
    fn retry_and_timeout(
        &mut self,
        obj: &Map<String, Value>,
        path: &str,
        wf_retry: &RetryPolicy,
    ) -> (RetryPolicy, Option<u64>) {
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
        (retry, timeout_ms)
    }

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

#[cfg(test)]
mod tests;
