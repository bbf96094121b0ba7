//! A state-based fake host for unit tests of the engine and of plugins.

use crate::background::{BackgroundHost, CalloutError, CalloutRequest, CalloutResponse};
use crate::host::{Direction, HeadersHold, Host, MetricId};
use std::collections::BTreeMap;

/// A local reply the engine sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentReply {
    /// HTTP status.
    pub status: u16,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// Response code details.
    pub details: String,
}

impl SentReply {
    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("local reply bodies are JSON")
    }
}

/// In-memory headers, bodies, metadata and metrics; a clock that advances by `tick_nanos` per read.
#[derive(Debug, Default, Clone)]
pub struct FakeHost {
    /// Request headers (lower-case names), in order.
    pub request_headers: Vec<(String, String)>,
    /// Response headers.
    pub response_headers: Vec<(String, String)>,
    /// Request body as the engine left it.
    pub request_body: Vec<u8>,
    /// Response body as the engine left it.
    pub response_body: Vec<u8>,
    /// How many times the body of each direction was replaced.
    pub body_replacements: usize,
    /// Dynamic metadata: (namespace, key) -> value.
    pub metadata: BTreeMap<(String, String), String>,
    /// The local reply, if one was sent.
    pub reply: Option<SentReply>,
    /// How often the route cache was cleared.
    pub route_cache_clears: usize,
    /// The buffer limit the engine asked for.
    pub buffer_limit: u64,
    /// Counter values by metric id.
    pub counters: BTreeMap<usize, u64>,
    /// Histogram samples by metric id.
    pub histograms: BTreeMap<usize, Vec<u64>>,
    /// Current clock value.
    pub now: std::cell::Cell<u64>,
    /// Clock advance per `now_nanos` call.
    pub tick_nanos: u64,
    /// Wall-clock time reported by `unix_time_nanos`.
    pub unix_time_nanos: u64,
    /// Gauge values by metric id.
    pub gauges: BTreeMap<usize, u64>,
    /// The upstream address reported once the response arrived.
    pub upstream: Option<String>,
    /// The endpoint passed to `set_original_destination`.
    pub original_destination: Option<String>,
    /// What `headers_hold` answers (`None`: available).
    pub headers_hold: Option<HeadersHold>,
    /// Whether the stream was reset.
    pub reset: bool,
    /// Whole namespaces set with `set_metadata_struct` (`None`: the host refuses, as the
    /// `.wasm` does).
    pub metadata_structs: Option<BTreeMap<String, serde_json::Map<String, serde_json::Value>>>,
    /// Typed metadata: namespace -> (type URL, message bytes), when `metadata_structs` is on.
    pub typed_metadata: BTreeMap<String, (String, Vec<u8>)>,
    /// Callouts the stream sent, with their handles (1, 2, ...), in order.
    pub callouts: Vec<(u64, CalloutRequest)>,
    /// When set, every stream callout fails to start with this reason.
    pub refuse_callouts: Option<String>,
    /// When set, the host lends its bodies in slices of this many bytes
    /// ([`Host::body_slices`]), as Envoy keeps a body in several buffers.
    pub body_slice_bytes: Option<usize>,
    /// How often the engine copied a body out ([`Host::read_body`]).
    pub body_reads: std::cell::Cell<usize>,
}

impl FakeHost {
    /// A POST request with the given path, headers and body.
    pub fn request(path: &str, headers: &[(&str, &str)], body: &[u8]) -> Self {
        let mut host = FakeHost::default();
        host.request_headers.push((":method".into(), "POST".into()));
        host.request_headers.push((":path".into(), path.into()));
        for (name, value) in headers {
            host.request_headers
                .push((name.to_ascii_lowercase(), value.to_string()));
        }
        host.request_body = body.to_vec();
        host
    }

    fn map(&self, dir: Direction) -> &Vec<(String, String)> {
        match dir {
            Direction::Request => &self.request_headers,
            Direction::Response => &self.response_headers,
        }
    }

    fn map_mut(&mut self, dir: Direction) -> &mut Vec<(String, String)> {
        match dir {
            Direction::Request => &mut self.request_headers,
            Direction::Response => &mut self.response_headers,
        }
    }

