//! Server-sent events: an incremental parser tolerant of any chunk split, and the event type
//! plugins see.
//!
//! Events end at a blank line; lines end at `\n`, `\r\n` or `\r` (the WHATWG rules). Bytes are
//! kept as received, so an event no plugin changed goes out byte-for-byte. A multi-byte UTF-8
//! character can never straddle two events (no UTF-8 sequence contains a line break byte), so
//! buffering up to the blank line is all it takes to see whole characters; invalid UTF-8 inside
//! an event is decoded with replacement characters for plugins and still forwarded unchanged.

use crate::json::JsonError;
use serde_json::Value;

/// One server-sent event.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    raw: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
    id: Option<String>,
    retry: Option<String>,
    json: Option<Value>,
    changed: bool,
}

impl SseEvent {
    /// Parses the bytes of one complete event (its terminating blank line included or not).
    pub fn parse(raw: Vec<u8>) -> Self {
        let mut event = SseEvent::default();
        let mut data: Option<String> = None;
        for line in lines(&raw) {
            if line.is_empty() || line[0] == b':' {
                continue; // blank line or comment
            }
            let (name, value) = match memchr::memchr(b':', line) {
                Some(colon) => {
                    let value = &line[colon + 1..];
                    (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (line, &b""[..]),
            };
            let value = String::from_utf8_lossy(value);
            match name {
                b"data" => match &mut data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(&value);
                    }
                    None => data = Some(value.into_owned()),
                },
                b"event" => event.event = Some(value.into_owned()),
                b"id" if !value.contains('\0') => event.id = Some(value.into_owned()),
                b"retry" => event.retry = Some(value.into_owned()),
                _ => {}
            }
        }
        event.data = data;
        event.raw = raw;
        event
    }

    /// A new event made by the engine or a plugin (always serialized from its fields).
    pub fn new(event: Option<&str>, data: &str) -> Self {
        Self {
            event: event.map(str::to_string),
            data: Some(data.to_string()),
            changed: true,
            ..Self::default()
        }
    }

    /// The `event:` field (`None` means the default type, `message`).
    pub fn event_type(&self) -> Option<&str> {
        self.event.as_deref()
    }

    /// The `data:` lines joined with `\n`; `None` when the event has no data field.
    pub fn data(&self) -> Option<&str> {
        self.data.as_deref()
    }

    /// The `id:` field.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// True for OpenAI's end-of-stream marker `data: [DONE]`.
    pub fn is_done_marker(&self) -> bool {
        self.data.as_deref().is_some_and(|d| d.trim() == "[DONE]")
    }

    /// True for the last event of a known streaming protocol: OpenAI's `[DONE]`, Anthropic's
    /// `message_stop`, the responses API's `response.completed`. The answer is complete there;
    /// clients often close the connection right after it, before the stream's end reaches the
    /// filter, so whatever must happen once per complete answer happens here.
    pub fn is_terminal(&self) -> bool {
        self.is_done_marker() || matches!(self.event_type(), Some("message_stop" | "response.completed"))
    }

    /// True when the event carries neither data nor a type (a keep-alive comment, a stray
    /// blank line); plugins are not called for such events.
    pub fn is_empty(&self) -> bool {
        self.data.is_none() && self.event.is_none()
    }

    /// The data parsed as JSON (parsed on first use).
    pub fn json(&mut self) -> Result<&Value, JsonError> {
        self.parsed().map(|value| &*value)
    }

    /// The data parsed as JSON, for editing; marks the event changed.
    pub fn json_mut(&mut self) -> Result<&mut Value, JsonError> {
        self.parsed()?;
        self.changed = true;
        Ok(self.json.as_mut().expect("parsed above"))
    }

    fn parsed(&mut self) -> Result<&mut Value, JsonError> {
        if self.json.is_none() {
            let data = self
                .data
                .as_deref()
                .ok_or_else(|| JsonError::Syntax("event has no data".into()))?;
            let value = serde_json::from_str(data).map_err(|err| JsonError::Syntax(err.to_string()))?;
            self.json = Some(value);
        }
        Ok(self.json.as_mut().expect("set above"))
    }

    /// Replaces the data.
    pub fn set_data(&mut self, data: impl Into<String>) {
        self.data = Some(data.into());
        self.json = None;
        self.changed = true;
    }

