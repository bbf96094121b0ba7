//! The engine against a state-based fake host, with small test plugins.

use payload_processor_core::testing::FakeHost;
use payload_processor_core::*;
use serde_json::{json, Value};
use std::sync::Arc;

/// A configurable test plugin: optional header to set, behaviour on request and response.
struct Probe {
    request: PhaseNeed,
    response: PhaseNeed,
    behaviour: String,
}

impl Plugin for Probe {
    fn request_need(&self) -> PhaseNeed {
        self.request
    }
    fn response_need(&self) -> PhaseNeed {
        self.response
    }
    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        self.act(ctx)
    }
    fn on_response(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        self.act(ctx)
    }
}

impl Probe {
    fn act(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        // Record the order in which processors ran.
        let trail = ctx.header("x-trail").unwrap_or_default();
        ctx.set_header("x-trail", &format!("{trail}{}", &self.behaviour[..1]))?;
        match self.behaviour.as_str() {
            "continue" => Ok(Decision::Continue),
            "reject" => Ok(Decision::Reject(LocalReply::json_error(403, "denied", "no"))),
            "error" => Err(PluginError::internal("broken", "it broke")),
            "panic" => panic!("boom"),
            "slow" => {
                while !ctx.deadline_exceeded() {}
                Ok(Decision::Continue)
            }
            "mutate" => {
                ctx.body().set(&FieldPath::parse("$.added").unwrap(), json!(1)).unwrap();
                Ok(Decision::Continue)
            }
            "derive" => {
                // Counts how many processors before this one derived the shared value.
                let seen = ctx.derived::<u32>(7).map_or(0, |value| *value);
                ctx.set_header("x-derived", &seen.to_string())?;
                ctx.keep_derived(7, std::rc::Rc::new(seen + 1));
                Ok(Decision::Continue)
            }
            "redact" => {
                ctx.mark_redacted();
                Ok(Decision::Continue)
            }
            "redacted?" => {
                let redacted = ctx.response_redacted();
                ctx.set_header("x-redacted", &redacted.to_string())?;
                Ok(Decision::Continue)
            }
            other => panic!("unknown behaviour {other}"),
        }
    }
}

fn registry() -> Registry {
    let mut registry = Registry::new();
    registry
        .register(
            "probe",
            |params: &Value, _: &mut BuildContext| -> Result<Arc<dyn Plugin>, ConfigError> {
                let need = |key: &str| match params.get(key).and_then(Value::as_str) {
                    Some("headers") => PhaseNeed::Headers,
                    Some("body") => PhaseNeed::Body,
                    _ => PhaseNeed::Skip,
                };
                let behaviour = params
                    .get("do")
                    .and_then(Value::as_str)
                    .unwrap_or("continue")
                    .to_string();
                Ok(Arc::new(Probe {
                    request: need("request"),
                    response: need("response"),
                    behaviour,
                }))
            },
        )
        .unwrap();
    registry
}

fn chain(yaml: &str) -> Arc<Chain> {
    Arc::new(Chain::load(yaml, &registry()).unwrap())
}

fn run_request(chain: &Arc<Chain>, host: &mut FakeHost) -> (HeadersFlow, Option<BodyFlow>) {
    let mut stream = Stream::new(chain.clone());
    let headers = stream.on_request_headers(host, false);
    let body = (headers == HeadersFlow::WaitForBody).then(|| stream.on_request_body(host, true));
    (headers, body)
}

fn trail(host: &FakeHost) -> String {
    host.header_values(Direction::Request, "x-trail").join(",")
}

#[test]
fn header_only_chain_runs_at_headers_without_buffering() {
    let chain = chain("processors: [{name: a, type: probe, parameters: {request: headers}}]");
    let mut host = FakeHost::request("/", &[], b"{}");
    assert_eq!(run_request(&chain, &mut host), (HeadersFlow::Continue, None));
    assert_eq!(host.buffer_limit, 0, "no buffering asked for");
    assert_eq!(trail(&host), "c");
    assert_eq!(host.route_cache_clears, 1, "request header changed");
}

