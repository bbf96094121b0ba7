//! The request phase: headers, body and trailers on the way upstream, and the release of
//! request headers a host cannot hold.

use super::stream::*;
use crate::config::FailureMode;
use crate::host::{Direction, Host};
use crate::json::Body;
use crate::plugin::{LocalReply, PhaseNeed};
use std::sync::Arc;

impl Stream {
    /// Request headers arrived. Decides which processors apply and whether to buffer.
    pub fn on_request_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> HeadersFlow {
        let chain = Arc::clone(&self.chain);
        self.started_nanos = host.now_nanos();
        self.active = chain.processors.iter().map(|p| p.matcher.matches(host)).collect();
        // `response_active` is sized when response headers arrive, `states` when a processor
        // first keeps state: a routing-only request allocates neither.
        let reads_response = chain
            .processors
            .iter()
            .zip(&self.active)
            .any(|(p, active)| *active && (p.response == PhaseNeed::Body || p.stream.is_some()));
        let reads_events = chain
            .processors
            .iter()
            .zip(&self.active)
            .any(|(p, active)| *active && p.stream.is_some());
        if reads_events {
            self.request_path = host.header(Direction::Request, ":path").unwrap_or_default();
        }
        if reads_response {
            // Response plugins must see plain text: ask the upstream not to compress. (To
            // compress towards the client, put Envoy's compressor filter before this one.)
            host.set_header(Direction::Request, "accept-encoding", "identity");
        }
        // A compressed request body cannot be inspected (decoding in the proxy would cost every
        // request CPU and memory): refuse it when a fail-closed body reader needs it (415),
        // otherwise those readers sit this request out.
        let encoding = host
            .header(Direction::Request, "content-encoding")
            .map(|e| e.trim().to_ascii_lowercase())
            .filter(|e| !e.is_empty() && e != "identity");
        if let Some(encoding) = encoding.filter(|_| !end_of_stream) {
            for (index, processor) in chain.processors.iter().enumerate() {
                if !self.active[index] || processor.request != PhaseNeed::Body {
                    continue;
                }
                if processor.failure_mode == FailureMode::FailClosed {
                    let message = format!(
                        "request bodies with content-encoding {encoding} cannot be inspected by processor {}; \
                         send the body uncompressed",
                        processor.name
                    );
                    let reply = LocalReply::json_error(415, "unsupported_content_encoding", &message);
                    self.reply(host, &reply, "payload_processor.request_encoded");
                    return HeadersFlow::Stop;
                }
                host.increment_counter(processor.metrics.skipped_encoded, 1);
                self.active[index] = false;
            }
        }
        self.on_headers(host, Direction::Request, end_of_stream)
    }

    /// A request body chunk arrived (`end_of_stream` on the last one).
    pub fn on_request_body(&mut self, host: &mut dyn Host, end_of_stream: bool) -> BodyFlow {
        self.on_body(host, Direction::Request, end_of_stream)
    }

    /// Request trailers arrived: the body (if any) is complete.
    pub fn on_request_trailers(&mut self, host: &mut dyn Host) -> BodyFlow {
        self.on_body(host, Direction::Request, true)
    }

    /// The adapter found that the request headers it was asked to hold went on waiting for a
    /// resume that no body callback would ever trigger (proxy-wasm without
    /// `allow_on_headers_stop_iteration`). Call it while the headers are still paused: the
    /// chain continues as [`HeadersHold::Unavailable`] prescribes. [`HeadersFlow::Continue`]
    /// means resume the request; [`HeadersFlow::Stop`] means a local reply was sent.
    pub fn on_request_headers_hold_failed(&mut self, host: &mut dyn Host, fix: &'static str) -> HeadersFlow {
        if self.replied || self.request != PhaseState::Buffering || self.request_released {
            return HeadersFlow::Continue;
        }
        self.release_request_headers(host, fix)
    }

    /// Lets the request headers go before the body: processors that change routing after the
    /// body follow their failure mode (fail-closed ones answer with an error saying how to fix
    /// the host, `fix`), header-stage processors run now while the headers are still here, and
    /// `content-length` goes when a body processor may change the body. The body processors
    /// run at the end of the body as usual, with the headers already gone.
    pub(super) fn release_request_headers(&mut self, host: &mut dyn Host, fix: &'static str) -> HeadersFlow {
        let chain = Arc::clone(&self.chain);
        let steering: Vec<usize> = self.active_steering().collect();
        for index in steering {
            let processor = &chain.processors[index];
            if processor.failure_mode == FailureMode::FailClosed {
                let message = format!(
                    "processor {} changes routing after reading the request body, but this filter cannot hold the \
                     request headers until then: {fix}",
                    processor.name
                );
                host.increment_counter(processor.metrics.errors, 1);
                let reply = LocalReply::json_error(500, "headers_hold_unavailable", &message);
                self.reply(
                    host,
                    &reply,
                    &format!("payload_processor.{}.headers_hold_unavailable", processor.name),
                );
                return HeadersFlow::Stop;
            }
            log::debug!(
                "processor {} skipped: it changes routing after the body and the headers cannot wait",
                processor.name
            );
            host.increment_counter(processor.metrics.fail_open, 1);
            self.active[index] = false;
        }
        self.request_released = true;
        let edits_body = chain
            .processors
            .iter()
            .zip(&self.active)
            .any(|(p, active)| *active && p.request == PhaseNeed::Body && p.edits.body);
        if edits_body {
            // The body may change length after the headers left: send it chunked.
            host.remove_header(Direction::Request, "content-length");
        }
        headers_flow(self.run(host, Direction::Request, Body::default(), true, true))
    }
}
