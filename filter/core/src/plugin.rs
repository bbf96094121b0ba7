//! What a plugin is and what it may do.

use crate::background::{Background, CalloutRequest, CalloutResponse};
use crate::host::{Direction, Host, MetricId};
use crate::json::{Body, FieldPath, JsonError};
use crate::metrics::{Counter, Gauge};
use crate::sse::SseEvent;
use serde_json::json;
use std::any::Any;
use std::rc::Rc;

/// How much of one direction of the exchange a plugin needs to see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum PhaseNeed {
    /// The plugin does not take part in this direction.
    Skip,
    /// Headers only: the plugin runs when headers arrive and nothing is buffered for it.
    Headers,
    /// The whole body: the engine buffers (up to the configured limit) and runs the plugin at its end.
    Body,
}

/// What a plugin may change in the request once it has read the request body.
///
/// The engine uses it when the host must let the request headers go before the body (see
/// [`crate::HeadersHold`]): a plugin that changes headers (routing) after the body cannot run
/// then and follows its failure mode; a plugin that changes the body makes the engine drop
/// `content-length` from the early headers, so the changed body goes upstream chunked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestEdits {
    /// May set or remove request headers, or otherwise steer routing (endpoint, metadata the
    /// load balancer reads).
    pub headers: bool,
    /// May change the request body.
    pub body: bool,
}

impl RequestEdits {
    /// Reads only.
    pub const NONE: Self = Self {
        headers: false,
        body: false,
    };
    /// Changes headers (routing) only.
    pub const HEADERS: Self = Self {
        headers: true,
        body: false,
    };
    /// Changes the body only.
    pub const BODY: Self = Self {
        headers: false,
        body: true,
    };
    /// May change both (the default for plugins that do not say).
    pub const ALL: Self = Self {
        headers: true,
        body: true,
    };
}

/// What a plugin needs of a streamed (`text/event-stream`) response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamNeed {
    /// Bytes of already-processed events the engine may hold back from the client, so that a
    /// plugin that spots a problem spanning several events can still stop them (a phrase
    /// split over tokens). The engine holds at most the largest window any active plugin
    /// asks for, releases everything older at once, and flushes at end of stream. Zero: every
    /// event goes on as soon as the plugins have seen it.
    pub hold_back_bytes: usize,
}

/// The outcome of a plugin that looked at one streamed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventDecision {
    /// Keep the event (changed or not) and go on with the next processor.
    Continue,
    /// Remove the event from the stream; later processors do not see it.
    Drop,
    /// Stop the stream. Before any byte reached the client this reply is sent as is; after,
    /// the stream ends with a terminal event the client's SDK understands, carrying the
    /// reply's error code and message.
    Reject(LocalReply),
    /// Keep this event at this processor: neither later processors nor the client see it
    /// until this processor's held events are released (a callout's answer that continues,
    /// [`EventDecision::Release`], or the stream's end). While a processor holds events, later
    /// events it continues are held too: an event never overtakes one held before it.
    Hold,
    /// Let this event, and every event this processor holds, go on now, in order.
    Release,
    /// Hold this event and send this HTTP request; no later event is processed until the
    /// answer, which comes to [`Plugin::on_callout_done`]: continuing releases what this
    /// processor holds, rejecting ends the stream and nothing held reaches the client. A call
    /// that fails follows the failure mode (fail-open releases what is held). This is how a
    /// processor has a service approve a streamed answer window by window.
    Callout(CalloutRequest),
}

/// A reply the proxy sends instead of forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    /// HTTP status.
    pub status: u16,
    /// Extra response headers.
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: Vec<u8>,
}

impl LocalReply {
    /// An OpenAI-shaped JSON error: `{"error":{"message","type","code"}}`.
    pub fn json_error(status: u16, code: &str, message: &str) -> Self {
        let kind = match status {
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        let body = json!({"error": {"message": message, "type": kind, "code": code}});
        Self {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: serde_json::to_vec(&body).expect("a json! value serializes"),
        }
    }
}

/// The outcome of a plugin that worked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go on with the next processor.
    Continue,
    /// Answer now with this reply; later processors do not run.
    Reject(LocalReply),
    /// Answer now with this reply, which is the answer itself rather than a refusal (a cache
    /// hit): later processors do not run, and it is not counted as a rejection.
    Respond(LocalReply),
    /// Send this HTTP request through a proxy cluster and wait for the answer, which comes to
    /// [`Plugin::on_callout_done`]. The engine parks the chain (the direction stays held, the
    /// body buffered) and resumes it in order after the answer; later processors run then.
    /// The wait is bounded by the request's `timeout` and by the processor's `timeout`
    /// budget, whichever is shorter. A callout that cannot start, times out or is reset is a
    /// failure of this processor, handled by its failure mode; the answer's status is the
    /// plugin's to judge. Allowed on the request, on a buffered response, and at the end of a
    /// streamed one (events call out with [`EventDecision::Callout`]).
    Callout(CalloutRequest),
}

