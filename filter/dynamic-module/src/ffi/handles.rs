//! Safe handles over Envoy's objects. Each method is one callback call with buffers that outlive
//! it; the handle's pointer is the one Envoy passed to the current hook.

use super::abi::*;
use std::ffi::c_void;
use std::ptr;

/// Writes to Envoy's log (component `dynamic_modules`).
pub(crate) fn log(level: LogLevel, message: &str) {
    // SAFETY: the buffer points at `message`, alive for the call.
    unsafe { envoy_dynamic_module_callback_log(level, ModuleBuffer::of(message.as_bytes())) }
}

pub(crate) fn log_enabled(level: LogLevel) -> bool {
    // SAFETY: plain value call.
    unsafe { envoy_dynamic_module_callback_log_enabled(level) }
}

/// Which body buffer a call refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyBuffer {
    Received,
    Buffered,
}

/// The callout id when Envoy started the call, else why it refused.
fn started_callout(result: i32, id: u64) -> Result<u64, String> {
    match CalloutInitResult::from_raw(result) {
        Some(CalloutInitResult::Success) => Ok(id),
        Some(refused) => Err(refused.describe().to_string()),
        None => Err(format!("callout refused ({result})")),
    }
}

/// Envoy's per-filter-config object. Valid from `config_new` until `config_destroy`; safe code
/// only uses it inside the hooks Envoy passes it to.
#[derive(Clone, Copy)]
pub struct ConfigHandle(pub(super) *mut c_void);

impl ConfigHandle {
    /// Defines a counter, histogram or gauge; returns Envoy's id for it.
    pub(crate) fn define_metric(&self, name: &str, kind: payload_processor_core::MetricKind) -> Option<usize> {
        let histogram = kind == payload_processor_core::MetricKind::Histogram;
        let mut id = 0usize;
        // SAFETY: the config pointer is valid during config_new; buffers outlive the call.
        let result = unsafe {
            if kind == payload_processor_core::MetricKind::Gauge {
                envoy_dynamic_module_callback_http_filter_config_define_gauge(
                    self.0,
                    ModuleBuffer::of(name.as_bytes()),
                    ptr::null(),
                    0,
                    &mut id,
                )
            } else if histogram {
                envoy_dynamic_module_callback_http_filter_config_define_histogram(
                    self.0,
                    ModuleBuffer::of(name.as_bytes()),
                    ptr::null(),
                    0,
                    &mut id,
                )
            } else {
                envoy_dynamic_module_callback_http_filter_config_define_counter(
                    self.0,
                    ModuleBuffer::of(name.as_bytes()),
                    ptr::null(),
                    0,
                    &mut id,
                )
            }
        };
        (MetricsResult::from_raw(result) == Some(MetricsResult::Success)).then_some(id)
    }

    /// Adds to a counter from the main thread (background work).
    pub(crate) fn increment_counter(&self, id: usize, by: u64) {
        if let Some(increment) = callbacks().envoy_dynamic_module_callback_http_filter_config_increment_counter {
            // SAFETY: called from a config hook, while the config is alive.
            unsafe { increment(self.0, id, ptr::null(), 0, by) };
        }
    }

    /// Sets a gauge from the main thread (background work).
    pub(crate) fn set_gauge(&self, id: usize, value: u64) {
        if let Some(set) = callbacks().envoy_dynamic_module_callback_http_filter_config_set_gauge {
            // SAFETY: called from a config hook, while the config is alive.
            unsafe { set(self.0, id, ptr::null(), 0, value) };
        }
    }

    /// Starts an HTTP call through `cluster` from the main thread; Envoy reports the answer
    /// to `on_http_filter_config_http_callout_done` with the returned id.
    pub(crate) fn http_callout(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u64, String> {
        let headers = module_headers(headers);
        let mut id = 0u64;
        // SAFETY: called from a config hook; headers and buffers outlive the call.
        let result = unsafe {
            envoy_dynamic_module_callback_http_filter_config_http_callout(
                self.0,
                &mut id,
                ModuleBuffer::of(cluster.as_bytes()),
                headers.as_ptr(),
                headers.len(),
                ModuleBuffer::of(body),
                timeout_ms,
            )
        };
        started_callout(result, id)
    }

    /// A scheduler whose commits run `on_http_filter_config_scheduled` on the main thread.
    pub(crate) fn new_scheduler(&self) -> Option<ConfigScheduler> {
        // SAFETY: the config pointer is valid during config_new.
        let raw = unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_new(self.0) };
        (!raw.is_null()).then_some(ConfigScheduler(raw))
    }
}

