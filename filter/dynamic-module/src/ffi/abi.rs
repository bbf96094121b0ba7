//! The raw ABI: C structs, enums and Envoy's callbacks, as `abi.h` declares them (facts read
//! from the header; the declarations are our own).

use std::ffi::{c_char, c_void, CStr};
use std::ptr;
use std::sync::OnceLock;

/// A buffer owned by Envoy, valid for the duration of the hook or callback that returned it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    pub(crate) ptr: *const c_char,
    pub(crate) length: usize,
}

/// A buffer owned by the module, passed to Envoy.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct ModuleBuffer {
    pub(crate) ptr: *const c_char,
    pub(crate) length: usize,
}

#[repr(C)]
pub(crate) struct ModuleHeader {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

/// An Envoy-owned header passed to the callout hooks.
#[repr(C)]
pub struct EnvoyHeader {
    pub(crate) key_ptr: *const c_char,
    pub(crate) key_length: usize,
    pub(crate) value_ptr: *const c_char,
    pub(crate) value_length: usize,
}

impl ModuleBuffer {
    pub(crate) fn of(bytes: &[u8]) -> Self {
        Self {
            ptr: bytes.as_ptr().cast(),
            length: bytes.len(),
        }
    }
}

pub(crate) fn envoy_bytes<'a>(buffer: EnvoyBuffer) -> &'a [u8] {
    if buffer.ptr.is_null() || buffer.length == 0 {
        return &[];
    }
    // SAFETY: Envoy guarantees ptr/length describe readable memory for the current hook.
    unsafe { std::slice::from_raw_parts(buffer.ptr.cast(), buffer.length) }
}

/// Declares an ABI enum as a `#[repr(i32)]` Rust enum. Values we pass to Envoy are the enum
/// itself (FFI-safe); values Envoy hands back are converted with `from_raw`, which refuses a
/// number the enum does not name instead of transmuting it.
macro_rules! abi_enum {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:literal,)+ }) => {
        $(#[$meta])*
        #[repr(i32)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[allow(dead_code)]
        $vis enum $name { $($(#[$vmeta])* $variant = $value,)+ }

        #[allow(dead_code)]
        impl $name {
            /// The variant Envoy's number names, if any.
            $vis fn from_raw(raw: i32) -> Option<Self> {
                match raw {
                    $($value => Some(Self::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

abi_enum! {
    /// `envoy_dynamic_module_type_http_header_type`.
    pub(crate) enum HeaderMap {
        RequestHeader = 0,
        RequestTrailer = 1,
        ResponseHeader = 2,
        ResponseTrailer = 3,
    }
}

abi_enum! {
    /// `envoy_dynamic_module_type_http_body_type`.
    #[allow(clippy::enum_variant_names)]
    pub(crate) enum BodySelector {
        ReceivedRequestBody = 0,
        BufferedRequestBody = 1,
        ReceivedResponseBody = 2,
        BufferedResponseBody = 3,
    }
}

abi_enum! {
    /// `envoy_dynamic_module_type_metadata_source`.
    pub(crate) enum MetadataSource {
        Dynamic = 0,
    }
}

abi_enum! {
    /// `envoy_dynamic_module_type_attribute_id` (only the ones we read).
    pub(crate) enum Attribute {
        /// `upstream.address`.
        UpstreamAddress = 41,
    }
}

abi_enum! {
    /// `envoy_dynamic_module_type_log_level`.
    pub(crate) enum LogLevel {
        Trace = 0,
        Debug = 1,
        Info = 2,
        Warn = 3,
        Error = 4,
    }
}

abi_enum! {
    /// `envoy_dynamic_module_type_http_filter_stream_reset_reason`.
    pub(crate) enum ResetReason {
        LocalReset = 0,
    }
}

abi_enum! {
    /// `envoy_dynamic_module_type_metrics_result`.
    pub(crate) enum MetricsResult {
        Success = 0,
    }
}

abi_enum! {
    /// `envoy_dynamic_module_type_http_callout_init_result`.
    pub(crate) enum CalloutInitResult {
        Success = 0,
        MissingRequiredHeaders = 1,
        ClusterNotFound = 2,
        DuplicateCalloutId = 3,
        CannotCreateRequest = 4,
    }
}

impl CalloutInitResult {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::MissingRequiredHeaders => "missing required headers (:method, :path, :authority)",
            Self::ClusterNotFound => "cluster not found",
            Self::DuplicateCalloutId => "duplicate callout id",
            Self::CannotCreateRequest => "cannot create request (no healthy upstream?)",
        }
    }
}

abi_enum! {
    /// `envoy_dynamic_module_type_http_callout_result`.
    pub(crate) enum CalloutResult {
        Success = 0,
        Reset = 1,
        ExceedResponseBufferLimit = 2,
    }
}

impl CalloutResult {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Reset => "reset (connection failure or timeout)",
            Self::ExceedResponseBufferLimit => "response too large",
        }
    }
}

abi_enum! {
    /// `envoy_dynamic_module_type_on_http_filter_request_headers_status` (and the response one).
    pub enum HeadersStatus {
        Continue = 0,
        StopIteration = 1,
        ContinueAndDontEndStream = 2,
        StopAllIterationAndBuffer = 3,
        StopAllIterationAndWatermark = 4,
    }
}

abi_enum! {
    /// `envoy_dynamic_module_type_on_http_filter_request_body_status` (and the response one).
    pub enum BodyStatus {
        Continue = 0,
        StopIterationAndBuffer = 1,
        StopIterationAndWatermark = 2,
        StopIterationNoBuffer = 3,
    }
}

abi_enum! {
    /// `envoy_dynamic_module_type_on_http_filter_request_trailers_status` (and the response one).
    pub enum TrailersStatus {
        Continue = 0,
        StopIteration = 1,
    }
}

/// What a stream hook returns: the status type of that hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookStatus {
    /// From a headers hook.
    Headers(HeadersStatus),
    /// From a body hook.
    Body(BodyStatus),
    /// From a trailers hook.
    Trailers(TrailersStatus),
}

impl HookStatus {
    /// The C value the hook returns.
    pub fn raw(self) -> i32 {
        match self {
            Self::Headers(status) => status as i32,
            Self::Body(status) => status as i32,
            Self::Trailers(status) => status as i32,
        }
    }
}

/// Callbacks a supported Envoy line may lack: the module works without them, with less.
pub(crate) const OPTIONAL_CALLBACKS: &[&str] = &[
    // Since 1.39: metrics recorded by background work.
    "envoy_dynamic_module_callback_http_filter_config_set_gauge",
    "envoy_dynamic_module_callback_http_filter_config_increment_counter",
    // Since 1.40: struct and typed dynamic metadata.
    "envoy_dynamic_module_callback_http_set_dynamic_metadata_struct",
    "envoy_dynamic_module_callback_http_set_dynamic_typed_metadata",
];

pub(crate) const fn empty_envoy_buffer() -> EnvoyBuffer {
    EnvoyBuffer {
        ptr: ptr::null(),
        length: 0,
    }
}

pub(crate) fn module_headers(headers: &[(&str, &str)]) -> Vec<ModuleHeader> {
    headers
        .iter()
        .map(|(k, v)| ModuleHeader {
            key_ptr: k.as_ptr().cast(),
            key_length: k.len(),
            value_ptr: v.as_ptr().cast(),
            value_length: v.len(),
        })
        .collect()
}

/// Declares Envoy's callbacks as functions of the same name that call through a table resolved
/// once at program init (`dlsym` in the process scope, where Envoy exports them), instead of
/// importing them at link time. Rust binds imports eagerly (through the GOT), so a single
/// callback an Envoy line lacks would make Envoy refuse the whole module before it could say
/// why; resolved this way, the module loads on any Envoy, names the supported versions when
/// the line is too old, and treats callbacks newer than the oldest supported line as optional.
macro_rules! envoy_callbacks {
    ($(fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?;)*) => {
        /// Envoy's callbacks as resolved in the running Envoy.
        #[allow(non_snake_case)]
        pub(crate) struct Callbacks {
            $(pub(crate) $name: Option<unsafe extern "C" fn($($ty),*) $(-> $ret)?>,)*
        }

        impl Callbacks {
            fn resolve() -> Self {
                Self {
                    $($name: {
                        let symbol = envoy_exports(
                            // The name with a NUL, as dlsym wants it.
                            CStr::from_bytes_with_nul(concat!(stringify!($name), "\0").as_bytes())
                                .expect("symbol names have no NUL"),
                        );
                        (!symbol.is_null()).then(|| {
                            // SAFETY: each symbol Envoy exports under this name has exactly this
                            // C signature (abi.h); a missing one stays `None`.
                            unsafe {
                                std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($ty),*) $(-> $ret)?>(symbol)
                            }
                        })
                    },)*
                }
            }

            /// The callbacks this module calls that the running Envoy lacks.
            pub(crate) fn missing(&self) -> Vec<&'static str> {
                let mut missing = Vec::new();
                $(if self.$name.is_none() {
                    missing.push(stringify!($name));
                })*
                missing
            }
        }

        $(
            #[allow(clippy::too_many_arguments, dead_code)]
            pub(crate) unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
                let callback = callbacks().$name.expect(concat!(stringify!($name), " is exported by every supported Envoy"));
                // SAFETY: the caller upholds the callback's contract, as for a direct call.
                unsafe { callback($($arg),*) }
            }
        )*
    };
}

envoy_callbacks! {
    // Since Envoy 1.39 (optional: without them background-work metrics are not reported).
    fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
        config: *mut c_void,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> i32;
    fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        config: *mut c_void,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> i32;
    // Every supported line.
    fn envoy_dynamic_module_callback_log(level: LogLevel, message: ModuleBuffer);
    fn envoy_dynamic_module_callback_log_enabled(level: LogLevel) -> bool;
    fn envoy_dynamic_module_callback_http_get_header(
        filter: *mut c_void,
        header_type: HeaderMap,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        filter: *mut c_void,
        header_type: HeaderMap,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_body_chunks_size(filter: *mut c_void, body_type: BodySelector) -> usize;
    fn envoy_dynamic_module_callback_http_get_body_chunks(
        filter: *mut c_void,
        body_type: BodySelector,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_body_size(filter: *mut c_void, body_type: BodySelector) -> usize;
    fn envoy_dynamic_module_callback_http_append_body(filter: *mut c_void, body_type: BodySelector, data: ModuleBuffer) -> bool;
    fn envoy_dynamic_module_callback_http_drain_body(filter: *mut c_void, body_type: BodySelector, bytes: usize) -> bool;
    fn envoy_dynamic_module_callback_http_received_buffered_request_body(filter: *mut c_void) -> bool;
    fn envoy_dynamic_module_callback_http_received_buffered_response_body(filter: *mut c_void) -> bool;
    fn envoy_dynamic_module_callback_http_send_response(
        filter: *mut c_void,
        status: u32,
        headers: *const ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );
    fn envoy_dynamic_module_callback_http_filter_reset_stream(
        filter: *mut c_void,
        reason: ResetReason,
        details: ModuleBuffer,
    );
    fn envoy_dynamic_module_callback_http_clear_route_cache(filter: *mut c_void);
    fn envoy_dynamic_module_callback_http_get_buffer_limit(filter: *mut c_void) -> u64;
    fn envoy_dynamic_module_callback_http_set_buffer_limit(filter: *mut c_void, limit: u64);
    fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
        filter: *mut c_void,
        namespace: ModuleBuffer,
        key: ModuleBuffer,
        value: ModuleBuffer,
    );
    // Since Envoy 1.40 (optional): a whole namespace from a serialized google.protobuf.Struct,
    // and typed metadata from a serialized google.protobuf.Any.
    fn envoy_dynamic_module_callback_http_set_dynamic_metadata_struct(
        filter: *mut c_void,
        namespace: ModuleBuffer,
        serialized_struct: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_dynamic_typed_metadata(
        filter: *mut c_void,
        namespace: ModuleBuffer,
        serialized_any: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_dynamic_metadata_number(
        filter: *mut c_void,
        namespace: ModuleBuffer,
        key: ModuleBuffer,
        value: f64,
    );
    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: *mut c_void,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_length: usize,
        id: *mut usize,
    ) -> i32;
    fn envoy_dynamic_module_callback_http_filter_config_define_histogram(
        config: *mut c_void,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_length: usize,
        id: *mut usize,
    ) -> i32;
    fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: *mut c_void,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> i32;
    fn envoy_dynamic_module_callback_http_filter_record_histogram_value(
        filter: *mut c_void,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> i32;
    fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        config: *mut c_void,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_length: usize,
        id: *mut usize,
    ) -> i32;
    fn envoy_dynamic_module_callback_http_filter_set_gauge(
        filter: *mut c_void,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> i32;
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(config: *mut c_void) -> *mut c_void;
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(scheduler: *mut c_void, event_id: u64);
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(scheduler: *mut c_void);
    fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        config: *mut c_void,
        callout_id: *mut u64,
        cluster: ModuleBuffer,
        headers: *const ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_milliseconds: u64,
    ) -> i32;
    fn envoy_dynamic_module_callback_http_filter_http_callout(
        filter: *mut c_void,
        callout_id: *mut u64,
        cluster: ModuleBuffer,
        headers: *const ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_milliseconds: u64,
    ) -> i32;
    fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: *mut c_void);
    fn envoy_dynamic_module_callback_http_filter_continue_encoding(filter: *mut c_void);
    fn envoy_dynamic_module_callback_http_get_metadata_string(
        filter: *mut c_void,
        source: MetadataSource,
        namespace: ModuleBuffer,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_metadata_list_size(
        filter: *mut c_void,
        source: MetadataSource,
        namespace: ModuleBuffer,
        key: ModuleBuffer,
        result: *mut usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_metadata_list_string(
        filter: *mut c_void,
        source: MetadataSource,
        namespace: ModuleBuffer,
        key: ModuleBuffer,
        index: usize,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter: *mut c_void,
        attribute_id: Attribute,
        result: *mut EnvoyBuffer,
    ) -> bool;
}

static CALLBACKS: OnceLock<Callbacks> = OnceLock::new();

pub(crate) fn callbacks() -> &'static Callbacks {
    CALLBACKS.get_or_init(Callbacks::resolve)
}

/// Whether a callback exists in the Envoy binary that loaded us. Envoy exports its callbacks
/// from the executable, so the process-wide symbol scope has them.
#[cfg(unix)]
pub(crate) fn envoy_exports(symbol: &CStr) -> *mut c_void {
    // SAFETY: dlsym with RTLD_DEFAULT (the null handle on glibc and musl) and a NUL-terminated
    // name only looks a symbol up.
    unsafe { libc::dlsym(ptr::null_mut(), symbol.as_ptr()) }
}

/// Dynamic modules exist on Unix only; elsewhere (a wasm build of a crate that depends on this
/// one) nothing is exported.
#[cfg(not(unix))]
pub(crate) fn envoy_exports(_symbol: &CStr) -> *mut c_void {
    ptr::null_mut()
}

/// The Envoy release line this module runs in, told apart by callbacks each line added.
pub(crate) fn detect_envoy() -> Option<crate::EnvoyAbi> {
    if envoy_exports(c"envoy_dynamic_module_callback_http_filter_config_http_callout").is_null() {
        return None; // 1.37 or older: the hash-versioned ABI, and callbacks we need are missing
    }
    if envoy_exports(c"envoy_dynamic_module_callback_http_filter_config_increment_counter").is_null() {
        return Some(crate::EnvoyAbi::V1_38);
    }
    if envoy_exports(c"envoy_dynamic_module_callback_access_logger_get_timing_info_v2").is_null() {
        return Some(crate::EnvoyAbi::V1_39);
    }
    Some(crate::EnvoyAbi::V1_40)
}
