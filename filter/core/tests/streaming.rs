//! Streamed (SSE) responses through the engine against the fake host: pass-through, hold-back,
//! rejections before and after the first byte, drops, edits, splits, oversized events.

use payload_processor_core::testing::FakeHost;
use payload_processor_core::*;
use serde_json::Value;
use std::sync::Arc;

/// Looks for `word` across the text of all events so far (so a word split over events is
/// found), drops events whose data contains `drop`, upper-cases data with `upper`, and counts
/// events into metadata at the end of the stream.
struct Watch {
    hold_back: usize,
    word: Option<String>,
    drop: Option<String>,
    upper: bool,
    fail_on: Option<String>,
}

#[derive(Default)]
struct Seen {
    text: String,
    events: u32,
}

impl Plugin for Watch {
    fn stream_need(&self) -> Option<StreamNeed> {
        Some(StreamNeed {
            hold_back_bytes: self.hold_back,
        })
    }
    fn on_response_event(&self, ctx: &mut Context<'_>, event: &mut SseEvent) -> Result<EventDecision, PluginError> {
        // The text of an OpenAI chunk, or the raw data of anything else.
        let data = match event.json() {
            Ok(chunk) if chunk.get("choices").is_some() => chunk["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            _ => event.data().unwrap_or_default().to_string(),
        };
        let seen = ctx.state::<Seen>();
        seen.events += 1;
        seen.text.push_str(&data);
        if self.word.as_ref().is_some_and(|w| seen.text.contains(w.as_str())) {
            return Ok(EventDecision::Reject(LocalReply::json_error(
                403, "blocked", "found it",
            )));
        }
        if self.fail_on.as_ref().is_some_and(|w| data.contains(w.as_str())) {
            return Err(PluginError::internal("broken", "plugin failed"));
        }
        if self.drop.as_ref().is_some_and(|d| data.contains(d.as_str())) {
            return Ok(EventDecision::Drop);
        }
        if self.upper {
            event.set_data(data.to_uppercase());
        }
        Ok(EventDecision::Continue)
    }
    fn on_stream_end(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        let events = ctx.state::<Seen>().events;
        ctx.set_metadata("test", "events", &events.to_string());
        Ok(Decision::Continue)
    }
}

fn registry() -> Registry {
    let mut registry = Registry::new();
    registry
        .register(
            "watch",
            |params: &Value, _: &mut BuildContext| -> Result<Arc<dyn Plugin>, ConfigError> {
                let text = |key: &str| params.get(key).and_then(Value::as_str).map(str::to_string);
                Ok(Arc::new(Watch {
                    hold_back: params.get("holdBack").and_then(Value::as_u64).unwrap_or(0) as usize,
                    word: text("word"),
                    drop: text("drop"),
                    upper: params.get("upper").and_then(Value::as_bool).unwrap_or(false),
                    fail_on: text("failOn"),
                }))
            },
        )
        .unwrap();
    registry
}

/// What the client received, and how each callback went.
struct Run {
    host: FakeHost,
    client: Vec<u8>,
    flows: Vec<BodyFlow>,
    headers: HeadersFlow,
}

fn stream_through(yaml: &str, path: &str, content_type: &str, chunks: &[&[u8]]) -> Run {
    let chain = Arc::new(Chain::load(yaml, &registry()).unwrap());
    let mut host = FakeHost::request(path, &[], b"");
    host.response_headers.push(("content-type".into(), content_type.into()));
    let mut stream = Stream::new(chain);
    assert_eq!(stream.on_request_headers(&mut host, true), HeadersFlow::Continue);
    let headers = stream.on_response_headers(&mut host, false);
    let mut client = Vec::new();
    let mut flows = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        host.response_body = chunk.to_vec();
        let flow = stream.on_response_body(&mut host, i + 1 == chunks.len());
        if matches!(flow, BodyFlow::Continue) {
            client.extend_from_slice(&host.response_body);
        }
        flows.push(flow);
    }
    Run {
        host,
        client,
        flows,
        headers,
    }
}

const CHAT: &str = concat!(
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo w\u{f6}rld\"}}]}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" secret\"}}]}\n\n",
    "data: [DONE]\n\n",
);

fn events(bytes: &[u8]) -> Vec<SseEvent> {
    let mut parser = payload_processor_core::sse::SseParser::new(1 << 20);
    parser.push(bytes);
    std::iter::from_fn(|| parser.next_event(true).unwrap()).collect()
}

