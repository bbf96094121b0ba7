//! `response-cache` through the engine against the fake host: whole exchanges, one chain.

use crate::embedding::request::tests::embedded;
use crate::embedding::tests::model_files;
use payload_processor_core::testing::{run_request_phase, run_streamed_response, FakeHost};
use payload_processor_core::{Chain, Direction, Stream};
use serde_json::{json, Value};
use std::sync::Arc;

fn load(yaml: &str) -> Arc<Chain> {
    Arc::new(Chain::load(yaml, &crate::builtin_registry()).expect("test chain loads"))
}

fn exact(extra: &str) -> Arc<Chain> {
    load(&format!(
        "processors: [{{name: cache, type: response-cache, parameters: {{partitionBy: [x-tenant]{extra}}}}}]"
    ))
}

fn chat(content: &str) -> Value {
    json!({"model": "m", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}]})
}

/// One exchange: the request, and (unless answered from the cache) a JSON answer from the
/// upstream. Returns the host: `reply` holds a hit, response headers a miss.
fn ask(
    chain: &Arc<Chain>,
    headers: &[(&str, &str)],
    body: &Value,
    upstream: &[(&str, &str)],
    answer: &str,
) -> FakeHost {
    let mut host = FakeHost::request("/v1/chat/completions", headers, &serde_json::to_vec(body).unwrap());
    host.now.set(1_000_000_000);
    let mut stream = Stream::new(chain.clone());
    run_request_phase(&mut stream, &mut host);
    if host.reply.is_some() {
        return host;
    }
    host.response_headers.push((":status".into(), "200".into()));
    host.response_headers
        .push(("content-type".into(), "application/json".into()));
    for (name, value) in upstream {
        host.response_headers.push((name.to_string(), value.to_string()));
    }
    host.response_body = answer.as_bytes().to_vec();
    stream.on_response_headers(&mut host, false);
    stream.on_response_body(&mut host, true);
    host
}

fn hit(host: &FakeHost) -> Option<String> {
    host.reply.as_ref().map(|reply| {
        assert_eq!(reply.status, 200);
        assert!(
            reply.headers.contains(&("x-cache".into(), "hit".into())),
            "{:?}",
            reply.headers
        );
        String::from_utf8(reply.body.clone()).unwrap()
    })
}

fn cache_header(host: &FakeHost) -> Vec<String> {
    host.header_values(Direction::Response, "x-cache")
}

