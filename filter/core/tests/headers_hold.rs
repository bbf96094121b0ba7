//! Hosts that cannot hold request headers while the body is read (proxy-wasm without
//! `allow_on_headers_stop_iteration`, as Envoy Gateway configures it): nothing hangs, chains
//! that do not steer routing work with the headers gone, steering processors follow their
//! failure mode with an error that says how to fix the host.

use payload_processor_core::testing::FakeHost;
use payload_processor_core::*;
use serde_json::{json, Value};
use std::sync::Arc;

const FIX: &str = "set the hold-headers option";

/// `route`: sets `x-route` from the body's `model` (steers). `mask`: rewrites `$.secret` (edits
/// the body). `stamp`: a header-stage plugin that sets `x-stamp`.
struct TestPlugin(&'static str);

impl Plugin for TestPlugin {
    fn request_need(&self) -> PhaseNeed {
        match self.0 {
            "stamp" => PhaseNeed::Headers,
            _ => PhaseNeed::Body,
        }
    }
    fn request_edits(&self) -> RequestEdits {
        match self.0 {
            "route" => RequestEdits::HEADERS,
            "mask" => RequestEdits::BODY,
            _ => RequestEdits::ALL,
        }
    }
    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        match self.0 {
            "route" => {
                let model = ctx.body().doc().ok().and_then(|d| d.get("model").cloned());
                ctx.set_header(
                    "x-route",
                    model
                        .and_then(|m| m.as_str().map(str::to_owned))
                        .as_deref()
                        .unwrap_or("-"),
                )?;
            }
            "mask" => {
                ctx.body()
                    .set(&FieldPath::parse("$.secret").unwrap(), json!("[MASKED]"))
                    .unwrap();
            }
            _ => ctx.set_header("x-stamp", "1")?,
        }
        Ok(Decision::Continue)
    }
}

