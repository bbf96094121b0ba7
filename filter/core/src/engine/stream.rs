//! A stream through the chain: its state, the flows the adapters act on, and the steps
//! shared by both directions (headers, buffering, size limits).

use super::chain::*;
use crate::config::FailureMode;
use crate::event_stream::EventStream;
use crate::host::{Direction, HeadersHold, Host};
use crate::json::Body;
use crate::plugin::{Decision, DerivedValues, EventDecision, LocalReply, PhaseNeed, PluginError};
use crate::sse::SseEvent;
use std::any::Any;
use std::sync::Arc;

/// What the adapter should tell the proxy after a headers callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadersFlow {
    /// Let the headers go on.
    Continue,
    /// Hold the headers until the body has been buffered and processed (or, for a streamed
    /// response, until the first processed bytes go out).
    WaitForBody,
    /// A local reply was sent; stop this direction.
    Stop,
    /// A processor waits for the answer of an HTTP callout: hold the headers. The adapter
    /// delivers the answer to [`Stream::on_callout_done`], which says when to resume.
    WaitForCallout,
}

/// What the adapter should tell the proxy after a body (or trailers) callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFlow {
    /// Let the data (and anything buffered) go on.
    Continue,
    /// Keep buffering.
    Buffer,
    /// The engine took this chunk's bytes into its own state: pass nothing on, keep the
    /// headers held, buffer nothing (a streamed response whose first bytes are still held).
    Hold,
    /// A local reply was sent; drop the data.
    Stop,
    /// A processor waits for the answer of an HTTP callout: stop and keep the body buffered
    /// (trailers: stop). The adapter delivers the answer to [`Stream::on_callout_done`].
    WaitForCallout,
}

/// What the adapter should do after delivering a callout's answer to
/// [`Stream::on_callout_done`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalloutFlow {
    /// Not this stream's pending callout (already answered, or the stream replied): nothing.
    Ignored,
    /// Another callout went out; keep waiting.
    Waiting,
    /// The chain finished this direction: resume it (Envoy: continue decoding or encoding).
    Resume(Direction),
    /// A local reply was sent (or the stream was reset): nothing to resume.
    Replied,
}

/// A chain parked on a callout: where it stopped and what it carries until the answer.
pub(super) struct Parked {
    pub(super) handle: u64,
    pub(super) index: usize,
    pub(super) direction: Direction,
    pub(super) body: Body,
    pub(super) headers_stage: bool,
    pub(super) request_headers_changed: bool,
    pub(super) cluster: String,
    /// Parked in a streamed response: the processor's position among the event processors,
    /// and whether at the stream's end.
    pub(super) stream: Option<(usize, bool)>,
}

/// Where a run of the chain starts (or resumes) and what it carries over.
#[derive(Debug, Clone, Copy)]
pub(super) struct Resume {
    pub(super) direction: Direction,
    pub(super) headers_stage: bool,
    pub(super) parkable: bool,
    /// The processor to start from (in [`Stream::settle`]: the one that just ran).
    pub(super) start: usize,
    pub(super) request_headers_changed: bool,
}

/// The headers flow after a run at headers.
pub(super) fn headers_flow(outcome: RunOutcome) -> HeadersFlow {
    match outcome {
        RunOutcome::Done => HeadersFlow::Continue,
        RunOutcome::Replied => HeadersFlow::Stop,
        RunOutcome::Waiting => HeadersFlow::WaitForCallout,
    }
}

/// How a run of the chain over one direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RunOutcome {
    /// Every processor ran; changes applied.
    Done,
    /// A local reply was sent or the stream reset.
    Replied,
    /// Parked on a callout.
    Waiting,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum PhaseState {
    #[default]
    Idle,
    Buffering,
    Streaming,
    Done,
}

/// Per-stream state. Create one per HTTP stream with [`Stream::new`].
pub struct Stream {
    pub(super) chain: Arc<Chain>,
    /// Processors whose `match` matched the request.
    pub(super) active: Vec<bool>,
    /// Processors that take part in the response, decided when its headers arrive (a body
    /// reader is dropped for a response it cannot read).
    pub(super) response_active: Vec<bool>,
    pub(super) request: PhaseState,
    pub(super) response: PhaseState,
    pub(super) events: Option<EventStream>,
    pub(super) replied: bool,
    /// Each processor's per-stream state ([`Context::state`]).
    pub(super) states: Vec<Option<Box<dyn Any>>>,
    /// Values derived from the request that several processors share ([`Context::derived`]).
    pub(super) derived: DerivedValues,
    /// A processor withheld or replaced content of the answer ([`Context::mark_redacted`]).
    pub(super) response_redacted: bool,
    pub(super) started_nanos: u64,
    /// The request path, kept when a streamed response may need it (its protocol); some
    /// hosts cannot read request headers any more once the response arrives.
    pub(super) request_path: String,
    /// The request headers went on before the body (the host could not hold them): the
    /// header-stage processors already ran, and the body processors cannot change headers.
    pub(super) request_released: bool,
    /// The same for the response headers.
    pub(super) response_released: bool,
    /// The chain waits for a callout's answer.
    pub(super) parked: Option<Parked>,
}

