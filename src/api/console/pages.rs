//! The console's pages. Each handler reads what it shows through the store
//! (bounded by a limit of its own) and renders it with `view`.

use std::collections::BTreeMap;

use axum::extract::{Extension, State};
use axum::http::StatusCode;
use maud::{html, Markup};

use super::graph::{self, Node};
use super::timeline::{self, Attempt};
use super::view::{self, badge, between, json, path_part, query, span_of, time, Frame, Nav};
use super::{PageError, PageResult, Session};
use crate::api::extract::{check_id, ApiPath, QueryParams};
use crate::api::instances::{instance_filter, next_cursor, shown_status, LIST_PARAMS};
use crate::api::AppState;
use crate::auth::Need;
use crate::definition::{Definition, StepKind};
use crate::engine::child_id;
use crate::model::{InstanceStatus, StepStatus, Vocabulary};
use crate::store::{InstanceBrief, InstanceRecord, StepRecord};

/// Counts per status cover at most this many of the newest matching
/// instances (a count is a scan).
const COUNT_SCAN: i64 = 10_000;
/// Longest the list may spend counting per status.
const COUNT_TIMEOUT_MS: u64 = 2_000;
/// History events one instance page shows.
const HISTORY_SHOWN: i32 = 1_000;
/// Leases, pending signals and children one instance page shows.
const INSTANCE_ROWS: i64 = 1_000;
/// Leased tasks the queues page lists.
const LEASES_SHOWN: i64 = 200;
/// Workflows the pages list.
const WORKFLOWS_LISTED: i64 = 10_000;
/// Longest the workflows pages may spend counting instances not ended (a
/// scan of every instance); past it they say so instead.
const UNENDED_COUNT_TIMEOUT_MS: u64 = 2_000;
/// Slots per row of the cluster's slot map.
const SLOTS_ACROSS: i32 = 32;

/// The parameters a page takes beside its filter: what the last form did.
const NOTICE_PARAMS: &[&str] = &["notice", "done", "refused"];

fn frame<'a>(
    state: &AppState,
    session: &'a Session,
    nav: Nav,
    title: String,
    grafana: Option<(u32, &[(&str, &str)])>,
) -> Frame<'a> {
    Frame {
        title,
        nav,
        session,
        grafana: grafana.and_then(|(panel, vars)| grafana_link(state, panel, vars)),
        live: true,
    }
}

/// The panel `panel` of the stead dashboard (`grafana/dashboards`), with
/// its variables set.
fn grafana_link(state: &AppState, panel: u32, vars: &[(&str, &str)]) -> Option<String> {
    let base = state.inner.grafana_url.as_deref()?.trim_end_matches('/');
    let mut pairs = vec![("viewPanel".to_string(), panel.to_string())];
    pairs.extend(
        vars.iter()
            .map(|(k, v)| (format!("var-{k}"), v.to_string())),
    );
    let pairs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    Some(format!("{base}/d/stead/stead?{}", query(&pairs)))
}

fn may_operate(session: &Session) -> bool {
    session.caller.role.may(Need::Operate)
}

// ---- instances ---------------------------------------------------------