    /// True when a plugin changed the event.
    pub fn is_changed(&self) -> bool {
        self.changed
    }

    /// The bytes to send: as received when unchanged, otherwise serialized from the fields.
    pub fn to_bytes(&self) -> Vec<u8> {
        if !self.changed {
            return self.raw.clone();
        }
        let data = match (&self.json, &self.data) {
            (Some(json), _) => Some(serde_json::to_string(json).expect("a Value always serializes")),
            (None, data) => data.clone(),
        };
        let mut out = Vec::with_capacity(data.as_ref().map_or(0, String::len) + 32);
        for (name, value) in [("event", &self.event), ("id", &self.id), ("retry", &self.retry)] {
            if let Some(value) = value {
                out.extend_from_slice(format!("{name}: {value}\n").as_bytes());
            }
        }
        if let Some(data) = data {
            for line in data.split('\n') {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(line.as_bytes());
                out.push(b'\n');
            }
        }
        out.push(b'\n');
        out
    }

    /// Size of the event as received.
    pub fn raw_len(&self) -> usize {
        self.raw.len()
    }
}

/// Lines of an event, split at `\r\n`, `\n` or `\r`.
fn lines(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = raw;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        match memchr::memchr2(b'\n', b'\r', rest) {
            Some(at) => {
                let line = &rest[..at];
                let skip = if rest[at] == b'\r' && rest.get(at + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = &rest[at + skip..];
                Some(line)
            }
            None => Some(std::mem::take(&mut rest)),
        }
    })
}

/// An event grew past the configured limit without ending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("server-sent event exceeds {0} bytes without ending")]
pub struct EventTooLarge(pub usize);

/// Splits a byte stream into events, whatever the chunk boundaries.
#[derive(Debug)]
pub struct SseParser {
    pending: Vec<u8>,
    /// Where the current line starts within `pending`.
    line_start: usize,
    /// Where scanning for the next line break resumes.
    scan: usize,
    max_event_bytes: usize,
}

