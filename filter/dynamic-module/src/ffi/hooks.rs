//! The hooks behind the exported symbols: raw pointers in, safe code under `catch_unwind`, an
//! ABI status out; and the macro that exports them.

use super::abi::*;
use super::handles::{ConfigHandle, FilterHandle};
use crate::{HttpFilter, ModuleConfig, Registry};
use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::Arc;

#[doc(hidden)]
pub fn on_program_init() -> *const c_char {
    let abi = detect_envoy();
    // Every callback but the optional ones must be there on a supported line.
    let missing: Vec<&str> = callbacks()
        .missing()
        .into_iter()
        .filter(|name| !OPTIONAL_CALLBACKS.contains(name))
        .collect();
    let can_log = callbacks().envoy_dynamic_module_callback_log.is_some()
        && callbacks().envoy_dynamic_module_callback_log_enabled.is_some();
    if can_log {
        crate::install_logger();
    }
    // Model files named in a configuration are read from the proxy's file system.
    payload_processor_core::set_file_reader(|path| std::fs::read(path).map_err(|err| format!("{path}: {err}")));
    match abi {
        Some(abi) if missing.is_empty() => {
            let _ = crate::ENVOY_ABI.set(abi);
            // The version string this Envoy line expects, so it logs no deprecation warning.
            let version: &CStr = match abi {
                crate::EnvoyAbi::V1_38 | crate::EnvoyAbi::V1_39 => c"v0.1.0",
                crate::EnvoyAbi::V1_40 => c"v0.2.0",
            };
            version.as_ptr()
        }
        _ => {
            let message =
                format!(
                "payload-processor: this Envoy is not supported by libpayload_processor.so; supported: Envoy 1.38.x, \
                 1.39.x and 1.40.x (Envoy Gateway v1.8 and v1.9 ship 1.38 and 1.39). The module refuses to load. \
                 Missing callbacks: {}",
                if missing.is_empty() { "none".to_string() } else { missing.join(", ") }
            );
            if can_log {
                log::error!("{message}");
            } else {
                eprintln!("{message}");
            }
            ptr::null()
        }
    }
}

#[doc(hidden)]
pub fn on_config_new(
    config: *mut c_void,
    name: EnvoyBuffer,
    text: EnvoyBuffer,
    registry: fn() -> Registry,
) -> *const c_void {
    let name = String::from_utf8_lossy(envoy_bytes(name)).into_owned();
    let text = envoy_bytes(text);
    let handle = ConfigHandle(config);
    match catch_unwind(AssertUnwindSafe(|| ModuleConfig::new(&handle, &name, text, registry))) {
        Ok(Some(config)) => Arc::into_raw(Arc::new(config)).cast(),
        Ok(None) => ptr::null(),
        Err(_) => {
            log::error!("payload-processor: panic while loading the configuration of {name}");
            ptr::null()
        }
    }
}

/// # Safety
/// `config` must come from [`on_config_new`] and not have been destroyed.
#[doc(hidden)]
pub unsafe fn on_config_destroy(config: *const c_void) {
    if !config.is_null() {
        // SAFETY: `config` is the pointer `on_config_new` made with `Arc::into_raw`, destroyed
        // once (the caller's contract).
        let config = unsafe { Arc::from_raw(config.cast::<ModuleConfig>()) };
        // The ticker must stop before Envoy's config goes away, even while streams still
        // hold the chain.
        config.stop_background();
        drop(config);
    }
}

/// # Safety
/// `config` must come from [`on_config_new`] and still be alive.
#[doc(hidden)]
pub unsafe fn on_filter_new(config: *const c_void) -> *const c_void {
    if config.is_null() {
        return ptr::null();
    }
    // SAFETY: `config` came from `Arc::into_raw` in `on_config_new` and is alive: taking one
    // more strong reference and owning it balances the count.
    let config = unsafe {
        Arc::increment_strong_count(config.cast::<ModuleConfig>());
        Arc::from_raw(config.cast::<ModuleConfig>())
    };
    match catch_unwind(AssertUnwindSafe(|| HttpFilter::new(config))) {
        Ok(filter) => Box::into_raw(Box::new(filter)).cast_const().cast(),
        Err(_) => ptr::null(),
    }
}