pub(super) enum Failure {
    Error(PluginError),
    /// A callout could not start, or got no answer (timeout, reset, unknown cluster).
    Callout(String),
    Overrun,
    Panic,
}

/// What a plugin asked for, whichever callback it was.
pub(super) enum Step {
    Continue,
    Drop,
    Reject(LocalReply),
    Respond(LocalReply),
    Callout(crate::background::CalloutRequest),
    Hold,
    Release,
}

impl From<Decision> for Step {
    fn from(decision: Decision) -> Self {
        match decision {
            Decision::Continue => Step::Continue,
            Decision::Reject(reply) => Step::Reject(reply),
            Decision::Respond(reply) => Step::Respond(reply),
            Decision::Callout(request) => Step::Callout(request),
        }
    }
}

impl From<EventDecision> for Step {
    fn from(decision: EventDecision) -> Self {
        match decision {
            EventDecision::Continue => Step::Continue,
            EventDecision::Drop => Step::Drop,
            EventDecision::Reject(reply) => Step::Reject(reply),
            EventDecision::Hold => Step::Hold,
            EventDecision::Release => Step::Release,
            EventDecision::Callout(request) => Step::Callout(request),
        }
    }
}

/// What one processor callback works on.
pub(super) struct Scope<'b> {
    pub(super) direction: Direction,
    pub(super) body: &'b mut Body,
    /// Set when the plugin changed a request header (the route cache must be cleared).
    pub(super) request_headers_changed: Option<&'b mut bool>,
    pub(super) headers_sent: bool,
    /// Where events a plugin emits go (only while it handles a streamed response).
    pub(super) emitted: Option<&'b mut Vec<SseEvent>>,
}

impl<'b> Scope<'b> {
    /// A response event or end of stream: no body, no request headers to change.
    pub(super) fn response_event(body: &'b mut Body, headers_sent: bool, emitted: &'b mut Vec<SseEvent>) -> Self {
        Scope {
            direction: Direction::Response,
            body,
            request_headers_changed: None,
            headers_sent,
            emitted: Some(emitted),
        }
    }
}

/// A processor's outcome after its failure mode was applied.
pub(super) enum Verdict {
    /// Go on (the plugin continued, or failed open).
    Continue,
    /// Go on without this event.
    Drop,
    /// End the exchange with this reply; the second field is the response code details.
    Stop(LocalReply, String),
    /// Send this callout and park until its answer.
    Callout(crate::background::CalloutRequest),
    /// Keep this event at this processor (streams).
    Hold,
    /// Let this event and what this processor holds go on (streams).
    Release,
}

/// Media type of a `content-type` value, lower-cased, without parameters.
pub(super) fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

impl Stream {
    /// A fresh stream of `chain`.
    pub fn new(chain: Arc<Chain>) -> Self {
        Self {
            chain,
            active: Vec::new(),
            response_active: Vec::new(),
            request: PhaseState::Idle,
            response: PhaseState::Idle,
            events: None,
            replied: false,
            states: Vec::new(),
            derived: DerivedValues::default(),
            response_redacted: false,
            started_nanos: 0,
            request_path: String::new(),
            request_released: false,
            response_released: false,
            parked: None,
        }
    }

    /// Whether this direction's headers went on before its body (the host could not hold
    /// them): a host that can only read held headers must read them another way.
    pub fn headers_released(&self, direction: Direction) -> bool {
        self.released(direction)
    }

    /// True once the engine sent a local reply for this stream.
    pub fn replied(&self) -> bool {
        self.replied
    }

    pub(super) fn mask(&self, direction: Direction) -> &[bool] {
        match direction {
            Direction::Request => &self.active,
            Direction::Response => &self.response_active,
        }
    }

    pub(super) fn need(&self, direction: Direction) -> PhaseNeed {
        self.chain
            .processors
            .iter()
            .zip(self.mask(direction))
            .filter(|(_, active)| **active)
            .map(|(p, _)| p.need(direction))
            .max()
            .unwrap_or(PhaseNeed::Skip)
    }

    pub(super) fn state(&mut self, direction: Direction) -> &mut PhaseState {
        match direction {
            Direction::Request => &mut self.request,
            Direction::Response => &mut self.response,
        }
    }

    pub(super) fn limit(&self, direction: Direction) -> u64 {
        match direction {
            Direction::Request => self.chain.limits.max_request_body_bytes,
            Direction::Response => self.chain.limits.max_response_body_bytes,
        }
    }