impl SseParser {
    /// A parser that refuses events larger than `max_event_bytes`.
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            pending: Vec::new(),
            line_start: 0,
            scan: 0,
            max_event_bytes,
        }
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// Bytes received but not yet part of a complete event.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Takes the bytes not yet part of a complete event (to pass them on unparsed).
    pub fn take_pending(&mut self) -> Vec<u8> {
        self.line_start = 0;
        self.scan = 0;
        std::mem::take(&mut self.pending)
    }

    /// The next complete event, if the bytes so far hold one. With `end_of_stream`, a final
    /// event without its blank line is returned too (servers that omit it are common).
    pub fn next_event(&mut self, end_of_stream: bool) -> Result<Option<SseEvent>, EventTooLarge> {
        loop {
            let Some(offset) = memchr::memchr2(b'\n', b'\r', &self.pending[self.scan..]) else {
                self.scan = self.pending.len();
                break;
            };
            let at = self.scan + offset;
            let terminator = if self.pending[at] == b'\n' {
                1
            } else if at + 1 < self.pending.len() {
                if self.pending[at + 1] == b'\n' {
                    2
                } else {
                    1
                }
            } else if end_of_stream {
                1
            } else {
                // A lone `\r` at the end: the `\n` of a CRLF pair may be in the next chunk.
                self.scan = at;
                break;
            };
            let blank = at == self.line_start;
            if blank && at + terminator > self.max_event_bytes {
                // Complete but too large: left in place, so a caller that gives up parsing
                // can still pass every byte on.
                return Err(EventTooLarge(self.max_event_bytes));
            }
            self.line_start = at + terminator;
            self.scan = self.line_start;
            if blank {
                let rest = self.pending.split_off(self.line_start);
                let raw = std::mem::replace(&mut self.pending, rest);
                self.line_start = 0;
                self.scan = 0;
                return Ok(Some(SseEvent::parse(raw)));
            }
        }
        if self.pending.len() > self.max_event_bytes {
            return Err(EventTooLarge(self.max_event_bytes));
        }
        if end_of_stream && !self.pending.is_empty() {
            return Ok(Some(SseEvent::parse(self.take_pending())));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_events(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut parser = SseParser::new(1 << 20);
        let mut events = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            parser.push(chunk);
            let eos = i + 1 == chunks.len();
            while let Some(event) = parser.next_event(eos).unwrap() {
                events.push(event);
            }
        }
        events
    }

    const STREAM: &str = "event: a\ndata: {\"x\":\"h\u{e9}llo \u{1f600}\"}\n\n: keep-alive\n\ndata: l1\r\ndata: l2\r\n\r\nid: 7\rdata: [DONE]\r\r";

    #[test]
    fn every_split_point_yields_the_same_events_and_bytes() {
        let whole = all_events(&[STREAM.as_bytes()]);
        assert_eq!(whole.len(), 4);
        assert_eq!(whole[0].event_type(), Some("a"));
        assert_eq!(whole[0].data(), Some("{\"x\":\"h\u{e9}llo \u{1f600}\"}"));
        assert!(whole[1].is_empty());
        assert_eq!(whole[2].data(), Some("l1\nl2"));
        assert_eq!(whole[3].id(), Some("7"));
        assert!(whole[3].is_done_marker());
        let bytes = STREAM.as_bytes();
        for a in 0..=bytes.len() {
            for b in a..=bytes.len() {
                let events = all_events(&[&bytes[..a], &bytes[a..b], &bytes[b..]]);
                let datas: Vec<_> = events.iter().map(|e| e.data().map(str::to_string)).collect();
                let expected: Vec<_> = whole.iter().map(|e| e.data().map(str::to_string)).collect();
                assert_eq!(datas, expected, "split at {a},{b}");
                let joined: Vec<u8> = events.iter().flat_map(SseEvent::to_bytes).collect();
                assert_eq!(joined, bytes, "bytes differ for split at {a},{b}");
            }
        }
    }

    #[test]
    fn a_final_event_without_blank_line_is_delivered_at_end_of_stream() {
        let events = all_events(&[b"data: one\n\ndata: [DONE]\n"]);
        assert_eq!(events.len(), 2);
        assert!(events[1].is_done_marker());
        assert_eq!(events[1].to_bytes(), b"data: [DONE]\n");
    }

    #[test]
    fn changed_events_are_reserialized() {
        let mut event = all_events(&[b"event: x\ndata: {\"a\":1}\n\n"]).remove(0);
        event.json_mut().unwrap()["a"] = 2.into();
        assert_eq!(event.to_bytes(), b"event: x\ndata: {\"a\":2}\n\n");
        event.set_data("l1\nl2");
        assert_eq!(event.to_bytes(), b"event: x\ndata: l1\ndata: l2\n\n");
    }

    #[test]
    fn invalid_utf8_is_replaced_for_plugins_and_forwarded_unchanged() {
        let raw = b"data: a\xffb\n\n".to_vec();
        let events = all_events(&[&raw]);
        assert_eq!(events[0].data(), Some("a\u{fffd}b"));
        assert_eq!(events[0].to_bytes(), raw);
    }

    #[test]
    fn an_event_over_the_limit_is_an_error_not_unbounded_growth() {
        let mut parser = SseParser::new(16);
        parser.push(b"data: 0123456789abcdef");
        assert_eq!(parser.next_event(false).unwrap_err(), EventTooLarge(16));
        let mut parser = SseParser::new(16);
        parser.push(b"data: 012345\n\n");
        assert!(parser.next_event(false).unwrap().is_some());
        let mut parser = SseParser::new(16);
        parser.push(b"data: 0123456789\n\n");
        assert_eq!(parser.next_event(false).unwrap_err(), EventTooLarge(16));
        assert_eq!(parser.take_pending(), b"data: 0123456789\n\n", "nothing is lost");
    }

    #[test]
    fn empty_first_data_line_keeps_its_line_break() {
        let events = all_events(&[b"data:\ndata: x\n\n"]);
        assert_eq!(events[0].data(), Some("\nx"));
        let events = all_events(&[b"data\n\n"]);
        assert_eq!(events[0].data(), Some(""));
    }

    #[test]
    fn non_json_data_is_an_error_for_json() {
        let mut event = SseEvent::new(None, "not json");
        assert!(event.json().is_err());
        assert!(SseEvent::parse(b"event: ping\n\n".to_vec()).json().is_err());
    }
}
