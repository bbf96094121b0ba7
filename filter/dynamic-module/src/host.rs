//! [`Host`] over Envoy's per-stream callbacks.

use crate::ffi::{BodyBuffer, ConfigHandle, FilterHandle};
use payload_processor_core::{BackgroundHost, CalloutError, CalloutRequest, Direction, Host, MetricId};
use std::sync::OnceLock;
use std::time::Instant;

pub(crate) struct EnvoyHost<'a> {
    filter: FilterHandle,
    metric_ids: &'a [Option<usize>],
    /// In a body hook the body is the buffered chunks plus the chunk just received; in a
    /// trailers hook it is the buffered chunks only.
    in_body_hook: bool,
}

impl<'a> EnvoyHost<'a> {
    pub(crate) fn new(filter: FilterHandle, metric_ids: &'a [Option<usize>], in_body_hook: bool) -> Self {
        Self {
            filter,
            metric_ids,
            in_body_hook,
        }
    }

    /// The buffers that hold this direction's body right now, without reading one twice.
    fn buffers(&self, request: bool) -> &'static [BodyBuffer] {
        if !self.in_body_hook {
            &[BodyBuffer::Buffered]
        } else if self.filter.received_is_buffered(request) {
            &[BodyBuffer::Received]
        } else {
            &[BodyBuffer::Buffered, BodyBuffer::Received]
        }
    }
}

/// A callout's headers as Envoy takes them, and its timeout in whole milliseconds (at least 1).
fn callout_parts(request: &CalloutRequest) -> (Vec<(&str, &str)>, u64) {
    let timeout_ms = u64::try_from(request.timeout.as_millis()).unwrap_or(u64::MAX).max(1);
    (request.header_pairs(), timeout_ms)
}

fn is_request(dir: Direction) -> bool {
    dir == Direction::Request
}

impl Host for EnvoyHost<'_> {
    fn http_callout(&mut self, request: &CalloutRequest) -> Result<u64, CalloutError> {
        let (headers, timeout_ms) = callout_parts(request);
        self.filter
            .http_callout(&request.cluster, &headers, &request.body, timeout_ms)
    }

    fn reset_stream(&mut self) {
        self.filter
            .reset_stream("payload_processor.response_rejected_after_headers");
    }

    fn header(&self, dir: Direction, name: &str) -> Option<String> {
        self.filter.header(is_request(dir), name).map(|bytes| {
            String::from_utf8(bytes).unwrap_or_else(|err| String::from_utf8_lossy(err.as_bytes()).into_owned())
        })
    }

    fn set_header(&mut self, dir: Direction, name: &str, value: &str) {
        self.filter.set_header(is_request(dir), name, Some(value));
    }

    fn remove_header(&mut self, dir: Direction, name: &str) {
        self.filter.set_header(is_request(dir), name, None);
    }

    fn body_len(&self, dir: Direction) -> u64 {
        let request = is_request(dir);
        self.buffers(request)
            .iter()
            .map(|b| self.filter.body_size(request, *b) as u64)
            .sum()
    }

    fn body_slices(&self, dir: Direction) -> Option<Vec<&[u8]>> {
        let request = is_request(dir);
        let mut slices = Vec::new();
        for buffer in self.buffers(request) {
            self.filter.body_chunks(request, *buffer, &mut slices);
        }
        Some(slices)
    }

    fn read_body(&mut self, dir: Direction) -> Vec<u8> {
        self.body_slices(dir).unwrap_or_default().concat()
    }

    fn replace_body(&mut self, dir: Direction, body: &[u8]) {
        let request = is_request(dir);
        let buffers = self.buffers(request);
        for buffer in buffers {
            self.filter
                .drain_body(request, *buffer, self.filter.body_size(request, *buffer));
        }
        let target = *buffers.last().expect("at least one buffer");
        self.filter.append_body(request, target, body);
    }

    fn clear_route_cache(&mut self) {
        self.filter.clear_route_cache();
    }

    fn raise_buffer_limit(&mut self, bytes: u64) {
        if self.filter.buffer_limit() < bytes {
            self.filter.set_buffer_limit(bytes);
        }
    }

    fn set_metadata(&mut self, namespace: &str, key: &str, value: &str) {
        self.filter.set_metadata(namespace, key, value);
    }

    fn set_metadata_number(&mut self, namespace: &str, key: &str, value: f64) {
        self.filter.set_metadata_number(namespace, key, value);
    }

    fn set_metadata_struct(&mut self, namespace: &str, fields: &serde_json::Map<String, serde_json::Value>) -> bool {
        let message = prost::Message::encode_to_vec(&protobuf_struct(fields));
        self.filter.set_metadata_struct(namespace, &message)
    }

    fn set_typed_metadata(&mut self, namespace: &str, type_url: &str, message: &[u8]) -> bool {
        let any = prost_types::Any {
            type_url: type_url.to_string(),
            value: message.to_vec(),
        };
        self.filter
            .set_typed_metadata(namespace, &prost::Message::encode_to_vec(&any))
    }

    fn send_local_reply(&mut self, status: u16, headers: &[(String, String)], body: &[u8], details: &str) {
        self.filter.send_response(status, headers, body, details);
    }

    fn now_nanos(&self) -> u64 {
        monotonic_nanos()
    }

    fn unix_time_nanos(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
    }

    fn increment_counter(&mut self, id: MetricId, by: u64) {
        if let Some(Some(envoy_id)) = self.metric_ids.get(id.0) {
            self.filter.increment_counter(*envoy_id, by);
        }
    }

    fn record_histogram(&mut self, id: MetricId, value: u64) {
        if let Some(Some(envoy_id)) = self.metric_ids.get(id.0) {
            self.filter.record_histogram(*envoy_id, value);
        }
    }

    fn set_gauge(&mut self, id: MetricId, value: u64) {
        if let Some(Some(envoy_id)) = self.metric_ids.get(id.0) {
            self.filter.set_gauge(*envoy_id, value);
        }
    }

    fn metadata_strings(&self, namespace: &str, key: &str) -> Vec<String> {
        self.filter
            .metadata_strings(namespace, key)
            .unwrap_or_default()
            .iter()
            .flat_map(|value| value.split(','))
            .map(|item| item.trim().to_string())
            .filter(|item| !item.is_empty())
            .collect()
    }

    fn upstream_address(&self) -> Option<String> {
        self.filter.upstream_address()
    }
}