fn chain(processors: &[(&'static str, &str)]) -> Arc<Chain> {
    let mut registry = Registry::new();
    for kind in ["route", "mask", "stamp"] {
        registry
            .register(
                kind,
                move |_: &Value, _: &mut BuildContext| -> Result<Arc<dyn Plugin>, ConfigError> {
                    Ok(Arc::new(TestPlugin(kind)))
                },
            )
            .unwrap();
    }
    let entries: Vec<String> = processors
        .iter()
        .map(|(kind, mode)| format!("{{name: {kind}, type: {kind}, failureMode: {mode}}}"))
        .collect();
    Arc::new(Chain::load(&format!("processors: [{}]", entries.join(", ")), &registry).unwrap())
}

fn host(hold: HeadersHold) -> FakeHost {
    let body = br#"{"model":"m-a","secret":"hunter2"}"#;
    let mut host = FakeHost::request("/v1/chat/completions", &[("content-length", "34")], body);
    host.headers_hold = Some(hold);
    host
}

fn counter(chain: &Chain, host: &FakeHost, name: &str) -> u64 {
    let id = chain.metrics().iter().position(|m| m.name == name).unwrap();
    host.counters.get(&id).copied().unwrap_or(0)
}

#[test]
fn fail_closed_steering_answers_at_headers_with_the_fix() {
    let chain = chain(&[("route", "FailClosed")]);
    let mut host = host(HeadersHold::Unavailable(FIX));
    let mut stream = Stream::new(chain.clone());
    assert_eq!(stream.on_request_headers(&mut host, false), HeadersFlow::Stop);
    let reply = host.reply.clone().unwrap();
    assert_eq!(reply.status, 500);
    let body = reply.json();
    assert_eq!(body["error"]["code"], "headers_hold_unavailable");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("processor route") && message.contains(FIX),
        "{message}"
    );
    assert_eq!(counter(&chain, &host, "processor.route.errors"), 1);
}

#[test]
fn fail_open_steering_is_skipped_and_counted_and_the_request_goes_on() {
    let chain = chain(&[("route", "FailOpen"), ("mask", "FailClosed")]);
    let mut host = host(HeadersHold::Unavailable(FIX));
    let mut stream = Stream::new(chain.clone());
    assert_eq!(stream.on_request_headers(&mut host, false), HeadersFlow::Continue);
    assert_eq!(stream.on_request_body(&mut host, false), BodyFlow::Buffer);
    assert_eq!(stream.on_request_body(&mut host, true), BodyFlow::Continue);
    assert!(host.reply.is_none());
    assert_eq!(host.header_values(Direction::Request, "x-route"), Vec::<String>::new());
    assert_eq!(counter(&chain, &host, "processor.route.fail_open"), 1);
    assert_eq!(counter(&chain, &host, "processor.route.invocations"), 0);
    assert_eq!(host.request_body, br#"{"model":"m-a","secret":"[MASKED]"}"#);
}

#[test]
fn body_editing_chains_drop_content_length_from_early_headers_and_never_touch_headers_after() {
    let chain = chain(&[("stamp", "FailClosed"), ("mask", "FailClosed")]);
    {
        let hold = HeadersHold::Unavailable(FIX);
        let mut host = host(hold);
        let mut stream = Stream::new(chain.clone());
        assert_eq!(
            stream.on_request_headers(&mut host, false),
            HeadersFlow::Continue,
            "{hold:?}"
        );
        // The header-stage processor ran while the headers were still here.
        assert_eq!(host.header_values(Direction::Request, "x-stamp"), vec!["1"]);
        assert!(
            host.header(Direction::Request, "content-length").is_none(),
            "sent chunked"
        );
        assert_eq!(stream.on_request_body(&mut host, true), BodyFlow::Continue);
        assert_eq!(host.request_body, br#"{"model":"m-a","secret":"[MASKED]"}"#);
        assert!(host.header(Direction::Request, "content-length").is_none());
        assert_eq!(
            host.route_cache_clears, 1,
            "once, for the header stage; nothing after the body"
        );
        assert_eq!(
            counter(&chain, &host, "processor.stamp.invocations"),
            1,
            "ran once, at headers"
        );
    }
}

#[test]
fn unknown_hold_with_a_steering_processor_waits_and_fails_as_configured_when_told() {
    for (mode, flow) in [("FailClosed", HeadersFlow::Stop), ("FailOpen", HeadersFlow::Continue)] {
        let chain = chain(&[("route", mode), ("mask", "FailClosed")]);
        let mut host = host(HeadersHold::Unknown);
        let mut stream = Stream::new(chain.clone());
        assert_eq!(stream.on_request_headers(&mut host, false), HeadersFlow::WaitForBody);
        assert_eq!(stream.on_request_headers_hold_failed(&mut host, FIX), flow, "{mode}");
        if flow == HeadersFlow::Continue {
            assert_eq!(stream.on_request_body(&mut host, true), BodyFlow::Continue);
            assert_eq!(host.request_body, br#"{"model":"m-a","secret":"[MASKED]"}"#);
            assert!(host.header(Direction::Request, "content-length").is_none());
        } else {
            assert_eq!(
                host.reply.as_ref().unwrap().json()["error"]["code"],
                "headers_hold_unavailable"
            );
        }
    }
}

#[test]
fn available_hold_keeps_the_normal_path() {
    let chain = chain(&[("route", "FailClosed"), ("mask", "FailClosed")]);
    let mut host = host(HeadersHold::Available);
    let mut stream = Stream::new(chain);
    assert_eq!(stream.on_request_headers(&mut host, false), HeadersFlow::WaitForBody);
    assert_eq!(stream.on_request_body(&mut host, true), BodyFlow::Continue);
    assert_eq!(host.header_values(Direction::Request, "x-route"), vec!["m-a"]);
    assert_eq!(host.header_values(Direction::Request, "content-length"), vec!["35"]);
    assert_eq!(host.route_cache_clears, 1);
}

#[test]
fn a_plugin_that_changes_headers_it_did_not_declare_fails_instead_of_losing_the_change() {
    // `stamp` declares nothing (ALL) but as a body processor here would set a header after the
    // headers left: its error goes through its failure mode, never a silent loss.
    struct Undeclared;
    impl Plugin for Undeclared {
        fn request_need(&self) -> PhaseNeed {
            PhaseNeed::Body
        }
        fn request_edits(&self) -> RequestEdits {
            RequestEdits::BODY
        }
        fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
            ctx.set_header("x-late", "1")?;
            Ok(Decision::Continue)
        }
    }
    let mut registry = Registry::new();
    registry
        .register(
            "late",
            |_: &Value, _: &mut BuildContext| -> Result<Arc<dyn Plugin>, ConfigError> { Ok(Arc::new(Undeclared)) },
        )
        .unwrap();
    let chain = Arc::new(Chain::load("processors: [{name: late, type: late}]", &registry).unwrap());
    let mut host = host(HeadersHold::Unavailable(FIX));
    let mut stream = Stream::new(chain);
    assert_eq!(stream.on_request_headers(&mut host, false), HeadersFlow::Continue);
    assert_eq!(stream.on_request_body(&mut host, true), BodyFlow::Stop);
    let reply = host.reply.unwrap();
    assert_eq!(reply.status, 500);
    assert!(host.request_headers.iter().all(|(name, _)| name != "x-late"));
}

/// `reply`: a response-body plugin that rejects answers containing "forbidden", masks "secret",
/// and stamps a response header.
struct ResponseGuard;

impl Plugin for ResponseGuard {
    fn response_need(&self) -> PhaseNeed {
        PhaseNeed::Body
    }
    fn on_response(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        let text = String::from_utf8_lossy(ctx.body().raw()).into_owned();
        if text.contains("forbidden") {
            return Ok(Decision::Reject(LocalReply::json_error(403, "blocked", "no")));
        }
        if text.contains("secret") {
            ctx.body()
                .set(&FieldPath::parse("$.answer").unwrap(), json!("[MASKED]"))
                .unwrap();
        }
        Ok(Decision::Continue)
    }
}

fn response_chain() -> Arc<Chain> {
    let mut registry = Registry::new();
    registry
        .register(
            "guard",
            |_: &Value, _: &mut BuildContext| -> Result<Arc<dyn Plugin>, ConfigError> { Ok(Arc::new(ResponseGuard)) },
        )
        .unwrap();
    Arc::new(Chain::load("processors: [{name: guard, type: guard}]", &registry).unwrap())
}

fn answer(host: &mut FakeHost, body: &[u8]) {
    host.response_headers = vec![
        (":status".into(), "200".into()),
        ("content-type".into(), "application/json".into()),
        ("content-length".into(), body.len().to_string()),
    ];
    host.response_body = body.to_vec();
}

#[test]
fn responses_whose_headers_cannot_wait_are_masked_chunked_and_reset_when_rejected() {
    let chain = response_chain();
    // Masked: the headers go first without content-length, the body is changed at its end.
    let mut fake = host(HeadersHold::Unavailable(FIX));
    let mut stream = Stream::new(chain.clone());
    assert_eq!(stream.on_request_headers(&mut fake, true), HeadersFlow::Continue);
    answer(&mut fake, br#"{"answer":"the secret"}"#);
    assert_eq!(stream.on_response_headers(&mut fake, false), HeadersFlow::Continue);
    assert!(fake.header(Direction::Response, "content-length").is_none());
    assert_eq!(stream.on_response_body(&mut fake, true), BodyFlow::Continue);
    assert_eq!(fake.response_body, br#"{"answer":"[MASKED]"}"#);
    assert!(fake.header(Direction::Response, "content-length").is_none());
    // Rejected: the status already went out, so the stream is reset; no reply is attempted.
    let mut fake = host(HeadersHold::Unavailable(FIX));
    let mut stream = Stream::new(chain);
    stream.on_request_headers(&mut fake, true);
    answer(&mut fake, br#"{"answer":"forbidden"}"#);
    assert_eq!(stream.on_response_headers(&mut fake, false), HeadersFlow::Continue);
    assert_eq!(stream.on_response_body(&mut fake, true), BodyFlow::Stop);
    assert!(fake.reset && fake.reply.is_none());
}