/// # Safety
/// `filter` must come from [`on_filter_new`] and not have been destroyed.
#[doc(hidden)]
pub unsafe fn on_filter_destroy(filter: *const c_void) {
    if !filter.is_null() {
        // SAFETY: `filter` is the pointer `on_filter_new` made with `Box::into_raw`, destroyed once.
        drop(unsafe { Box::from_raw(filter.cast_mut().cast::<HttpFilter>()) });
    }
}

/// # Safety
/// `config` must come from [`on_config_new`] and still be alive; `envoy` is Envoy's config.
#[doc(hidden)]
pub unsafe fn on_config_scheduled(envoy: *mut c_void, config: *const c_void) {
    if config.is_null() {
        return;
    }
    // SAFETY: `config` is a live `ModuleConfig` from `on_config_new` (the caller's contract).
    let config = unsafe { &*config.cast::<ModuleConfig>() };
    let handle = ConfigHandle(envoy);
    if catch_unwind(AssertUnwindSafe(|| config.on_tick(handle))).is_err() {
        log::error!("payload-processor: panic in background work contained");
    }
}

/// # Safety
/// As [`on_config_scheduled`]; `headers`/`chunks` must describe `*_size` valid items.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn on_config_callout_done(
    envoy: *mut c_void,
    config: *const c_void,
    id: u64,
    result: i32,
    headers: *const EnvoyHeader,
    headers_size: usize,
    chunks: *const EnvoyBuffer,
    chunks_size: usize,
) {
    if config.is_null() {
        return;
    }
    // SAFETY: `config` is a live `ModuleConfig` from `on_config_new` (the caller's contract).
    let config = unsafe { &*config.cast::<ModuleConfig>() };
    // SAFETY: forwarded from the caller.
    let outcome = unsafe { callout_outcome(result, headers, headers_size, chunks, chunks_size) };
    let handle = ConfigHandle(envoy);
    if catch_unwind(AssertUnwindSafe(|| config.on_callout_done(handle, id, outcome))).is_err() {
        log::error!("payload-processor: panic in background work contained");
    }
}

/// A callout's answer as Envoy hands it to a done hook, copied out.
///
/// # Safety
/// `headers`/`chunks` must describe `*_size` valid items, alive for the hook.
unsafe fn callout_outcome(
    result: i32,
    headers: *const EnvoyHeader,
    headers_size: usize,
    chunks: *const EnvoyBuffer,
    chunks_size: usize,
) -> Result<payload_processor_core::CalloutResponse, payload_processor_core::CalloutError> {
    if result != 0 {
        return Err(CalloutResult::from_raw(result).map_or_else(
            || format!("callout failed ({result})"),
            |failure| failure.describe().to_string(),
        ));
    }
    let headers: &[EnvoyHeader] = if headers.is_null() || headers_size == 0 {
        &[]
    } else {
        // SAFETY: Envoy passes `headers_size` valid headers, alive for this hook.
        unsafe { std::slice::from_raw_parts(headers, headers_size) }
    };
    let chunks: &[EnvoyBuffer] = if chunks.is_null() || chunks_size == 0 {
        &[]
    } else {
        // SAFETY: Envoy passes `chunks_size` valid buffers, alive for this hook.
        unsafe { std::slice::from_raw_parts(chunks, chunks_size) }
    };
    let mut response = payload_processor_core::CalloutResponse::default();
    for header in headers {
        let key = String::from_utf8_lossy(envoy_bytes(EnvoyBuffer {
            ptr: header.key_ptr,
            length: header.key_length,
        }))
        .into_owned();
        let value = String::from_utf8_lossy(envoy_bytes(EnvoyBuffer {
            ptr: header.value_ptr,
            length: header.value_length,
        }))
        .into_owned();
        if key == ":status" {
            response.status = value.parse().unwrap_or(0);
        }
        response.headers.push((key, value));
    }
    for chunk in chunks {
        response.body.extend_from_slice(envoy_bytes(*chunk));
    }
    Ok(response)
}

