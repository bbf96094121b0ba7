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

/// Holds a streamed answer and has a service approve it two events at a time (and the rest
/// at the end): `{"allow": bool}`.
struct Windows;

#[derive(Default)]
struct WindowText {
    text: String,
    events: usize,
}

impl Windows {
    fn ask(ctx: &mut Context<'_>) -> CalloutRequest {
        let text = std::mem::take(&mut ctx.state::<WindowText>().text);
        CalloutRequest {
            cluster: "svc".into(),
            method: "POST".into(),
            path: "/approve".into(),
            authority: "svc".into(),
            headers: vec![],
            body: text.into_bytes(),
            timeout: Duration::from_secs(1),
        }
    }
}

impl Plugin for Windows {
    fn stream_need(&self) -> Option<StreamNeed> {
        Some(StreamNeed::default())
    }
    fn on_response_event(&self, ctx: &mut Context<'_>, event: &mut SseEvent) -> Result<EventDecision, PluginError> {
        let word = event
            .json()
            .ok()
            .and_then(|doc| {
                doc.pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
                    .map(String::from)
            })
            .unwrap_or_default();
        let state = ctx.state::<WindowText>();
        state.text.push_str(&word);
        state.events += 1;
        if state.events % 2 == 0 || event.is_terminal() {
            return Ok(EventDecision::Callout(Self::ask(ctx)));
        }
        Ok(EventDecision::Hold)
    }
    fn on_callout_done(&self, _ctx: &mut Context<'_>, response: CalloutResponse) -> Result<Decision, PluginError> {
        let verdict: Value = serde_json::from_slice(&response.body).unwrap_or_default();
        if verdict["allow"] == json!(true) {
            Ok(Decision::Continue)
        } else {
            Ok(Decision::Reject(LocalReply::json_error(
                400,
                "content_flagged",
                "flagged",
            )))
        }
    }
    fn on_stream_end(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        if ctx.state::<WindowText>().text.is_empty() {
            return Ok(Decision::Continue);
        }
        Ok(Decision::Callout(Self::ask(ctx)))
    }
}

fn window_chain(mode: &str) -> Arc<Chain> {
    let mut registry = registry();
    registry
        .register(
            "windows",
            |_: &Value, _: &mut BuildContext| -> Result<Arc<dyn Plugin>, ConfigError> { Ok(Arc::new(Windows)) },
        )
        .unwrap();
    let yaml = format!("processors: [{{name: approve, type: windows, failureMode: {mode}}}]");
    Arc::new(Chain::load(&yaml, &registry).unwrap())
}

fn chunk(word: &str) -> String {
    format!("data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}}}}]}}\n\n")
}

/// A streamed chat answer through the chain: returns the stream, the host, and what the
/// client got from the first body callback.
fn start_stream(chain: Arc<Chain>, first: &str, end: bool) -> (Stream, FakeHost, Vec<u8>, BodyFlow) {
    let mut stream = Stream::new(chain);
    let mut host = FakeHost::request("/v1/chat/completions", &[], b"");
    stream.on_request_headers(&mut host, true);
    host.response_headers.push((":status".into(), "200".into()));
    host.response_headers
        .push(("content-type".into(), "text/event-stream".into()));
    assert_eq!(stream.on_response_headers(&mut host, false), HeadersFlow::WaitForBody);
    host.response_body = first.as_bytes().to_vec();
    let flow = stream.on_response_body(&mut host, end);
    let sent = if flow == BodyFlow::Continue {
        host.response_body.clone()
    } else {
        Vec::new()
    };
    (stream, host, sent, flow)
}

fn answer(stream: &mut Stream, host: &mut FakeHost, allow: bool) -> (CalloutFlow, Vec<u8>) {
    let handle = host.callouts.last().unwrap().0;
    host.response_body.clear();
    let flow = stream.on_callout_done(host, handle, json_answer(200, &json!({"allow": allow})));
    let sent = if flow == CalloutFlow::Resume(Direction::Response) {
        host.response_body.clone()
    } else {
        Vec::new()
    };
    (flow, sent)
}

#[test]
fn a_streamed_answer_goes_out_window_by_window_once_approved() {
    let first = [chunk("one "), chunk("two "), chunk("three "), chunk("four ")].concat();
    let (mut stream, mut host, sent, flow) = start_stream(window_chain("FailClosed"), &first, false);
    // Nothing is released before the service approved it.
    assert_eq!(flow, BodyFlow::WaitForCallout);
    assert!(sent.is_empty());
    assert_eq!(host.callouts[0].1.body, b"one two ");
    let (flow, sent) = answer(&mut stream, &mut host, true);
    // The first window goes; the second waits for its own answer.
    assert_eq!(flow, CalloutFlow::Resume(Direction::Response));
    assert_eq!(
        String::from_utf8(sent).unwrap(),
        [chunk("one "), chunk("two ")].concat()
    );
    assert_eq!(host.callouts.len(), 2);
    assert_eq!(host.callouts[1].1.body, b"three four ");
    // The rest of the upstream's stream arrives while the chain waits: it waits too.
    host.response_body = [chunk("five"), "data: [DONE]\n\n".into()].concat().into_bytes();
    assert_eq!(stream.on_response_body(&mut host, true), BodyFlow::WaitForCallout);
    assert!(host.response_body.is_empty());
    // The upstream ended: approved windows go out with the last one.
    let (flow, _) = answer(&mut stream, &mut host, true);
    assert_eq!(flow, CalloutFlow::Waiting);
    assert_eq!(host.callouts[2].1.body, b"five");
    let (flow, sent) = answer(&mut stream, &mut host, true);
    assert_eq!(flow, CalloutFlow::Resume(Direction::Response));
    let sent = String::from_utf8(sent).unwrap();
    assert_eq!(
        sent,
        [
            chunk("three "),
            chunk("four "),
            chunk("five"),
            "data: [DONE]\n\n".into()
        ]
        .concat()
    );
    assert!(host.reply.is_none());
}

