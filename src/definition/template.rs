//! Templates inside workflow definitions.
//!
//! Any JSON value in a template position (a task's `input`, an HTTP body, a
//! `value` step, the workflow `output`, ...) may contain `${expr}` parts in its
//! strings:
//!
//! - a string that is exactly `${expr}` (spaces inside the braces are
//!   ignored) becomes the JSON value of `expr`, keeping its type;
//! - otherwise every `${expr}` in the string is replaced by text: strings as
//!   they are, null or missing values as the empty string, anything else as
//!   compact JSON;
//! - objects and arrays are rendered recursively (keys are never templated);
//!   numbers, booleans and null pass through unchanged.
//!
//! `expr` is a dotted path. Roots: `input`, `steps.<id>.output`,
//! `instance.id`, `item`, `index`. After the root every segment
//! (`[A-Za-z0-9_-]+`) is an object key or, when it is all digits and the
//! value is an array, an array index. Anything missing evaluates to null.
//! There is no escape syntax: `$${` is not special.

use serde_json::Value;

use crate::definition::model::Problem;

/// What a template can see while it is rendered.
pub(crate) struct Scope<'a> {
    /// The instance input.
    pub input: &'a Value,
    /// The instance id (`${instance.id}`).
    pub instance_id: &'a str,
    /// Output of finished steps by step id (skipped steps map to Null;
    /// unfinished steps are absent). With a `HashMap<String, Value>` of
    /// outputs: `step_outputs: &|id: &str| outputs.get(id)`.
    pub step_outputs: &'a dyn Fn(&str) -> Option<&'a Value>,
    /// The current element of a `for_each` step (`${item}`).
    pub item: Option<&'a Value>,
    /// The current index of a `for_each` step (`${index}`).
    pub index: Option<usize>,
}