#[test]
fn no_event_plugin_means_plain_pass_through() {
    let run = stream_through(
        "processors: []",
        "/v1/chat/completions",
        "text/event-stream",
        &[CHAT.as_bytes()],
    );
    assert_eq!(run.headers, HeadersFlow::Continue);
    assert_eq!(run.client, CHAT.as_bytes());
    assert_eq!(run.host.body_replacements, 0);
}

#[test]
fn every_split_gives_the_client_the_same_bytes_and_plugins_the_same_events() {
    let yaml = "processors: [{name: w, type: watch}]";
    let bytes = CHAT.as_bytes();
    for split in 0..=bytes.len() {
        let run = stream_through(
            yaml,
            "/v1/chat/completions",
            "text/event-stream",
            &[&bytes[..split], &bytes[split..]],
        );
        assert_eq!(run.headers, HeadersFlow::WaitForBody);
        assert_eq!(run.client, bytes, "split at {split}");
        assert_eq!(
            run.host
                .metadata
                .get(&("test".into(), "events".into()))
                .map(String::as_str),
            Some("4"),
            "split at {split}"
        );
    }
    // One byte per chunk, the worst case for the parser.
    let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
    let run = stream_through(yaml, "/v1/chat/completions", "text/event-stream", &chunks);
    assert_eq!(run.client, bytes);
}

#[test]
fn with_no_window_each_event_goes_out_as_soon_as_it_is_complete() {
    let run = stream_through(
        "processors: [{name: w, type: watch}]",
        "/v1/chat/completions",
        "text/event-stream",
        &[b"data: a\n\ndata: b", b"\n\n", b"data: [DONE]\n\n"],
    );
    assert_eq!(
        run.flows,
        vec![BodyFlow::Continue, BodyFlow::Continue, BodyFlow::Continue]
    );
    assert_eq!(run.client, b"data: a\n\ndata: b\n\ndata: [DONE]\n\n");
}

#[test]
fn a_window_holds_back_at_most_its_size_and_flushes_at_the_end() {
    let run = stream_through(
        "processors: [{name: w, type: watch, parameters: {holdBack: 20}}]",
        "/x",
        "text/event-stream",
        &[b"data: aaaaaaaa\n\n", b"data: bbbbbbbb\n\n", b"data: cccccccc\n\n", b""],
    );
    // 16 bytes held (<= 20): nothing goes out and the headers stay held.
    assert_eq!(run.flows[0], BodyFlow::Hold);
    // 32 bytes held: the oldest event is released.
    assert_eq!(run.flows[1], BodyFlow::Continue);
    assert_eq!(run.client, b"data: aaaaaaaa\n\ndata: bbbbbbbb\n\ndata: cccccccc\n\n");
}

#[test]
fn a_rejection_before_the_first_byte_is_an_ordinary_error_response() {
    let run = stream_through(
        "processors: [{name: w, type: watch, parameters: {word: secret, holdBack: 4096}}]",
        "/v1/chat/completions",
        "text/event-stream",
        &[CHAT.as_bytes()],
    );
    let reply = run.host.reply.expect("a local reply");
    assert_eq!(reply.status, 403);
    assert_eq!(reply.json()["error"]["code"], "blocked");
    assert!(run.client.is_empty());
}