/// A plugin that could not do its work. Handled by the processor's failure mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PluginError {
    /// Status of the local reply under FailClosed (500 when `None`).
    pub status: Option<u16>,
    /// Machine-readable code for the error body (`invalid_json`, ...).
    pub code: String,
    /// Human-readable message; must never contain request data a guard protects.
    pub message: String,
}

impl PluginError {
    /// An internal failure (500 under FailClosed).
    pub fn internal(code: &str, message: impl Into<String>) -> Self {
        Self {
            status: None,
            code: code.into(),
            message: message.into(),
        }
    }

    /// A failure caused by the request (400 under FailClosed).
    pub fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self {
            status: Some(400),
            code: code.into(),
            message: message.into(),
        }
    }
}

/// A payload plugin. Built once per configuration load, shared by every stream and thread;
/// per-stream state belongs in the engine, not in the plugin.
pub trait Plugin: Send + Sync {
    /// What the plugin needs of the request.
    fn request_need(&self) -> PhaseNeed {
        PhaseNeed::Skip
    }
    /// What the plugin needs of the response.
    fn response_need(&self) -> PhaseNeed {
        PhaseNeed::Skip
    }
    /// What the plugin may change in the request after reading its body. The default, both,
    /// is the safe answer for a plugin that does not say.
    fn request_edits(&self) -> RequestEdits {
        RequestEdits::ALL
    }
    /// Runs on the request (at headers or at end of body, per [`Plugin::request_need`]).
    fn on_request(&self, _ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        Ok(Decision::Continue)
    }
    /// Runs on the response (at headers or at end of body, per [`Plugin::response_need`]).
    /// A body is only handed over for JSON responses (`application/json`, `*/*+json`).
    fn on_response(&self, _ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        Ok(Decision::Continue)
    }
    /// What the plugin needs of a streamed response; `None` (the default) when it does not
    /// look at event streams.
    fn stream_need(&self) -> Option<StreamNeed> {
        None
    }
    /// Runs on each event of a streamed response, in order, as it arrives.
    fn on_response_event(&self, _ctx: &mut Context<'_>, _event: &mut SseEvent) -> Result<EventDecision, PluginError> {
        Ok(EventDecision::Continue)
    }
    /// Runs once when a streamed response ended normally (not after a rejection). May return
    /// [`Decision::Callout`] to have the last window approved; continuing releases every event
    /// this processor holds.
    fn on_stream_end(&self, _ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        Ok(Decision::Continue)
    }
    /// The answer to the callout this plugin asked for with [`Decision::Callout`], in the
    /// same direction and with the same body. It may ask for another callout. The default
    /// refuses, for plugins that never call out.
    fn on_callout_done(&self, _ctx: &mut Context<'_>, _response: CalloutResponse) -> Result<Decision, PluginError> {
        Err(PluginError::internal(
            "unexpected_callout",
            "this plugin does not handle callout answers",
        ))
    }
    /// Work the plugin does off the request path (timers, HTTP callouts); `None` by default.
    fn background(&self) -> Option<&dyn Background> {
        None
    }
}

/// A plugin's view of one stream while it runs. All changes go through the engine.
pub struct Context<'a> {
    pub(crate) host: &'a mut dyn Host,
    pub(crate) direction: Direction,
    pub(crate) body: &'a mut Body,
    pub(crate) request_headers_changed: &'a mut bool,
    pub(crate) deadline_nanos: Option<u64>,
    pub(crate) counters: &'a [MetricId],
    pub(crate) gauges: &'a [MetricId],
    pub(crate) state: &'a mut Option<Box<dyn Any>>,
    pub(crate) derived: &'a mut DerivedValues,
    pub(crate) response_redacted: &'a mut bool,
    pub(crate) started_nanos: u64,
    /// True when the headers of this direction already went out (later events of a stream).
    pub(crate) headers_sent: bool,
    /// Events emitted while handling a streamed response.
    pub(crate) emitted: Option<&'a mut Vec<SseEvent>>,
}

