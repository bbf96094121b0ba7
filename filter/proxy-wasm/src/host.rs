//! [`Host`] over proxy-wasm host calls.

use payload_processor_core::{
    BackgroundHost, BodyFlow, CalloutError, CalloutRequest, Direction, HeadersHold, Host, MetricId,
};
use prost::Message;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::Context;
use proxy_wasm::types::{BufferType, MapType};
use std::time::UNIX_EPOCH;

pub(crate) struct WasmHost<'a> {
    metric_ids: &'a [Option<u32>],
    /// Size of the body buffered so far, as the body callback reported it (cumulative).
    body_size: usize,
    /// The direction of the callback being served. Envoy only lends a header map to wasm
    /// while that direction's headers are held, and proxy-wasm traps on a map Envoy refuses,
    /// so request headers read from a response callback come from the `request.headers`
    /// attribute, and writes to the other direction's headers are not attempted.
    phase: Direction,
    /// What the engine is told about holding request headers.
    hold: HeadersHold,
    /// Request body bytes taken out of Envoy in earlier callbacks (see [`RequestBody`]).
    request_body: Option<&'a mut RequestBody>,
    /// Headers that went on before their body: Envoy no longer lends their map (the SDK traps
    /// on a refused map) nor their attributes, so they are read from the copy taken when they
    /// went ([`HeaderSnapshot`]); `[request, response]`.
    gone: [Option<&'a HeaderSnapshot>; 2],
}

/// The headers of one direction as they went on early (see [`payload_processor_core::HeadersHold`]),
/// for reads in its later body callbacks.
#[derive(Default)]
pub(crate) struct HeaderSnapshot(Vec<(String, String)>);

impl HeaderSnapshot {
    /// Copies the held headers of `dir` (call while they are still held).
    pub(crate) fn take(dir: Direction) -> Self {
        Self(hostcalls::get_map(headers_map(dir)).unwrap_or_default())
    }

    fn get(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.clone())
    }
}

/// The request body as the filter holds it itself: each chunk is moved out of Envoy as it
/// arrives, so Envoy buffers nothing for us. A proxy-wasm filter cannot raise Envoy's
/// per-stream buffer limit (32 KiB on Envoy Gateway listeners), and a body buffered in Envoy
/// above it is refused with Envoy's own 413, or stalls when a filter ahead of us held the
/// headers while it arrived. Held here, the chain's `maxRequestBodyBytes` is the only limit,
/// as in the dynamic module. At the end the whole body goes back into Envoy's buffer.
#[derive(Default)]
pub(crate) struct RequestBody {
    taken: Vec<u8>,
    /// The engine replaced the body in this callback (Envoy's buffer holds all of it).
    replaced: bool,
}

impl RequestBody {
    /// After a request body callback: while the engine buffers, this callback's bytes move out
    /// of Envoy; when it lets the body go and did not put one back itself, the bytes taken
    /// before return to Envoy's buffer ahead of the last chunk; after a local reply they go.
    pub(crate) fn settle(&mut self, chunk_size: usize, flow: BodyFlow) {
        let replaced = std::mem::take(&mut self.replaced);
        match flow {
            BodyFlow::Buffer if !replaced => {
                if let Ok(Some(chunk)) = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, chunk_size) {
                    self.taken.extend_from_slice(&chunk);
                }
                let _ = hostcalls::set_buffer(BufferType::HttpRequestBody, 0, chunk_size, &[]);
            }
            BodyFlow::Continue if !self.taken.is_empty() && !replaced => {
                let taken = std::mem::take(&mut self.taken);
                let _ = hostcalls::set_buffer(BufferType::HttpRequestBody, 0, 0, &taken);
            }
            BodyFlow::Stop => self.taken = Vec::new(),
            _ => {}
        }
    }
}

impl<'a> WasmHost<'a> {
    pub(crate) fn new(metric_ids: &'a [Option<u32>], body_size: usize, phase: Direction) -> Self {
        Self {
            metric_ids,
            body_size,
            phase,
            hold: HeadersHold::Available,
            request_body: None,
            gone: [None, None],
        }
    }

    /// The copies of headers that already went on (`None` where they are still held).
    pub(crate) fn with_gone_headers(
        mut self,
        request: Option<&'a HeaderSnapshot>,
        response: Option<&'a HeaderSnapshot>,
    ) -> Self {
        self.gone = [request, response];
        self
    }