type EarlyAnswer = (
    u64,
    Result<payload_processor_core::CalloutResponse, payload_processor_core::CalloutError>,
);

thread_local! {
    /// The filter whose hook runs on this thread right now. Envoy may answer a callout inline,
    /// while the hook that started it still runs (a cluster with no healthy host answers at
    /// once); that answer must not touch the filter the hook is using.
    static IN_HOOK: Cell<*const c_void> = const { Cell::new(ptr::null()) };
    /// Answers that came inline, delivered once the hook returned.
    static EARLY: RefCell<Vec<EarlyAnswer>> = const { RefCell::new(Vec::new()) };
    /// Set when `EARLY` got an answer: the usual hook looks at this flag only (a cheaper
    /// thread-local than the queue, which has a destructor).
    static EARLY_PENDING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `work` on `filter` as the hook of this thread, then delivers any answer that came
/// inline meanwhile.
fn in_hook<T>(envoy: *mut c_void, filter: &mut HttpFilter, work: impl FnOnce(&mut HttpFilter) -> T) -> T {
    let pointer: *const c_void = (filter as *const HttpFilter).cast();
    let outer = IN_HOOK.with(|hook| hook.replace(pointer));
    let value = work(filter);
    IN_HOOK.with(|hook| hook.set(outer));
    if EARLY_PENDING.with(|pending| pending.replace(false)) {
        while let Some((id, outcome)) = EARLY.with(|early| early.borrow_mut().pop()) {
            deliver_callout(envoy, filter, id, outcome);
        }
    }
    value
}

/// # Safety
/// `envoy` and `filter` must be the pointers Envoy passed to `on_http_filter_http_callout_done`;
/// `headers`/`chunks` must describe `*_size` valid items.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn on_filter_callout_done(
    envoy: *mut c_void,
    filter: *const c_void,
    id: u64,
    result: i32,
    headers: *const EnvoyHeader,
    headers_size: usize,
    chunks: *const EnvoyBuffer,
    chunks_size: usize,
) {
    if filter.is_null() {
        return;
    }
    // SAFETY: forwarded from the caller.
    let outcome = unsafe { callout_outcome(result, headers, headers_size, chunks, chunks_size) };
    if IN_HOOK.with(Cell::get) == filter {
        // Inline, inside a hook of this very filter: keep it for when that hook returns.
        EARLY.with(|early| early.borrow_mut().push((id, outcome)));
        EARLY_PENDING.with(|pending| pending.set(true));
        return;
    }
    // SAFETY: `filter` came from `on_filter_new`, Envoy calls one hook of a stream at a time,
    // and no hook of this filter runs on this thread (checked above).
    let filter = unsafe { &mut *filter.cast_mut().cast::<HttpFilter>() };
    deliver_callout(envoy, filter, id, outcome);
}

fn deliver_callout(
    envoy: *mut c_void,
    filter: &mut HttpFilter,
    id: u64,
    outcome: Result<payload_processor_core::CalloutResponse, payload_processor_core::CalloutError>,
) {
    if filter.poisoned {
        return;
    }
    let handle = FilterHandle(envoy);
    let run = catch_unwind(AssertUnwindSafe(|| {
        in_hook(envoy, filter, |filter| filter.on_callout_done(handle, id, outcome))
    }));
    if run.is_err() {
        filter.poisoned = true;
        contain_panic(handle, filter.response_headers_sent);
    }
}

/// Answers a stream whose hook panicked: a 500, or a reset once the response headers went out.
fn contain_panic(handle: FilterHandle, response_headers_sent: bool) {
    if response_headers_sent {
        log::error!("payload-processor: internal panic contained; resetting the stream");
        let _ = catch_unwind(AssertUnwindSafe(|| {
            handle.reset_stream("payload_processor.internal_panic")
        }));
        return;
    }
    log::error!("payload-processor: internal panic contained; answering 500");
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let body = br#"{"error":{"message":"payload processor internal error","type":"server_error","code":"internal_error"}}"#;
        handle.send_response(
            500,
            &[("content-type".into(), "application/json".into())],
            body,
            "payload_processor.internal_panic",
        );
    }));
}

