//! Streamed responses: SSE events through the processors, processors that hold events and
//! have a service approve them (callouts), and the stream end.
//!
//! Events wait in a queue (`EventStream::pending`) with the position of the first processor
//! that has yet to see them: new events from the parser enter at 0, events a processor emits
//! or releases enter after it. A processor may hold events (its gate) until a callout's
//! answer, [`crate::EventDecision::Release`] or the stream's end; while the chain waits for a
//! callout nothing is processed and the upstream's bytes wait in the parser.

use super::stream::*;
use crate::background::{CalloutError, CalloutRequest, CalloutResponse};
use crate::config::FailureMode;
use crate::event_stream::{EventStream, StreamEnd};
use crate::host::{Direction, Host};
use crate::json::Body;
use crate::plugin::LocalReply;
use crate::sse::SseEvent;
use std::sync::Arc;

/// How far processing a stream got.
pub(super) enum Advance {
    /// Everything that could be processed was.
    Done,
    /// The stream must stop with this reply (details second).
    Stop(LocalReply, String),
    /// A processor waits for a callout's answer.
    Parked,
}

impl Stream {
    /// A chunk of a streamed response: parse events, run the event processors on each, hold
    /// back the window, release the rest (everything at end of stream).
    pub(super) fn on_stream_data(&mut self, host: &mut dyn Host, end_of_stream: bool) -> BodyFlow {
        if self.replied {
            return BodyFlow::Stop;
        }
        let Some(mut events) = self.events.take() else {
            return BodyFlow::Continue;
        };
        let flow = self.stream_chunk(host, &mut events, end_of_stream);
        self.events = Some(events);
        flow
    }

    /// A chunk that arrived while the chain waits for a callout: its bytes wait in the parser.
    pub(super) fn stash_stream_data(&mut self, host: &mut dyn Host, end_of_stream: bool) {
        let Some(stream) = self.events.as_mut() else { return };
        let chunk = host.read_body(Direction::Response);
        if !stream.finished && !stream.passthrough {
            stream.parser.push(&chunk);
        }
        stream.ended |= end_of_stream;
        if !chunk.is_empty() {
            host.replace_body(Direction::Response, &[]);
        }
    }

    pub(super) fn stream_chunk(
        &mut self,
        host: &mut dyn Host,
        stream: &mut EventStream,
        end_of_stream: bool,
    ) -> BodyFlow {
        if stream.passthrough {
            return BodyFlow::Continue;
        }
        let chunk = host.read_body(Direction::Response);
        if stream.finished {
            // The client already has its terminal event: swallow the rest of the upstream's.
            if !chunk.is_empty() {
                host.replace_body(Direction::Response, &[]);
            }
            return BodyFlow::Continue;
        }
        stream.parser.push(&chunk);
        stream.ended |= end_of_stream;
        let advance = self.advance_stream(host, stream);
        let parked = matches!(advance, Advance::Parked);
        let Some(out) = self.stream_output(host, stream, advance, Some(&chunk)) else {
            return BodyFlow::Stop;
        };
        if parked && (out.is_empty() || stream.ended) {
            // Nothing to send yet: Envoy keeps the (empty) chunk until the answer resumes us.
            return BodyFlow::WaitForCallout;
        }
        if out.is_empty() && !stream.started && !end_of_stream {
            return BodyFlow::Hold;
        }
        stream.started = true;
        BodyFlow::Continue
    }