#[test]
fn a_rejection_after_the_first_byte_ends_an_openai_stream_with_content_filter() {
    // The phrase "lo wörld secret" is split over events; with no window the first events
    // already went out, so the stream ends with a terminal chunk and [DONE].
    let bytes = CHAT.as_bytes();
    let run = stream_through(
        "processors: [{name: w, type: watch, parameters: {word: \"w\u{f6}rld secret\"}}]",
        "/v1/chat/completions",
        "text/event-stream",
        &bytes.chunks(40).collect::<Vec<_>>(),
    );
    assert!(run.host.reply.is_none(), "no JSON body on an event stream");
    let mut got = events(&run.client);
    let texts: Vec<String> = got
        .iter_mut()
        .filter(|e| !e.is_done_marker())
        .map(|e| {
            e.json().unwrap()["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(
        texts,
        vec!["Hel", "lo w\u{f6}rld", ""],
        "the blocked event never reaches the client"
    );
    let at = got.len() - 2;
    let last_chunk = got[at].json().unwrap().clone();
    assert_eq!(last_chunk["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(last_chunk["id"], "c1");
    assert!(got.last().unwrap().is_done_marker());
    assert_eq!(
        run.flows.last(),
        Some(&BodyFlow::Continue),
        "the rest is swallowed, the stream ends"
    );
}

#[test]
fn a_window_keeps_a_phrase_split_over_events_from_the_client() {
    let bytes = CHAT.as_bytes();
    let run = stream_through(
        "processors: [{name: w, type: watch, parameters: {word: \"w\u{f6}rld secret\", holdBack: 200}}]",
        "/v1/chat/completions",
        "text/event-stream",
        &bytes.chunks(40).collect::<Vec<_>>(),
    );
    let mut got = events(&run.client);
    let texts: Vec<String> = got
        .iter_mut()
        .filter(|e| !e.is_done_marker())
        .map(|e| {
            e.json().unwrap()["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    // "lo wörld" (the start of the phrase) was held back and discarded.
    assert_eq!(texts, vec!["Hel", ""]);
}

#[test]
fn anthropic_streams_end_with_an_error_event() {
    let stream = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\"}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"a secret\"}}\n\n",
    );
    let run = stream_through(
        "processors: [{name: w, type: watch, parameters: {word: secret}}]",
        "/anything",
        "text/event-stream",
        &[stream.as_bytes().split_at(60).0, stream.as_bytes().split_at(60).1],
    );
    let mut got = events(&run.client);
    assert_eq!(got[0].event_type(), Some("message_start"));
    let last = got.last_mut().unwrap();
    assert_eq!(last.event_type(), Some("error"));
    assert_eq!(last.json().unwrap()["error"]["type"], "permission_error");
    assert_eq!(last.json().unwrap()["error"]["message"], "found it");
}

#[test]
fn events_can_be_dropped_and_edited() {
    let run = stream_through(
        "processors: [{name: w, type: watch, parameters: {drop: skip, upper: true}}]",
        "/x",
        "text/event-stream",
        &[b"data: a\n\ndata: skip me\n\nevent: e\ndata: b\n\n"],
    );
    assert_eq!(run.client, b"data: A\n\nevent: e\ndata: B\n\n");
}

#[test]
fn plugin_errors_follow_the_failure_mode_on_streams() {
    let chunks: [&[u8]; 2] = [b"data: ok\n\n", b"data: bad\n\ndata: after\n\n"];
    let open = stream_through(
        "processors: [{name: w, type: watch, failureMode: FailOpen, parameters: {failOn: bad}}]",
        "/x",
        "text/event-stream",
        &chunks,
    );
    assert_eq!(open.client, b"data: ok\n\ndata: bad\n\ndata: after\n\n");
    let closed = stream_through(
        "processors: [{name: w, type: watch, parameters: {failOn: bad}}]",
        "/x",
        "text/event-stream",
        &chunks,
    );
    let mut got = events(&closed.client);
    assert_eq!(got[0].data(), Some("ok"));
    assert_eq!(got[1].event_type(), Some("error"));
    assert_eq!(got[1].json().unwrap()["error"]["code"], "broken");
    assert_eq!(got.len(), 2);
}

#[test]
fn an_oversized_event_fails_closed_or_passes_through_open() {
    let big = format!("data: {}\n\n", "x".repeat(100));
    let chunks: [&[u8]; 2] = [b"data: small\n\n", big.as_bytes()];
    let open = stream_through(
        "limits: {maxResponseBodyBytes: 64}\nprocessors: [{name: w, type: watch, failureMode: FailOpen}]",
        "/x",
        "text/event-stream",
        &chunks,
    );
    assert_eq!(open.client, [chunks[0], chunks[1]].concat());
    let closed = stream_through(
        "limits: {maxResponseBodyBytes: 64}\nprocessors: [{name: w, type: watch}]",
        "/x",
        "text/event-stream",
        &chunks,
    );
    let mut got = events(&closed.client);
    assert_eq!(
        got[0].data(),
        Some("small"),
        "{:?}",
        String::from_utf8_lossy(&closed.client)
    );
    assert_eq!(got[1].json().unwrap()["error"]["code"], "response_event_too_large");
}

#[test]
fn json_responses_do_not_reach_event_plugins() {
    let run = stream_through(
        "processors: [{name: w, type: watch, parameters: {word: x}}]",
        "/x",
        "application/json",
        &[b"{\"x\":1}"],
    );
    assert_eq!(run.headers, HeadersFlow::Continue);
    assert_eq!(run.client, b"{\"x\":1}");
}