#[test]
fn a_rejected_window_ends_the_stream_and_none_of_it_reaches_the_client() {
    let first = [chunk("fine "), chunk("text "), chunk("bad "), chunk("words ")].concat();
    let (mut stream, mut host, _, _) = start_stream(window_chain("FailClosed"), &first, false);
    let (_, sent) = answer(&mut stream, &mut host, true);
    assert_eq!(
        String::from_utf8(sent).unwrap(),
        [chunk("fine "), chunk("text ")].concat()
    );
    let (flow, sent) = answer(&mut stream, &mut host, false);
    assert_eq!(flow, CalloutFlow::Resume(Direction::Response));
    let sent = String::from_utf8(sent).unwrap();
    assert!(!sent.contains("bad") && !sent.contains("words"), "{sent}");
    assert!(
        sent.contains("\"finish_reason\":\"content_filter\"") && sent.ends_with("data: [DONE]\n\n"),
        "{sent}"
    );
    // The upstream's remaining bytes are swallowed.
    host.response_body = chunk("more").into_bytes();
    assert_eq!(stream.on_response_body(&mut host, true), BodyFlow::Continue);
    assert!(host.response_body.is_empty());
}

#[test]
fn a_first_window_rejected_before_any_byte_went_out_is_an_error_response() {
    let (mut stream, mut host, _, _) = start_stream(
        window_chain("FailClosed"),
        &[chunk("bad "), chunk("start ")].concat(),
        false,
    );
    let (flow, _) = answer(&mut stream, &mut host, false);
    assert_eq!(flow, CalloutFlow::Replied);
    let reply = host.reply.unwrap();
    assert_eq!(
        (reply.status, reply.json()["error"]["code"].as_str()),
        (400, Some("content_flagged"))
    );
}

#[test]
fn a_stream_callout_without_an_answer_follows_the_failure_mode() {
    for (mode, released) in [("FailClosed", false), ("FailOpen", true)] {
        let (mut stream, mut host, _, _) = start_stream(window_chain(mode), &[chunk("a "), chunk("b ")].concat(), true);
        let handle = host.callouts[0].0;
        let flow = stream.on_callout_done(&mut host, handle, Err("timeout".into()));
        if released {
            assert_eq!(flow, CalloutFlow::Resume(Direction::Response));
            assert_eq!(
                String::from_utf8(host.response_body.clone()).unwrap(),
                [chunk("a "), chunk("b ")].concat()
            );
        } else {
            // Nothing went out yet: an error response naming the processor.
            assert_eq!(flow, CalloutFlow::Replied);
            assert_eq!(host.reply.clone().unwrap().status, 503);
        }
    }
}

#[test]
fn the_last_window_is_approved_at_the_end_of_the_stream() {
    let (mut stream, mut host, _, flow) = start_stream(window_chain("FailClosed"), &chunk("alone"), true);
    assert_eq!(
        flow,
        BodyFlow::WaitForCallout,
        "the stream end asks for the last window"
    );
    assert_eq!(host.callouts[0].1.body, b"alone");
    let (flow, sent) = answer(&mut stream, &mut host, true);
    assert_eq!(flow, CalloutFlow::Resume(Direction::Response));
    assert_eq!(String::from_utf8(sent).unwrap(), chunk("alone"));
}

#[test]
fn approved_windows_of_an_ended_upstream_still_go_out_before_a_rejection() {
    // The whole answer arrived before the first verdict: nothing may go on while a window
    // waits, but what was approved is sent with the terminal events.
    let all = [chunk("fine "), chunk("text "), chunk("bad "), chunk("words ")].concat();
    let (mut stream, mut host, _, flow) = start_stream(window_chain("FailClosed"), &all, true);
    assert_eq!(flow, BodyFlow::WaitForCallout);
    assert_eq!(answer(&mut stream, &mut host, true).0, CalloutFlow::Waiting);
    let (flow, sent) = answer(&mut stream, &mut host, false);
    assert_eq!(flow, CalloutFlow::Resume(Direction::Response));
    let sent = String::from_utf8(sent).unwrap();
    assert!(sent.starts_with(&[chunk("fine "), chunk("text ")].concat()), "{sent}");
    assert!(!sent.contains("bad") && sent.contains("content_filter"), "{sent}");
    assert!(host.reply.is_none());
}
