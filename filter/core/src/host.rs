//! The narrow interface between the engine and the proxy that runs it.
//!
//! Each adapter (Envoy dynamic module, proxy-wasm) implements [`Host`] for one HTTP stream; the
//! engine and every plugin only ever see this trait, so they are unit-tested against
//! [`crate::testing::FakeHost`] and run unchanged in both forms.

use crate::background::{CalloutError, CalloutRequest};

/// Which direction of the HTTP exchange an operation applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client to upstream.
    Request,
    /// Upstream to client.
    Response,
}

impl Direction {
    /// Lower-case name used in logs and error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Request => "request",
            Direction::Response => "response",
        }
    }
}

/// Index of a metric declared by [`crate::Chain::metrics`]; adapters map it to the host's own id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MetricId(pub usize);

/// Whether the host can hold a direction's headers while the engine reads its body.
///
/// Holding request headers is what lets a plugin change routing (set a header routes match,
/// pick an endpoint) after reading the body; holding response headers lets a plugin change the
/// status (reject) or set headers after reading the answer. proxy-wasm in Envoy can only hold them when the filter is
/// configured with `allow_on_headers_stop_iteration: true`, which some control planes (Envoy
/// Gateway) never set; the proxy-wasm adapter finds out at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadersHold {
    /// Headers can wait for the body.
    Available,
    /// Headers must go on before the body: on requests, processors that change routing after
    /// the body cannot run (they follow their failure mode); the others read the body as it
    /// follows the headers. On responses, processors cannot set headers after the body (their
    /// failure mode applies), and a rejected buffered answer is reset, as its status went out.
    /// The text says how to make holding available (logged, and put in the error a
    /// fail-closed processor answers with).
    Unavailable(&'static str),
    /// Not known yet: the engine holds the headers, and the adapter finds out whether the hold
    /// takes effect (and calls [`crate::Stream::on_request_headers_hold_failed`] if it never
    /// does).
    Unknown,
}

/// Per-stream operations the engine needs from the proxy.
///
/// Header names are case-insensitive; `set_header` replaces every existing value, so a value
/// the gateway sets always overwrites what a client sent.
pub trait Host {
    /// First value of a header in the headers of `dir`, if present.
    fn header(&self, dir: Direction, name: &str) -> Option<String>;
    /// Replaces all values of a header.
    fn set_header(&mut self, dir: Direction, name: &str, value: &str);
    /// Removes a header.
    fn remove_header(&mut self, dir: Direction, name: &str);
    /// Bytes of body received so far in `dir` (buffered plus the current chunk).
    fn body_len(&self, dir: Direction) -> u64;
    /// The whole body received so far in `dir`, copied out of the proxy's buffers.
    fn read_body(&mut self, dir: Direction) -> Vec<u8>;
    /// The body received so far in `dir` where the proxy keeps it, as its slices in order, so
    /// a reader can look at it without a copy. `None` for hosts that cannot lend their buffers
    /// (the engine then uses [`Host::read_body`]). The slices stay valid while the host is
    /// borrowed.
    fn body_slices(&self, _dir: Direction) -> Option<Vec<&[u8]>> {
        None
    }
    /// Replaces the whole body of `dir`.
    fn replace_body(&mut self, dir: Direction, body: &[u8]);
    /// Makes the proxy select the route again (after request headers that routes match changed).
    fn clear_route_cache(&mut self);
    /// Raises the per-stream buffer limit to at least `bytes`; never lowers it.
    fn raise_buffer_limit(&mut self, bytes: u64);
    /// Writes a string into the stream's dynamic metadata.
    fn set_metadata(&mut self, namespace: &str, key: &str, value: &str);
    /// Writes a number into the stream's dynamic metadata (hosts without numbers store text).
    fn set_metadata_number(&mut self, namespace: &str, key: &str, value: f64) {
        self.set_metadata(namespace, key, &value.to_string());
    }
    /// Sends a local reply instead of the upstream's response.
    fn send_local_reply(&mut self, status: u16, headers: &[(String, String)], body: &[u8], details: &str);
    /// Monotonic clock in nanoseconds (wasm hosts may only offer wall time).
    fn now_nanos(&self) -> u64;
    /// Wall-clock time: nanoseconds since the Unix epoch (for deadlines and expiries).
    fn unix_time_nanos(&self) -> u64;
    /// Adds to a counter declared by the chain.
    fn increment_counter(&mut self, id: MetricId, by: u64);
    /// Records a histogram sample for a histogram declared by the chain.
    fn record_histogram(&mut self, id: MetricId, value: u64);
    /// Sets a gauge declared by the chain.
    fn set_gauge(&mut self, id: MetricId, value: u64);
    /// The strings under `key` in the stream's dynamic metadata namespace `namespace`: the
    /// string items of a list, or a string value split at commas; empty when absent.
    fn metadata_strings(&self, _namespace: &str, _key: &str) -> Vec<String> {
        Vec::new()
    }
    /// Whether the headers of the direction being processed can wait for its body (see
    /// [`HeadersHold`]).
    fn headers_hold(&self) -> HeadersHold {
        HeadersHold::Available
    }
    /// Resets the stream: for a response whose headers already went out, when a processor
    /// rejects it (a local reply can no longer change the status).
    fn reset_stream(&mut self) {}
    /// The upstream host the request went to (`ip:port`), once the response arrived.
    fn upstream_address(&self) -> Option<String> {
        None
    }
    /// Tells any ORIGINAL_DST cluster to connect to `endpoint` (`ip:port`). Hosts whose
    /// dynamic metadata such clusters read need nothing here; proxy-wasm, which cannot write
    /// dynamic metadata, sets the typed filter state those clusters honour.
    fn set_original_destination(&mut self, _endpoint: &str) {}
    /// Sets a whole dynamic metadata namespace from a JSON object (Envoy: a
    /// `google.protobuf.Struct`). False when the host cannot (the `.wasm`, Envoy before 1.40).
    fn set_metadata_struct(&mut self, _namespace: &str, _fields: &serde_json::Map<String, serde_json::Value>) -> bool {
        false
    }
    /// Sets typed dynamic metadata: a serialized protobuf message of `type_url`
    /// (`type.googleapis.com/<full name>`). False when the host cannot.
    fn set_typed_metadata(&mut self, _namespace: &str, _type_url: &str, _message: &[u8]) -> bool {
        false
    }
    /// True when the host wants a [`ProcessorTrace`] after every invocation (the offline
    /// CLI); proxies leave it off and pay nothing.
    fn tracing(&self) -> bool {
        false
    }
    /// Receives a trace when [`Host::tracing`] is on.
    fn trace(&mut self, _trace: &ProcessorTrace<'_>) {}
    /// Starts an HTTP call from this stream; returns the adapter's handle for it. The answer
    /// (or failure) must come back through [`crate::Stream::on_callout_done`] with that
    /// handle, on this stream. Hosts that cannot call out refuse.
    fn http_callout(&mut self, _request: &CalloutRequest) -> Result<u64, CalloutError> {
        Err("this host cannot send HTTP callouts".into())
    }
}

/// What one processor invocation did, for hosts that trace ([`Host::tracing`]).
#[derive(Debug)]
pub struct ProcessorTrace<'a> {
    /// The processor's name.
    pub processor: &'a str,
    /// The direction it ran on.
    pub direction: Direction,
    /// `continue`, `drop`, `reject <status>`, `failed open: <reason>` or `failed closed: <reason>`.
    pub outcome: &'a str,
    /// Time spent in the plugin.
    pub elapsed_nanos: u64,
    /// The body of the direction after the invocation (edits included); empty for streamed events.
    pub body: &'a [u8],
}