    fn gone(&self, dir: Direction) -> Option<&'a HeaderSnapshot> {
        self.gone[usize::from(dir == Direction::Response)]
    }

    /// Request body callbacks: earlier chunks are in `body`, not in Envoy.
    pub(crate) fn with_request_body(mut self, body: &'a mut RequestBody) -> Self {
        self.request_body = Some(body);
        self
    }

    pub(crate) fn with_hold(mut self, hold: HeadersHold) -> Self {
        self.hold = hold;
        self
    }
}

/// A request header read from a response callback, through Envoy's `request.headers` attribute
/// (Envoy lends the request header map only while the request is held); the pseudo-headers
/// from their own attributes.
fn header_attribute(dir: Direction, name: &str) -> Option<String> {
    let path = match name {
        ":path" => vec!["request", "path"],
        ":method" => vec!["request", "method"],
        ":authority" => vec!["request", "host"],
        ":scheme" => vec!["request", "scheme"],
        name => vec![dir.as_str(), "headers", name],
    };
    let value = hostcalls::get_property(path).ok().flatten()?;
    Some(String::from_utf8_lossy(&value).into_owned())
}

/// Size of the buffered body outside a body callback (at trailers).
pub(crate) fn buffered_size(request: bool) -> usize {
    hostcalls::get_buffer(body_buffer(request), 0, usize::MAX)
        .ok()
        .flatten()
        .map_or(0, |body| body.len())
}

fn headers_map(dir: Direction) -> MapType {
    match dir {
        Direction::Request => MapType::HttpRequestHeaders,
        Direction::Response => MapType::HttpResponseHeaders,
    }
}

fn body_buffer(request: bool) -> BufferType {
    if request {
        BufferType::HttpRequestBody
    } else {
        BufferType::HttpResponseBody
    }
}