/// Envoy's config-level scheduler. `commit` may be called from any thread (that is its
/// purpose); it is deleted exactly once, on drop.
pub(crate) struct ConfigScheduler(*mut c_void);

// SAFETY: Envoy's scheduler posts to the main dispatcher under its own lock; committing from
// another thread is the documented use.
unsafe impl Send for ConfigScheduler {}
// SAFETY: as for Send: `commit` is the only method, and it is thread-safe on Envoy's side.
unsafe impl Sync for ConfigScheduler {}

impl ConfigScheduler {
    pub(crate) fn commit(&self, event_id: u64) {
        // SAFETY: the pointer came from scheduler_new and is deleted only on drop.
        unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_commit(self.0, event_id) };
    }
}

impl Drop for ConfigScheduler {
    fn drop(&mut self) {
        // SAFETY: created by scheduler_new, deleted once.
        unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.0) };
    }
}

/// Envoy's per-stream filter object, valid during the hook that received it.
#[derive(Clone, Copy)]
pub struct FilterHandle(pub(super) *mut c_void);

fn header_type(request: bool) -> HeaderMap {
    if request {
        HeaderMap::RequestHeader
    } else {
        HeaderMap::ResponseHeader
    }
}

fn body_type(request: bool, buffer: BodyBuffer) -> BodySelector {
    match (request, buffer) {
        (true, BodyBuffer::Received) => BodySelector::ReceivedRequestBody,
        (true, BodyBuffer::Buffered) => BodySelector::BufferedRequestBody,
        (false, BodyBuffer::Received) => BodySelector::ReceivedResponseBody,
        (false, BodyBuffer::Buffered) => BodySelector::BufferedResponseBody,
    }
}

// Every `unsafe` block below calls one callback with `self.0`, the filter pointer of the
// current hook, and buffers that point at memory alive for the call.
impl FilterHandle {
    pub(crate) fn header(&self, request: bool, name: &str) -> Option<Vec<u8>> {
        let mut result = EnvoyBuffer {
            ptr: ptr::null(),
            length: 0,
        };
        // SAFETY: the filter pointer of the current hook; buffers outlive the call.
        let found = unsafe {
            envoy_dynamic_module_callback_http_get_header(
                self.0,
                header_type(request),
                ModuleBuffer::of(name.as_bytes()),
                &mut result,
                0,
                ptr::null_mut(),
            )
        };
        (found && !result.ptr.is_null()).then(|| envoy_bytes(result).to_vec())
    }

