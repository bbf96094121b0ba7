//! Streamed responses: SSE events through the processors, and the stream end.

use super::stream::*;
use crate::config::FailureMode;
use crate::event_stream::EventStream;
use crate::host::{Direction, Host};
use crate::json::Body;
use crate::plugin::LocalReply;
use crate::sse::SseEvent;
use std::sync::Arc;

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
        let processors = std::mem::take(&mut stream.processors);
        let mut stop: Option<(LocalReply, String)> = None;
        loop {
            match stream.parser.next_event(end_of_stream) {
                Ok(Some(mut event)) => {
                    if event.is_empty() {
                        stream.hold(event.to_bytes());
                        continue;
                    }
                    stream.observe(&mut event);
                    let mut passed = Vec::new();
                    stop = self.run_event(host, &processors, event, stream.started, &mut passed);
                    for event in passed {
                        stream.hold(event.to_bytes());
                    }
                    if stop.is_some() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(too_large) => {
                    host.increment_counter(self.chain.response_body_too_large, 1);
                    let chain = Arc::clone(&self.chain);
                    let fail_closed = processors
                        .iter()
                        .any(|&i| chain.processors[i].failure_mode == FailureMode::FailClosed);
                    if fail_closed {
                        let reply = LocalReply::json_error(502, "response_event_too_large", &too_large.to_string());
                        stop = Some((reply, "payload_processor.response_event_too_large".into()));
                    } else {
                        log::warn!("{too_large}: passing the rest of the stream through unread");
                        for &i in &processors {
                            host.increment_counter(chain.processors[i].metrics.fail_open, 1);
                        }
                        stream.passthrough = true;
                    }
                    break;
                }
            }
        }
        if stop.is_none() && end_of_stream && !stream.passthrough {
            let mut passed = Vec::new();
            stop = self.run_stream_end(host, &processors, stream.started, &mut passed);
            for event in passed {
                stream.hold(event.to_bytes());
            }
        }
        stream.processors = processors;
        let mut out = Vec::new();
        match stop {
            Some((reply, details)) => {
                stream.discard_held();
                stream.parser.take_pending();
                stream.finished = true;
                if !stream.started {
                    // Nothing reached the client yet: an ordinary error response.
                    self.reply(host, &reply, &details);
                    return BodyFlow::Stop;
                }
                log::debug!("ending a started event stream ({details})");
                out = stream.terminal_events(&reply);
            }
            None => {
                stream.release(&mut out, end_of_stream || stream.passthrough);
                if stream.passthrough {
                    out.extend(stream.parser.take_pending());
                }
            }
        }
        if out != chunk {
            host.replace_body(Direction::Response, &out);
        }
        if out.is_empty() && !stream.started && !end_of_stream {
            return BodyFlow::Hold;
        }
        stream.started = true;
        BodyFlow::Continue
    }

    /// Runs the event processors on one event, in order. Events a processor emits go through
    /// the processors after it, ahead of the event; whatever survives lands in `out`, in order.
    /// Returns the reply that stops the stream, if one did.
    pub(super) fn run_event(
        &mut self,
        host: &mut dyn Host,
        processors: &[usize],
        mut event: SseEvent,
        headers_sent: bool,
        out: &mut Vec<SseEvent>,
    ) -> Option<(LocalReply, String)> {
        for (position, &index) in processors.iter().enumerate() {
            let mut emitted = Vec::new();
            let verdict = self.invoke(
                host,
                index,
                Scope::response_event(&mut Body::default(), headers_sent, &mut emitted),
                |plugin, ctx| plugin.on_response_event(ctx, &mut event).map(Step::from),
            );
            if let Verdict::Stop(reply, details) = verdict {
                return Some((reply, details));
            }
            for extra in emitted {
                if let Some(stop) = self.run_event(host, &processors[position + 1..], extra, headers_sent, out) {
                    return Some(stop);
                }
            }
            if let Verdict::Drop = verdict {
                return None;
            }
        }
        out.push(event);
        None
    }

    /// Tells the event processors the stream ended; the first rejection wins. Events they
    /// emit go through the processors after them and land in `out`.
    pub(super) fn run_stream_end(
        &mut self,
        host: &mut dyn Host,
        processors: &[usize],
        headers_sent: bool,
        out: &mut Vec<SseEvent>,
    ) -> Option<(LocalReply, String)> {
        for (position, &index) in processors.iter().enumerate() {
            let mut emitted = Vec::new();
            let verdict = self.invoke(
                host,
                index,
                Scope::response_event(&mut Body::default(), headers_sent, &mut emitted),
                |plugin, ctx| plugin.on_stream_end(ctx).map(Step::from),
            );
            if let Verdict::Stop(reply, details) = verdict {
                return Some((reply, details));
            }
            for extra in emitted {
                if let Some(stop) = self.run_event(host, &processors[position + 1..], extra, headers_sent, out) {
                    return Some(stop);
                }
            }
        }
        None
    }
}