impl Host for WasmHost<'_> {
    fn http_callout(&mut self, request: &CalloutRequest) -> Result<u64, CalloutError> {
        // The SDK routes the answer to the HTTP context that is active now: this stream's.
        hostcalls::dispatch_http_call(
            &request.cluster,
            request.header_pairs(),
            Some(&request.body).filter(|body| !body.is_empty()).map(Vec::as_slice),
            Vec::new(),
            request.timeout.max(std::time::Duration::from_millis(1)),
        )
        .map(u64::from)
        .map_err(|status| {
            format!(
                "the proxy refused the call ({status:?}); is cluster {} defined?",
                request.cluster
            )
        })
    }

    fn header(&self, dir: Direction, name: &str) -> Option<String> {
        let value = if let Some(snapshot) = self.gone(dir) {
            return snapshot.get(name);
        } else if dir == self.phase {
            hostcalls::get_map_value_bytes(headers_map(dir), name).ok().flatten()?
        } else if dir == Direction::Request {
            return header_attribute(dir, &name.to_ascii_lowercase());
        } else {
            return None; // response headers do not exist yet in a request callback
        };
        Some(String::from_utf8_lossy(&value).into_owned())
    }

    fn set_header(&mut self, dir: Direction, name: &str, value: &str) {
        if dir != self.phase || self.gone(dir).is_some() {
            log::debug!("not setting {} header {name}: it went out already", dir.as_str());
            return;
        }
        // Replacing a request header also makes Envoy clear the route cache.
        let _ = hostcalls::set_map_value(headers_map(dir), name, Some(value));
    }

    fn remove_header(&mut self, dir: Direction, name: &str) {
        if dir != self.phase || self.gone(dir).is_some() {
            return;
        }
        let _ = hostcalls::set_map_value(headers_map(dir), name, None);
    }

    fn body_len(&self, dir: Direction) -> u64 {
        let taken = match (&self.request_body, dir) {
            (Some(body), Direction::Request) => body.taken.len(),
            _ => 0,
        };
        (taken + self.body_size) as u64
    }

    fn read_body(&mut self, dir: Direction) -> Vec<u8> {
        let in_envoy = hostcalls::get_buffer(body_buffer(dir == Direction::Request), 0, self.body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        match (&mut self.request_body, dir) {
            (Some(body), Direction::Request) if !body.taken.is_empty() => {
                // The whole body goes back into Envoy now (it goes upstream unless the chain
                // replaces it), and the engine gets it once.
                let mut whole = std::mem::take(&mut body.taken);
                whole.extend_from_slice(&in_envoy);
                let _ = hostcalls::set_buffer(BufferType::HttpRequestBody, 0, self.body_size, &whole);
                self.body_size = whole.len();
                whole
            }
            _ => in_envoy,
        }
    }

    fn replace_body(&mut self, dir: Direction, body: &[u8]) {
        let _ = hostcalls::set_buffer(body_buffer(dir == Direction::Request), 0, self.body_size, body);
        if let (Some(request_body), Direction::Request) = (&mut self.request_body, dir) {
            request_body.taken.clear();
            request_body.replaced = true;
        }
    }

    fn headers_hold(&self) -> HeadersHold {
        self.hold
    }

    fn reset_stream(&mut self) {
        let _ = match self.phase {
            Direction::Request => hostcalls::reset_http_request(),
            Direction::Response => hostcalls::reset_http_response(),
        };
    }

    fn clear_route_cache(&mut self) {
        // Nothing to do: Envoy clears the route cache on every request header change made
        // from wasm, and the engine asks only after such changes (a foreign-function call per
        // routed request saved; tests/e2e/test_routing.py proves the re-route on every Envoy
        // of the version matrix).
    }

    fn raise_buffer_limit(&mut self, _bytes: u64) {
        // Not available to wasm: see the crate docs (per_connection_buffer_limit_bytes).
    }

    fn set_metadata(&mut self, namespace: &str, key: &str, value: &str) {
        // proxy-wasm cannot write dynamic metadata in Envoy; this writes filter state
        // `wasm.<namespace>.<key>`, readable by access logs with %FILTER_STATE(...)%.
        let _ = hostcalls::set_property(vec![&format!("{namespace}.{key}")], Some(value.as_bytes()));
    }

    fn send_local_reply(&mut self, status: u16, headers: &[(String, String)], body: &[u8], _details: &str) {
        let headers = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let _ = hostcalls::send_http_response(u32::from(status), headers, Some(body));
    }

    fn now_nanos(&self) -> u64 {
        wall_clock_nanos()
    }

    fn unix_time_nanos(&self) -> u64 {
        self.now_nanos() // proxy-wasm's clock is wall time already
    }

    fn increment_counter(&mut self, id: MetricId, by: u64) {
        if let Some(Some(metric)) = self.metric_ids.get(id.0) {
            let _ = hostcalls::increment_metric(*metric, i64::try_from(by).unwrap_or(i64::MAX));
        }
    }

    fn record_histogram(&mut self, id: MetricId, value: u64) {
        if let Some(Some(metric)) = self.metric_ids.get(id.0) {
            let _ = hostcalls::record_metric(*metric, value);
        }
    }

    fn set_gauge(&mut self, id: MetricId, value: u64) {
        if let Some(Some(metric)) = self.metric_ids.get(id.0) {
            let _ = hostcalls::record_metric(*metric, value);
        }
    }

    fn metadata_strings(&self, namespace: &str, key: &str) -> Vec<String> {
        let Some(bytes) = hostcalls::get_property(vec!["metadata", "filter_metadata", namespace, key])
            .ok()
            .flatten()
        else {
            return Vec::new();
        };
        metadata_value_strings(&bytes)
    }

    fn upstream_address(&self) -> Option<String> {
        let bytes = hostcalls::get_property(vec!["upstream", "address"]).ok().flatten()?;
        Some(String::from_utf8_lossy(&bytes).into_owned()).filter(|address| !address.is_empty())
    }

    fn set_original_destination(&mut self, endpoint: &str) {
        // Typed filter state every ORIGINAL_DST cluster honours (over header and metadata), set
        // through Envoy's `set_envoy_filter_state` foreign function.
        let arguments = SetEnvoyFilterStateArguments {
            path: "envoy.network.transport_socket.original_dst_address".into(),
            value: endpoint.into(),
            span: LIFE_SPAN_DOWNSTREAM_REQUEST,
        };
        if let Err(status) =
            hostcalls::call_foreign_function("set_envoy_filter_state", Some(&arguments.encode_to_vec()))
        {
            log::warn!("payload-processor: cannot set the original destination filter state: {status:?}");
        }
    }
}

/// [`BackgroundHost`] over a root context: HTTP calls through `dispatch_http_call` (so the SDK
/// routes the answer back to the root context), metrics as for streams.
pub(crate) struct WasmBackgroundHost<'a> {
    root: &'a dyn Context,
    metric_ids: &'a [Option<u32>],
}

impl<'a> WasmBackgroundHost<'a> {
    pub(crate) fn new(root: &'a dyn Context, metric_ids: &'a [Option<u32>]) -> Self {
        Self { root, metric_ids }
    }
}