    /// Writes what the client gets now into the body being handled (`chunk`: the bytes it
    /// held, to avoid a needless rewrite). `None` when a local reply was sent instead.
    fn stream_output(
        &mut self,
        host: &mut dyn Host,
        stream: &mut EventStream,
        advance: Advance,
        chunk: Option<&[u8]>,
    ) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        match advance {
            Advance::Stop(reply, details) => {
                stream.discard_held();
                stream.parser.take_pending();
                stream.pending.clear();
                stream.gates.iter_mut().for_each(Vec::clear);
                stream.finished = true;
                if !stream.started && stream.approved.is_empty() {
                    // Nothing reached the client yet: an ordinary error response.
                    self.reply(host, &reply, &details);
                    return None;
                }
                log::debug!("ending a started event stream ({details})");
                out = std::mem::take(&mut stream.approved);
                out.extend(stream.terminal_events(&reply));
            }
            Advance::Done => {
                out = std::mem::take(&mut stream.approved);
                let all = (stream.ended && stream.end == StreamEnd::Done) || stream.passthrough;
                stream.release(&mut out, all);
                if stream.passthrough {
                    out.extend(stream.parser.take_pending());
                }
            }
            // Waiting: what is approved goes, unless the upstream already ended (then the
            // stream must not go on before the answer: it goes with the next output).
            Advance::Parked if !stream.ended => {
                out = std::mem::take(&mut stream.approved);
                stream.release(&mut out, false);
            }
            Advance::Parked => {
                let mut approved = std::mem::take(&mut stream.approved);
                stream.release(&mut approved, false);
                stream.approved = approved;
            }
        }
        if chunk != Some(out.as_slice()) {
            host.replace_body(Direction::Response, &out);
        }
        Some(out)
    }

    /// Runs queued events through their processors, the parser's new events, and the stream
    /// end once the upstream ended, until done, stopped, or parked on a callout.
    pub(super) fn advance_stream(&mut self, host: &mut dyn Host, stream: &mut EventStream) -> Advance {
        loop {
            if let Some((start, event)) = stream.pending.pop_front() {
                match self.pass_event(host, stream, start, event) {
                    Advance::Done => continue,
                    other => return other,
                }
            }
            match stream.end {
                StreamEnd::Done => return Advance::Done,
                StreamEnd::Next(position) if position >= stream.processors.len() => {
                    stream.end = StreamEnd::Done;
                    continue;
                }
                StreamEnd::Next(position) => match self.end_at(host, stream, position) {
                    Advance::Done => continue,
                    other => return other,
                },
                StreamEnd::NotYet => {}
            }
            match stream.parser.next_event(stream.ended) {
                Ok(Some(mut event)) => {
                    if event.is_empty() {
                        stream.hold(event.to_bytes());
                        continue;
                    }
                    stream.observe(&mut event);
                    stream.pending.push_back((0, event));
                }
                Ok(None) if stream.ended => stream.end = StreamEnd::Next(0),
                Ok(None) => return Advance::Done,
                Err(too_large) => {
                    host.increment_counter(self.chain.response_body_too_large, 1);
                    let chain = Arc::clone(&self.chain);
                    let fail_closed = stream
                        .processors
                        .iter()
                        .any(|&i| chain.processors[i].failure_mode == FailureMode::FailClosed);
                    if fail_closed {
                        let reply = LocalReply::json_error(502, "response_event_too_large", &too_large.to_string());
                        return Advance::Stop(reply, "payload_processor.response_event_too_large".into());
                    }
                    log::warn!("{too_large}: passing the rest of the stream through unread");
                    for &i in &stream.processors {
                        host.increment_counter(chain.processors[i].metrics.fail_open, 1);
                    }
                    // Everything held or queued goes on as it is, in order.
                    for position in 0..stream.gates.len() {
                        for event in std::mem::take(&mut stream.gates[position]) {
                            stream.hold(event.to_bytes());
                        }
                    }
                    while let Some((_, event)) = stream.pending.pop_front() {
                        stream.hold(event.to_bytes());
                    }
                    stream.passthrough = true;
                    return Advance::Done;
                }
            }
        }
    }

    /// Runs one event through the processors from `start` on. Events a processor emits go
    /// through the processors after it, ahead of the event.
    fn pass_event(
        &mut self,
        host: &mut dyn Host,
        stream: &mut EventStream,
        start: usize,
        mut event: SseEvent,
    ) -> Advance {
        for position in start..stream.processors.len() {
            let index = stream.processors[position];
            let mut emitted = Vec::new();
            let verdict = self.invoke(
                host,
                index,
                Scope::response_event(&mut Body::default(), stream.started, &mut emitted),
                |plugin, ctx| plugin.on_response_event(ctx, &mut event).map(Step::from),
            );
            // An event never overtakes one its processor holds.
            let verdict = match verdict {
                Verdict::Continue if !stream.gates[position].is_empty() => Verdict::Hold,
                other => other,
            };
            let after = position + 1;
            match verdict {
                Verdict::Stop(reply, details) => return Advance::Stop(reply, details),
                Verdict::Continue if emitted.is_empty() => continue,
                Verdict::Continue => {
                    stream.pending.push_front((after, event));
                    queue_front(stream, after, emitted);
                }
                Verdict::Drop => queue_front(stream, after, emitted),
                Verdict::Hold => {
                    stream.gates[position].push(event);
                    queue_front(stream, after, emitted);
                }
                Verdict::Release => {
                    stream.pending.push_front((after, event));
                    queue_front(stream, after, emitted);
                    stream.release_gate(position);
                }
                Verdict::Callout(request) => {
                    stream.gates[position].push(event);
                    stream.gates[position].extend(emitted);
                    return self.park_stream(host, stream, position, false, request);
                }
            }
            return Advance::Done;
        }
        stream.hold(event.to_bytes());
        Advance::Done
    }

    /// Tells the processor at `position` the stream ended; what it holds goes on after it
    /// (unless it calls out first).
    fn end_at(&mut self, host: &mut dyn Host, stream: &mut EventStream, position: usize) -> Advance {
        let index = stream.processors[position];
        let mut emitted = Vec::new();
        let verdict = self.invoke(
            host,
            index,
            Scope::response_event(&mut Body::default(), stream.started, &mut emitted),
            |plugin, ctx| plugin.on_stream_end(ctx).map(Step::from),
        );
        match verdict {
            Verdict::Stop(reply, details) => Advance::Stop(reply, details),
            Verdict::Callout(request) => {
                stream.gates[position].extend(emitted);
                self.park_stream(host, stream, position, true, request)
            }
            _ => {
                queue_front(stream, position + 1, emitted);
                stream.release_gate(position);
                stream.end = StreamEnd::Next(position + 1);
                Advance::Done
            }
        }
    }

    /// Sends a stream processor's callout and parks; a call that cannot start follows the
    /// processor's failure mode.
    fn park_stream(
        &mut self,
        host: &mut dyn Host,
        stream: &mut EventStream,
        position: usize,
        at_end: bool,
        mut request: CalloutRequest,
    ) -> Advance {
        let index = stream.processors[position];
        let chain = Arc::clone(&self.chain);
        if let Some(budget) = chain.processors[index].timeout_nanos {
            request.timeout = request.timeout.min(std::time::Duration::from_nanos(budget));
        }
        match host.http_callout(&request) {
            Ok(handle) => {
                self.parked = Some(Parked {
                    handle,
                    index,
                    direction: Direction::Response,
                    body: Body::default(),
                    headers_stage: false,
                    request_headers_changed: false,
                    cluster: request.cluster,
                    stream: Some((position, at_end)),
                });
                Advance::Parked
            }
            Err(reason) => {
                let reason = format!("the callout to cluster {} could not start: {reason}", request.cluster);
                self.settle_stream_failure(host, stream, position, at_end, reason)
            }
        }
    }

    /// A stream callout without an answer: fail closed ends the stream, fail open lets what
    /// the processor held go on.
    fn settle_stream_failure(
        &mut self,
        host: &mut dyn Host,
        stream: &mut EventStream,
        position: usize,
        at_end: bool,
        reason: String,
    ) -> Advance {
        let index = stream.processors[position];
        match self.fail(host, index, Direction::Response, Failure::Callout(reason)).0 {
            Verdict::Stop(reply, details) => Advance::Stop(reply, details),
            _ => {
                stream.release_gate(position);
                if at_end {
                    stream.end = StreamEnd::Next(position + 1);
                }
                Advance::Done
            }
        }
    }

    /// The answer to a stream processor's callout: the processor decides, then the stream
    /// goes on from where it stopped.
    pub(super) fn resume_stream(
        &mut self,
        host: &mut dyn Host,
        (position, at_end): (usize, bool),
        cluster: &str,
        result: Result<CalloutResponse, CalloutError>,
    ) -> CalloutFlow {
        let Some(mut stream) = self.events.take() else {
            return CalloutFlow::Ignored;
        };
        let index = stream.processors[position];
        let advance = match result {
            Ok(response) => {
                let mut emitted = Vec::new();
                let verdict = self.invoke(
                    host,
                    index,
                    Scope::response_event(&mut Body::default(), stream.started, &mut emitted),
                    |plugin, ctx| plugin.on_callout_done(ctx, response).map(Step::from),
                );
                // What the processor adds now goes after what it held.
                stream.gates[position].extend(emitted);
                match verdict {
                    Verdict::Stop(reply, details) => Advance::Stop(reply, details),
                    Verdict::Callout(request) => self.park_stream(host, &mut stream, position, at_end, request),
                    _ => {
                        stream.release_gate(position);
                        if at_end {
                            stream.end = StreamEnd::Next(position + 1);
                        }
                        Advance::Done
                    }
                }
            }
            Err(reason) => {
                let reason = format!("the callout to cluster {cluster} failed: {reason}");
                self.settle_stream_failure(host, &mut stream, position, at_end, reason)
            }
        };
        let advance = match advance {
            Advance::Done => self.advance_stream(host, &mut stream),
            other => other,
        };
        let parked = matches!(advance, Advance::Parked);
        let written = self.stream_output(host, &mut stream, advance, None);
        let flow = match written {
            None => CalloutFlow::Replied,
            Some(out) if parked && (out.is_empty() || stream.ended) => CalloutFlow::Waiting,
            Some(_) => {
                stream.started = true;
                CalloutFlow::Resume(Direction::Response)
            }
        };
        self.events = Some(stream);
        flow
    }
}

/// Queues events a processor emitted ahead of everything pending, to go on from `start`.
fn queue_front(stream: &mut EventStream, start: usize, emitted: Vec<SseEvent>) {
    for event in emitted.into_iter().rev() {
        stream.pending.push_front((start, event));
    }
}
