//! Envoy 1.40 dynamic-module form of envoy-payload-processor: `libpayload_processor.so`.
//!
//! Load it with `envoy.filters.http.dynamic_modules`, `dynamic_module_config: {name:
//! payload_processor}` and the chain in `filter_config` (a `StringValue` of YAML or JSON).
//!
//! A third party builds its own filter with its own plugins by depending on this crate with
//! `default-features = false` and calling, in its `cdylib`:
//! ```ignore
//! fn registry() -> payload_processor_core::Registry {
//!     let mut registry = payload_processor_plugins::builtin_registry();
//!     registry.register("my-plugin", my_plugin::build).unwrap();
//!     registry
//! }
//! payload_processor::export_envoy_dynamic_module!(registry);
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

#[allow(unsafe_code)]
#[doc(hidden)]
pub mod ffi;
mod host;

pub use payload_processor_core::Registry;

use ffi::{ConfigHandle, Event, FilterHandle};
use host::EnvoyHost;
use payload_processor_core::{BodyFlow, Chain, HeadersFlow, MetricKind, Stream};
use std::sync::Arc;

#[cfg(feature = "builtin-exports")]
export_envoy_dynamic_module!(payload_processor_plugins::builtin_registry);

/// One loaded filter configuration: the compiled chain and Envoy's ids for its metrics.
pub struct ModuleConfig {
    chain: Arc<Chain>,
    metric_ids: Vec<Option<usize>>,
}

impl ModuleConfig {
    fn new(handle: &ConfigHandle, name: &str, text: &[u8], registry: fn() -> Registry) -> Option<Self> {
        let text = match std::str::from_utf8(text) {
            Ok(text) => text,
            Err(err) => {
                log::error!("payload-processor {name}: configuration is not UTF-8: {err}");
                return None;
            }
        };
        match Chain::load(text, &registry()) {
            Ok(chain) => {
                let metric_ids = chain
                    .metrics()
                    .iter()
                    .map(|metric| handle.define_metric(&metric.name, metric.kind == MetricKind::Histogram))
                    .collect();
                let names: Vec<&str> = chain.processor_names().collect();
                log::info!("payload-processor {name}: loaded chain [{}]", names.join(", "));
                Some(Self {
                    chain: Arc::new(chain),
                    metric_ids,
                })
            }
            Err(err) => {
                log::error!("payload-processor {name}: invalid configuration: {err}");
                None
            }
        }
    }
}

/// Per-stream filter state.
pub struct HttpFilter {
    config: Arc<ModuleConfig>,
    stream: Stream,
}

// ABI statuses. Headers: Continue=0, StopIteration=1. Body: Continue=0,
// StopIterationAndBuffer=1, StopIterationNoBuffer=3. Trailers: Continue=0, StopIteration=1.
fn headers_status(flow: HeadersFlow) -> i32 {
    match flow {
        HeadersFlow::Continue => 0,
        HeadersFlow::WaitForBody | HeadersFlow::Stop => 1,
    }
}

fn body_status(flow: BodyFlow) -> i32 {
    match flow {
        BodyFlow::Continue => 0,
        BodyFlow::Buffer => 1,
        BodyFlow::Hold | BodyFlow::Stop => 3,
    }
}

fn trailers_status(flow: BodyFlow) -> i32 {
    match flow {
        BodyFlow::Continue => 0,
        BodyFlow::Buffer | BodyFlow::Hold | BodyFlow::Stop => 1,
    }
}

impl HttpFilter {
    fn new(config: Arc<ModuleConfig>) -> Self {
        let stream = Stream::new(Arc::clone(&config.chain));
        Self { config, stream }
    }

    fn on_event(&mut self, handle: FilterHandle, event: Event) -> i32 {
        let in_body_hook = matches!(event, Event::RequestBody(_) | Event::ResponseBody(_));
        let mut host = EnvoyHost::new(handle, &self.config.metric_ids, in_body_hook);
        match event {
            Event::RequestHeaders(eos) => headers_status(self.stream.on_request_headers(&mut host, eos)),
            Event::RequestBody(eos) => body_status(self.stream.on_request_body(&mut host, eos)),
            Event::RequestTrailers => trailers_status(self.stream.on_request_trailers(&mut host)),
            Event::ResponseHeaders(eos) => headers_status(self.stream.on_response_headers(&mut host, eos)),
            Event::ResponseBody(eos) => body_status(self.stream.on_response_body(&mut host, eos)),
            Event::ResponseTrailers => trailers_status(self.stream.on_response_trailers(&mut host)),
        }
    }
}

/// Routes the `log` facade to Envoy's log (component `dynamic_modules`).
struct EnvoyLogger;

// Envoy's levels: Trace=0, Debug=1, Info=2, Warn=3, Error=4.
fn envoy_level(level: log::Level) -> i32 {
    match level {
        log::Level::Trace => 0,
        log::Level::Debug => 1,
        log::Level::Info => 2,
        log::Level::Warn => 3,
        log::Level::Error => 4,
    }
}

impl log::Log for EnvoyLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        ffi::log_enabled(envoy_level(metadata.level()))
    }
    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            ffi::log(envoy_level(record.level()), &record.args().to_string());
        }
    }
    fn flush(&self) {}
}

fn install_logger() {
    static LOGGER: EnvoyLogger = EnvoyLogger;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
    }
}
