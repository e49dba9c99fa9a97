//! The API against its own OpenAPI document: schemathesis (from PyPI, in
//! the virtualenv `scripts/test` makes) fuzzes a live node that requires
//! keys, with an admin key: no request may get a 5xx, and every response
//! must conform to the document (status, content type, headers, body),
//! unknown methods must get 405 with `Allow`, and no key must get 401.
//!
//! `DELETE /v1/keys/{id}` is left out (the fuzzer would revoke its own key;
//! `auth.rs` tests it). It runs twice: once generating every parameter (malformed and unknown
//! ids), once with the path parameters pinned to a real workflow, instance
//! and queue, so that the requests reach past the 404s. The checks of how
//! precisely the document states what input is valid
//! (`positive_data_acceptance`, `negative_data_rejection`) are not run: the
//! definition language and the id alphabet are checked by the server beyond
//! what the schemas say, and a refusal there is a 422 naming the field.

use std::path::PathBuf;
use std::process::Command;

use serde_json::json;
use stead::Role;

use crate::{ServeProcess, TestDb};

/// The checks every response must pass.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
    response_headers_conformance,response_schema_conformance,missing_required_header,\
    ignored_auth,unsupported_method,allow_header_conformance";

/// schemathesis, as `scripts/test` installs it, or a panic saying how.
fn schemathesis() -> PathBuf {
    let path = std::env::var_os("STEAD_SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cache/stead/schemathesis-4.32.5/bin/schemathesis")
        });
    assert!(
        path.exists(),
        "schemathesis is not installed at {}: run the tests with scripts/test, which installs it",
        path.display()
    );
    path
}

/// Runs schemathesis against `base` with `config`; panics with its report
/// unless every check passed, or if no request to a route that needs a key
/// succeeded (the key did not work).
fn fuzz(base: &str, key: &str, config: &str, seed: u32) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("schemathesis.toml"), config).unwrap();
    let har = dir.path().join("requests.har");
    let output = Command::new(schemathesis())
        .arg("--config-file")
        .arg(dir.path().join("schemathesis.toml"))
        .arg("run")
        .arg(format!("{base}/v1/openapi.json"))
        .args(["--url", base])
        .args(["-H", &format!("Authorization: Bearer {key}")])
        .args(["--checks", CHECKS])
        // The one DELETE revokes a key, and the fuzzer learns key ids from
        // `GET /v1/keys`: it would revoke its own (tests/it/auth.rs covers
        // revocation).
        .args(["--exclude-method", "DELETE"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", "25", "--seed", &seed.to_string()])
        // One worker: hypothesis, which generates the cases, is not
        // thread-safe in every part (a lambda-description cache raced).
        .args(["--workers", "1", "--generation-database", "none"])
        .args(["--request-timeout", "20", "--no-color", "--report", "har"])
        .arg("--report-har-path")
        .arg(&har)
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .output()
        .expect("running schemathesis");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis failed ({}):\n{report}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(report.contains("Open API 3.1.0"), "{report}");
    let har: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&har).expect("the HAR report")).unwrap();
    let keyed_successes = har["log"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            let url = e["request"]["url"].as_str().unwrap_or("");
            let status = e["response"]["status"].as_u64().unwrap_or(0);
            url.contains("/v1/")
                && !url.contains("/v1/openapi.json")
                && (200..300).contains(&status)
        })
        .count();
    assert!(
        keyed_successes > 0,
        "no request with the key succeeded:\n{report}"
    );
}

/// Nothing but the defaults (the checks and phases are flags).
const PLAIN: &str = "";

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_every_response_conforms() {
    let db = TestDb::new().await;
    let args = ["--auth", "keys", "--max-wait-ms", "100"];
    let node = ServeProcess::spawn(&db.url, "fuzz", &args).await;
    let key = stead::keys::create(&db.url, "stead", "fuzz", Role::Admin, &[])
        .await
        .unwrap()
        .key;
    let http = reqwest::Client::new();
    let base = node.base_url.clone();
    let def = json!({"steps": [
        {"id": "work", "task": {"queue": "fuzz"}},
        {"id": "wait", "signal": {"name": "go"}}]});
    for (method, path, body) in [
        ("PUT", "/v1/workflows/fuzz", def),
        (
            "POST",
            "/v1/workflows/fuzz/instances",
            json!({"id": "fuzz-1"}),
        ),
    ] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = http
            .request(method, format!("{base}{path}"))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
    }
    fuzz(&base, &key, PLAIN, 1);
    let pinned = format!(
        "{PLAIN}[parameters]\n\"path.name\" = \"fuzz\"\n\"path.id\" = \"fuzz-1\"\n\
         \"path.queue\" = \"fuzz\"\n\"path.version\" = 1\n"
    );
    fuzz(&base, &key, &pinned, 2);
}