/// One clock for streams and background work, so deadlines and ages compare.
fn monotonic_nanos() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// [`BackgroundHost`] over Envoy's config-level callbacks, on the main thread.
pub(crate) struct EnvoyBackgroundHost<'a> {
    config: ConfigHandle,
    metric_ids: &'a [Option<usize>],
}

impl<'a> EnvoyBackgroundHost<'a> {
    pub(crate) fn new(config: ConfigHandle, metric_ids: &'a [Option<usize>]) -> Self {
        Self { config, metric_ids }
    }
}

impl BackgroundHost for EnvoyBackgroundHost<'_> {
    fn now_nanos(&self) -> u64 {
        monotonic_nanos()
    }

    fn http_callout(&mut self, request: &CalloutRequest) -> Result<u64, CalloutError> {
        let (headers, timeout_ms) = callout_parts(request);
        self.config
            .http_callout(&request.cluster, &headers, &request.body, timeout_ms)
    }

    fn increment_counter(&mut self, id: MetricId, by: u64) {
        if let Some(Some(envoy_id)) = self.metric_ids.get(id.0) {
            self.config.increment_counter(*envoy_id, by);
        }
    }

    fn set_gauge(&mut self, id: MetricId, value: u64) {
        if let Some(Some(envoy_id)) = self.metric_ids.get(id.0) {
            self.config.set_gauge(*envoy_id, value);
        }
    }
}

/// A JSON object as a `google.protobuf.Struct` (numbers become doubles, as in any Struct).
fn protobuf_struct(fields: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: fields
            .iter()
            .map(|(key, value)| (key.clone(), protobuf_value(value)))
            .collect(),
    }
}

fn protobuf_value(value: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value;
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(protobuf_value).collect(),
        }),
        Value::Object(fields) => Kind::StructValue(protobuf_struct(fields)),
    };
    prost_types::Value { kind: Some(kind) }
}