    pub(crate) fn set_header(&self, request: bool, name: &str, value: Option<&str>) {
        let value = value.map_or(
            ModuleBuffer {
                ptr: ptr::null(),
                length: 0,
            },
            |v| ModuleBuffer::of(v.as_bytes()),
        );
        // SAFETY: the filter pointer of the current hook; buffers outlive the call.
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.0,
                header_type(request),
                ModuleBuffer::of(name.as_bytes()),
                value,
            )
        };
    }

    pub(crate) fn body_size(&self, request: bool, buffer: BodyBuffer) -> usize {
        // SAFETY: the filter pointer of the current hook; buffers outlive the call.
        unsafe { envoy_dynamic_module_callback_http_get_body_size(self.0, body_type(request, buffer)) }
    }

    /// Appends the slices of one body buffer to `out`, in place. They borrow `self`: the host
    /// that lends them holds this handle, and Envoy only changes the buffer through calls that
    /// need that host mutably (drain, append, continue) or after the hook returns.
    pub(crate) fn body_chunks<'h>(&'h self, request: bool, buffer: BodyBuffer, out: &mut Vec<&'h [u8]>) {
        let kind = body_type(request, buffer);
        // SAFETY: the filter pointer of the current hook; buffers outlive the call.
        let count = unsafe { envoy_dynamic_module_callback_http_get_body_chunks_size(self.0, kind) };
        if count == 0 {
            return;
        }
        // Envoy writes one descriptor per slice: on the stack for the usual few slices.
        const ON_STACK: usize = 16;
        let empty = EnvoyBuffer {
            ptr: ptr::null(),
            length: 0,
        };
        let mut small = [empty; ON_STACK];
        let mut large = Vec::new();
        let chunks: &mut [EnvoyBuffer] = if count <= ON_STACK {
            &mut small[..count]
        } else {
            large.resize(count, empty);
            &mut large
        };
        // SAFETY: the filter pointer of the current hook; `chunks` has room for `count`
        // descriptors, as Envoy requires; the slices stay valid while the hook runs.
        if unsafe { envoy_dynamic_module_callback_http_get_body_chunks(self.0, kind, chunks.as_mut_ptr()) } {
            out.extend(
                chunks
                    .iter()
                    .map(|chunk| envoy_bytes(*chunk))
                    .filter(|chunk| !chunk.is_empty()),
            );
        }
    }

    pub(crate) fn drain_body(&self, request: bool, buffer: BodyBuffer, bytes: usize) {
        // SAFETY: the filter pointer of the current hook; buffers outlive the call.
        unsafe { envoy_dynamic_module_callback_http_drain_body(self.0, body_type(request, buffer), bytes) };
    }

    pub(crate) fn append_body(&self, request: bool, buffer: BodyBuffer, data: &[u8]) {
        // SAFETY: the filter pointer of the current hook; buffers outlive the call.
        unsafe {
            envoy_dynamic_module_callback_http_append_body(self.0, body_type(request, buffer), ModuleBuffer::of(data))
        };
    }

    /// True when the received chunk is the buffered body itself (read it once).
    pub(crate) fn received_is_buffered(&self, request: bool) -> bool {
        // SAFETY: the filter pointer of the current hook; buffers outlive the call.
        unsafe {
            if request {
                envoy_dynamic_module_callback_http_received_buffered_request_body(self.0)
            } else {
                envoy_dynamic_module_callback_http_received_buffered_response_body(self.0)
            }
        }
    }

    pub(crate) fn send_response(&self, status: u16, headers: &[(String, String)], body: &[u8], details: &str) {
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let headers = module_headers(&pairs);
        // SAFETY: the filter pointer of the current hook; buffers outlive the call.
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                self.0,
                u32::from(status),
                headers.as_ptr(),
                headers.len(),
                ModuleBuffer::of(body),
                ModuleBuffer::of(details.as_bytes()),
            )
        };
    }

    /// Starts an HTTP call through `cluster` from this stream; Envoy reports the answer to
    /// `on_http_filter_http_callout_done` with the returned id, or never when the stream is
    /// destroyed first (Envoy cancels the stream's callouts then).
    pub(crate) fn http_callout(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u64, String> {
        let headers = module_headers(headers);
        let mut id = 0u64;
        // SAFETY: the filter pointer of the current hook; headers and buffers outlive the call.
        let result = unsafe {
            envoy_dynamic_module_callback_http_filter_http_callout(
                self.0,
                &mut id,
                ModuleBuffer::of(cluster.as_bytes()),
                headers.as_ptr(),
                headers.len(),
                ModuleBuffer::of(body),
                timeout_ms,
            )
        };
        started_callout(result, id)
    }

    /// Resumes the request a hook stopped (after a callout's answer).
    pub(crate) fn continue_decoding(&self) {
        // SAFETY: the filter pointer of the current hook.
        unsafe { envoy_dynamic_module_callback_http_filter_continue_decoding(self.0) };
    }

    /// Resumes the response a hook stopped (after a callout's answer).
    pub(crate) fn continue_encoding(&self) {
        // SAFETY: the filter pointer of the current hook.
        unsafe { envoy_dynamic_module_callback_http_filter_continue_encoding(self.0) };
    }

    /// Resets the stream (reason LocalReset): for an answer whose headers already went out,
    /// which a local reply can no longer replace.
    pub(crate) fn reset_stream(&self, details: &str) {
        // SAFETY: the filter pointer of the current hook; buffers outlive the call.
        unsafe {
            envoy_dynamic_module_callback_http_filter_reset_stream(
                self.0,
                ResetReason::LocalReset,
                ModuleBuffer::of(details.as_bytes()),
            )
        };
    }

    pub(crate) fn clear_route_cache(&self) {
        // SAFETY: the filter pointer of the current hook; buffers outlive the call.
        unsafe { envoy_dynamic_module_callback_http_clear_route_cache(self.0) };
    }

    pub(crate) fn buffer_limit(&self) -> u64 {
        // SAFETY: the filter pointer of the current hook; buffers outlive the call.
        unsafe { envoy_dynamic_module_callback_http_get_buffer_limit(self.0) }
    }

    pub(crate) fn set_buffer_limit(&self, limit: u64) {
        // SAFETY: the filter pointer of the current hook; buffers outlive the call.
        unsafe { envoy_dynamic_module_callback_http_set_buffer_limit(self.0, limit) };
    }

    pub(crate) fn set_metadata(&self, namespace: &str, key: &str, value: &str) {
        // SAFETY: the filter pointer of the current hook; buffers outlive the call.
        unsafe {
            envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
                self.0,
                ModuleBuffer::of(namespace.as_bytes()),
                ModuleBuffer::of(key.as_bytes()),
                ModuleBuffer::of(value.as_bytes()),
            )
        };
    }

    /// Sets a whole namespace from a serialized `google.protobuf.Struct`; false when this
    /// Envoy lacks the callback (before 1.40) or refused the bytes.
    pub(crate) fn set_metadata_struct(&self, namespace: &str, serialized: &[u8]) -> bool {
        let Some(set) = callbacks().envoy_dynamic_module_callback_http_set_dynamic_metadata_struct else {
            return false;
        };
        // SAFETY: the filter pointer of the current hook; buffers outlive the call.
        unsafe {
            set(
                self.0,
                ModuleBuffer::of(namespace.as_bytes()),
                ModuleBuffer::of(serialized),
            )
        }
    }

    /// Sets typed metadata from a serialized `google.protobuf.Any`; false as above.
    pub(crate) fn set_typed_metadata(&self, namespace: &str, serialized_any: &[u8]) -> bool {
        let Some(set) = callbacks().envoy_dynamic_module_callback_http_set_dynamic_typed_metadata else {
            return false;
        };
        // SAFETY: the filter pointer of the current hook; buffers outlive the call.
        unsafe {
            set(
                self.0,
                ModuleBuffer::of(namespace.as_bytes()),
                ModuleBuffer::of(serialized_any),
            )
        }
    }

    pub(crate) fn set_metadata_number(&self, namespace: &str, key: &str, value: f64) {
        // SAFETY: the filter pointer of the current hook; buffers outlive the call.
        unsafe {
            envoy_dynamic_module_callback_http_set_dynamic_metadata_number(
                self.0,
                ModuleBuffer::of(namespace.as_bytes()),
                ModuleBuffer::of(key.as_bytes()),
                value,
            )
        };
    }

    pub(crate) fn increment_counter(&self, id: usize, by: u64) {
        // SAFETY: the filter pointer of the current hook; buffers outlive the call.
        unsafe { envoy_dynamic_module_callback_http_filter_increment_counter(self.0, id, ptr::null(), 0, by) };
    }

    pub(crate) fn record_histogram(&self, id: usize, value: u64) {
        // SAFETY: the filter pointer of the current hook; buffers outlive the call.
        unsafe { envoy_dynamic_module_callback_http_filter_record_histogram_value(self.0, id, ptr::null(), 0, value) };
    }

    pub(crate) fn set_gauge(&self, id: usize, value: u64) {
        // SAFETY: the filter pointer of the current hook; buffers outlive the call.
        unsafe { envoy_dynamic_module_callback_http_filter_set_gauge(self.0, id, ptr::null(), 0, value) };
    }

    /// The string items of a list in dynamic metadata, or a string value; `None` when absent.
    pub(crate) fn metadata_strings(&self, namespace: &str, key: &str) -> Option<Vec<String>> {
        let ns = ModuleBuffer::of(namespace.as_bytes());
        let key = ModuleBuffer::of(key.as_bytes());
        let mut size = 0usize;
        // SAFETY: the filter pointer of the current hook; buffers outlive the call.
        if unsafe {
            envoy_dynamic_module_callback_http_get_metadata_list_size(
                self.0,
                MetadataSource::Dynamic,
                ns,
                key,
                &mut size,
            )
        } {
            let items = (0..size)
                .filter_map(|index| {
                    let mut item = empty_envoy_buffer();
                    // SAFETY: the filter pointer of the current hook; buffers outlive the call.
                    let found = unsafe {
                        envoy_dynamic_module_callback_http_get_metadata_list_string(
                            self.0,
                            MetadataSource::Dynamic,
                            ns,
                            key,
                            index,
                            &mut item,
                        )
                    };
                    found.then(|| String::from_utf8_lossy(envoy_bytes(item)).into_owned())
                })
                .collect();
            return Some(items);
        }
        let mut value = empty_envoy_buffer();
        // SAFETY: the filter pointer of the current hook; buffers outlive the call.
        let found = unsafe {
            envoy_dynamic_module_callback_http_get_metadata_string(self.0, MetadataSource::Dynamic, ns, key, &mut value)
        };
        found.then(|| vec![String::from_utf8_lossy(envoy_bytes(value)).into_owned()])
    }

    /// The `upstream.address` attribute (`ip:port`), once an upstream host was chosen.
    pub(crate) fn upstream_address(&self) -> Option<String> {
        let mut value = empty_envoy_buffer();
        // SAFETY: the filter pointer of the current hook; buffers outlive the call.
        let found = unsafe {
            envoy_dynamic_module_callback_http_filter_get_attribute_string(
                self.0,
                Attribute::UpstreamAddress,
                &mut value,
            )
        };
        (found && value.length > 0).then(|| String::from_utf8_lossy(envoy_bytes(value)).into_owned())
    }
}