/// Renders a template against `scope`. Never fails: anything that cannot be
/// resolved (missing keys, unfinished steps, malformed expressions that
/// validation would have rejected) evaluates to null, and an unterminated
/// `${` is kept as literal text.
pub(crate) fn render(template: &Value, scope: &Scope<'_>) -> Value {
    match template {
        Value::String(s) => render_string(s, scope),
        Value::Array(items) => Value::Array(items.iter().map(|v| render(v, scope)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), render(v, scope)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// True when a rendered `when` value means "skip": null or false (a missing
/// value renders to null). Everything else, including `0` and `""`, runs.
pub(crate) fn is_falsy(v: &Value) -> bool {
    matches!(v, Value::Null | Value::Bool(false))
}

/// One reference made by a template expression (parsed, for validation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ref {
    /// `${input...}` with the path after `input`.
    Input(Vec<String>),
    /// `${steps.<step>.output...}` with the path after `output`.
    StepOutput { step: String, path: Vec<String> },
    /// `${instance.id}`.
    InstanceId,
    /// `${item...}` with the path after `item`.
    Item(Vec<String>),
    /// `${index}`.
    Index,
}

/// Every reference in a template (walking objects and arrays), or the
/// problems found: bad `${` syntax, an unknown root, `steps.X` not followed
/// by `.output`, `instance.` other than `id`. Problem paths extend
/// `base_path` (e.g. `$.steps[1].http.body.amount`).
pub(crate) fn references(template: &Value, base_path: &str) -> Result<Vec<Ref>, Vec<Problem>> {
    let mut refs = Vec::new();
    let mut problems = Vec::new();
    for found in scan(template, base_path) {
        match found {
            Ok((r, _)) => refs.push(r),
            Err(p) => problems.push(p),
        }
    }
    if problems.is_empty() {
        Ok(refs)
    } else {
        Err(problems)
    }
}

/// Like [`references`], but returns references (each with the path of the
/// string it appears in) and problems interleaved in document order, so a
/// caller can report everything at once.
pub(crate) fn scan(template: &Value, base_path: &str) -> Vec<Result<(Ref, String), Problem>> {
    let mut out = Vec::new();
    scan_into(template, base_path, &mut out);
    out
}

fn scan_into(template: &Value, path: &str, out: &mut Vec<Result<(Ref, String), Problem>>) {
    match template {
        Value::String(s) => {
            for part in split(s) {
                match part {
                    Part::Text(_) => {}
                    Part::Expr(e) => out.push(match parse_expr(e) {
                        Ok(r) => Ok((r, path.to_string())),
                        Err(msg) => Err(Problem {
                            path: path.to_string(),
                            message: format!("in template ${{{e}}}: {msg}"),
                        }),
                    }),
                    Part::Unterminated(_) => out.push(Err(Problem {
                        path: path.to_string(),
                        message: "unterminated template: `${` has no closing `}`".to_string(),
                    })),
                }
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                scan_into(v, &index_path(path, i), out);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                scan_into(v, &key_path(path, k), out);
            }
        }
        _ => {}
    }
}

/// `base` extended by an object key: `.key`, or `["key"]` when the key is not
/// a plain identifier.
pub(crate) fn key_path(base: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && !key.as_bytes()[0].is_ascii_digit()
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if plain {
        format!("{base}.{key}")
    } else {
        format!("{base}[{}]", Value::String(key.to_string()))
    }
}

/// `base` extended by an array index: `[i]`.
pub(crate) fn index_path(base: &str, i: usize) -> String {
    format!("{base}[{i}]")
}

/// True when the string contains template syntax (`${`).
pub(crate) fn has_template(s: &str) -> bool {
    s.contains("${")
}

/// When `s` is exactly one `${expr}`, the trimmed expression.
pub(crate) fn exact_expr(s: &str) -> Option<&str> {
    let inner = s.strip_prefix("${")?.strip_suffix('}')?;
    if inner.contains('}') {
        return None;
    }
    Some(inner.trim())
}

enum Part<'s> {
    Text(&'s str),
    /// Trimmed expression between `${` and `}`.
    Expr(&'s str),
    /// `${` without a closing brace; the text from `${` to the end.
    Unterminated(&'s str),
}

fn split(s: &str) -> Vec<Part<'_>> {
    let mut parts = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        if start > 0 {
            parts.push(Part::Text(&rest[..start]));
        }
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) => {
                parts.push(Part::Expr(after[..end].trim()));
                rest = &after[end + 1..];
            }
            None => {
                parts.push(Part::Unterminated(&rest[start..]));
                rest = "";
            }
        }
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest));
    }
    parts
}

const ROOTS: &str = "`input`, `steps.<id>.output`, `instance.id`, `item` or `index`";

fn parse_expr(expr: &str) -> Result<Ref, String> {
    if expr.is_empty() {
        return Err(format!(
            "empty expression; expected a path starting with {ROOTS}"
        ));
    }
    let segments: Vec<&str> = expr.split('.').collect();
    for seg in &segments {
        if seg.is_empty() {
            return Err("empty path segment (paths look like `input.order.id`)".to_string());
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!(
                "invalid path segment `{seg}`: segments are made of letters, digits, `_` and `-` \
                 and separated by `.` (array elements are `list.0`)"
            ));
        }
    }
    let rest = |from: usize| segments[from..].iter().map(|s| s.to_string()).collect();
    match segments[0] {
        "input" => Ok(Ref::Input(rest(1))),
        "item" => Ok(Ref::Item(rest(1))),
        "index" if segments.len() == 1 => Ok(Ref::Index),
        "index" => Err("`index` is a number and has no fields".to_string()),
        "instance" if segments.len() == 2 && segments[1] == "id" => Ok(Ref::InstanceId),
        "instance" => Err("the only instance field is `instance.id`".to_string()),
        "steps" if segments.len() >= 3 && segments[2] == "output" => Ok(Ref::StepOutput {
            step: segments[1].to_string(),
            path: rest(3),
        }),
        "steps" if segments.len() >= 2 => Err(format!(
            "a step is referenced as `steps.{}.output` (optionally followed by a path)",
            segments[1]
        )),
        "steps" => Err("a step is referenced as `steps.<id>.output`".to_string()),
        other => Err(format!("unknown root `{other}`; expected {ROOTS}")),
    }
}

