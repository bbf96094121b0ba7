//! Processors that park the chain on an HTTP callout and resume it on the answer.

use payload_processor_core::testing::{
    json_answer, run_request_with_callouts, run_response_with_callouts, FakeHost, PhaseEnd,
};
use payload_processor_core::*;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// Asks a service whether the body may pass: `{"allow": bool, "tag": "..."}`; sets
/// `x-tag` and the body field `tag` from the answer. `panic` in the answer panics.
struct Ask {
    need: PhaseNeed,
    timeout: Duration,
}

impl Ask {
    fn call(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        let body = ctx.body().current().into_owned();
        Ok(Decision::Callout(CalloutRequest {
            cluster: "svc".into(),
            method: "POST".into(),
            path: "/check".into(),
            authority: "svc".into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body,
            timeout: self.timeout,
        }))
    }
}

impl Plugin for Ask {
    fn request_need(&self) -> PhaseNeed {
        self.need
    }
    fn response_need(&self) -> PhaseNeed {
        self.need
    }
    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        self.call(ctx)
    }
    fn on_response(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        self.call(ctx)
    }
    fn on_callout_done(&self, ctx: &mut Context<'_>, response: CalloutResponse) -> Result<Decision, PluginError> {
        if response.status != 200 {
            return Err(PluginError::internal(
                "bad_status",
                format!("status {}", response.status),
            ));
        }
        let verdict: Value =
            serde_json::from_slice(&response.body).map_err(|_| PluginError::internal("unreadable", "not JSON"))?;
        if verdict["panic"] == json!(true) {
            panic!("boom");
        }
        if verdict["again"] == json!(true) && ctx.header("x-asked-twice").is_none() {
            ctx.set_header("x-asked-twice", "1")?;
            return self.call(ctx);
        }
        if verdict["allow"] != json!(true) {
            return Ok(Decision::Reject(LocalReply::json_error(
                403,
                "denied",
                "the service said no",
            )));
        }
        let tag = verdict["tag"].as_str().unwrap_or("none").to_string();
        if !ctx.headers_sent() {
            ctx.set_header("x-tag", &tag)?;
        }
        if ctx.direction() == Direction::Request || !ctx.body().current().is_empty() {
            ctx.body()
                .set(&FieldPath::parse("$.tag").unwrap(), json!(tag))
                .map_err(|e| PluginError::internal("edit", e.to_string()))?;
        }
        Ok(Decision::Continue)
    }
}

/// Appends its letter to `x-trail` and to the body field `trail`, to show the order.
struct Trail(&'static str);

impl Plugin for Trail {
    fn request_need(&self) -> PhaseNeed {
        PhaseNeed::Body
    }
    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        let trail = ctx.header("x-trail").unwrap_or_default();
        ctx.set_header("x-trail", &format!("{trail}{}", self.0))?;
        let path = FieldPath::parse("$.trail").unwrap();
        let before = ctx
            .body()
            .get(&path)
            .ok()
            .flatten()
            .and_then(|v| v.as_str().map(String::from));
        ctx.body()
            .set(&path, json!(format!("{}{}", before.unwrap_or_default(), self.0)))
            .map_err(|e| PluginError::internal("edit", e.to_string()))?;
        Ok(Decision::Continue)
    }
}

fn registry() -> Registry {
    let mut registry = Registry::new();
    registry
        .register(
            "ask",
            |params: &Value, _: &mut BuildContext| -> Result<Arc<dyn Plugin>, ConfigError> {
                let need = match params.get("need").and_then(Value::as_str) {
                    Some("headers") => PhaseNeed::Headers,
                    _ => PhaseNeed::Body,
                };
                let timeout = Duration::from_millis(params.get("timeoutMs").and_then(Value::as_u64).unwrap_or(5000));
                Ok(Arc::new(Ask { need, timeout }))
            },
        )
        .unwrap();
    for (name, letter) in [("a", "a"), ("b", "b")] {
        registry
            .register(
                name,
                move |_: &Value, _: &mut BuildContext| -> Result<Arc<dyn Plugin>, ConfigError> {
                    Ok(Arc::new(Trail(letter)))
                },
            )
            .unwrap();
    }
    registry
}

fn chain(yaml: &str) -> Arc<Chain> {
    Arc::new(Chain::load(yaml, &registry()).expect("valid config"))
}

fn request() -> FakeHost {
    FakeHost::request(
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        br#"{"model":"m"}"#,
    )
}

const THREE: &str = "processors: [{name: first, type: a}, {name: ask, type: ask}, {name: last, type: b}]";

