//! Drives the `payload-processor` binary as a user would.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_payload-processor"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes `content` to a fresh file under the target directory and returns its path.
fn file(name: &str, content: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

fn arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

const GUARD_CHAIN: &str = "processors:
  - name: route-by-model
    type: body-field-to-header
    parameters: {fieldName: model, headerName: X-Gateway-Model-Name}
  - name: no-pii
    type: pii-guard
    parameters: {entities: [CreditCard, Email], action: Mask}
";

const REQUEST: &str =
    r#"{"model":"gpt-4o","messages":[{"role":"user","content":"card 4111 1111 1111 1111, mail bob@example.com"}]}"#;

#[test]
fn validate_accepts_a_good_chain_and_names_its_processors() {
    let chain = file("good.yaml", GUARD_CHAIN);
    let out = cli(&["validate", arg(&chain)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("valid; 2 processors: route-by-model, no-pii"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        out.stderr.is_empty(),
        "no warnings for canonical spellings: {}",
        text(&out.stderr)
    );
}

#[test]
fn validate_refuses_a_bad_chain_with_the_path_qualified_message() {
    let chain = file(
        "bad.yaml",
        "processors: [{name: a, type: pii-guard, parameters: {entities: [Email, passport]}}]",
    );
    let out = cli(&["validate", arg(&chain)]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("invalid configuration: processors[0].parameters.entities[1]: unknown variant `passport`, expected one of `Email`, `Phone`, `CreditCard`"),
        "{err}"
    );
}

#[test]
fn old_spellings_load_with_a_deprecation_warning() {
    let chain = file(
        "old.yaml",
        "processors:
  - {name: g, type: pii-guard, parameters: {entities: [credit_card, ip_address], overrides: {ip_address: {action: Report}}}}
  - {name: p, type: prompt-guard, parameters: {builtin: [prompt-injection]}}
  - {name: m, type: body-mutation, parameters: {operations: [{op: setDefault, path: temperature, value: 0}]}}
",
    );
    let out = cli(&["validate", arg(&chain)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    for (old, new) in [
        ("credit_card", "CreditCard"),
        ("ip_address", "IpAddress"),
        ("prompt-injection", "PromptInjection"),
        ("setDefault", "SetDefault"),
    ] {
        assert!(
            err.contains(&format!(
                "configuration value {old:?} is a deprecated spelling; write {new:?}"
            )),
            "{old}: {err}"
        );
    }
}

#[test]
fn the_wasm_form_cannot_read_files_and_validate_says_so() {
    let weights = file("weights.bin", "not read");
    let chain = file(
        "classifier.yaml",
        &format!(
            "processors: [{{name: g, type: prompt-guard, parameters: {{builtin: [PromptInjection], \
             injection: {{classifier: {{weights: {}}}}}}}}}]",
            weights.display()
        ),
    );
    let out = cli(&["validate", "--form", "wasm", arg(&chain)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot read files"), "{}", text(&out.stderr));
    // The .so reads it, and finds it is no weights file.
    let out = cli(&["validate", arg(&chain)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not a safetensors file"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn run_traces_each_processor_and_prints_the_final_request() {
    let chain = file("run.yaml", GUARD_CHAIN);
    let request = file("request.json", REQUEST);
    let out = cli(&[
        "run",
        arg(&chain),
        "--request",
        arg(&request),
        "--json",
        "--header",
        "x-tenant: acme",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let steps = report["processors"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0]["processor"], "route-by-model");
    assert_eq!(steps[0]["type"], "body-field-to-header");
    assert!(steps[0]["headersSet"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!(["x-gateway-model-name", "gpt-4o"])));
    assert_eq!(steps[1]["outcome"], "continue");
    let diff = steps[1]["bodyDiff"].as_str().unwrap();
    assert!(
        diff.contains("+      \"content\": \"card [CREDIT_CARD], mail [EMAIL]\""),
        "{diff}"
    );
    assert!(steps[1]["metadata"].to_string().contains("credit_card,email"));
    assert_eq!(
        report["request"]["body"]["messages"][0]["content"],
        "card [CREDIT_CARD], mail [EMAIL]"
    );
    assert!(report["request"]["headers"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!(["x-tenant", "acme"])));
    assert!(report["localReply"].is_null());

    let out = cli(&["run", arg(&chain), "--request", arg(&request)]);
    let shown = text(&out.stdout);
    assert!(shown.contains("[request] no-pii (pii-guard): continue in"), "{shown}");
    assert!(shown.contains("== request sent upstream"), "{shown}");
}

#[test]
fn run_shows_a_rejection_as_the_local_reply() {
    let chain = file(
        "reject.yaml",
        "processors: [{name: no-cards, type: pii-guard, parameters: {entities: [CreditCard], action: Reject}}]",
    );
    let request = file("reject.json", REQUEST);
    let out = cli(&["run", arg(&chain), "--request", arg(&request), "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["processors"][0]["outcome"], "reject 400");
    assert_eq!(report["localReply"]["status"], 400);
    assert!(report["request"].is_null(), "nothing went upstream");
}

#[test]
fn run_says_it_sends_no_callouts_and_follows_the_failure_mode() {
    let request = file("callout.json", REQUEST);
    for (mode, status) in [("FailClosed", Some(503u64)), ("FailOpen", None)] {
        let chain = file(
            &format!("callout-{mode}.yaml"),
            &format!("processors: [{{name: moderate, type: openai-moderation, failureMode: {mode}, parameters: {{cluster: moderation}}}}]"),
        );
        let out = cli(&["run", arg(&chain), "--request", arg(&request), "--json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["processors"][0]["outcome"], "callout to moderation");
        assert_eq!(report["localReply"]["status"].as_u64(), status);
        match status {
            Some(_) => {
                let message = report["localReply"]["body"]["error"]["message"].as_str().unwrap();
                assert!(message.contains("sends no callouts"), "{message}");
            }
            None => assert!(!report["request"].is_null(), "fail open: the request goes on"),
        }
    }
}

#[test]
fn run_feeds_buffered_and_streamed_responses() {
    let chain = file(
        "response.yaml",
        "processors: [{name: out, type: pii-guard, parameters: {entities: [Email], direction: Response}}]",
    );
    let request = file(
        "plain.json",
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
    );
    let response = file(
        "response.json",
        r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"write alice@example.org"}}]}"#,
    );
    let out = cli(&[
        "run",
        arg(&chain),
        "--request",
        arg(&request),
        "--response",
        arg(&response),
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["response"]["body"]["choices"][0]["message"]["content"],
        "write [EMAIL]"
    );

    let sse = file(
        "stream.txt",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"write alice@\"}}]}\n\n\
         data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"example.org\"}}]}\n\n\
         data: [DONE]\n\n",
    );
    let out = cli(&[
        "run",
        arg(&chain),
        "--request",
        arg(&request),
        "--sse",
        arg(&sse),
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let body = report["response"]["body"].as_str().unwrap();
    assert!(body.contains("[EMAIL]") && !body.contains("alice@"), "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
}

#[test]
fn bad_input_gets_a_clear_error_never_a_panic() {
    let chain = file("ok.yaml", GUARD_CHAIN);
    let empty = file("empty.yaml", "");
    let cases: [(&[&str], &str); 4] = [
        (
            &["validate", "/nonexistent/chain.yaml"],
            "cannot read /nonexistent/chain.yaml",
        ),
        (
            &["run", arg(&chain), "--request", "/nonexistent/req.json"],
            "cannot read /nonexistent/req.json",
        ),
        (
            &["run", arg(&chain), "--request", arg(&chain), "--header", "no-colon"],
            "expected NAME:VALUE",
        ),
        (&["validate", arg(&empty)], "configuration is empty"),
    ];
    for (args, expected) in cases {
        let out = cli(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // A request body that is not JSON is the chain's business: a 400 from the first reader.
    let request = file("not-json.txt", "{not json");
    let out = cli(&["run", arg(&chain), "--request", arg(&request), "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["localReply"]["status"], 400);
}

#[test]
fn help_documents_every_command_and_option() {
    let out = cli(&["--help"]);
    let help = text(&out.stdout);
    for word in ["validate", "run", "schema"] {
        assert!(help.contains(word), "{help}");
    }
    let out = cli(&["run", "--help"]);
    let help = text(&out.stdout);
    for option in [
        "--request",
        "--path",
        "--method",
        "--header",
        "--response",
        "--sse",
        "--json",
        "--form",
    ] {
        assert!(help.contains(option), "{option}: {help}");
    }
}

#[test]
fn schema_describes_every_builtin_type_with_its_parameters() {
    let out = cli(&["schema"]);
    assert!(out.status.success());
    let schema: Value = serde_json::from_slice(&out.stdout).unwrap();
    let processor = &schema["$defs"]["ProcessorConfig"];
    let types: Vec<&str> = processor["properties"]["type"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        types.contains(&"pii-guard") && types.contains(&"endpoint-picker"),
        "{types:?}"
    );
    assert_eq!(
        processor["allOf"].as_array().unwrap().len(),
        types.len(),
        "every type has its parameters"
    );
    let entity = &schema["$defs"]["Entity"];
    assert_eq!(entity["enum"][2], "CreditCard");
    let modes: Vec<&Value> = schema["$defs"]["FailureMode"]["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .map(|mode| &mode["const"])
        .collect();
    assert_eq!(
        modes,
        [&serde_json::json!("FailClosed"), &serde_json::json!("FailOpen")]
    );
    let pii = &schema["$defs"]["PiiGuardParameters"];
    assert_eq!(pii["additionalProperties"], false, "unknown parameters are refused");
}

#[test]
fn the_committed_schema_is_current() {
    let out = cli(&["schema"]);
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/chain.schema.json");
    let committed = std::fs::read_to_string(&committed).unwrap_or_default();
    assert!(
        committed == text(&out.stdout),
        "docs/chain.schema.json is stale: run `cargo run -p payload-processor-cli -- schema > docs/chain.schema.json`"
    );
}