/// `GET /`: the instances, filtered, counted per status, paged by cursor,
/// with bulk cancel and retry of the selected rows.
pub(crate) async fn instances(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    query_params: QueryParams,
) -> PageResult<(StatusCode, Markup)> {
    // A form sends its empty fields: they are no filter.
    let given: Vec<(String, String)> = query_params
        .0
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .collect();
    let params = QueryParams(
        given
            .iter()
            .filter(|(k, _)| !NOTICE_PARAMS.contains(&k.as_str()))
            .cloned()
            .collect(),
    );
    let notices = QueryParams(given.clone());
    let store = &state.inner.store;
    let mut workflows: Vec<String> = store
        .workflow_versions(None, WORKFLOWS_LISTED)
        .await?
        .into_iter()
        .map(|v| v.workflow)
        .collect();
    workflows.dedup();
    let checked = params
        .only(LIST_PARAMS)
        .and_then(|()| instance_filter(&params, state.inner.limits.max_page));
    let (filter, problem) = match checked {
        Ok(filter) => (Some(filter), None),
        Err(e) => (None, Some(e.detail)),
    };
    let (rows, counts) = match &filter {
        Some(f) => (
            store.list_instance_briefs(f).await?,
            store
                .count_instances(f, COUNT_SCAN, COUNT_TIMEOUT_MS)
                .await?,
        ),
        None => (Vec::new(), Some(Vec::new())),
    };
    let last = rows.last().map(|r| (r.created_at, r.id.as_str()));
    let next = filter
        .as_ref()
        .and_then(|f| next_cursor(f, rows.len(), last));
    let get = |k: &str| params.get(k).unwrap_or("");
    let workflow = get("workflow");
    let f = frame(
        &state,
        &session,
        Nav::Instances,
        "Instances".into(),
        Some((
            3,
            &[(
                "workflow",
                if workflow.is_empty() {
                    "$__all"
                } else {
                    workflow
                },
            )],
        )),
    );
    // The page itself, without its cursor: where a bulk action comes back.
    let filters: Vec<(&str, &str)> = LIST_PARAMS
        .iter()
        .filter(|k| **k != "cursor")
        .map(|k| (*k, get(k)))
        .collect();
    let here = query(&filters);
    let next_link = next.map(|c| {
        let mut pairs = filters.clone();
        pairs.push(("cursor", c.as_str()));
        list_url(&pairs)
    });
    let body = html! {
        (view::notice(notices.get("notice"), notices.get("done"), notices.get("refused")))
        (filter_form(&params, &workflows.iter().map(String::as_str).collect::<Vec<_>>()))
        @if let Some(p) = &problem {
            p.error role="alert" { (p) }
        }
        (status_counts(counts.as_deref(), &params))
        @if rows.is_empty() {
            p.empty { "No instances match." }
        } @else {
            (instance_table(&rows, &session, &here))
        }
        nav.pager aria-label="Pages" {
            @if params.get("cursor").is_some() {
                a href=(list_url(&filters)) { "← First page" }
            }
            @if let Some(link) = &next_link {
                a href=(link) rel="next" { "Next page →" }
            }
        }
    };
    let status = if problem.is_some() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    Ok((status, view::page(&f, body)))
}

/// The list with these parameters (the empty ones left out).
fn list_url(pairs: &[(&str, &str)]) -> String {
    match query(pairs) {
        q if q.is_empty() => "/".to_string(),
        q => format!("/?{q}"),
    }
}

fn filter_form(params: &QueryParams, workflows: &[&str]) -> Markup {
    let get = |k: &str| params.get(k).unwrap_or("");
    html! {
        form.filters method="get" action="/" role="search" aria-label="Filter instances" {
            div {
                label for="f-workflow" { "Workflow" }
                select #f-workflow name="workflow" {
                    option value="" { "any" }
                    @for w in workflows {
                        option value=(w) selected[get("workflow") == *w] { (w) }
                    }
                }
            }
            div {
                label for="f-status" { "Status" }
                select #f-status name="status" {
                    option value="" { "any" }
                    @for s in InstanceStatus::ALL {
                        option value=(s.as_str()) selected[get("status") == s.as_str()] { (s.as_str()) }
                    }
                }
            }
            div {
                label for="f-after" { "Created from (UTC)" }
                input #f-after type="datetime-local" name="created_after" step="1"
                    value=(get("created_after"));
            }
            div {
                label for="f-before" { "Created before (UTC)" }
                input #f-before type="datetime-local" name="created_before" step="1"
                    value=(get("created_before"));
            }
            div {
                label for="f-prefix" { "Id prefix" }
                input #f-prefix type="text" name="id_prefix" value=(get("id_prefix"))
                    spellcheck="false" autocomplete="off";
            }
            div.buttons {
                button type="submit" { "Filter" }
                a href="/" { "Clear" }
            }
        }
    }
}

fn status_counts(counts: Option<&[(InstanceStatus, i64)]>, params: &QueryParams) -> Markup {
    let Some(counts) = counts else {
        return html! { p.hint { "Counts not taken: they took over 2 s (narrow the filter, e.g. by creation time)." } };
    };
    let total: i64 = counts.iter().map(|(_, n)| n).sum();
    let of = |s: InstanceStatus| counts.iter().find(|(c, _)| *c == s).map_or(0, |(_, n)| *n);
    let link = |status: &str| {
        let pairs: Vec<(&str, &str)> = LIST_PARAMS
            .iter()
            .filter(|k| !matches!(**k, "cursor" | "status"))
            .map(|k| (*k, params.get(k).unwrap_or("")))
            .chain(std::iter::once(("status", status)))
            .collect();
        list_url(&pairs)
    };
    let current = params.get("status").unwrap_or("");
    html! {
        ul.counts aria-label="Instances per status" {
            li { a href=(link("")) aria-current=[current.is_empty().then_some("true")] {
                "all " strong { (total) } } }
            @for s in InstanceStatus::ALL {
                li { a href=(link(s.as_str())) class=(format!("st-{s}"))
                    aria-current=[(current == s.as_str()).then_some("true")] {
                    (s.as_str()) " " strong data-count=(s.as_str()) { (of(*s)) } } }
            }
        }
        @if total >= COUNT_SCAN {
            p.hint { "Counts cover the newest " (COUNT_SCAN) " matching instances." }
        }
    }
}

