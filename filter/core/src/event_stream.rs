//! Per-stream state of a streamed (SSE) response: the parser, the hold-back window, and the
//! terminal events that end a rejected stream in a way each provider's SDK understands.

use crate::plugin::LocalReply;
use crate::sse::{SseEvent, SseParser};
use serde_json::{json, Value};
use std::collections::VecDeque;

/// The provider API a request speaks, as far as the engine and plugins need to know (how a
/// rejected stream ends, where a system prompt goes, which requests can stream usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// OpenAI chat completions (`chat.completion.chunk` events, `data: [DONE]`).
    OpenAiChat,
    /// OpenAI legacy completions (`text_completion` events, `data: [DONE]`).
    OpenAiCompletions,
    /// OpenAI responses API (typed `response.*` events).
    OpenAiResponses,
    /// Anthropic messages (typed `message_*` / `content_block_*` events).
    Anthropic,
    /// Anything else.
    Unknown,
}

impl Api {
    /// The API a request path implies (query ignored).
    pub fn from_path(path: &str) -> Self {
        let path = path.split('?').next().unwrap_or_default().trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Self::OpenAiChat
        } else if path.ends_with("/completions") {
            Self::OpenAiCompletions
        } else if path.ends_with("/responses") {
            Self::OpenAiResponses
        } else if path.ends_with("/messages") {
            Self::Anthropic
        } else {
            Self::Unknown
        }
    }

    /// Typed events tell the protocol better than a path (a gateway may rewrite paths).
    fn refine(&mut self, event_type: &str) {
        if event_type.starts_with("message_") || event_type.starts_with("content_block_") {
            *self = Self::Anthropic;
        } else if event_type.starts_with("response.") {
            *self = Self::OpenAiResponses;
        }
    }
}

/// A streamed response being passed through event processors.
pub(crate) struct EventStream {
    /// Indexes of the processors that see the events, in chain order (decided once, at the
    /// response headers).
    pub(crate) processors: Vec<usize>,
    pub(crate) parser: SseParser,
    held: VecDeque<Vec<u8>>,
    held_bytes: usize,
    hold_back: usize,
    pub(crate) protocol: Api,
    /// `id`, `model` and `created` of the first OpenAI chunk, for a terminal chunk that
    /// belongs to the same completion.
    first_chunk: Option<Value>,
    events_seen: u64,
    /// True once any byte (and so the headers) went to the client.
    pub(crate) started: bool,
    /// True after a rejection: the stream is over for the client.
    pub(crate) finished: bool,
    /// True after giving up parsing (an oversized event under FailOpen): bytes flow unchanged.
    pub(crate) passthrough: bool,
    /// Events ready to go through the processors from a position on (`processors[position]`):
    /// new events enter at 0; events a processor emitted or released enter after it.
    pub(crate) pending: VecDeque<(usize, SseEvent)>,
    /// Per position, the events that processor holds until a callout's answer (or the end).
    pub(crate) gates: Vec<Vec<SseEvent>>,
    /// The upstream's end reached the filter (data with end of stream, or trailers).
    pub(crate) ended: bool,
    /// Where telling the processors the stream ended has got to.
    pub(crate) end: StreamEnd,
    /// Approved bytes kept back while a callout is out after the upstream ended (the stream
    /// may not go on then); they go first in the next output, a rejection's included.
    pub(crate) approved: Vec<u8>,
}

/// Telling the processors a stream ended, one after the other (a processor may call out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamEnd {
    /// Not yet.
    NotYet,
    /// The processor at this position is next.
    Next(usize),
    /// Every processor was told.
    Done,
}

impl EventStream {
    pub(crate) fn new(max_event_bytes: usize, hold_back: usize, protocol: Api, processors: Vec<usize>) -> Self {
        let gates = processors.iter().map(|_| Vec::new()).collect();
        Self {
            processors,
            parser: SseParser::new(max_event_bytes),
            held: VecDeque::new(),
            held_bytes: 0,
            hold_back,
            protocol,
            first_chunk: None,
            events_seen: 0,
            started: false,
            finished: false,
            passthrough: false,
            pending: VecDeque::new(),
            gates,
            ended: false,
            end: StreamEnd::NotYet,
            approved: Vec::new(),
        }
    }

    /// Moves what processor `position` holds to the front of the pending events, to go on
    /// through the processors after it.
    pub(crate) fn release_gate(&mut self, position: usize) {
        let Some(gate) = self.gates.get_mut(position) else {
            return;
        };
        for event in std::mem::take(gate).into_iter().rev() {
            self.pending.push_front((position + 1, event));
        }
    }

    /// Learns what it needs from an event before plugins see it.
    pub(crate) fn observe(&mut self, event: &mut SseEvent) {
        self.events_seen += 1;
        if let Some(kind) = event.event_type() {
            self.protocol.refine(kind);
        }
        let openai = matches!(self.protocol, Api::OpenAiChat | Api::OpenAiCompletions);
        if openai && self.first_chunk.is_none() && !event.is_done_marker() && event.data().is_some() {
            if let Ok(Value::Object(chunk)) = event.json() {
                let keep = ["id", "created", "model", "system_fingerprint"];
                let kept: serde_json::Map<_, _> = chunk
                    .iter()
                    .filter(|(key, _)| keep.contains(&key.as_str()))
                    .map(|(key, value)| (key.clone(), value.clone()))
                    .collect();
                self.first_chunk = Some(Value::Object(kept));
            }
        }
    }