/// Which stream event a hook reports.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub enum Event {
    RequestHeaders(bool),
    RequestBody(bool),
    RequestTrailers,
    ResponseHeaders(bool),
    ResponseBody(bool),
    ResponseTrailers,
}

/// Runs one stream event; returns the ABI status. A panic that escaped the engine becomes a
/// 500 local reply and a stop, never an unwind into Envoy.
///
/// # Safety
/// `envoy` and `filter` must be the pointers Envoy passed to the current hook.
#[doc(hidden)]
pub unsafe fn on_event(envoy: *mut c_void, filter: *const c_void, event: Event) -> i32 {
    // SAFETY: forwarded from the caller.
    unsafe { on_event_status(envoy, filter, event) }.raw()
}

/// [`on_event`] with the typed status.
///
/// # Safety
/// As [`on_event`].
#[doc(hidden)]
pub unsafe fn on_event_status(envoy: *mut c_void, filter: *const c_void, event: Event) -> HookStatus {
    if filter.is_null() {
        return continue_status(event);
    }
    // SAFETY: `filter` came from `on_filter_new` and Envoy calls one hook of a stream at a time.
    let filter = unsafe { &mut *filter.cast_mut().cast::<HttpFilter>() };
    if filter.poisoned {
        // A contained panic already answered this stream: let it go on, never run the engine.
        return continue_status(event);
    }
    let handle = FilterHandle(envoy);
    match catch_unwind(AssertUnwindSafe(|| {
        in_hook(envoy, filter, |filter| filter.on_event(handle, event))
    })) {
        Ok(status) => status,
        Err(_) => {
            filter.poisoned = true;
            contain_panic(handle, filter.response_headers_sent);
            crate::panic_status(event)
        }
    }
}

/// The status that lets a hook's data go on.
fn continue_status(event: Event) -> HookStatus {
    match event {
        Event::RequestHeaders(_) | Event::ResponseHeaders(_) => HookStatus::Headers(HeadersStatus::Continue),
        Event::RequestBody(_) | Event::ResponseBody(_) => HookStatus::Body(BodyStatus::Continue),
        Event::RequestTrailers | Event::ResponseTrailers => HookStatus::Trailers(TrailersStatus::Continue),
    }
}