#[test]
fn the_chain_waits_for_the_answer_and_goes_on_in_order() {
    let chain = chain(THREE);
    let mut stream = Stream::new(Arc::clone(&chain));
    let mut host = request();
    assert_eq!(stream.on_request_headers(&mut host, false), HeadersFlow::WaitForBody);
    assert_eq!(stream.on_request_body(&mut host, true), BodyFlow::WaitForCallout);
    // Parked after the first processor: the last has not run, nothing was applied yet.
    assert_eq!(host.header(Direction::Request, "x-trail").as_deref(), Some("a"));
    assert_eq!(host.request_body, br#"{"model":"m"}"#);
    assert_eq!(stream.waiting_for_callout(), Some(Direction::Request));
    // The service saw the body as the first processor left it.
    let (handle, sent) = host.callouts[0].clone();
    assert_eq!(sent.cluster, "svc");
    assert_eq!(serde_json::from_slice::<Value>(&sent.body).unwrap()["trail"], "a");
    // Data or trailers arriving meanwhile wait too.
    assert_eq!(stream.on_request_trailers(&mut host), BodyFlow::WaitForCallout);
    let flow = stream.on_callout_done(
        &mut host,
        handle,
        json_answer(200, &json!({"allow": true, "tag": "t1"})),
    );
    assert_eq!(flow, CalloutFlow::Resume(Direction::Request));
    assert_eq!(host.header(Direction::Request, "x-trail").as_deref(), Some("ab"));
    assert_eq!(host.header(Direction::Request, "x-tag").as_deref(), Some("t1"));
    let body: Value = serde_json::from_slice(&host.request_body).unwrap();
    assert_eq!(body, json!({"model": "m", "trail": "ab", "tag": "t1"}));
    assert_eq!(
        host.header(Direction::Request, "content-length").as_deref(),
        Some(host.request_body.len().to_string().as_str())
    );
    assert_eq!(host.route_cache_clears, 1);
    // A second answer for the same handle (or any other) is ignored: nothing twice.
    let again = stream.on_callout_done(&mut host, handle, json_answer(200, &json!({"allow": false})));
    assert_eq!(again, CalloutFlow::Ignored);
    assert!(host.reply.is_none());
}

#[test]
fn a_denial_answers_and_later_processors_never_run() {
    let chain = chain(THREE);
    let mut stream = Stream::new(chain);
    let mut host = request();
    let end = run_request_with_callouts(&mut stream, &mut host, |_| json_answer(200, &json!({"allow": false})));
    assert_eq!(end, PhaseEnd::Stopped);
    let reply = host.reply.clone().unwrap();
    assert_eq!(reply.status, 403);
    assert_eq!(reply.details, "payload_processor.ask.rejected");
    assert_eq!(host.header(Direction::Request, "x-trail").as_deref(), Some("a"));
}

#[test]
fn a_failed_callout_follows_the_failure_mode() {
    for (mode, failure) in [
        ("FailClosed", Err("timeout".to_string())),
        ("FailClosed", Err("reset".to_string())),
        ("FailOpen", Err("timeout".to_string())),
    ] {
        let yaml = format!(
            "processors: [{{name: first, type: a}}, {{name: ask, type: ask, failureMode: {mode}}}, {{name: last, type: b}}]"
        );
        let chain = chain(&yaml);
        let mut stream = Stream::new(Arc::clone(&chain));
        let mut host = request();
        let end = run_request_with_callouts(&mut stream, &mut host, |_| failure.clone());
        assert_eq!(host.counter(&chain, "processor.ask.errors"), 1);
        if mode == "FailClosed" {
            assert_eq!(end, PhaseEnd::Stopped);
            let reply = host.reply.clone().unwrap();
            assert_eq!(reply.status, 503);
            assert_eq!(reply.details, "payload_processor.ask.failed");
            let message = reply.json()["error"]["message"].as_str().unwrap().to_string();
            assert!(
                message.contains("processor ask") && message.contains("cluster svc"),
                "{message}"
            );
            assert_eq!(reply.json()["error"]["code"], "callout_failed");
        } else {
            assert_eq!(end, PhaseEnd::Continued);
            assert_eq!(host.counter(&chain, "processor.ask.fail_open"), 1);
            assert_eq!(host.header(Direction::Request, "x-trail").as_deref(), Some("ab"));
        }
    }
}

#[test]
fn a_callout_that_cannot_start_follows_the_failure_mode() {
    let chain = chain(THREE);
    let mut stream = Stream::new(Arc::clone(&chain));
    let mut host = request();
    host.refuse_callouts = Some("cluster not found".into());
    run_request_phase(&mut stream, &mut host);
    let reply = host.reply.clone().unwrap();
    assert_eq!(reply.status, 503);
    assert!(reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("could not start: cluster not found"));
}

fn run_request_phase(stream: &mut Stream, host: &mut FakeHost) {
    payload_processor_core::testing::run_request_phase(stream, host);
}

#[test]
fn non_2xx_unreadable_answers_and_panics_are_the_plugins_failures() {
    for (answer, status) in [
        (json_answer(500, &json!({})), 500),
        (
            Ok(CalloutResponse {
                status: 200,
                headers: vec![],
                body: b"not json".to_vec(),
            }),
            500,
        ),
        (json_answer(200, &json!({"panic": true})), 500),
    ] {
        let chain = chain(THREE);
        let mut stream = Stream::new(Arc::clone(&chain));
        let mut host = request();
        let end = run_request_with_callouts(&mut stream, &mut host, |_| answer.clone());
        assert_eq!(end, PhaseEnd::Stopped);
        assert_eq!(host.reply.as_ref().unwrap().status, status);
    }
}

#[test]
fn the_processor_budget_bounds_the_wait() {
    let chain = chain(
        "processors: [{name: ask, type: ask, timeout: 40ms, parameters: {timeoutMs: 5000}}, {name: b, type: ask, parameters: {timeoutMs: 20}}]",
    );
    let mut stream = Stream::new(chain);
    let mut host = request();
    let end = run_request_with_callouts(&mut stream, &mut host, |_| json_answer(200, &json!({"allow": true})));
    assert_eq!(end, PhaseEnd::Continued);
    let timeouts: Vec<Duration> = host.callouts.iter().map(|(_, r)| r.timeout).collect();
    assert_eq!(timeouts, [Duration::from_millis(40), Duration::from_millis(20)]);
}

#[test]
fn a_processor_may_call_out_again_and_the_answer_to_the_first_is_stale() {
    let chain = chain(THREE);
    let mut stream = Stream::new(chain);
    let mut host = request();
    run_request_phase(&mut stream, &mut host);
    let first = host.callouts[0].0;
    let flow = stream.on_callout_done(&mut host, first, json_answer(200, &json!({"again": true})));
    assert_eq!(flow, CalloutFlow::Waiting);
    assert_eq!(host.callouts.len(), 2);
    assert_eq!(
        stream.on_callout_done(&mut host, first, json_answer(200, &json!({"allow": true}))),
        CalloutFlow::Ignored
    );
    let second = host.callouts[1].0;
    let flow = stream.on_callout_done(&mut host, second, json_answer(200, &json!({"allow": true, "tag": "x"})));
    assert_eq!(flow, CalloutFlow::Resume(Direction::Request));
    assert_eq!(host.header(Direction::Request, "x-trail").as_deref(), Some("ab"));
}

#[test]
fn a_request_without_body_waits_at_its_headers_and_data_behind_them_waits_too() {
    let chain = chain("processors: [{name: ask, type: ask, parameters: {need: headers}}]");
    let mut stream = Stream::new(chain);
    let mut host = FakeHost::request("/x", &[], b"");
    assert_eq!(stream.on_request_headers(&mut host, false), HeadersFlow::WaitForCallout);
    assert_eq!(stream.on_request_body(&mut host, false), BodyFlow::WaitForCallout);
    let handle = host.callouts[0].0;
    let flow = stream.on_callout_done(&mut host, handle, json_answer(200, &json!({"allow": true, "tag": "h"})));
    assert_eq!(flow, CalloutFlow::Resume(Direction::Request));
    assert_eq!(host.header(Direction::Request, "x-tag").as_deref(), Some("h"));
}

#[test]
fn a_buffered_response_waits_for_the_answer() {
    let chain = chain("processors: [{name: ask, type: ask}]");
    let mut stream = Stream::new(chain);
    let mut host = FakeHost::request("/x", &[], b"");
    assert_eq!(stream.on_request_headers(&mut host, true), HeadersFlow::WaitForCallout);
    let handle = host.callouts[0].0;
    stream.on_callout_done(&mut host, handle, json_answer(200, &json!({"allow": true})));
    host.response_body = br#"{"answer":42}"#.to_vec();
    let end = run_response_with_callouts(&mut stream, &mut host, |_| {
        json_answer(200, &json!({"allow": true, "tag": "r"}))
    });
    assert_eq!(end, PhaseEnd::Continued);
    assert_eq!(host.header(Direction::Response, "x-tag").as_deref(), Some("r"));
    assert_eq!(
        serde_json::from_slice::<Value>(&host.response_body).unwrap(),
        json!({"answer": 42, "tag": "r"})
    );
    // And a denied answer is replaced by the reply.
    let mut stream = Stream::new(chain_of_one());
    let mut host = FakeHost::request("/x", &[], b"");
    stream.on_request_headers(&mut host, true);
    let handle = host.callouts[0].0;
    stream.on_callout_done(&mut host, handle, json_answer(200, &json!({"allow": true})));
    host.response_body = br#"{"answer":42}"#.to_vec();
    let end = run_response_with_callouts(&mut stream, &mut host, |_| json_answer(200, &json!({"allow": false})));
    assert_eq!(end, PhaseEnd::Stopped);
    assert_eq!(host.reply.unwrap().status, 403);
}

fn chain_of_one() -> Arc<Chain> {
    chain("processors: [{name: ask, type: ask}]")
}

#[test]
fn a_stream_dropped_while_parked_answers_nothing() {
    let chain = chain(THREE);
    let mut stream = Stream::new(chain);
    let mut host = request();
    run_request_phase(&mut stream, &mut host);
    assert_eq!(stream.waiting_for_callout(), Some(Direction::Request));
    drop(stream);
    assert!(host.reply.is_none());
}