fn render_string(s: &str, scope: &Scope<'_>) -> Value {
    if let Some(expr) = exact_expr(s) {
        return eval(expr, scope);
    }
    if !has_template(s) {
        return Value::String(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    for part in split(s) {
        match part {
            Part::Text(t) | Part::Unterminated(t) => out.push_str(t),
            Part::Expr(e) => out.push_str(&as_text(&eval(e, scope))),
        }
    }
    Value::String(out)
}

/// The text a value interpolates as: a string as it is, null as nothing,
/// anything else as its JSON.
pub(crate) fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A value's JSON type with its article, for messages ("an array").
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn eval(expr: &str, scope: &Scope<'_>) -> Value {
    let Ok(r) = parse_expr(expr) else {
        return Value::Null;
    };
    match r {
        Ref::Input(path) => lookup(Some(scope.input), &path),
        Ref::StepOutput { step, path } => lookup((scope.step_outputs)(&step), &path),
        Ref::InstanceId => Value::String(scope.instance_id.to_string()),
        Ref::Item(path) => lookup(scope.item, &path),
        Ref::Index => scope.index.map_or(Value::Null, Value::from),
    }
}

fn lookup(root: Option<&Value>, path: &[String]) -> Value {
    let mut cur = match root {
        Some(v) => v,
        None => return Value::Null,
    };
    for seg in path {
        let next = match cur {
            Value::Object(map) => map.get(seg.as_str()),
            Value::Array(items) if seg.bytes().all(|b| b.is_ascii_digit()) => {
                seg.parse::<usize>().ok().and_then(|i| items.get(i))
            }
            _ => None,
        };
        match next {
            Some(v) => cur = v,
            None => return Value::Null,
        }
    }
    cur.clone()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::json;

    use super::*;

    fn with_scope<R>(f: impl FnOnce(&Scope<'_>) -> R) -> R {
        let input = json!({
            "amount": 42,
            "name": "ada",
            "flag": true,
            "nothing": null,
            "list": [10, {"x": "deep"}, [1, 2]],
            "obj": {"a": 1, "b": [true]},
            "7": "seven",
            "with-dash": "d",
        });
        let mut outputs: HashMap<String, Value> = HashMap::new();
        outputs.insert("reserve".into(), json!({"id": "r-1", "n": 3}));
        outputs.insert("skipped".into(), Value::Null);
        let item = json!({"sku": "a1", "qty": 2});
        let lookup = |id: &str| outputs.get(id);
        let scope = Scope {
            input: &input,
            instance_id: "inst-1",
            step_outputs: &lookup,
            item: Some(&item),
            index: Some(4),
        };
        f(&scope)
    }

    fn r(t: Value) -> Value {
        with_scope(|s| render(&t, s))
    }

    #[test]
    fn exact_keeps_type() {
        assert_eq!(r(json!("${input.amount}")), json!(42));
        assert_eq!(r(json!("${input.flag}")), json!(true));
        assert_eq!(r(json!("${input.obj}")), json!({"a": 1, "b": [true]}));
        assert_eq!(
            r(json!("${input}"))["list"],
            json!([10, {"x": "deep"}, [1, 2]])
        );
        assert_eq!(r(json!("${ input.amount }")), json!(42));
        assert_eq!(
            r(json!("${steps.reserve.output}")),
            json!({"id": "r-1", "n": 3})
        );
        assert_eq!(r(json!("${steps.reserve.output.n}")), json!(3));
        assert_eq!(r(json!("${instance.id}")), json!("inst-1"));
        assert_eq!(r(json!("${index}")), json!(4));
        assert_eq!(r(json!("${item}")), json!({"sku": "a1", "qty": 2}));
        assert_eq!(r(json!("${item.qty}")), json!(2));
    }

    #[test]
    fn missing_is_null() {
        assert_eq!(r(json!("${input.nope}")), Value::Null);
        assert_eq!(r(json!("${input.amount.deeper}")), Value::Null);
        assert_eq!(r(json!("${input.nothing}")), Value::Null);
        assert_eq!(r(json!("${steps.unfinished.output}")), Value::Null);
        assert_eq!(r(json!("${steps.skipped.output}")), Value::Null);
        assert_eq!(r(json!("${steps.skipped.output.x}")), Value::Null);
        assert_eq!(r(json!("${input.list.9}")), Value::Null);
        assert_eq!(r(json!("${input.list.x}")), Value::Null);
        // Malformed expressions (rejected by validation) are null, not a panic.
        assert_eq!(r(json!("${bogus}")), Value::Null);
        assert_eq!(r(json!("${}")), Value::Null);
    }

    #[test]
    fn array_index_and_digit_keys() {
        assert_eq!(r(json!("${input.list.0}")), json!(10));
        assert_eq!(r(json!("${input.list.1.x}")), json!("deep"));
        assert_eq!(r(json!("${input.list.2.1}")), json!(2));
        // An all-digit segment on an object is a key lookup.
        assert_eq!(r(json!("${input.7}")), json!("seven"));
        assert_eq!(r(json!("${input.with-dash}")), json!("d"));
    }

    #[test]
    fn interpolation() {
        assert_eq!(
            r(json!("order ${input.name} x${input.amount}")),
            json!("order ada x42")
        );
        assert_eq!(r(json!("[${input.nothing}][${input.nope}]")), json!("[][]"));
        assert_eq!(r(json!("o=${input.obj}")), json!(r#"o={"a":1,"b":[true]}"#));
        assert_eq!(r(json!("${input.flag}!")), json!("true!"));
        assert_eq!(r(json!(" ${input.amount}")), json!(" 42"));
        assert_eq!(r(json!("${input.name}${input.amount}")), json!("ada42"));
        assert_eq!(r(json!("#${index}: ${item.sku}")), json!("#4: a1"));
        assert_eq!(
            r(json!("http://x/${steps.reserve.output.id}/${instance.id}")),
            json!("http://x/r-1/inst-1")
        );
    }

    #[test]
    fn plain_and_odd_strings_pass_through() {
        assert_eq!(r(json!("plain")), json!("plain"));
        assert_eq!(r(json!("costs $5 {x}")), json!("costs $5 {x}"));
        assert_eq!(r(json!("$${input.name}")), json!("$ada"));
        assert_eq!(r(json!("open ${input.name")), json!("open ${input.name"));
        assert_eq!(r(json!("")), json!(""));
    }

    #[test]
    fn nested_structures() {
        let t = json!({
            "amount": "${input.amount}",
            "${input.name}": "key not templated",
            "lines": ["${item}", {"i": "${index}"}, 5, null, false],
            "msg": "hi ${input.name}",
        });
        assert_eq!(
            r(t),
            json!({
                "amount": 42,
                "${input.name}": "key not templated",
                "lines": [{"sku": "a1", "qty": 2}, {"i": 4}, 5, null, false],
                "msg": "hi ada",
            })
        );
        assert_eq!(r(json!(1.5)), json!(1.5));
        assert_eq!(r(json!(null)), json!(null));
        assert_eq!(r(json!(true)), json!(true));
    }

    #[test]
    fn no_item_or_index_outside_for_each() {
        let input = json!({});
        let none = |_: &str| None;
        let scope = Scope {
            input: &input,
            instance_id: "i",
            step_outputs: &none,
            item: None,
            index: None,
        };
        assert_eq!(render(&json!("${item}"), &scope), Value::Null);
        assert_eq!(render(&json!("${index}"), &scope), Value::Null);
        assert_eq!(render(&json!("<${index}>"), &scope), json!("<>"));
    }

    #[test]
    fn falsy() {
        assert!(is_falsy(&Value::Null));
        assert!(is_falsy(&json!(false)));
        assert!(!is_falsy(&json!(true)));
        assert!(!is_falsy(&json!(0)));
        assert!(!is_falsy(&json!("")));
        assert!(!is_falsy(&json!([])));
        assert!(with_scope(|s| is_falsy(&render(
            &json!("${input.nope}"),
            s
        ))));
    }

    #[test]
    fn references_found() {
        let t = json!({
            "a": "${input.x.0}",
            "b": ["${steps.s1.output}", "x ${steps.s2.output.y.z} ${instance.id}"],
            "c": "${item.k}-${index}",
            "d": "${input}",
            "e": 3,
        });
        assert_eq!(
            references(&t, "$.v").unwrap(),
            vec![
                Ref::Input(vec!["x".into(), "0".into()]),
                Ref::StepOutput {
                    step: "s1".into(),
                    path: vec![]
                },
                Ref::StepOutput {
                    step: "s2".into(),
                    path: vec!["y".into(), "z".into()]
                },
                Ref::InstanceId,
                Ref::Item(vec!["k".into()]),
                Ref::Index,
                Ref::Input(vec![]),
            ]
        );
        assert_eq!(references(&json!("no refs"), "$").unwrap(), vec![]);
        assert_eq!(
            references(&json!("$${input}"), "$").unwrap(),
            vec![Ref::Input(vec![])]
        );
    }

    fn problem_paths(t: Value) -> Vec<(String, String)> {
        references(&t, "$.steps[1].http.body")
            .unwrap_err()
            .into_iter()
            .map(|p| (p.path, p.message))
            .collect()
    }

    #[test]
    fn reference_problems() {
        let cases = [
            ("${foo}", "unknown root `foo`"),
            ("${}", "empty expression"),
            ("${ }", "empty expression"),
            ("${input..a}", "empty path segment"),
            ("${input.}", "empty path segment"),
            ("${input.a b}", "invalid path segment `a b`"),
            ("${input[0]}", "invalid path segment `input[0]`"),
            ("${steps.a}", "steps.a.output"),
            ("${steps}", "steps.<id>.output"),
            ("${steps.a.error}", "steps.a.output"),
            ("${instance}", "instance.id"),
            ("${instance.name}", "instance.id"),
            ("${instance.id.x}", "instance.id"),
            ("${index.x}", "has no fields"),
            ("abc ${input", "unterminated"),
            ("${a${b}", "invalid path segment"),
        ];
        for (t, want) in cases {
            let ps = problem_paths(json!(t));
            assert_eq!(ps.len(), 1, "{t}: {ps:?}");
            assert_eq!(ps[0].0, "$.steps[1].http.body", "{t}");
            assert!(ps[0].1.contains(want), "{t}: {}", ps[0].1);
        }
    }

    #[test]
    fn reference_problem_paths_in_structures() {
        let ps = problem_paths(json!({
            "amount": "${nope.x}",
            "items": [1, "${input}", "${bad}"],
            "Content-Type": "${x",
            "ok": "${input.a}",
        }));
        let mut paths: Vec<&str> = ps.iter().map(|p| p.0.as_str()).collect();
        // Map order depends on serde_json's `preserve_order` feature.
        paths.sort();
        assert_eq!(
            paths,
            vec![
                "$.steps[1].http.body.amount",
                "$.steps[1].http.body.items[2]",
                "$.steps[1].http.body[\"Content-Type\"]",
            ]
        );
    }

    #[test]
    fn exact_detection() {
        assert_eq!(exact_expr("${input}"), Some("input"));
        assert_eq!(exact_expr("${ input.a }"), Some("input.a"));
        assert_eq!(exact_expr("${a}${b}"), None);
        assert_eq!(exact_expr(" ${a}"), None);
        assert_eq!(exact_expr("${a"), None);
        assert_eq!(r(json!("${input.amount}${input.amount}")), json!("4242"));
    }
}