#[test]
fn exact_mode_serves_a_repeat_and_misses_on_any_change() {
    let chain = exact("");
    let first = ask(&chain, &[], &chat("hello"), &[], r#"{"answer":1}"#);
    assert_eq!(hit(&first), None);
    assert_eq!(cache_header(&first), vec!["miss"]);
    let again = ask(&chain, &[], &chat("hello"), &[], "unused");
    assert_eq!(hit(&again).as_deref(), Some(r#"{"answer":1}"#));
    assert_eq!(
        again.reply.as_ref().unwrap().details,
        "payload_processor.cache.answered"
    );
    // Another text, another parameter, another tenant: misses.
    assert_eq!(hit(&ask(&chain, &[], &chat("hello!"), &[], "{}")), None);
    let mut warmer = chat("hello");
    warmer["temperature"] = json!(0.9);
    assert_eq!(hit(&ask(&chain, &[], &warmer, &[], "{}")), None);
    assert_eq!(hit(&ask(&chain, &[("x-tenant", "b")], &chat("hello"), &[], "{}")), None);
    // The fake host counts per exchange.
    let stat = |host: &FakeHost, name: &str| host.counter(&chain, &format!("processor.cache.{name}"));
    assert_eq!((stat(&again, "hits"), stat(&again, "misses")), (1, 0));
    assert_eq!(
        (stat(&first, "hits"), stat(&first, "misses"), stat(&first, "stores")),
        (0, 1, 1)
    );
}

#[test]
fn cache_control_and_upstream_answers_decide_what_is_kept() {
    let chain = exact("");
    // The client's no-store: neither looked up nor kept.
    ask(&chain, &[("cache-control", "no-store")], &chat("a"), &[], r#"{"a":1}"#);
    assert_eq!(hit(&ask(&chain, &[], &chat("a"), &[], r#"{"a":2}"#)), None);
    assert_eq!(
        hit(&ask(&chain, &[], &chat("a"), &[], "")).as_deref(),
        Some(r#"{"a":2}"#)
    );
    // The client's no-cache: not served from the cache, but the fresh answer is kept.
    ask(&chain, &[("cache-control", "no-cache")], &chat("a"), &[], r#"{"a":3}"#);
    assert_eq!(
        hit(&ask(&chain, &[], &chat("a"), &[], "")).as_deref(),
        Some(r#"{"a":3}"#)
    );
    // The upstream's no-store or private: not kept.
    ask(
        &chain,
        &[],
        &chat("b"),
        &[("cache-control", "private, max-age=60")],
        r#"{"b":1}"#,
    );
    assert_eq!(hit(&ask(&chain, &[], &chat("b"), &[], r#"{"b":2}"#)), None);
    // Errors are not kept.
    let mut host = FakeHost::request("/v1/chat/completions", &[], &serde_json::to_vec(&chat("c")).unwrap());
    let mut stream = Stream::new(chain.clone());
    run_request_phase(&mut stream, &mut host);
    host.response_headers.push((":status".into(), "500".into()));
    host.response_headers
        .push(("content-type".into(), "application/json".into()));
    host.response_body = br#"{"error":{}}"#.to_vec();
    stream.on_response_headers(&mut host, false);
    stream.on_response_body(&mut host, true);
    assert_eq!(hit(&ask(&chain, &[], &chat("c"), &[], r#"{"c":1}"#)), None);
}

#[test]
fn masked_answers_are_not_kept_unless_configured() {
    let guarded = |store_redacted: bool| {
        load(&format!(
            "processors: [{{name: pii, type: pii-guard, parameters: {{entities: [Email], action: Mask}}}}, \
             {{name: cache, type: response-cache, parameters: {{storeRedacted: {store_redacted}}}}}]"
        ))
    };
    let answer = r#"{"choices":[{"message":{"role":"assistant","content":"write to a.b@example.com"}}]}"#;
    let chain = guarded(false);
    ask(&chain, &[], &chat("contact?"), &[], answer);
    assert_eq!(hit(&ask(&chain, &[], &chat("contact?"), &[], answer)), None);
    let chain = guarded(true);
    ask(&chain, &[], &chat("contact?"), &[], answer);
    let served = hit(&ask(&chain, &[], &chat("contact?"), &[], answer)).expect("kept when configured");
    assert!(
        !served.contains("a.b@example.com"),
        "the masked answer is what is kept: {served}"
    );
}

#[test]
fn streams_are_recorded_and_replayed_only_to_streaming_clients() {
    let chain = exact("");
    let mut streaming = chat("count");
    streaming["stream"] = json!(true);
    let events = "data: {\"choices\":[{\"delta\":{\"content\":\"one\"}}]}\n\n\
                  data: {\"choices\":[{\"delta\":{\"content\":\" two\"}}]}\n\ndata: [DONE]\n\n";
    let mut host = FakeHost::request("/v1/chat/completions", &[], &serde_json::to_vec(&streaming).unwrap());
    let mut stream = Stream::new(chain.clone());
    run_request_phase(&mut stream, &mut host);
    let client = run_streamed_response(&mut stream, &mut host, events.as_bytes(), 17);
    assert_eq!(String::from_utf8(client).unwrap(), events);
    // The same streaming request: the recorded events, as an event stream.
    let mut host = FakeHost::request("/v1/chat/completions", &[], &serde_json::to_vec(&streaming).unwrap());
    run_request_phase(&mut Stream::new(chain.clone()), &mut host);
    let reply = host.reply.expect("a hit");
    assert_eq!(String::from_utf8(reply.body).unwrap(), events);
    assert!(reply
        .headers
        .contains(&("content-type".into(), "text/event-stream".into())));
    // The same question without streaming is another entry.
    assert_eq!(hit(&ask(&chain, &[], &chat("count"), &[], r#"{"n":2}"#)), None);
}

fn semantic(extra: &str) -> Arc<Chain> {
    let (weights, tokenizer) = model_files();
    load(&format!(
        "processors: [{{name: cache, type: response-cache, parameters: {{mode: Semantic, similarityThreshold: 0.9, \
         embedding: {{weights: '{weights}', tokenizer: '{tokenizer}'}}{extra}}}}}]"
    ))
}

#[test]
fn semantic_mode_serves_close_prompts_with_the_same_guard_words() {
    let chain = semantic("");
    ask(&chain, &[], &chat("a a a"), &[], r#"{"v":"a"}"#);
    // The synthetic model maps `a` and `aa`-like tokens to one axis: a paraphrase.
    assert_eq!(
        hit(&ask(&chain, &[], &chat("a a"), &[], "")).as_deref(),
        Some(r#"{"v":"a"}"#)
    );
    // Another direction, a number, a negation, a name: misses.
    assert_eq!(hit(&ask(&chain, &[], &chat("c c"), &[], r#"{"v":"c"}"#)), None);
    assert_eq!(hit(&ask(&chain, &[], &chat("a a 2"), &[], "{}")), None);
    assert_eq!(hit(&ask(&chain, &[], &chat("a not a"), &[], "{}")), None);
    assert_eq!(hit(&ask(&chain, &[], &chat("a a Ab"), &[], "{}")), None);
    // Another system prompt: a miss, whatever the user said.
    let mut other_system = chat("a a a");
    other_system["messages"][0]["content"] = json!("be verbose");
    assert_eq!(hit(&ask(&chain, &[], &other_system, &[], "{}")), None);
}

#[test]
fn one_embedding_per_request_for_the_router_and_the_cache() {
    let (weights, tokenizer) = model_files();
    let embedding = format!("embedding: {{weights: '{weights}', tokenizer: '{tokenizer}'}}");
    let chain = load(&format!(
        "processors: [{{name: router, type: semantic-router, parameters: {{{embedding}, defaultModel: d, \
         routes: [{{name: a, model: a-model, utterances: [a]}}]}}}}, \
         {{name: cache, type: response-cache, parameters: {{mode: Semantic, {embedding}}}}}]"
    ));
    let before = embedded();
    let mut body = chat("a a");
    body["model"] = json!("auto");
    ask(&chain, &[], &body, &[], "{}");
    assert_eq!(embedded() - before, 1, "the cache used the router's embedding");
}

#[test]
fn bad_parameters_are_refused_with_paths() {
    let registry = crate::builtin_registry();
    for (parameters, expected) in [
        (
            "{mode: Semantic}",
            "processors[0].parameters.embedding: mode: Semantic needs an embedding model",
        ),
        (
            "{embedding: {weights: w, tokenizer: t}}",
            "processors[0].parameters.embedding: only used with mode: Semantic",
        ),
        (
            "{maxEntries: 0}",
            "processors[0].parameters.maxEntries: must be at least 1",
        ),
        (
            "{similarityThreshold: 1.5}",
            "processors[0].parameters.similarityThreshold: a cosine similarity",
        ),
        (
            "{partitionBy: ['bad header']}",
            "processors[0].parameters.partitionBy[0]",
        ),
        ("{ttl: 0s}", "processors[0].parameters.ttl"),
        ("{mode: Fuzzy}", "processors[0].parameters.mode"),
    ] {
        let yaml = format!("processors: [{{name: c, type: response-cache, parameters: {parameters}}}]");
        let err = Chain::load(&yaml, &registry).unwrap_err().to_string();
        assert!(err.starts_with(expected), "{parameters}: {err}");
    }
}

#[test]
fn streams_behind_a_stream_guard_are_recorded() {
    let chain = load(
        "processors: [{name: pii, type: pii-guard, parameters: {entities: [Email], action: Mask}}, \
         {name: cache, type: response-cache, parameters: {}}]",
    );
    let mut streaming = chat("count");
    streaming["stream"] = json!(true);
    let events = "data: {\"choices\":[{\"delta\":{\"content\":\"one\"}}]}\n\n\
                  data: {\"choices\":[{\"delta\":{\"content\":\" two\"}}]}\n\ndata: [DONE]\n\n";
    let mut host = FakeHost::request("/v1/chat/completions", &[], &serde_json::to_vec(&streaming).unwrap());
    let mut stream = Stream::new(chain.clone());
    run_request_phase(&mut stream, &mut host);
    let client = run_streamed_response(&mut stream, &mut host, events.as_bytes(), 17);
    let mut again = FakeHost::request("/v1/chat/completions", &[], &serde_json::to_vec(&streaming).unwrap());
    run_request_phase(&mut Stream::new(chain.clone()), &mut again);
    let reply = again.reply.expect("a hit");
    assert_eq!(
        String::from_utf8(reply.body).unwrap(),
        String::from_utf8(client).unwrap()
    );
}

#[test]
fn a_stream_is_kept_at_its_terminal_event_when_the_client_leaves_before_the_end() {
    let chain = exact("");
    let mut streaming = chat("count");
    streaming["stream"] = json!(true);
    let events = "data: {\"choices\":[{\"delta\":{\"content\":\"one\"}}]}\n\ndata: [DONE]\n\n";
    let mut host = FakeHost::request("/v1/chat/completions", &[], &serde_json::to_vec(&streaming).unwrap());
    let mut stream = Stream::new(chain.clone());
    run_request_phase(&mut stream, &mut host);
    host.response_headers.push((":status".into(), "200".into()));
    host.response_headers
        .push(("content-type".into(), "text/event-stream".into()));
    stream.on_response_headers(&mut host, false);
    host.response_body = events.as_bytes().to_vec();
    stream.on_response_body(&mut host, false);
    drop(stream); // the client went away: no end of stream
    let mut again = FakeHost::request("/v1/chat/completions", &[], &serde_json::to_vec(&streaming).unwrap());
    run_request_phase(&mut Stream::new(chain.clone()), &mut again);
    assert_eq!(String::from_utf8(again.reply.expect("a hit").body).unwrap(), events);
    // Cut before the terminal event: nothing is kept.
    let mut other = chat("other");
    other["stream"] = json!(true);
    let mut host = FakeHost::request("/v1/chat/completions", &[], &serde_json::to_vec(&other).unwrap());
    let mut stream = Stream::new(chain.clone());
    run_request_phase(&mut stream, &mut host);
    host.response_headers.push((":status".into(), "200".into()));
    host.response_headers
        .push(("content-type".into(), "text/event-stream".into()));
    stream.on_response_headers(&mut host, false);
    host.response_body = b"data: {\"choices\":[{\"delta\":{\"content\":\"one\"}}]}\n\n".to_vec();
    stream.on_response_body(&mut host, false);
    drop(stream);
    let mut again = FakeHost::request("/v1/chat/completions", &[], &serde_json::to_vec(&other).unwrap());
    run_request_phase(&mut Stream::new(chain), &mut again);
    assert!(again.reply.is_none(), "a cut stream is not an answer");
}