    /// Every value of a header.
    pub fn header_values(&self, dir: Direction, name: &str) -> Vec<String> {
        self.map(dir)
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The request body as the engine left it, parsed as JSON.
    pub fn request_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.request_body).expect("the request body is JSON")
    }

    /// Value of a counter by full metric name in `chain`.
    pub fn counter(&self, chain: &crate::Chain, name: &str) -> u64 {
        self.counters.get(&metric_index(chain, name)).copied().unwrap_or(0)
    }
}

/// The id of the metric called `name` in `chain` (panics when there is none: a test bug).
fn metric_index(chain: &crate::Chain, name: &str) -> usize {
    chain
        .metrics()
        .iter()
        .position(|m| m.name == name)
        .unwrap_or_else(|| panic!("no metric {name}"))
}

impl Host for FakeHost {
    fn headers_hold(&self) -> HeadersHold {
        self.headers_hold.unwrap_or(HeadersHold::Available)
    }
    fn reset_stream(&mut self) {
        self.reset = true;
    }
    fn header(&self, dir: Direction, name: &str) -> Option<String> {
        self.map(dir)
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
    fn set_header(&mut self, dir: Direction, name: &str, value: &str) {
        self.remove_header(dir, name);
        self.map_mut(dir).push((name.to_ascii_lowercase(), value.to_string()));
    }
    fn remove_header(&mut self, dir: Direction, name: &str) {
        self.map_mut(dir).retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }
    fn body_len(&self, dir: Direction) -> u64 {
        match dir {
            Direction::Request => self.request_body.len() as u64,
            Direction::Response => self.response_body.len() as u64,
        }
    }
    fn body_slices(&self, dir: Direction) -> Option<Vec<&[u8]>> {
        let body = match dir {
            Direction::Request => &self.request_body,
            Direction::Response => &self.response_body,
        };
        Some(body.chunks(self.body_slice_bytes?.max(1)).collect())
    }
    fn read_body(&mut self, dir: Direction) -> Vec<u8> {
        self.body_reads.set(self.body_reads.get() + 1);
        match dir {
            Direction::Request => self.request_body.clone(),
            Direction::Response => self.response_body.clone(),
        }
    }
    fn replace_body(&mut self, dir: Direction, body: &[u8]) {
        self.body_replacements += 1;
        match dir {
            Direction::Request => self.request_body = body.to_vec(),
            Direction::Response => self.response_body = body.to_vec(),
        }
    }
    fn clear_route_cache(&mut self) {
        self.route_cache_clears += 1;
    }
    fn raise_buffer_limit(&mut self, bytes: u64) {
        self.buffer_limit = self.buffer_limit.max(bytes);
    }
    fn set_metadata(&mut self, namespace: &str, key: &str, value: &str) {
        self.metadata
            .insert((namespace.to_string(), key.to_string()), value.to_string());
    }
    fn send_local_reply(&mut self, status: u16, headers: &[(String, String)], body: &[u8], details: &str) {
        self.reply = Some(SentReply {
            status,
            headers: headers.to_vec(),
            body: body.to_vec(),
            details: details.to_string(),
        });
    }
    fn now_nanos(&self) -> u64 {
        let now = self.now.get() + self.tick_nanos;
        self.now.set(now);
        now
    }
    fn unix_time_nanos(&self) -> u64 {
        self.unix_time_nanos
    }
    fn increment_counter(&mut self, id: MetricId, by: u64) {
        *self.counters.entry(id.0).or_default() += by;
    }
    fn record_histogram(&mut self, id: MetricId, value: u64) {
        self.histograms.entry(id.0).or_default().push(value);
    }
    fn set_gauge(&mut self, id: MetricId, value: u64) {
        self.gauges.insert(id.0, value);
    }
    fn metadata_strings(&self, namespace: &str, key: &str) -> Vec<String> {
        self.metadata
            .get(&(namespace.to_string(), key.to_string()))
            .map(|value| {
                value
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }
    fn upstream_address(&self) -> Option<String> {
        self.upstream.clone()
    }
    fn set_metadata_struct(&mut self, namespace: &str, fields: &serde_json::Map<String, serde_json::Value>) -> bool {
        match &mut self.metadata_structs {
            Some(structs) => {
                structs.insert(namespace.to_string(), fields.clone());
                true
            }
            None => false,
        }
    }
    fn set_typed_metadata(&mut self, namespace: &str, type_url: &str, message: &[u8]) -> bool {
        if self.metadata_structs.is_none() {
            return false;
        }
        self.typed_metadata
            .insert(namespace.to_string(), (type_url.to_string(), message.to_vec()));
        true
    }
    fn set_original_destination(&mut self, endpoint: &str) {
        self.original_destination = Some(endpoint.to_string());
    }
    fn http_callout(&mut self, request: &CalloutRequest) -> Result<u64, CalloutError> {
        if let Some(reason) = &self.refuse_callouts {
            return Err(reason.clone());
        }
        let handle = self.callouts.len() as u64 + 1;
        self.callouts.push((handle, request.clone()));
        Ok(handle)
    }
}

/// Shared data of fake background hosts: key -> (value, version).
pub type SharedData = std::rc::Rc<std::cell::RefCell<BTreeMap<String, (Vec<u8>, u32)>>>;

/// A fake [`BackgroundHost`]: records the callouts sent and hands out handles 1, 2, ...
#[derive(Debug, Default)]
pub struct FakeBackgroundHost {
    /// Current clock value (set by the test).
    pub now: u64,
    /// Callouts sent, with their handles, in order.
    pub sent: Vec<(u64, CalloutRequest)>,
    /// When set, every callout fails to start with this reason.
    pub refuse: Option<String>,
    /// Counter values by metric id.
    pub counters: BTreeMap<usize, u64>,
    /// Gauge values by metric id.
    pub gauges: BTreeMap<usize, u64>,
    /// Handles handed out so far.
    pub handles: u64,
    /// Shared data (key -> value, version), shared with other fake hosts through the `Rc`
    /// when set; `None`: the host has no shared data.
    pub shared: Option<SharedData>,
}

impl FakeBackgroundHost {
    /// Value of a counter by full metric name in `chain`.
    pub fn counter(&self, chain: &crate::Chain, name: &str) -> u64 {
        self.counters.get(&metric_index(chain, name)).copied().unwrap_or(0)
    }

    /// Value of a gauge by full metric name in `chain`.
    pub fn gauge(&self, chain: &crate::Chain, name: &str) -> Option<u64> {
        let id = chain
            .metrics()
            .iter()
            .position(|m| m.name == name)
            .unwrap_or_else(|| panic!("no metric {name}"));
        self.gauges.get(&id).copied()
    }

    /// Takes the callouts sent so far.
    pub fn take_sent(&mut self) -> Vec<(u64, CalloutRequest)> {
        std::mem::take(&mut self.sent)
    }
}

impl BackgroundHost for FakeBackgroundHost {
    fn now_nanos(&self) -> u64 {
        self.now
    }
    fn http_callout(&mut self, request: &CalloutRequest) -> Result<u64, CalloutError> {
        if let Some(reason) = &self.refuse {
            return Err(reason.clone());
        }
        self.handles += 1;
        let handle = self.handles;
        self.sent.push((handle, request.clone()));
        Ok(handle)
    }
    fn increment_counter(&mut self, id: MetricId, by: u64) {
        *self.counters.entry(id.0).or_default() += by;
    }
    fn set_gauge(&mut self, id: MetricId, value: u64) {
        self.gauges.insert(id.0, value);
    }
    fn has_shared_data(&self) -> bool {
        self.shared.is_some()
    }
    fn shared_data_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.shared.as_ref()?.borrow().get(key).cloned()
    }
    fn shared_data_set(&mut self, key: &str, value: &[u8], version: u32) -> bool {
        let Some(shared) = &self.shared else { return false };
        let mut shared = shared.borrow_mut();
        let current = shared.get(key).map_or(0, |(_, v)| *v);
        if version != 0 && version != current {
            return false;
        }
        shared.insert(key.to_string(), (value.to_vec(), current + 1));
        true
    }
}

/// Runs the request phase as the filter does when the whole request arrived at once: the
/// headers (end of stream when there is no body), then the body if the chain buffers it.
pub fn run_request_phase(stream: &mut crate::Stream, host: &mut FakeHost) {
    let no_body = host.request_body.is_empty();
    if stream.on_request_headers(host, no_body) == crate::HeadersFlow::WaitForBody {
        stream.on_request_body(host, true);
    }
}

/// How a phase driven with [`run_request_with_callouts`] or [`run_response_with_callouts`]
/// ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseEnd {
    /// The direction went on (to the upstream, or to the client).
    Continued,
    /// A local reply was sent (in `host.reply`) or the stream was reset.
    Stopped,
}

/// Runs the request phase like [`run_request_phase`], answering every callout the chain
/// sends with `answer` (a fake service), as the adapter would when Envoy answers.
pub fn run_request_with_callouts(
    stream: &mut crate::Stream,
    host: &mut FakeHost,
    mut answer: impl FnMut(&CalloutRequest) -> Result<CalloutResponse, CalloutError>,
) -> PhaseEnd {
    let no_body = host.request_body.is_empty();
    match stream.on_request_headers(host, no_body) {
        crate::HeadersFlow::Continue => return PhaseEnd::Continued,
        crate::HeadersFlow::Stop => return PhaseEnd::Stopped,
        crate::HeadersFlow::WaitForCallout => {}
        crate::HeadersFlow::WaitForBody => match stream.on_request_body(host, true) {
            crate::BodyFlow::WaitForCallout => {}
            crate::BodyFlow::Continue => return PhaseEnd::Continued,
            _ => return PhaseEnd::Stopped,
        },
    }
    answer_callouts(stream, host, &mut answer)
}

/// Runs a buffered JSON response (`host.response_body`, status 200) through the response
/// phase, answering callouts with `answer`.
pub fn run_response_with_callouts(
    stream: &mut crate::Stream,
    host: &mut FakeHost,
    mut answer: impl FnMut(&CalloutRequest) -> Result<CalloutResponse, CalloutError>,
) -> PhaseEnd {
    if host.header(Direction::Response, ":status").is_none() {
        host.response_headers.push((":status".into(), "200".into()));
        host.response_headers
            .push(("content-type".into(), "application/json".into()));
    }
    let no_body = host.response_body.is_empty();
    match stream.on_response_headers(host, no_body) {
        crate::HeadersFlow::Continue => return PhaseEnd::Continued,
        crate::HeadersFlow::Stop => return PhaseEnd::Stopped,
        crate::HeadersFlow::WaitForCallout => {}
        crate::HeadersFlow::WaitForBody => match stream.on_response_body(host, true) {
            crate::BodyFlow::WaitForCallout => {}
            crate::BodyFlow::Continue => return PhaseEnd::Continued,
            _ => return PhaseEnd::Stopped,
        },
    }
    answer_callouts(stream, host, &mut answer)
}

fn answer_callouts(
    stream: &mut crate::Stream,
    host: &mut FakeHost,
    answer: &mut dyn FnMut(&CalloutRequest) -> Result<CalloutResponse, CalloutError>,
) -> PhaseEnd {
    loop {
        let (handle, request) = host.callouts.last().cloned().expect("a callout was sent");
        match stream.on_callout_done(host, handle, answer(&request)) {
            crate::CalloutFlow::Waiting => {}
            crate::CalloutFlow::Resume(_) => return PhaseEnd::Continued,
            crate::CalloutFlow::Replied | crate::CalloutFlow::Ignored => return PhaseEnd::Stopped,
        }
    }
}

/// A JSON answer from a fake service.
pub fn json_answer(status: u16, body: &serde_json::Value) -> Result<CalloutResponse, CalloutError> {
    Ok(CalloutResponse {
        status,
        headers: vec![
            (":status".into(), status.to_string()),
            ("content-type".into(), "application/json".into()),
        ],
        body: serde_json::to_vec(body).expect("JSON serializes"),
    })
}

/// Sends a streamed (`text/event-stream`) response through `stream` in chunks of `split`
/// bytes, the last one ending the stream, and returns the bytes the client received. A
/// local reply sent instead ends up in `host.reply`.
pub fn run_streamed_response(stream: &mut crate::Stream, host: &mut FakeHost, body: &[u8], split: usize) -> Vec<u8> {
    host.response_headers.push((":status".into(), "200".into()));
    host.response_headers
        .push(("content-type".into(), "text/event-stream".into()));
    let mut client = Vec::new();
    if stream.on_response_headers(host, false) == crate::HeadersFlow::Stop {
        return client;
    }
    let chunks: Vec<&[u8]> = body.chunks(split.max(1)).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        host.response_body = chunk.to_vec();
        match stream.on_response_body(host, i + 1 == chunks.len()) {
            crate::BodyFlow::Continue => client.extend_from_slice(&host.response_body),
            crate::BodyFlow::Stop => break,
            crate::BodyFlow::Buffer | crate::BodyFlow::Hold | crate::BodyFlow::WaitForCallout => {}
        }
    }
    client
}