    pub(super) fn on_headers(&mut self, host: &mut dyn Host, direction: Direction, end_of_stream: bool) -> HeadersFlow {
        match self.need(direction) {
            PhaseNeed::Skip => HeadersFlow::Continue,
            PhaseNeed::Body if !end_of_stream => {
                let declared = host
                    .header(direction, "content-length")
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if declared.is_some_and(|len| len > self.limit(direction)) {
                    return self.too_large(host, direction);
                }
                host.raise_buffer_limit(self.limit(direction));
                *self.state(direction) = PhaseState::Buffering;
                // Unknown: hold, and the adapter finds out whether the hold takes effect.
                if let HeadersHold::Unavailable(fix) = host.headers_hold() {
                    return match direction {
                        Direction::Request => self.release_request_headers(host, fix),
                        Direction::Response => self.release_response_headers(host),
                    };
                }
                HeadersFlow::WaitForBody
            }
            // Header-only chains, and body chains when there is no body: run now on an empty body.
            _ => {
                *self.state(direction) = PhaseState::Done;
                headers_flow(self.run(host, direction, Body::default(), false, true))
            }
        }
    }

    /// Active processors that change routing after reading the request body.
    pub(super) fn active_steering(&self) -> impl Iterator<Item = usize> + '_ {
        self.chain
            .processors
            .iter()
            .enumerate()
            .filter(|(index, p)| self.active[*index] && p.steers_after_body())
            .map(|(index, _)| index)
    }

    pub(super) fn released(&self, direction: Direction) -> bool {
        match direction {
            Direction::Request => self.request_released,
            Direction::Response => self.response_released,
        }
    }

    pub(super) fn on_body(&mut self, host: &mut dyn Host, direction: Direction, end_of_stream: bool) -> BodyFlow {
        if self.replied {
            return BodyFlow::Stop;
        }
        if self.parked.is_some() {
            // Data behind headers held for a callout: keep it until the answer.
            return BodyFlow::WaitForCallout;
        }
        if *self.state(direction) != PhaseState::Buffering {
            return BodyFlow::Continue;
        }
        if host.body_len(direction) > self.limit(direction) {
            return match self.too_large(host, direction) {
                HeadersFlow::Stop => BodyFlow::Stop,
                _ => BodyFlow::Continue,
            };
        }
        if !end_of_stream {
            return BodyFlow::Buffer;
        }
        *self.state(direction) = PhaseState::Done;
        // Left in the host's buffers: plugins that read fields read them there, and the bytes
        // are copied out only for one that asks for the whole body.
        match self.run(host, direction, Body::unread(), false, true) {
            RunOutcome::Done => BodyFlow::Continue,
            RunOutcome::Replied => BodyFlow::Stop,
            RunOutcome::Waiting => BodyFlow::WaitForCallout,
        }
    }

    /// A body over the limit: 413 for requests. For responses, 502 when a fail-closed processor
    /// needed the body, otherwise the body-needing processors are skipped and bytes flow on.
    pub(super) fn too_large(&mut self, host: &mut dyn Host, direction: Direction) -> HeadersFlow {
        let limit = self.limit(direction);
        match direction {
            Direction::Request => {
                host.increment_counter(self.chain.request_body_too_large, 1);
                let reply = LocalReply::json_error(
                    413,
                    "request_too_large",
                    &format!("request body exceeds the limit of {limit} bytes"),
                );
                self.reply(host, &reply, "payload_processor.request_body_too_large");
                HeadersFlow::Stop
            }
            Direction::Response => {
                host.increment_counter(self.chain.response_body_too_large, 1);
                *self.state(direction) = PhaseState::Done;
                let chain = Arc::clone(&self.chain);
                let readers = chain
                    .processors
                    .iter()
                    .zip(&self.response_active)
                    .filter(|(p, active)| **active && p.response == PhaseNeed::Body);
                if readers.clone().any(|(p, _)| p.failure_mode == FailureMode::FailClosed) {
                    if self.response_released {
                        log::warn!("response body over {limit} bytes after its headers went out: resetting the stream");
                        self.replied = true;
                        host.reset_stream();
                        return HeadersFlow::Stop;
                    }
                    let reply = LocalReply::json_error(
                        502,
                        "response_too_large",
                        &format!("response body exceeds the limit of {limit} bytes"),
                    );
                    self.reply(host, &reply, "payload_processor.response_body_too_large");
                    HeadersFlow::Stop
                } else {
                    for (p, _) in readers {
                        host.increment_counter(p.metrics.fail_open, 1);
                    }
                    log::warn!("response body over {limit} bytes: skipping fail-open response processors");
                    HeadersFlow::Continue
                }
            }
        }
    }
}