impl BackgroundHost for WasmBackgroundHost<'_> {
    fn now_nanos(&self) -> u64 {
        wall_clock_nanos()
    }

    fn http_callout(&mut self, request: &CalloutRequest) -> Result<u64, CalloutError> {
        let headers = request.header_pairs();
        let body = (!request.body.is_empty()).then_some(request.body.as_slice());
        self.root
            .dispatch_http_call(&request.cluster, headers, body, Vec::new(), request.timeout)
            .map(u64::from)
            .map_err(|status| format!("dispatch_http_call to cluster {} refused: {status:?}", request.cluster))
    }

    fn increment_counter(&mut self, id: MetricId, by: u64) {
        if let Some(Some(metric)) = self.metric_ids.get(id.0) {
            let _ = hostcalls::increment_metric(*metric, i64::try_from(by).unwrap_or(i64::MAX));
        }
    }

    fn set_gauge(&mut self, id: MetricId, value: u64) {
        if let Some(Some(metric)) = self.metric_ids.get(id.0) {
            let _ = hostcalls::record_metric(*metric, value);
        }
    }

    fn has_shared_data(&self) -> bool {
        true // one VM per worker: copies of the configuration meet in the host's shared data
    }

    fn shared_data_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(value), cas)) => Some((value, cas.unwrap_or(0))),
            _ => None,
        }
    }

    fn shared_data_set(&mut self, key: &str, value: &[u8], version: u32) -> bool {
        hostcalls::set_shared_data(key, Some(value), (version != 0).then_some(version)).is_ok()
    }
}

fn wall_clock_nanos() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|now| now.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |since| u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
}

/// The argument message of Envoy's `set_envoy_filter_state` foreign function
/// (`envoy.source.extensions.common.wasm.SetEnvoyFilterStateArguments`).
#[derive(Clone, PartialEq, prost::Message)]
struct SetEnvoyFilterStateArguments {
    #[prost(string, tag = "1")]
    path: String,
    #[prost(string, tag = "2")]
    value: String,
    #[prost(int32, tag = "3")]
    span: i32,
}

/// `LifeSpan::DownstreamRequest`.
const LIFE_SPAN_DOWNSTREAM_REQUEST: i32 = 1;

/// A metadata value as Envoy's wasm host hands it over: a string as its bytes; a list in the
/// proxy-wasm pairs encoding (count, then key/value lengths, then NUL-terminated keys and
/// values), its items being the keys. Items split at commas.
fn metadata_value_strings(bytes: &[u8]) -> Vec<String> {
    let texts = pairs_keys(bytes).unwrap_or_else(|| vec![String::from_utf8_lossy(bytes).into_owned()]);
    texts
        .iter()
        .flat_map(|text| text.split(','))
        .map(|item| item.trim().to_string())
        .filter(|item| !item.is_empty())
        .collect()
}

/// The keys of a proxy-wasm pairs buffer; `None` unless `bytes` is exactly one.
fn pairs_keys(bytes: &[u8]) -> Option<Vec<String>> {
    let word = |at: usize| -> Option<usize> {
        let raw: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(raw)).ok()
    };
    let count = word(0)?;
    let mut data = 4usize.checked_add(count.checked_mul(8)?)?;
    if count == 0 || data > bytes.len() {
        return None;
    }
    let mut keys = Vec::with_capacity(count);
    for index in 0..count {
        let key_len = word(4 + index * 8)?;
        let value_len = word(8 + index * 8)?;
        let key = bytes.get(data..data.checked_add(key_len)?)?;
        let value_end = data + key_len + 1 + value_len;
        if bytes.get(data + key_len) != Some(&0) || bytes.get(value_end) != Some(&0) {
            return None;
        }
        keys.push(String::from_utf8_lossy(key).into_owned());
        data = value_end + 1;
    }
    (data == bytes.len()).then_some(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_lists_and_strings_both_read_as_items() {
        // What Envoy 1.40 handed over for a list of two addresses.
        let mut list = Vec::new();
        for word in [2u32, 13, 0, 13, 0] {
            list.extend_from_slice(&word.to_le_bytes());
        }
        list.extend_from_slice(b"10.0.0.1:8000\x00\x0010.0.0.2:8000\x00\x00");
        assert_eq!(metadata_value_strings(&list), vec!["10.0.0.1:8000", "10.0.0.2:8000"]);
        // Truncated or inconsistent buffers read as text, never panic.
        for cut in 0..list.len() {
            let _ = metadata_value_strings(&list[..cut]);
        }
        assert_eq!(
            metadata_value_strings(b"10.0.0.1:8000, 10.0.0.3:9000"),
            vec!["10.0.0.1:8000", "10.0.0.3:9000"]
        );
        assert!(metadata_value_strings(b"").is_empty());
    }
}
