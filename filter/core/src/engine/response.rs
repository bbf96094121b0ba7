//! The response phase: headers, body and trailers on the way back.

use super::stream::*;
use crate::config::FailureMode;
use crate::event_stream::{Api, EventStream};
use crate::host::{Direction, HeadersHold, Host};
use crate::json::Body;
use crate::plugin::{LocalReply, PhaseNeed};
use std::sync::Arc;

impl Stream {
    /// Response headers arrived. Decides, from the content type and encoding, which response
    /// processors can run, and whether to pass through, buffer, or stream events.
    pub fn on_response_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> HeadersFlow {
        if self.replied {
            return HeadersFlow::Continue; // our own local reply passing through the encoder
        }
        let chain = Arc::clone(&self.chain);
        if self.active.len() != chain.processors.len() {
            return HeadersFlow::Continue; // no request headers were seen
        }
        // Request-only chains (body routing) leave answers alone without reading a header.
        let looks_at_response = chain
            .processors
            .iter()
            .zip(&self.active)
            .any(|(p, active)| *active && (p.response != PhaseNeed::Skip || p.stream.is_some()));
        if !looks_at_response {
            return HeadersFlow::Continue;
        }
        let media = media_type(&host.header(Direction::Response, "content-type").unwrap_or_default());
        let event_stream = media == "text/event-stream";
        let json = media == "application/json" || media.ends_with("+json");
        let encoding = host
            .header(Direction::Response, "content-encoding")
            .map(|e| e.trim().to_ascii_lowercase())
            .filter(|e| !e.is_empty() && e != "identity");
        let mut hold_back: Option<usize> = None;
        self.response_active = vec![false; chain.processors.len()];
        for (index, processor) in chain.processors.iter().enumerate() {
            if !self.active[index] {
                continue;
            }
            let reads_events = event_stream && !end_of_stream && processor.stream.is_some();
            let reads_body = processor.response == PhaseNeed::Body && (json || end_of_stream);
            if reads_events || reads_body {
                if let Some(encoding) = encoding.as_deref().filter(|_| !end_of_stream) {
                    if processor.failure_mode == FailureMode::FailClosed {
                        let message = format!(
                            "the upstream answered with content-encoding {encoding}, which processor {} cannot \
                             inspect",
                            processor.name
                        );
                        let reply = LocalReply::json_error(502, "response_encoded", &message);
                        self.reply(host, &reply, "payload_processor.response_encoded");
                        return HeadersFlow::Stop;
                    }
                    host.increment_counter(processor.metrics.skipped_encoded, 1);
                    continue;
                }
                self.response_active[index] = true;
                if reads_events {
                    let window = processor.stream.unwrap_or_default().hold_back_bytes;
                    hold_back = Some(hold_back.unwrap_or(0).max(window));
                }
            } else if processor.response == PhaseNeed::Body {
                host.increment_counter(processor.metrics.skipped_non_json, 1);
            } else if processor.response == PhaseNeed::Headers {
                self.response_active[index] = true;
            }
        }
        let Some(hold_back) = hold_back else {
            return self.on_headers(host, Direction::Response, end_of_stream);
        };
        let released = matches!(host.headers_hold(), HeadersHold::Unavailable(_));
        // A streamed response: header-stage processors run now, event processors per event.
        self.response = PhaseState::Streaming;
        if self.run(host, Direction::Response, Body::default(), true, false) != RunOutcome::Done {
            return HeadersFlow::Stop;
        }
        // Events may change length; a stream with a content-length would be cut or padded.
        host.remove_header(Direction::Response, "content-length");
        let path = std::mem::take(&mut self.request_path);
        let max_event = usize::try_from(self.chain.limits.max_response_body_bytes).unwrap_or(usize::MAX);
        let processors = (0..chain.processors.len())
            .filter(|&i| self.response_active[i] && chain.processors[i].stream.is_some())
            .collect();
        let mut events = EventStream::new(max_event, hold_back, Api::from_path(&path), processors);
        if released {
            // The headers go now: a later rejection ends the stream with a terminal event.
            self.response_released = true;
            events.started = true;
            self.events = Some(events);
            return HeadersFlow::Continue;
        }
        self.events = Some(events);
        HeadersFlow::WaitForBody
    }

    /// A response body chunk arrived.
    pub fn on_response_body(&mut self, host: &mut dyn Host, end_of_stream: bool) -> BodyFlow {
        if self.replied && self.response == PhaseState::Idle {
            return BodyFlow::Continue;
        }
        if self.parked.is_some() {
            if self.response == PhaseState::Streaming {
                self.stash_stream_data(host, end_of_stream);
            }
            return BodyFlow::WaitForCallout;
        }
        if self.response == PhaseState::Streaming {
            return self.on_stream_data(host, end_of_stream);
        }
        self.on_body(host, Direction::Response, end_of_stream)
    }

    /// Response trailers arrived.
    pub fn on_response_trailers(&mut self, host: &mut dyn Host) -> BodyFlow {
        if self.parked.is_some() {
            if self.response == PhaseState::Streaming {
                self.stash_stream_data(host, true);
            }
            return BodyFlow::WaitForCallout;
        }
        if self.response == PhaseState::Streaming {
            return self.on_stream_data(host, true);
        }
        self.on_body(host, Direction::Response, true)
    }

    /// Lets a buffered response's headers go before its body: header-stage processors run now,
    /// `content-length` goes (a processor may change the body), the body processors run at its
    /// end with the headers gone.
    pub(super) fn release_response_headers(&mut self, host: &mut dyn Host) -> HeadersFlow {
        self.response_released = true;
        host.remove_header(Direction::Response, "content-length");
        headers_flow(self.run(host, Direction::Response, Body::default(), true, true))
    }
}
