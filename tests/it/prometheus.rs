//! The shipped observability files against the real tools: a real
//! Prometheus (Debian's `prometheus` package; `.ci/run` installs it) scrapes
//! three real `stead serve` processes under load, with the shipped alert
//! rules loaded; every PromQL expression of the Grafana dashboard and of the
//! rules must return data, and every alert must be pending or firing once its
//! condition is staged. `promtool` checks the exposition, rules and config.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{pretty, wait_until, ServeProcess, TestDb};

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The path of a Prometheus tool, or a panic saying how to get it.
fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return path;
        }
    }
    panic!(
        "{name} is not installed: run the tests with scripts/test, which installs it, or \
         `apt-get install prometheus`"
    );
}

/// Runs promtool; panics with its output unless it succeeds.
fn promtool(args: &[&str], dir: &Path, stdin: Option<&str>) -> String {
    let mut cmd = Command::new(tool("promtool"));
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("running promtool");
    {
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn promtool_accepts_the_shipped_config_rules_and_rule_tests() {
    let dir = repo_file("prometheus");
    promtool(&["check", "config", "prometheus.yml"], &dir, None);
    promtool(&["check", "rules", "alerts.yml"], &dir, None);
    let tested = promtool(&["test", "rules", "alerts.test.yml"], &dir, None);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// Every `expr` in the dashboard, with its panel title.
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(v: &Value, title: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(map) => {
                let title = map.get("title").and_then(Value::as_str).unwrap_or(title);
                if let Some(Value::String(expr)) = map.get("expr") {
                    out.push((title.to_string(), expr.clone()));
                }
                for child in map.values() {
                    walk(child, title, out);
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, title, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], "", &mut out);
    out
}

/// Grafana's variables, as a query against every value: all workflows and
/// queues, and a rate window several scrapes wide.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("${workflow}", ".*")
        .replace("$workflow", ".*")
        .replace("${queue}", ".*")
        .replace("$queue", ".*")
}

/// Each alert's name and expression from the rules file (one-line exprs).
fn alert_rules(text: &str) -> Vec<(String, String)> {
    let mut rules = Vec::new();
    let mut name = None;
    for line in text.lines() {
        let line = line.trim().trim_start_matches("- ");
        if let Some(n) = line.strip_prefix("alert:") {
            name = Some(n.trim().to_string());
        } else if let Some(e) = line.strip_prefix("expr:") {
            let expr = e.trim().trim_matches('\'').to_string();
            rules.push((name.take().expect("expr after alert:"), expr));
        }
    }
    rules
}

struct Prometheus {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("----- prometheus log (last lines, newest first) -----");
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

impl Prometheus {
    fn start(dir: &Path, targets: &[String]) -> Prometheus {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let rules = repo_file("prometheus/alerts.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: stead\n    static_configs:\n      - targets: [{}]\n",
            rules.display(),
            targets
                .iter()
                .map(|t| format!("'{t}'"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        promtool(
            &["check", "config", config_path.to_str().unwrap()],
            dir,
            None,
        );
        let log = dir.join("prometheus.log");
        let mut cmd = Command::new(tool("prometheus"));
        // SAFETY: only async-signal-safe calls. Prometheus dies with this
        // thread (the test's own, which lives as long as the test), even if
        // the test process is killed.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("starting prometheus");
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    async fn get(&self, http: &reqwest::Client, path: &str, query: &[(&str, &str)]) -> Value {
        let resp = http
            .get(format!("{}{path}", self.url))
            .query(query)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let body: Value = resp.json().await.expect("Prometheus answers JSON");
        assert_eq!(
            body["status"],
            "success",
            "{path} {query:?}: {}",
            pretty(&body)
        );
        body["data"].clone()
    }

    /// The result of an instant query (asserting that it is valid PromQL).
    async fn query(&self, http: &reqwest::Client, expr: &str) -> Vec<Value> {
        let data = self.get(http, "/api/v1/query", &[("query", expr)]).await;
        data["result"].as_array().cloned().unwrap_or_default()
    }
}

/// Starts an instance with an id whose slot is not `avoid_slot`.
async fn start(
    http: &reqwest::Client,
    db: &tokio_postgres::Client,
    base: &str,
    workflow: &str,
    n: &mut u32,
    input: Value,
) -> String {
    let id = loop {
        *n += 1;
        let id = format!("{workflow}-{n}");
        let row = db
            .query_one("SELECT stead.slot_for($1)", &[&id])
            .await
            .unwrap();
        if row.get::<_, i32>(0) != STRAY_SLOT {
            break id;
        }
    };
    let resp = http
        .post(format!("{base}/v1/workflows/{workflow}/instances"))
        .json(&json!({"id": id, "input": input}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201, "start {workflow}");
    id
}

/// The slot a stray session holds, so no member can own it.
const STRAY_SLOT: i32 = 0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_evaluates_every_dashboard_and_alert_query_against_a_live_cluster() {
    let db = TestDb::new().await;
    let migrate = Command::new(env!("CARGO_BIN_EXE_stead"))
        .args(["migrate", "--database-url", &db.url])
        .output()
        .unwrap();
    assert!(migrate.status.success(), "stead migrate: {migrate:?}");

    // "No slot owner": a stray session holds one slot's lock for the whole
    // test, as a leftover session of a misbehaving client would.
    let stray = db.client().await;
    let lock_class: i32 = stray
        .query_one("SELECT lock_class FROM stead.cluster", &[])
        .await
        .unwrap()
        .get(0);
    stray
        .execute(
            "SELECT pg_advisory_lock($1, $2)",
            &[&lock_class, &STRAY_SLOT],
        )
        .await
        .unwrap();
    let sql = db.client().await;

    let fast = [
        "--heartbeat-ms",
        "200",
        "--member-ttl-ms",
        "2000",
        "--gauge-refresh-ms",
        "300",
        "--poll-interval-ms",
        "100",
        "--reap-interval-ms",
        "100",
    ];
    let mut nodes = Vec::new();
    for name in ["prom-a", "prom-b", "prom-c"] {
        nodes.push(ServeProcess::spawn(&db.url, name, &fast).await);
    }
    let bases: Vec<String> = nodes.iter().map(|n| n.base_url.clone()).collect();
    let targets: Vec<String> = bases
        .iter()
        .map(|b| b.trim_start_matches("http://").to_string())
        .collect();

    // promtool lints the exposition of a live node.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let exposition = http
        .get(format!("{}/metrics", bases[0]))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    promtool(&["check", "metrics"], dir.path(), Some(&exposition));

    let prometheus = Prometheus::start(dir.path(), &targets);
    wait_until(
        "Prometheus to be ready",
        Duration::from_secs(60),
        || async {
            http.get(format!("{}/-/ready", prometheus.url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        },
    )
    .await;

    // Prometheus discovers its targets a few seconds after it is ready;
    // the staged events must happen after it scrapes them.
    wait_until(
        "Prometheus to scrape all three nodes",
        Duration::from_secs(60),
        || async {
            let up = prometheus.query(&http, "up{job=\"stead\"} == 1").await;
            up.len() == 3
        },
    )
    .await;

    // Workflows covering every metric: built-in echo, an http call, a sleep,
    // an external queue with a retry, failures, cancels and a stuck queue.
    let put = |name: &'static str, def: Value| {
        let http = http.clone();
        let base = bases[0].clone();
        async move {
            let resp = http
                .put(format!("{base}/v1/workflows/{name}"))
                .json(&def)
                .send()
                .await
                .unwrap();
            assert!(resp.status().is_success(), "PUT {name}: {}", resp.status());
        }
    };
    put(
        "prom-main",
        json!({"steps": [
            {"id": "echo", "task": {"queue": "stead.echo", "input": {"n": "${input.n}"}}},
            {"id": "ping", "http": {"method": "GET", "url": "${input.base}/healthz"}},
            {"id": "nap", "sleep": "50ms"},
            {"id": "ext", "task": {"queue": "prom.ext", "input": {"n": "${input.n}"}},
             "retry": {"max_attempts": 3, "initial_interval": "10ms"}}
        ]}),
    )
    .await;
    put(
        "prom-fail",
        json!({"steps": [{"id": "doomed", "task": {"queue": "prom.ext", "input": {"fail": true}}}]}),
    )
    .await;
    put(
        "prom-wait",
        json!({"steps": [{"id": "wait", "signal": {"name": "never"}}]}),
    )
    .await;
    put(
        "prom-stuck",
        json!({"steps": [{"id": "stuck", "task": {"queue": "prom.stuck"}}]}),
    )
    .await;
    // Flow control: a per-second schedule, a paused queue, a paused
    // workflow (the schedule and pause panels).
    put("prom-tick", json!({"steps": [{"id": "tick", "value": 1}]})).await;
    let staged = [
        (
            "PUT",
            "/v1/schedules/prom-tick",
            Some(json!({"workflow": "prom-tick", "cron": "* * * * * *"})),
        ),
        ("POST", "/v1/queues/prom.paused/pause", None),
        // Its instances are held from here on; the schedule still fires.
        ("POST", "/v1/workflows/prom-tick/pause", None),
    ];
    for (method, path, body) in staged {
        let url = format!("{}{path}", bases[0]);
        let request = match method {
            "PUT" => http.put(url),
            _ => http.post(url),
        };
        let request = match body {
            Some(body) => request.json(&body),
            None => request,
        };
        let status = request.send().await.unwrap().status();
        assert!(status.is_success(), "{method} {path}: {status}");
    }

    // An external worker on prom.ext: fails each first attempt of
    // prom-main (a retry), fails prom-fail for good, lets one lease expire
    // and completes it late (a stale completion), completes the rest.
    let worker = {
        let http = http.clone();
        let bases = bases.clone();
        tokio::spawn(async move {
            let mut expired: Option<Value> = None;
            let mut round = 0usize;
            loop {
                round += 1;
                let base = &bases[round % 2];
                let lease = if expired.is_none() && round > 3 {
                    "200ms"
                } else {
                    "30s"
                };
                let Ok(resp) = http
                    .post(format!("{base}/v1/queues/prom.ext/claim"))
                    .json(
                        &json!({"worker": "prom-worker", "max": 20, "lease": lease, "wait": "1s"}),
                    )
                    .send()
                    .await
                else {
                    continue;
                };
                let Ok(body) = resp.json::<Value>().await else {
                    continue;
                };
                for task in body["tasks"].as_array().cloned().unwrap_or_default() {
                    let token = task["lease_token"].clone();
                    let url =
                        |action: &str| format!("{base}/v1/tasks/{}/{action}", task["task_id"]);
                    if lease == "200ms" && expired.is_none() {
                        expired = Some(task.clone());
                        continue;
                    }
                    let (action, body) = if task["input"]["fail"] == true {
                        (
                            "fail",
                            json!({"lease_token": token, "error": {"message": "no", "retryable": false}}),
                        )
                    } else if task["attempt"] == 1 {
                        (
                            "fail",
                            json!({"lease_token": token, "error": {"message": "again"}}),
                        )
                    } else {
                        (
                            "complete",
                            json!({"lease_token": token, "output": {"ok": true}}),
                        )
                    };
                    let _ = http.post(url(action)).json(&body).send().await;
                }
                if let Some(late) = &expired {
                    if round % 10 == 0 {
                        // Long expired by now: refused as stale (409).
                        let _ = http
                            .post(format!("{base}/v1/tasks/{}/complete", late["task_id"]))
                            .json(&json!({"lease_token": late["lease_token"], "output": {}}))
                            .send()
                            .await;
                    }
                }
            }
        })
    };

    // Load for a while, spread over the three nodes; one node is killed
    // half-way (member lost, failover, a scrape target down).
    let mut n = 0u32;
    let mut waiting = Vec::new();
    let load_until = Instant::now() + Duration::from_secs(8);
    let mut round = 0usize;
    let mut killed = false;
    while Instant::now() < load_until {
        round += 1;
        let live = if killed { &bases[..2] } else { &bases[..] };
        let base = &live[round % live.len()];
        for _ in 0..5 {
            let input = json!({"n": n, "base": base});
            start(&http, &sql, base, "prom-main", &mut n, input).await;
        }
        start(&http, &sql, base, "prom-fail", &mut n, json!({})).await;
        waiting.push(start(&http, &sql, base, "prom-wait", &mut n, json!({})).await);
        if round == 10 {
            start(&http, &sql, base, "prom-stuck", &mut n, json!({})).await;
        }
        if round == 20 && !killed {
            nodes[2].kill9();
            killed = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(killed, "the load loop reached the kill");
    for id in &waiting {
        let _ = http
            .post(format!("{}/v1/instances/{id}/cancel", bases[0]))
            .send()
            .await;
    }
    // A stuck queue: its task has been ready for an hour.
    wait_until(
        "the prom.stuck task to exist",
        Duration::from_secs(20),
        || async {
            sql.execute(
                "UPDATE stead.tasks SET run_at = now() - interval '1 hour' \
             WHERE queue = 'prom.stuck' AND status = 'ready'",
                &[],
            )
            .await
            .unwrap()
                == 1
        },
    )
    .await;

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("grafana/dashboards/stead.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let rows: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    for wanted in [
        "Throughput",
        "Latency",
        "Queues",
        "Failures",
        "Cluster",
        "Database pool",
    ] {
        assert!(
            rows.iter().any(|r| r.starts_with(wanted)),
            "no {wanted} row in {rows:?}"
        );
    }
    let panels = dashboard_exprs(&dashboard);
    assert!(
        panels.len() >= 20,
        "the dashboard has only {} queries",
        panels.len()
    );
    let rules = alert_rules(&std::fs::read_to_string(repo_file("prometheus/alerts.yml")).unwrap());
    let names: Vec<&str> = rules.iter().map(|(n, _)| n.as_str()).collect();
    for wanted in [
        "SteadQueueStuck",
        "SteadFailuresRising",
        "SteadMemberLost",
        "SteadTargetDown",
        "SteadNoSlotOwner",
    ] {
        assert!(
            names.contains(&wanted),
            "alerts.yml lacks {wanted}: {names:?}"
        );
    }

    // Every query returns data, and every alert is pending or firing.
    let prometheus = &prometheus;
    let http = &http;
    let panels = &panels;
    let rules = &rules;
    wait_until(
        "every dashboard and alert query to return data",
        Duration::from_secs(90),
        || async move {
            let mut empty = Vec::new();
            for (title, expr) in panels {
                let expr = substitute(expr);
                if prometheus.query(http, &expr).await.is_empty() {
                    empty.push(format!("panel {title:?}: {expr}"));
                }
            }
            for (name, expr) in rules {
                if prometheus.query(http, expr).await.is_empty() {
                    empty.push(format!("alert {name}: {expr}"));
                }
            }
            let alerts = prometheus.get(http, "/api/v1/alerts", &[]).await;
            for (name, _) in rules {
                let active = alerts["alerts"].as_array().unwrap().iter().any(|a| {
                    a["labels"]["alertname"] == name.as_str()
                        && (a["state"] == "pending" || a["state"] == "firing")
                });
                if !active {
                    empty.push(format!("alert {name} is not active"));
                }
            }
            if empty.is_empty() {
                Ok(())
            } else {
                Err(empty.join("\n"))
            }
        },
    )
    .await;

    // The rules loaded cleanly, and the template variables find values.
    let groups = prometheus.get(http, "/api/v1/rules", &[]).await;
    for group in groups["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            assert_eq!(rule["health"], "ok", "{}", pretty(rule));
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        let query = variable["query"]
            .as_str()
            .or_else(|| variable["query"]["query"].as_str())
            .unwrap_or_default();
        if let Some(inner) = query.strip_prefix("label_values(") {
            let (metric, label) = inner.trim_end_matches(')').split_once(',').unwrap();
            let data = prometheus
                .get(
                    http,
                    &format!("/api/v1/label/{}/values", label.trim()),
                    &[("match[]", metric.trim())],
                )
                .await;
            assert!(
                !data.as_array().unwrap().is_empty(),
                "variable {}: no values for {query}",
                variable["name"]
            );
        }
    }
    worker.abort();
}