impl Context<'_> {
    /// The direction being processed.
    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// A header of the direction being processed.
    pub fn header(&self, name: &str) -> Option<String> {
        self.host.header(self.direction, name)
    }

    /// Whether the headers of this direction already went out, so cannot change any more.
    pub fn headers_sent(&self) -> bool {
        self.headers_sent
    }

    /// A request header (also readable while processing the response).
    pub fn request_header(&self, name: &str) -> Option<String> {
        self.host.header(Direction::Request, name)
    }

    /// Sets a header of the direction being processed, replacing any value a client or
    /// upstream sent. Values with control characters are refused, so no header injection.
    /// Once a stream's headers went out (events after the first bytes) this is an error.
    pub fn set_header(&mut self, name: &str, value: &str) -> Result<(), PluginError> {
        if self.headers_sent {
            return Err(PluginError::internal(
                "headers_sent",
                format!(
                    "cannot set {} header {name}: the headers already went out",
                    self.direction.as_str()
                ),
            ));
        }
        if let Some(bad) = value.bytes().find(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f) {
            return Err(PluginError::bad_request(
                "invalid_header_value",
                format!("value for header {name} contains control character 0x{bad:02x}"),
            ));
        }
        self.host.set_header(self.direction, name, value);
        self.note_header_change();
        Ok(())
    }

    /// Removes a header of the direction being processed (nothing once the headers went out).
    pub fn remove_header(&mut self, name: &str) {
        if self.headers_sent {
            return;
        }
        self.host.remove_header(self.direction, name);
        self.note_header_change();
    }

    fn note_header_change(&mut self) {
        if self.direction == Direction::Request {
            *self.request_headers_changed = true;
        }
    }

    /// Adds an event to a streamed response: in [`Plugin::on_response_event`] it goes out
    /// before the current event, in [`Plugin::on_stream_end`] after everything else. Either
    /// way the processors after this one see it like any event. An error anywhere else.
    pub fn emit_event(&mut self, event: SseEvent) -> Result<(), PluginError> {
        match self.emitted.as_mut() {
            Some(emitted) => {
                emitted.push(event);
                Ok(())
            }
            None => Err(PluginError::internal(
                "not_a_stream",
                "events can only be emitted while handling a streamed response",
            )),
        }
    }

    /// The body of the direction being processed (empty for header-only plugins). The first
    /// call copies it out of the proxy's buffers; a plugin that only reads fields should use
    /// [`Context::body_field`], which reads them in place.
    pub fn body(&mut self) -> &mut Body {
        if self.body.is_unread() {
            self.body.fill(self.host.read_body(self.direction));
        }
        self.body
    }

    /// Reads one field of the body, as [`Body::get`] does. While no plugin has asked for the
    /// whole body, a field named by member names is found where the proxy keeps the body,
    /// without copying it.
    pub fn body_field(&mut self, path: &FieldPath) -> Result<Option<serde_json::Value>, JsonError> {
        if let (true, FieldPath::Members(members)) = (self.body.is_unread(), path) {
            if let Some(slices) = self.host.body_slices(self.direction) {
                if let Some(answer) = crate::json::get_in_slices(&slices, members) {
                    return answer;
                }
            }
        }
        self.body().get(path)
    }

    /// True when the body is empty or only whitespace, looked at in place while unread.
    pub fn body_is_blank(&mut self) -> bool {
        if self.body.is_unread() {
            if let Some(slices) = self.host.body_slices(self.direction) {
                return slices.iter().all(|slice| slice.iter().all(u8::is_ascii_whitespace));
            }
        }
        self.body().is_blank()
    }

    /// The JSON text of top-level members of the body as the client wrote it (at most `limit`
    /// bytes of each), found in one pass; `None` for an absent member. Read in place while no
    /// plugin has asked for the whole body; from the body as it stands (edits included)
    /// otherwise. The values are not validated beyond the document's structure.
    pub fn body_member_texts<const N: usize>(
        &mut self,
        keys: [&str; N],
        limit: usize,
    ) -> Result<[Option<Vec<u8>>; N], JsonError> {
        if self.body.is_unread() {
            if let Some(slices) = self.host.body_slices(self.direction) {
                if let Some(answer) = crate::json::member_texts_in_slices(&slices, keys, limit) {
                    return answer;
                }
            }
        }
        let body = self.body();
        if body.is_changed() {
            // An earlier processor edited the document: read the edited one.
            let doc = body.doc()?;
            return Ok(keys.map(|key| {
                doc.get(key).map(|value| {
                    let mut text = serde_json::to_vec(value).expect("a Value always serializes");
                    text.truncate(limit);
                    text
                })
            }));
        }
        let raw = body.raw();
        let spans = crate::json::find_member_spans(raw, keys)?;
        Ok(spans.map(|span| span.map(|span| raw[crate::json::cut(span, limit)].to_vec())))
    }

    /// Writes a string into the stream's dynamic metadata.
    pub fn set_metadata(&mut self, namespace: &str, key: &str, value: &str) {
        self.host.set_metadata(namespace, key, value);
    }

    /// Writes a number into the stream's dynamic metadata.
    pub fn set_metadata_number(&mut self, namespace: &str, key: &str, value: f64) {
        self.host.set_metadata_number(namespace, key, value);
    }

    /// Sets a whole dynamic metadata namespace from a JSON object; false when the host cannot.
    pub fn set_metadata_struct(
        &mut self,
        namespace: &str,
        fields: &serde_json::Map<String, serde_json::Value>,
    ) -> bool {
        self.host.set_metadata_struct(namespace, fields)
    }

    /// Sets typed dynamic metadata (a serialized protobuf message); false when the host cannot.
    pub fn set_typed_metadata(&mut self, namespace: &str, type_url: &str, message: &[u8]) -> bool {
        self.host.set_typed_metadata(namespace, type_url, message)
    }

    /// This processor's state for this stream, created with `T::default()` on first use and
    /// kept across the request and response callbacks (plugins themselves are shared).
    pub fn state<T: Default + 'static>(&mut self) -> &mut T {
        if !self.state.as_ref().is_some_and(|state| state.is::<T>()) {
            *self.state = Some(Box::new(T::default()));
        }
        self.state
            .as_mut()
            .and_then(|state| state.downcast_mut())
            .expect("state of type T was just ensured")
    }

    /// A value derived from this request under `key` by an earlier processor (a prompt
    /// embedding), if one was kept with [`Context::keep_derived`] and has type `T`.
    pub fn derived<T: 'static>(&self, key: u64) -> Option<Rc<T>> {
        self.derived.get(key)
    }

    /// Keeps a value derived from this request for the processors after this one, so that
    /// an expensive value (a prompt embedding) is computed once per request, whoever asks.
    /// Keys are chosen by the plugins that share the value (the embedding component hashes
    /// its model and text).
    pub fn keep_derived<T: 'static>(&mut self, key: u64, value: Rc<T>) {
        self.derived.keep(key, value);
    }

    /// Records that this processor withheld or replaced content of the answer (a guard
    /// masked it), so that later processors can tell what the client received is not what
    /// the upstream said: a response cache does not store such an answer. No effect on the
    /// request, whose processors after this one see the changed request anyway.
    pub fn mark_redacted(&mut self) {
        if self.direction == Direction::Response {
            *self.response_redacted = true;
        }
    }

    /// Whether an earlier processor marked the answer redacted ([`Context::mark_redacted`]).
    pub fn response_redacted(&self) -> bool {
        *self.response_redacted
    }

    /// The host's clock, in nanoseconds.
    pub fn now_nanos(&self) -> u64 {
        self.host.now_nanos()
    }

    /// Wall-clock time, nanoseconds since the Unix epoch.
    pub fn unix_time_nanos(&self) -> u64 {
        self.host.unix_time_nanos()
    }

    /// The host's clock when the request headers arrived.
    pub fn stream_started_nanos(&self) -> u64 {
        self.started_nanos
    }

    /// True once the processor's latency budget is used up; long-running plugins should stop early.
    pub fn deadline_exceeded(&self) -> bool {
        self.deadline_nanos
            .is_some_and(|deadline| self.host.now_nanos() > deadline)
    }

    /// Adds one to a counter declared by this processor.
    pub fn increment(&mut self, counter: Counter) {
        if let Some(id) = self.counters.get(counter.0) {
            self.host.increment_counter(*id, 1);
        }
    }

    /// Sets a gauge declared by this processor.
    pub fn set_gauge(&mut self, gauge: Gauge, value: u64) {
        if let Some(id) = self.gauges.get(gauge.0) {
            self.host.set_gauge(*id, value);
        }
    }

    /// Strings under `key` in the stream's dynamic metadata `namespace` (a list's items, or a
    /// string split at commas), for hints earlier filters leave.
    pub fn metadata_strings(&self, namespace: &str, key: &str) -> Vec<String> {
        self.host.metadata_strings(namespace, key)
    }

    /// The upstream host (`ip:port`) that answered, once the response arrived.
    pub fn upstream_address(&self) -> Option<String> {
        self.host.upstream_address()
    }

    /// Tells ORIGINAL_DST clusters to connect to `endpoint` on hosts that cannot write the
    /// dynamic metadata such clusters read (see [`Host::set_original_destination`]).
    pub fn set_original_destination(&mut self, endpoint: &str) {
        self.host.set_original_destination(endpoint);
    }
}

/// Values derived from one request that processors share ([`Context::derived`]): few per
/// request, so a list.
#[derive(Default)]
pub(crate) struct DerivedValues(Vec<(u64, Rc<dyn Any>)>);

impl DerivedValues {
    fn get<T: 'static>(&self, key: u64) -> Option<Rc<T>> {
        self.0
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, value)| Rc::clone(value).downcast::<T>().ok())
    }

    fn keep<T: 'static>(&mut self, key: u64, value: Rc<T>) {
        self.0.retain(|(k, _)| *k != key);
        self.0.push((key, value));
    }
}