#[test]
fn body_chain_runs_every_processor_in_order_at_end_of_body() {
    let chain = chain(
        "processors: [{name: a, type: probe, parameters: {request: headers}}, {name: b, type: probe, parameters: {request: body, do: mutate}}]",
    );
    let mut host = FakeHost::request("/", &[], br#"{"model":"m"}"#);
    assert_eq!(
        run_request(&chain, &mut host),
        (HeadersFlow::WaitForBody, Some(BodyFlow::Continue))
    );
    assert_eq!(host.buffer_limit, 2 * 1024 * 1024);
    assert_eq!(trail(&host), "cm");
    assert_eq!(host.request_body, br#"{"model":"m","added":1}"#);
    assert_eq!(host.header_values(Direction::Request, "content-length"), vec!["23"]);
}

#[test]
fn request_without_body_runs_body_processors_at_headers() {
    let chain = chain("processors: [{name: a, type: probe, parameters: {request: body}}]");
    let mut host = FakeHost::request("/", &[], b"");
    let mut stream = Stream::new(chain);
    assert_eq!(stream.on_request_headers(&mut host, true), HeadersFlow::Continue);
    assert_eq!(trail(&host), "c");
}

#[test]
fn first_reject_short_circuits() {
    let chain = chain(
        "processors: [{name: a, type: probe, parameters: {request: headers, do: reject}}, {name: b, type: probe, parameters: {request: headers}}]",
    );
    let mut host = FakeHost::request("/", &[], b"");
    assert_eq!(run_request(&chain, &mut host).0, HeadersFlow::Stop);
    assert_eq!(trail(&host), "r", "b never ran");
    let reply = host.reply.clone().unwrap();
    assert_eq!(
        (reply.status, reply.json()["error"]["code"].clone()),
        (403, json!("denied"))
    );
    assert_eq!(host.counter(&chain, "processor.a.rejections"), 1);
    assert_eq!(host.counter(&chain, "processor.b.invocations"), 0);
}

#[test]
fn failure_modes_table() {
    // (behaviour, failure mode, timeout, expected status or None for continue, counter that moved)
    let cases = [
        ("error", "FailClosed", "", Some(500), "errors"),
        ("error", "FailOpen", "", None, "fail_open"),
        ("panic", "FailClosed", "", Some(500), "panics"),
        ("panic", "FailOpen", "", Some(500), "panics"),
        ("slow", "FailClosed", ", timeout: 1us", Some(500), "budget_overruns"),
        ("slow", "FailOpen", ", timeout: 1us", None, "fail_open"),
    ];
    for (behaviour, mode, timeout, status, counter) in cases {
        let yaml = format!(
            "processors: [{{name: a, type: probe, failureMode: {mode}{timeout}, parameters: {{request: body, do: {behaviour}}}}}, {{name: b, type: probe, parameters: {{request: body}}}}]"
        );
        let chain = chain(&yaml);
        let mut host = FakeHost::request("/", &[], b"{}");
        host.tick_nanos = 1_000;
        let (_, body) = run_request(&chain, &mut host);
        let case = format!("{behaviour}/{mode}");
        assert_eq!(host.reply.as_ref().map(|r| r.status), status, "{case}");
        assert_eq!(
            body,
            Some(if status.is_some() {
                BodyFlow::Stop
            } else {
                BodyFlow::Continue
            }),
            "{case}"
        );
        assert_eq!(host.counter(&chain, &format!("processor.a.{counter}")), 1, "{case}");
        assert_eq!(
            host.counter(&chain, "processor.b.invocations"),
            u64::from(status.is_none()),
            "{case}"
        );
        assert_eq!(
            host.histograms.values().map(Vec::len).sum::<usize>() as u64,
            1 + u64::from(status.is_none())
        );
    }
}

#[test]
fn body_over_limit_is_413_by_content_length_and_while_buffering() {
    let chain =
        chain("limits: {maxRequestBodyBytes: 10}\nprocessors: [{name: a, type: probe, parameters: {request: body}}]");
    let mut host = FakeHost::request("/", &[("content-length", "11")], b"01234567890");
    let mut stream = Stream::new(chain.clone());
    assert_eq!(stream.on_request_headers(&mut host, false), HeadersFlow::Stop);
    assert_eq!(host.reply.as_ref().unwrap().status, 413);

    let mut host = FakeHost::request("/", &[], b"01234567890");
    let mut stream = Stream::new(chain.clone());
    assert_eq!(stream.on_request_headers(&mut host, false), HeadersFlow::WaitForBody);
    assert_eq!(stream.on_request_body(&mut host, false), BodyFlow::Stop);
    assert_eq!(host.reply.as_ref().unwrap().status, 413);
    assert_eq!(host.counter(&chain, "request_body_too_large"), 1);
}

#[test]
fn response_processors_buffer_and_fail_closed_or_open_above_the_limit() {
    for (mode, expected) in [("FailClosed", Some(502)), ("FailOpen", None)] {
        let yaml = format!(
            "limits: {{maxResponseBodyBytes: 4}}\nprocessors: [{{name: a, type: probe, failureMode: {mode}, parameters: {{response: body}}}}]"
        );
        let chain = chain(&yaml);
        let mut host = FakeHost::request("/", &[], b"");
        host.response_headers
            .push(("content-type".into(), "application/json".into()));
        host.response_body = b"0123456789".to_vec();
        let mut stream = Stream::new(chain.clone());
        assert_eq!(stream.on_request_headers(&mut host, true), HeadersFlow::Continue);
        assert_eq!(stream.on_response_headers(&mut host, false), HeadersFlow::WaitForBody);
        let flow = stream.on_response_body(&mut host, false);
        assert_eq!(host.reply.as_ref().map(|r| r.status), expected, "{mode}");
        assert_eq!(
            flow,
            if expected.is_some() {
                BodyFlow::Stop
            } else {
                BodyFlow::Continue
            }
        );
    }
}

#[test]
fn response_chain_runs_at_end_of_response_body() {
    let chain = chain("processors: [{name: a, type: probe, parameters: {response: body, do: mutate}}]");
    let mut host = FakeHost::request("/", &[], b"");
    host.response_headers
        .push(("content-type".into(), "application/json; charset=utf-8".into()));
    host.response_body = br#"{"id":1}"#.to_vec();
    let mut stream = Stream::new(chain);
    assert_eq!(stream.on_request_headers(&mut host, true), HeadersFlow::Continue);
    assert_eq!(stream.on_response_headers(&mut host, false), HeadersFlow::WaitForBody);
    assert_eq!(stream.on_response_body(&mut host, false), BodyFlow::Buffer);
    assert_eq!(stream.on_response_body(&mut host, true), BodyFlow::Continue);
    assert_eq!(host.response_body, br#"{"id":1,"added":1}"#);
    assert_eq!(host.route_cache_clears, 0, "response changes never touch routing");
    assert_eq!(host.header_values(Direction::Response, "content-length"), vec!["18"]);
    assert_eq!(
        host.header_values(Direction::Request, "accept-encoding"),
        vec!["identity"],
        "a response reader asks the upstream for plain text"
    );
}

#[test]
fn derived_values_are_shared_with_later_processors_of_the_same_request_only() {
    let chain = chain(
        "processors: [{name: a, type: probe, parameters: {request: body, do: derive}}, {name: b, type: probe, parameters: {request: body, do: derive}}]",
    );
    let mut host = FakeHost::request("/", &[], b"{}");
    run_request(&chain, &mut host);
    assert_eq!(host.header_values(Direction::Request, "x-derived"), vec!["1"]);
    let mut next = FakeHost::request("/", &[], b"{}");
    run_request(&chain, &mut next);
    assert_eq!(
        next.header_values(Direction::Request, "x-derived"),
        vec!["1"],
        "a new request starts empty"
    );
}

#[test]
fn a_redacted_answer_is_visible_to_later_response_processors_only() {
    let answer = |yaml: &str| {
        let chain = chain(yaml);
        let mut host = FakeHost::request("/", &[], b"");
        host.response_headers
            .push(("content-type".into(), "application/json".into()));
        host.response_body = br#"{"id":1}"#.to_vec();
        let mut stream = Stream::new(chain);
        stream.on_request_headers(&mut host, true);
        stream.on_response_headers(&mut host, false);
        stream.on_response_body(&mut host, true);
        host.header_values(Direction::Response, "x-redacted").join(",")
    };
    let redact_then_look = "processors: [{name: r, type: probe, parameters: {response: body, do: redact}}, {name: l, type: probe, parameters: {response: body, do: redacted?}}]";
    assert_eq!(answer(redact_then_look), "true");
    let look_then_redact = "processors: [{name: l, type: probe, parameters: {response: body, do: redacted?}}, {name: r, type: probe, parameters: {response: body, do: redact}}]";
    assert_eq!(answer(look_then_redact), "false");
    let on_request = "processors: [{name: r, type: probe, parameters: {request: headers, do: redact}}, {name: l, type: probe, parameters: {response: body, do: redacted?}}]";
    assert_eq!(
        answer(on_request),
        "false",
        "redacting the request does not mark the answer"
    );
}

#[test]
fn non_json_responses_skip_body_readers_and_count_it() {
    let chain = chain("processors: [{name: a, type: probe, parameters: {response: body, do: mutate}}]");
    for content_type in ["text/plain", "text/event-stream", "application/octet-stream"] {
        let mut host = FakeHost::request("/", &[], b"");
        host.response_headers.push(("content-type".into(), content_type.into()));
        host.response_body = b"not json".to_vec();
        let mut stream = Stream::new(chain.clone());
        stream.on_request_headers(&mut host, true);
        assert_eq!(stream.on_response_headers(&mut host, false), HeadersFlow::Continue);
        assert_eq!(stream.on_response_body(&mut host, true), BodyFlow::Continue);
        assert_eq!(host.response_body, b"not json");
        assert_eq!(
            host.counter(&chain, "processor.a.skipped_non_json"),
            1,
            "{content_type}"
        );
        assert_eq!(host.counter(&chain, "processor.a.invocations"), 0);
    }
}

#[test]
fn compressed_requests_are_refused_or_skipped_open() {
    for (mode, expected) in [("FailClosed", Some(415)), ("FailOpen", None)] {
        let chain = chain(&format!(
            "processors: [{{name: a, type: probe, failureMode: {mode}, parameters: {{request: body}}}}, \
             {{name: h, type: probe, parameters: {{request: headers}}}}]"
        ));
        let mut host = FakeHost::request("/", &[("content-encoding", "gzip")], b"\x1f\x8b");
        let (flow, _) = run_request(&chain, &mut host);
        assert_eq!(host.reply.as_ref().map(|r| r.status), expected, "{mode}");
        if expected.is_some() {
            assert_eq!(flow, HeadersFlow::Stop);
            assert_eq!(
                host.reply.as_ref().unwrap().json()["error"]["code"],
                "unsupported_content_encoding"
            );
        } else {
            assert_eq!(flow, HeadersFlow::Continue, "nothing is buffered for a skipped reader");
            assert_eq!(host.counter(&chain, "processor.a.skipped_encoded"), 1);
            assert_eq!(trail(&host), "c", "the header-only processor still ran");
        }
    }
}

#[test]
fn compressed_responses_fail_closed_or_are_skipped_open() {
    for (mode, expected) in [("FailClosed", Some(502)), ("FailOpen", None)] {
        let chain = chain(&format!(
            "processors: [{{name: a, type: probe, failureMode: {mode}, parameters: {{response: body}}}}]"
        ));
        let mut host = FakeHost::request("/", &[("accept-encoding", "gzip")], b"");
        host.response_headers
            .push(("content-type".into(), "application/json".into()));
        host.response_headers.push(("content-encoding".into(), "gzip".into()));
        let mut stream = Stream::new(chain.clone());
        stream.on_request_headers(&mut host, true);
        assert_eq!(
            host.header_values(Direction::Request, "accept-encoding"),
            vec!["identity"]
        );
        let flow = stream.on_response_headers(&mut host, false);
        assert_eq!(host.reply.as_ref().map(|r| r.status), expected, "{mode}");
        if expected.is_none() {
            assert_eq!(flow, HeadersFlow::Continue);
            assert_eq!(host.counter(&chain, "processor.a.skipped_encoded"), 1);
        } else {
            assert_eq!(host.reply.as_ref().unwrap().json()["error"]["code"], "response_encoded");
        }
    }
}

#[test]
fn non_matching_processors_take_no_part() {
    let chain =
        chain("processors: [{name: a, type: probe, match: {pathPrefixes: [/v1/chat]}, parameters: {request: body}}]");
    let mut host = FakeHost::request("/v1/embeddings?x=/v1/chat", &[], b"{}");
    assert_eq!(run_request(&chain, &mut host), (HeadersFlow::Continue, None));
    assert_eq!(host.counter(&chain, "processor.a.invocations"), 0);
}

/// The same bad configurations the Envoy test feeds, at the engine level.
#[test]
fn bad_config_case_table() {
    let cases = [
        ("", "configuration is empty"),
        ("[]", "configuration must be a mapping"),
        (
            "processors: [{name: a, type: nope}]",
            "processors[0].type: unknown plugin type \"nope\"; known types: probe",
        ),
        (
            "processors: [{name: a, type: probe, extra: 1}]",
            "processors[0].extra: unknown field `extra`",
        ),
        ("processors: [{type: probe}]", "processors[0]: missing field `name`"),
        (
            "processors: [{name: a, type: probe}, {name: a, type: probe}]",
            "processors[1].name: duplicate processor name",
        ),
        (
            "processors: [{name: 'a b', type: probe}]",
            "processors[0].name: processor name \"a b\"",
        ),
        (
            "processors: [{name: a, type: probe, timeout: 2 parsecs}]",
            "processors[0].timeout: invalid duration",
        ),
        (
            "processors: [{name: a, type: probe, timeout: 5}]",
            "processors[0].timeout: invalid type: integer",
        ),
        (
            "processors: [{name: a, type: probe, timeout: 0s}]",
            "processors[0].timeout: duration \"0s\" must be greater than zero",
        ),
        (
            "processors: [{name: a, type: probe, failureMode: failopen}]",
            "processors[0].failureMode: unknown variant",
        ),
        (
            "limits: {maxRequestBodyBytes: -1}",
            "limits.maxRequestBodyBytes: invalid value",
        ),
        (
            "processors: [{name: a, type: probe, match: {pathPrefixes: [v1]}}]",
            "processors[0].match.pathPrefixes[0]:",
        ),
        (
            "processors: [{name: a, type: probe, match: {headers: [{name: x, exact: a, prefix: b}]}}]",
            "processors[0].match.headers[0]: give exactly one of",
        ),
        (
            "{\"processors\": [{\"name\": \"a\", \"type\": \"probe\", \"bad\": 1}]}",
            "processors[0].bad: unknown field",
        ),
        ("{\"processors\": [", "invalid JSON"),
    ];
    for (text, expected) in cases {
        let err = Chain::load(text, &registry()).unwrap_err().to_string();
        assert!(err.starts_with(expected), "{text:?}\n  got: {err}\n  want: {expected}");
    }
}

#[test]
fn registry_refuses_duplicates_and_bad_names() {
    let mut registry = registry();
    let build = |_: &Value, _: &mut BuildContext| -> Result<Arc<dyn Plugin>, ConfigError> { unreachable!() };
    assert_eq!(
        registry.register("probe", build),
        Err(RegistryError::Duplicate("probe".into()))
    );
    assert_eq!(
        registry.register("Bad_Name", build),
        Err(RegistryError::InvalidName("Bad_Name".into()))
    );
}

#[test]
fn metrics_are_declared_per_processor() {
    let chain = chain("processors: [{name: a, type: probe}]");
    let names: Vec<&str> = chain.metrics().iter().map(|m| m.name.as_str()).collect();
    for expected in [
        "processor.a.invocations",
        "processor.a.rejections",
        "processor.a.errors",
        "processor.a.fail_open",
        "processor.a.budget_overruns",
        "processor.a.panics",
        "processor.a.latency_us",
    ] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
}