    /// Queues processed bytes behind the hold-back window.
    pub(crate) fn hold(&mut self, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.held_bytes += bytes.len();
            self.held.push_back(bytes);
        }
    }

    /// Moves everything beyond the window (everything, with `all`) to `out`.
    pub(crate) fn release(&mut self, out: &mut Vec<u8>, all: bool) {
        while self.held_bytes > self.hold_back || (all && !self.held.is_empty()) {
            let Some(bytes) = self.held.pop_front() else { break };
            self.held_bytes -= bytes.len();
            out.extend_from_slice(&bytes);
        }
    }

    /// Forgets the held bytes (the stream was rejected; they never reach the client).
    pub(crate) fn discard_held(&mut self) {
        self.held.clear();
        self.held_bytes = 0;
    }

    /// The bytes that end a rejected stream for the client: never a JSON body on an event
    /// stream, always something the provider's SDK reports as a filtered or failed response.
    pub(crate) fn terminal_events(&self, reply: &LocalReply) -> Vec<u8> {
        let (code, message) = error_fields(reply);
        let event = |kind: Option<&str>, data: Value| SseEvent::new(kind, &data.to_string()).to_bytes();
        match self.protocol {
            Api::OpenAiChat | Api::OpenAiCompletions => {
                let mut chunk = self.first_chunk.clone().unwrap_or_else(|| json!({}));
                let choice = if self.protocol == Api::OpenAiChat {
                    chunk["object"] = "chat.completion.chunk".into();
                    json!({"index": 0, "delta": {}, "finish_reason": "content_filter", "logprobs": null})
                } else {
                    chunk["object"] = "text_completion".into();
                    json!({"index": 0, "text": "", "finish_reason": "content_filter", "logprobs": null})
                };
                chunk["choices"] = json!([choice]);
                let mut bytes = event(None, chunk);
                bytes.extend_from_slice(b"data: [DONE]\n\n");
                bytes
            }
            Api::OpenAiResponses => event(
                Some("error"),
                json!({"type": "error", "code": code, "message": message, "param": null,
                       "sequence_number": self.events_seen}),
            ),
            Api::Anthropic => {
                let kind = match reply.status {
                    401 => "authentication_error",
                    403 => "permission_error",
                    404 => "not_found_error",
                    413 => "request_too_large",
                    429 => "rate_limit_error",
                    400..=499 => "invalid_request_error",
                    529 => "overloaded_error",
                    _ => "api_error",
                };
                event(
                    Some("error"),
                    json!({"type": "error", "error": {"type": kind, "message": message}}),
                )
            }
            Api::Unknown => event(
                Some("error"),
                json!({"error": {"message": message, "type": "content_filter", "code": code}}),
            ),
        }
    }
}

/// Code and message of a reply built by [`LocalReply::json_error`] (generic ones otherwise).
fn error_fields(reply: &LocalReply) -> (String, String) {
    let error = serde_json::from_slice::<Value>(&reply.body)
        .ok()
        .and_then(|body| body.get("error").cloned());
    let text = |key: &str, fallback: &str| {
        error
            .as_ref()
            .and_then(|e| e.get(key))
            .and_then(Value::as_str)
            .unwrap_or(fallback)
            .to_string()
    };
    (
        text("code", "content_filter"),
        text("message", "the response was stopped by the gateway"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::SseParser;

    fn parse_all(bytes: &[u8]) -> Vec<SseEvent> {
        let mut parser = SseParser::new(1 << 20);
        parser.push(bytes);
        std::iter::from_fn(|| parser.next_event(true).unwrap()).collect()
    }

    #[test]
    fn openai_chat_ends_with_content_filter_then_done() {
        let mut stream = EventStream::new(1024, 0, Api::from_path("/v1/chat/completions"), vec![]);
        let mut first = SseEvent::parse(
            br#"data: {"id":"c1","object":"chat.completion.chunk","created":5,"model":"m","choices":[]}"#.to_vec(),
        );
        stream.observe(&mut first);
        let reply = LocalReply::json_error(403, "blocked", "no");
        let mut events = parse_all(&stream.terminal_events(&reply));
        assert_eq!(events.len(), 2);
        let chunk = events[0].json().unwrap().clone();
        assert_eq!(chunk["id"], "c1");
        assert_eq!(chunk["model"], "m");
        assert_eq!(chunk["choices"][0]["finish_reason"], "content_filter");
        assert!(events[1].is_done_marker());
    }

    #[test]
    fn anthropic_and_responses_end_with_an_error_event() {
        let reply = LocalReply::json_error(403, "blocked", "not allowed");
        let mut stream = EventStream::new(1024, 0, Api::Unknown, vec![]);
        stream.observe(&mut SseEvent::parse(b"event: message_start\ndata: {}\n\n".to_vec()));
        let mut events = parse_all(&stream.terminal_events(&reply));
        assert_eq!(events[0].event_type(), Some("error"));
        assert_eq!(events[0].json().unwrap()["error"]["type"], "permission_error");
        assert_eq!(events[0].json().unwrap()["error"]["message"], "not allowed");

        let stream = EventStream::new(1024, 0, Api::from_path("/v1/responses"), vec![]);
        let mut events = parse_all(&stream.terminal_events(&reply));
        assert_eq!(events[0].json().unwrap()["code"], "blocked");
    }

    #[test]
    fn the_window_holds_at_most_its_size_at_event_granularity() {
        let mut stream = EventStream::new(1024, 10, Api::Unknown, vec![]);
        let mut out = Vec::new();
        stream.hold(b"aaaa".to_vec());
        stream.hold(b"bbbb".to_vec());
        stream.release(&mut out, false);
        assert!(out.is_empty());
        stream.hold(b"cccc".to_vec());
        stream.release(&mut out, false);
        assert_eq!(out, b"aaaa");
        stream.release(&mut out, true);
        assert_eq!(out, b"aaaabbbbcccc");
    }
}