/// Exports every Envoy dynamic-module hook, backed by the engine with the plugins of
/// `$registry` (a `fn() -> Registry`). Call it once, in the crate that builds the `cdylib`.
#[macro_export]
macro_rules! export_envoy_dynamic_module {
    ($registry:path) => {
        // The exports are the FFI boundary itself; everything they call is in `ffi`.
        #[allow(unsafe_code)]
        const _: () = {
            use ::std::ffi::{c_char, c_void};
            use $crate::ffi::{self, EnvoyBuffer, EnvoyHeader, Event};

            #[no_mangle]
            extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
                ffi::on_program_init()
            }
            #[no_mangle]
            extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
                c: *mut c_void,
                name: EnvoyBuffer,
                config: EnvoyBuffer,
            ) -> *const c_void {
                ffi::on_config_new(c, name, config, $registry)
            }
            #[no_mangle]
            unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(c: *const c_void) {
                // SAFETY: the pointers Envoy passed to this hook, forwarded as they came.
                unsafe { ffi::on_config_destroy(c) }
            }
            #[no_mangle]
            unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(
                c: *const c_void,
                _e: *mut c_void,
            ) -> *const c_void {
                // SAFETY: the pointers Envoy passed to this hook, forwarded as they came.
                unsafe { ffi::on_filter_new(c) }
            }
            #[no_mangle]
            unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(f: *const c_void) {
                // SAFETY: the pointers Envoy passed to this hook, forwarded as they came.
                unsafe { ffi::on_filter_destroy(f) }
            }
            #[no_mangle]
            unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
                e: *mut c_void,
                f: *const c_void,
                eos: bool,
            ) -> i32 {
                // SAFETY: the pointers Envoy passed to this hook, forwarded as they came.
                unsafe { ffi::on_event(e, f, Event::RequestHeaders(eos)) }
            }
            #[no_mangle]
            unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
                e: *mut c_void,
                f: *const c_void,
                eos: bool,
            ) -> i32 {
                // SAFETY: the pointers Envoy passed to this hook, forwarded as they came.
                unsafe { ffi::on_event(e, f, Event::RequestBody(eos)) }
            }
            #[no_mangle]
            unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
                e: *mut c_void,
                f: *const c_void,
            ) -> i32 {
                // SAFETY: the pointers Envoy passed to this hook, forwarded as they came.
                unsafe { ffi::on_event(e, f, Event::RequestTrailers) }
            }
            #[no_mangle]
            unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
                e: *mut c_void,
                f: *const c_void,
                eos: bool,
            ) -> i32 {
                // SAFETY: the pointers Envoy passed to this hook, forwarded as they came.
                unsafe { ffi::on_event(e, f, Event::ResponseHeaders(eos)) }
            }
            #[no_mangle]
            unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
                e: *mut c_void,
                f: *const c_void,
                eos: bool,
            ) -> i32 {
                // SAFETY: the pointers Envoy passed to this hook, forwarded as they came.
                unsafe { ffi::on_event(e, f, Event::ResponseBody(eos)) }
            }
            #[no_mangle]
            unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
                e: *mut c_void,
                f: *const c_void,
            ) -> i32 {
                // SAFETY: the pointers Envoy passed to this hook, forwarded as they came.
                unsafe { ffi::on_event(e, f, Event::ResponseTrailers) }
            }
            #[no_mangle]
            extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(_e: *mut c_void, _f: *const c_void) {}
            #[no_mangle]
            unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
                e: *mut c_void,
                f: *const c_void,
                id: u64,
                result: i32,
                headers: *mut EnvoyHeader,
                headers_size: usize,
                body: *mut EnvoyBuffer,
                body_size: usize,
            ) {
                // SAFETY: the pointers Envoy passed to this hook, forwarded as they came.
                unsafe { ffi::on_filter_callout_done(e, f, id, result, headers, headers_size, body, body_size) }
            }
            #[no_mangle]
            extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
                _e: *mut c_void,
                _f: *const c_void,
                _id: u64,
                _headers: *mut EnvoyHeader,
                _size: usize,
                _end: bool,
            ) {
            }
            #[no_mangle]
            extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
                _e: *mut c_void,
                _f: *const c_void,
                _id: u64,
                _data: *const EnvoyBuffer,
                _count: usize,
                _end: bool,
            ) {
            }
            #[no_mangle]
            extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
                _e: *mut c_void,
                _f: *const c_void,
                _id: u64,
                _trailers: *mut EnvoyHeader,
                _size: usize,
            ) {
            }
            #[no_mangle]
            extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
                _e: *mut c_void,
                _f: *const c_void,
                _id: u64,
            ) {
            }
            #[no_mangle]
            extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
                _e: *mut c_void,
                _f: *const c_void,
                _id: u64,
                _reason: i32,
            ) {
            }
            #[no_mangle]
            extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(_e: *mut c_void, _f: *const c_void, _id: u64) {}
            #[no_mangle]
            unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
                e: *mut c_void,
                c: *const c_void,
                _id: u64,
            ) {
                // SAFETY: the pointers Envoy passed to this hook, forwarded as they came.
                unsafe { ffi::on_config_scheduled(e, c) }
            }
            #[no_mangle]
            #[allow(clippy::too_many_arguments)]
            unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
                e: *mut c_void,
                c: *const c_void,
                id: u64,
                result: i32,
                headers: *const EnvoyHeader,
                headers_size: usize,
                chunks: *const EnvoyBuffer,
                chunks_size: usize,
            ) {
                // SAFETY: the pointers Envoy passed to this hook, forwarded as they came.
                unsafe { ffi::on_config_callout_done(e, c, id, result, headers, headers_size, chunks, chunks_size) }
            }
            #[no_mangle]
            extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
                _e: *mut c_void,
                _f: *const c_void,
            ) {
            }
            #[no_mangle]
            extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
                _e: *mut c_void,
                _f: *const c_void,
            ) {
            }
        };
    };
}