fn instance_table(rows: &[InstanceBrief], session: &Session, here: &str) -> Markup {
    let operate = may_operate(session);
    html! {
        form #bulk method="post" action="/" {
            (view::token(session))
            input type="hidden" name="back" value=(here);
            @if operate {
                div.bulk role="group" aria-label="With the selected instances" {
                    button type="submit" name="action" value="cancel" { "Cancel selected" }
                    button type="submit" name="action" value="retry" { "Retry selected" }
                }
            }
            div.scroll {
                table.instances {
                    caption.sr-only { "Instances, newest first" }
                    thead { tr {
                        @if operate {
                            th scope="col" { input #select-all type="checkbox" aria-label="Select all"; }
                        }
                        th scope="col" { "Id" }
                        th scope="col" { "Workflow" }
                        th scope="col" { "Status" }
                        th scope="col" { "Created" }
                        th scope="col" { "Updated" }
                        th scope="col" { "Took" }
                    } }
                    tbody {
                        @for r in rows {
                            tr data-id=(r.id) {
                                @if operate {
                                    td { input type="checkbox" name="id" value=(r.id)
                                        aria-label=(format!("Select {}", r.id)); }
                                }
                                td.id { a href=(format!("/instances/{}", path_part(&r.id))) { (r.id) } }
                                td { (r.workflow_name) " " span.version { "v" (r.workflow_version) } }
                                td { (badge(r.status.as_str())) }
                                td { (time(Some(r.created_at))) }
                                td { (time(Some(r.updated_at))) }
                                td { (between(Some(r.created_at), r.ended_at)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

// ---- one instance ------------------------------------------------------

/// `GET /instances/{id}`: status, input, output, error, the step graph, the
/// steps, the attempts, pending signals, children, history, and actions.
pub(crate) async fn instance(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    ApiPath(id): ApiPath<String>,
    params: QueryParams,
) -> PageResult<Markup> {
    check_id("id", &id)?;
    let store = &state.inner.store;
    let (record, steps) = store
        .get_instance_with_steps(&id)
        .await?
        .ok_or_else(|| PageError::not_found(format!("instance {id:?} does not exist")))?;
    let def = state
        .inner
        .definitions
        .get(store, &record.workflow_name, record.workflow_version)
        .await?;
    let events = store.history_head(&id, HISTORY_SHOWN).await?;
    let leases = store.instance_leases(&id, INSTANCE_ROWS).await?;
    let signals = store.pending_signals(&id, INSTANCE_ROWS).await?;
    let children = store.children(&id, INSTANCE_ROWS).await?;
    let attempts = timeline::attempts(&events, &leases);
    let f = frame(
        &state,
        &session,
        Nav::Instances,
        format!("Instance {id}"),
        Some((7, &[("workflow", record.workflow_name.as_str())])),
    );
    let whole = format!("GET /v1/instances/{id}");
    let body = html! {
        (view::notice(params.get("notice"), None, None))
        (summary(&record))
        @if may_operate(&session) {
            (actions(&record, &session))
        }
        section aria-labelledby="h-graph" {
            h2 #h-graph { "Steps" }
            @if let Some(def) = &def {
                div.scroll.graph-box {
                    (graph::svg(&instance_nodes(def, &record.id, &steps), "The step graph, each step coloured by its status"))
                }
                (legend())
            }
            (step_table(def.as_deref(), &record.id, &steps))
        }
        section.values aria-labelledby="h-values" {
            h2 #h-values { "Input, output, error" }
            h3 { "Input" } (json("input", Some(&record.input), &whole))
            h3 { "Output" } (json("output", record.output.as_ref(), &whole))
            h3 { "Error" } (json("error", record.error.as_ref(), &whole))
        }
        section aria-labelledby="h-attempts" {
            h2 #h-attempts { "Attempts" }
            (attempt_table(&attempts))
        }
        section aria-labelledby="h-signals" {
            h2 #h-signals { "Pending signals" }
            @if signals.is_empty() {
                p.empty { "None: every signal sent has been taken by a step." }
            } @else {
                div.scroll { table {
                    thead { tr { th scope="col" { "Id" } th scope="col" { "Name" } th scope="col" { "Sent" } th scope="col" { "Payload" } } }
                    tbody { @for s in &signals { tr {
                        td { (s.id) } td { (s.name) } td { (time(Some(s.created_at))) }
                        td { (view::json_cell("payload", Some(&s.payload), &whole)) }
                    } } }
                } }
            }
        }
        @if !children.is_empty() {
            section aria-labelledby="h-children" {
                h2 #h-children { "Children" }
                ul.children { @for (child, status) in &children {
                    li { a href=(format!("/instances/{}", path_part(child))) { (child) } " " (badge(status.as_str())) }
                } }
            }
        }
        section aria-labelledby="h-history" {
            h2 #h-history { "History" }
            (history_table(&id, &events))
            @if events.len() as i32 >= HISTORY_SHOWN {
                p.hint { "The first " (HISTORY_SHOWN) " events; "
                    code { "GET /v1/instances/" (id) "/history" } " has them all." }
            }
        }
    };
    Ok(view::page(&f, body))
}

fn summary(r: &InstanceRecord) -> Markup {
    html! {
        dl.summary {
            div { dt { "Status" } dd { (badge(r.status.as_str())) } }
            @if let Some(held) = r.held {
                div { dt { "Held" } dd { (match held {
                    crate::model::HeldReason::Paused => "its workflow is paused",
                    crate::model::HeldReason::Concurrency => "its concurrency key is at the limit",
                }) } }
            }
            div { dt { "Workflow" } dd {
                a href=(format!("/workflows/{}?{}", path_part(&r.workflow_name), query(&[("version", &r.workflow_version.to_string())]))) {
                    (r.workflow_name) " v" (r.workflow_version) } } }
            div { dt { "Created" } dd { (time(Some(r.created_at))) } }
            div { dt { "Started" } dd { (time(r.started_at)) } }
            div { dt { "Ended" } dd { (time(r.ended_at)) } }
            @if r.ended_at.is_some() {
                div { dt { "Took" } dd { (between(Some(r.created_at), r.ended_at)) } }
            }
            @if let Some(p) = &r.parent_id {
                div { dt { "Parent" } dd { a href=(format!("/instances/{}", path_part(p))) { (p) } } }
            }
        }
    }
}

fn actions(r: &InstanceRecord, session: &Session) -> Markup {
    let base = format!("/instances/{}", path_part(&r.id));
    let ended = r.status.is_terminal();
    // As the API: only a failed instance can be retried.
    let retryable = r.status == InstanceStatus::Failed;
    html! {
        section.actions aria-labelledby="h-actions" {
            h2 #h-actions { "Actions" }
            div.action-forms {
                @if !ended {
                    form method="post" action=(format!("{base}/cancel")) {
                        (view::token(session))
                        label for="cancel-reason" { "Reason (optional)" }
                        input #cancel-reason type="text" name="reason" maxlength="1000";
                        button.danger type="submit" { "Cancel instance" }
                    }
                    form method="post" action=(format!("{base}/signal")) {
                        (view::token(session))
                        label for="signal-name" { "Signal name" }
                        input #signal-name type="text" name="name" required spellcheck="false"
                            pattern="[A-Za-z0-9._:@\\-]{1,200}";
                        label for="signal-payload" { "Payload (JSON)" }
                        textarea #signal-payload name="payload" rows="3" spellcheck="false" { "null" }
                        button type="submit" { "Send signal" }
                    }
                }
                @if retryable {
                    form method="post" action=(format!("{base}/retry")) {
                        (view::token(session))
                        p { "Runs the failed steps again; completed steps keep their results." }
                        button type="submit" { "Retry instance" }
                    }
                }
                @if ended && !retryable {
                    p.empty { "Ended " (r.status.as_str()) ": nothing to act on." }
                }
            }
        }
    }
}

/// The graph's boxes: each step of the definition with its status, a note
/// (attempt, `for_each` progress) and, for a child workflow, its link.
fn instance_nodes(def: &Definition, instance: &str, steps: &[StepRecord]) -> Vec<Node> {
    def.steps
        .iter()
        .map(|d| {
            let record = steps.iter().find(|s| s.step.step_id == d.id);
            let status = record.map_or(StepStatus::Pending, |r| {
                shown_status(r.step.state.status, r.leased)
            });
            let note = record.and_then(|r| {
                let s = &r.step.state;
                match &s.items {
                    Some(items) => Some(format!(
                        "{}/{} done",
                        items.iter().filter(|i| i.status.is_ended()).count(),
                        items.len()
                    )),
                    None if s.attempt > 1 => Some(format!("attempt {}", s.attempt)),
                    None => None,
                }
            });
            let child = matches!(d.kind, StepKind::Workflow { .. })
                && d.for_each.is_none()
                && status != StepStatus::Pending;
            Node {
                id: d.id.clone(),
                kind: d.kind.name(),
                needs: d.needs.clone(),
                status,
                note,
                link: child
                    .then(|| format!("/instances/{}", path_part(&child_id(instance, &d.id, None)))),
            }
        })
        .collect()
}

fn legend() -> Markup {
    html! {
        ul.legend aria-label="Step colours" {
            @for s in StepStatus::ALL {
                li { (badge(s.as_str())) }
            }
        }
    }
}

fn step_table(def: Option<&Definition>, instance: &str, steps: &[StepRecord]) -> Markup {
    // The definition's order and every step, or (without it) what is stored.
    let ids: Vec<(String, &str, bool)> = match def {
        Some(def) => def
            .steps
            .iter()
            .map(|d| {
                (
                    d.id.clone(),
                    d.kind.name(),
                    matches!(d.kind, StepKind::Workflow { .. }),
                )
            })
            .collect(),
        None => steps
            .iter()
            .map(|s| (s.step.step_id.clone(), "", false))
            .collect(),
    };
    html! {
        div.scroll { table.steps {
            caption.sr-only { "Steps in definition order" }
            thead { tr {
                th scope="col" { "Step" } th scope="col" { "Kind" } th scope="col" { "Status" }
                th scope="col" { "Attempt" } th scope="col" { "Scheduled" } th scope="col" { "Started" }
                th scope="col" { "Ended" } th scope="col" { "Detail" }
            } }
            tbody {
                @for (id, kind, is_workflow) in &ids {
                    @let record = steps.iter().find(|s| &s.step.step_id == id);
                    @let state = record.map(|r| &r.step.state);
                    @let status = record.map_or(StepStatus::Pending, |r| shown_status(r.step.state.status, r.leased));
                    tr data-step=(id) data-status=(status.as_str()) {
                        th scope="row" { (id) }
                        td { (kind) }
                        td { (badge(status.as_str())) }
                        td { (state.map_or(0, |s| s.attempt)) }
                        td { (time(state.and_then(|s| s.scheduled_at))) }
                        td { (time(state.and_then(|s| s.started_at))) }
                        td { (time(state.and_then(|s| s.ended_at))) }
                        td { (step_detail(instance, id, *is_workflow, record)) }
                    }
                }
            }
        } }
    }
}

fn step_detail(
    instance: &str,
    step: &str,
    is_workflow: bool,
    record: Option<&StepRecord>,
) -> Markup {
    let Some(r) = record else {
        return html! {};
    };
    let s = &r.step.state;
    let whole = format!("GET /v1/instances/{instance}");
    html! {
        @if let Some(items) = &s.items {
            @let by = per_status(items.iter().map(|i| i.status));
            p.progress {
                progress max=(items.len()) value=(items.iter().filter(|i| i.status.is_ended()).count())
                    aria-label=(format!("{step}: elements ended")) {}
                " " @for (status, n) in &by { span { (n) " " (status) " " } }
            }
            @if is_workflow {
                details { summary { "Children (" (items.len()) ")" }
                    ul.children { @for (k, item) in items.iter().enumerate() {
                        @let child = child_id(instance, step, Some(k as u32));
                        li { a href=(format!("/instances/{}", path_part(&child))) { (child) } " " (badge(item.status.as_str())) }
                    } }
                }
            }
        } @else if is_workflow && s.status != StepStatus::Pending {
            @let child = child_id(instance, step, None);
            a href=(format!("/instances/{}", path_part(&child))) { "child " (child) }
        }
        @if let Some(w) = s.wake_at {
            p { "wakes " (time(Some(w))) }
        }
        @if let Some(e) = &s.error {
            (view::json_cell("error", Some(e), &whole))
        } @else if let Some(o) = &s.output {
            (view::json_cell("output", Some(o.value()), &whole))
        }
        @if let Some(c) = &s.compensation {
            p { "compensation " (badge(c.status.as_str())) " attempt " (c.attempt) }
        }
    }
}

/// How many of `statuses` are each status, in name order.
fn per_status(statuses: impl Iterator<Item = StepStatus>) -> BTreeMap<&'static str, usize> {
    let mut by = BTreeMap::new();
    for s in statuses {
        *by.entry(s.as_str()).or_default() += 1;
    }
    by
}

fn attempt_table(attempts: &[Attempt]) -> Markup {
    if attempts.is_empty() {
        return html! { p.empty { "No attempts yet." } };
    }
    html! {
        div.scroll { table.attempts {
            caption.sr-only { "Every attempt of every step, in the order scheduled" }
            thead { tr {
                th scope="col" { "Step" } th scope="col" { "Attempt" } th scope="col" { "Scheduled" }
                th scope="col" { "Started" } th scope="col" { "Ended" } th scope="col" { "Took" }
                th scope="col" { "Worker" } th scope="col" { "Outcome" }
            } }
            tbody { @for a in attempts { tr {
                th scope="row" {
                    (a.step_id)
                    @if let Some(k) = a.item { " [" (k) "]" }
                    @if a.compensation { " (compensation)" }
                    @if a.run > 0 { " (after retry " (a.run) ")" }
                }
                td { (a.attempt) }
                td { (time(a.scheduled_at)) }
                td { (time(a.started_at)) }
                td { (time(a.ended_at)) }
                td { (between(a.started_at, a.ended_at)) }
                td { (a.worker.as_deref().unwrap_or("—")) }
                td { (badge(a.outcome.as_str()))
                    @if let Some(e) = &a.error { " " span.error-text { (e) } } }
            } } }
        } }
    }
}

fn history_table(id: &str, events: &[crate::store::EventRecord]) -> Markup {
    let whole = format!("GET /v1/instances/{id}/history");
    html! {
        div.scroll { table.history {
            caption.sr-only { "History, oldest first" }
            thead { tr {
                th scope="col" { "#" } th scope="col" { "At" } th scope="col" { "Event" }
                th scope="col" { "Step" } th scope="col" { "Attempt" } th scope="col" { "Member" }
                th scope="col" { "Data" }
            } }
            tbody { @for e in events { tr {
                td { (e.seq) }
                td { (time(Some(e.created_at))) }
                td { (e.kind.as_str()) }
                td { (e.step_id.as_deref().unwrap_or("")) }
                td { (e.attempt.map(|a| a.to_string()).unwrap_or_default()) }
                td { (e.member.as_deref().unwrap_or("")) }
                td { @if !matches!(e.data.as_object(), Some(o) if o.is_empty()) {
                    (view::json_cell("data", Some(&e.data), &whole))
                } }
            } } }
        } }
    }
}

// ---- workflows ---------------------------------------------------------

/// `GET /workflows`: each workflow, its latest version and how many of its
/// instances have not ended.
pub(crate) async fn workflows(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
) -> PageResult<Markup> {
    let store = &state.inner.store;
    // The latest version of each, from the versions in name order.
    let mut latest = store.workflow_versions(None, WORKFLOWS_LISTED).await?;
    latest.reverse();
    latest.dedup_by(|later, kept| later.workflow == kept.workflow);
    latest.reverse();
    let counts = store.unended_by_version(UNENDED_COUNT_TIMEOUT_MS).await?;
    let unended = |name: &str| -> String {
        counts.as_ref().map_or(NOT_COUNTED.into(), |counts| {
            let n: i64 = counts
                .iter()
                .filter(|c| c.workflow == name)
                .map(|c| c.unended)
                .sum();
            n.to_string()
        })
    };
    let mut f = frame(
        &state,
        &session,
        Nav::Workflows,
        "Workflows".into(),
        Some((2, &[])),
    );
    // Its count reads every instance: not every 5 s.
    f.live = false;
    let body = html! {
        @if latest.is_empty() {
            p.empty { "No workflows yet: register one with " code { "PUT /v1/workflows/{name}" } "." }
        } @else {
            div.scroll { table.workflows {
                caption.sr-only { "Workflows" }
                thead { tr { th scope="col" { "Workflow" } th scope="col" { "Latest version" }
                    th scope="col" { "Registered" } th scope="col" { "Not ended" } th scope="col" { "Instances" } } }
                tbody { @for w in &latest { tr data-workflow=(w.workflow) {
                    th scope="row" { a href=(format!("/workflows/{}", path_part(&w.workflow))) { (w.workflow) } }
                    td { "v" (w.version) }
                    td { (time(Some(w.created_at))) }
                    td { (unended(&w.workflow)) }
                    td { a href=(list_url(&[("workflow", &w.workflow)])) { "list" } }
                } } }
            } }
        }
    };
    Ok(view::page(&f, body))
}

/// `GET /workflows/{name}`: its versions with their instances not ended,
/// and one version's definition and graph (`?version=`, the latest by
/// default).
pub(crate) async fn workflow(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    ApiPath(name): ApiPath<String>,
    params: QueryParams,
) -> PageResult<Markup> {
    check_id("name", &name)?;
    let store = &state.inner.store;
    let versions = store
        .workflow_versions(Some(&name), WORKFLOWS_LISTED)
        .await?;
    let not_found = || PageError::not_found(format!("workflow {name:?} is not registered"));
    let latest = versions
        .iter()
        .map(|v| v.version)
        .max()
        .ok_or_else(not_found)?;
    let chosen = match params.get("version").filter(|v| !v.is_empty()) {
        None => latest,
        Some(v) => v
            .parse::<i32>()
            .ok()
            .filter(|v| versions.iter().any(|w| w.version == *v))
            .ok_or_else(|| {
                PageError::bad_request(format!("version: {name} has no version {v:?}"))
            })?,
    };
    let record = store
        .get_workflow(&name, Some(chosen))
        .await?
        .ok_or_else(not_found)?;
    let def = state.inner.definitions.get(store, &name, chosen).await?;
    let counts = store.unended_by_version(UNENDED_COUNT_TIMEOUT_MS).await?;
    let unended = |v: i32| -> String {
        counts.as_ref().map_or(NOT_COUNTED.into(), |counts| {
            let n = counts
                .iter()
                .find(|c| c.workflow == name && c.version == v)
                .map_or(0, |c| c.unended);
            n.to_string()
        })
    };
    let mut f = frame(
        &state,
        &session,
        Nav::Workflows,
        format!("Workflow {name}"),
        Some((2, &[("workflow", name.as_str())])),
    );
    f.live = false;
    let body = html! {
        p { a href=(list_url(&[("workflow", &name)])) { "Its instances" } }
        div.scroll { table.versions {
            caption { "Versions" }
            thead { tr { th scope="col" { "Version" } th scope="col" { "Registered" } th scope="col" { "Not ended" } } }
            tbody { @for v in versions.iter().rev() { tr aria-current=[(v.version == chosen).then_some("true")] {
                th scope="row" { a href=(format!("?{}", query(&[("version", &v.version.to_string())]))) { "v" (v.version) } }
                td { (time(Some(v.created_at))) }
                td data-unended=(v.version) { (unended(v.version)) }
            } } }
        } }
        section aria-labelledby="h-graph" {
            h2 #h-graph { "Version " (chosen) }
            @if let Some(def) = &def {
                div.scroll.graph-box { (graph::svg(&definition_nodes(def), &format!("The step graph of {name} v{chosen}"))) }
            }
            h3 { "Definition" }
            (json("definition", Some(&record.definition), &format!("GET /v1/workflows/{name}/versions/{chosen}")))
        }
    };
    Ok(view::page(&f, body))
}

/// Shown for a count that took too long.
const NOT_COUNTED: &str = "not counted (over 2 s)";

fn definition_nodes(def: &Definition) -> Vec<Node> {
    def.steps
        .iter()
        .map(|d| Node {
            id: d.id.clone(),
            kind: d.kind.name(),
            needs: d.needs.clone(),
            status: StepStatus::Pending,
            note: d.for_each.as_ref().map(|_| "for each".to_string()),
            link: None,
        })
        .collect()
}

// ---- queues ------------------------------------------------------------

/// `GET /queues`: per queue its ready, leased and delayed tasks and the
/// oldest ready one's age; the leases that expire first.
pub(crate) async fn queues(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
) -> PageResult<Markup> {
    let store = &state.inner.store;
    let depth = store.queue_depth().await?;
    let leases = store.leased_tasks(LEASES_SHOWN).await?;
    let f = frame(
        &state,
        &session,
        Nav::Queues,
        "Queues".into(),
        Some((13, &[])),
    );
    let body = html! {
        @if depth.is_empty() {
            p.empty { "No tasks are waiting or leased." }
        } @else {
            div.scroll { table.queues {
                caption.sr-only { "Queues" }
                thead { tr { th scope="col" { "Queue" } th scope="col" { "Ready" } th scope="col" { "Leased" }
                    th scope="col" { "Delayed" } th scope="col" { "Oldest ready" }
                    @if state.inner.grafana_url.is_some() { th scope="col" { "Grafana" } } } }
                tbody { @for q in &depth { tr data-queue=(q.queue) {
                    th scope="row" { (q.queue) }
                    td { (q.ready) } td { (q.leased) } td { (q.delayed) }
                    td { (span_of(q.oldest_ready_age_seconds)) }
                    @if let Some(link) = grafana_link(&state, 14, &[("queue", q.queue.as_str())]) {
                        td { a href=(link) rel="noopener" { "panel" } }
                    }
                } } }
            } }
        }
        h2 { "Leased tasks" }
        @if leases.is_empty() {
            p.empty { "No task is leased." }
        } @else {
            div.scroll { table.leases {
                caption.sr-only { "Leased tasks, the soonest to expire first" }
                thead { tr { th scope="col" { "Task" } th scope="col" { "Queue" } th scope="col" { "Instance" }
                    th scope="col" { "Step" } th scope="col" { "Attempt" } th scope="col" { "Worker" }
                    th scope="col" { "Leased" } th scope="col" { "Expires in" } } }
                tbody { @for l in &leases { tr {
                    td { (l.id) }
                    td { (l.queue) }
                    td { a href=(format!("/instances/{}", path_part(&l.instance_id))) { (l.instance_id) } }
                    td { (l.step_id) @if let Some(k) = l.item { " [" (k) "]" } @if l.compensation { " (compensation)" } }
                    td { (l.attempt) }
                    td { (l.worker.as_deref().unwrap_or("—")) }
                    td { (time(l.leased_at)) }
                    td title=(l.lease_expires_at.map(|t| t.to_rfc3339()).unwrap_or_default()) { @match l.expires_in_s {
                        Some(s) if s < 0.0 => span.error-text { "expired " (span_of(-s)) " ago" },
                        Some(s) => (span_of(s)),
                        None => "—",
                    } }
                } } }
            } }
            @if leases.len() as i64 >= LEASES_SHOWN {
                p.hint { "The " (LEASES_SHOWN) " leases that expire first." }
            }
        }
    };
    Ok(view::page(&f, body))
}

// ---- cluster -----------------------------------------------------------

/// `GET /cluster`: the members with heartbeat age and liveness, the duty
/// holder, and the slot map coloured by owner.
pub(crate) async fn cluster(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
) -> PageResult<Markup> {
    let store = &state.inner.store;
    let members = store.cluster_members().await?;
    let owners = store.slot_owners().await?;
    let duties = store.duty_holders().await?;
    let slot_count = store.slot_count().await?;
    let owner_of: BTreeMap<i32, Option<String>> = owners.into_iter().collect();
    let held = |name: &str| {
        owner_of
            .values()
            .filter(|o| o.as_deref() == Some(name))
            .count()
    };
    let colour = |name: Option<&str>| -> &'static str {
        match name.and_then(|n| members.iter().position(|m| m.name == n)) {
            Some(i) => PALETTE[i % PALETTE.len()],
            None => "#ffffff",
        }
    };
    let f = frame(
        &state,
        &session,
        Nav::Cluster,
        "Cluster".into(),
        Some((25, &[])),
    );
    let unowned = (0..slot_count)
        .filter(|s| !matches!(owner_of.get(s), Some(Some(_))))
        .count();
    let rows = (slot_count + SLOTS_ACROSS - 1) / SLOTS_ACROSS;
    let cell = 16;
    let body = html! {
        div.scroll { table.members {
            caption.sr-only { "Members" }
            thead { tr { th scope="col" { "Member" } th scope="col" { "Alive" } th scope="col" { "Last heartbeat" }
                th scope="col" { "TTL" } th scope="col" { "Joined" } th scope="col" { "Slots" } th scope="col" { "API" } } }
            tbody { @for m in &members { tr data-member=(m.name) data-alive=(m.alive) {
                th scope="row" {
                    svg width="12" height="12" aria-hidden="true" { rect width="12" height="12" fill=(colour(Some(&m.name))) stroke="#444" {} }
                    " " (m.name)
                }
                td { @if m.alive { span.badge.st-completed { "alive" } } @else { span.badge.st-failed { "gone" } } }
                td { (span_of(m.since_heartbeat_s)) " ago" }
                td { (span_of(f64::from(m.ttl_ms) / 1000.0)) }
                td { (time(Some(m.joined_at))) }
                td { (held(&m.name)) }
                td { (m.api_url.as_deref().unwrap_or("—")) }
            } } }
        } }
        h2 { "Duties" }
        @if duties.is_empty() {
            p.empty { "No member holds a duty right now (one takes it within a heartbeat)." }
        } @else {
            ul.duties { @for (duty, holder) in &duties {
                li data-duty=(duty) { (duty) ": " strong { (holder.as_deref().unwrap_or("(a session that is not a member)")) } }
            } }
        }
        h2 { "Slots" }
        p { (slot_count) " slots; " (unowned) " without an owner (white)." }
        div.scroll {
            svg.slots xmlns="http://www.w3.org/2000/svg" role="img"
                aria-label=(format!("Slot map: {slot_count} slots, {unowned} without an owner"))
                width=(SLOTS_ACROSS * cell) height=(rows * cell) {
                @for slot in 0..slot_count {
                    @let owner = owner_of.get(&slot).cloned().flatten();
                    rect x=((slot % SLOTS_ACROSS) * cell) y=((slot / SLOTS_ACROSS) * cell)
                        width=(cell - 2) height=(cell - 2) fill=(colour(owner.as_deref()))
                        stroke=(if owner.is_some() { "#444" } else { "#b42318" }) data-slot=(slot) {
                        title { "slot " (slot) ": " (owner.as_deref().unwrap_or("no owner")) }
                    }
                }
            }
        }
    };
    Ok(view::page(&f, body))
}

/// Owner colours of the slot map: distinct, and dark text stays readable
/// on each.
const PALETTE: [&str; 10] = [
    "#8ecae6", "#ffb703", "#90be6d", "#f4a3a8", "#cdb4db", "#f9c74f", "#73d2de", "#e9c46a",
    "#b5e48c", "#ffc8dd",
];
