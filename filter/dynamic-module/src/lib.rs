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
// In `ffi`, the one module allowed `unsafe`: every unsafe operation sits in its own block with
// a `// SAFETY:` comment saying why it holds, even inside `unsafe fn`.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

#[allow(unsafe_code)]
#[doc(hidden)]
pub mod ffi;
mod host;

pub use payload_processor_core::Registry;

use ffi::abi::{BodyStatus, HeadersStatus, HookStatus, LogLevel, TrailersStatus};
use ffi::{ConfigHandle, ConfigScheduler, Event, FilterHandle};
use host::{EnvoyBackgroundHost, EnvoyHost};
use payload_processor_core::{
    BodyFlow, CalloutError, CalloutFlow, CalloutResponse, Chain, Direction, HeadersFlow, Stream,
};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

#[cfg(feature = "builtin-exports")]
export_envoy_dynamic_module!(payload_processor_plugins::builtin_registry);

/// The Envoy release line the module was loaded into (detected at program init from the
/// callbacks Envoy exports). Everything works on each; what a line lacks is listed here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvoyAbi {
    /// Envoy 1.38.x (ABI `v0.1.0`): no config-level counters or gauges, so the metrics that
    /// background work records (the endpoint picker's scrapes and pool gauges) are not
    /// reported. Per-request metrics work.
    V1_38,
    /// Envoy 1.39.x (ABI `v0.1.0`).
    V1_39,
    /// Envoy 1.40.x (ABI `v0.2.0`).
    V1_40,
}

static ENVOY_ABI: std::sync::OnceLock<EnvoyAbi> = std::sync::OnceLock::new();

/// The Envoy line detected at program init (`None` before it, e.g. in unit tests).
pub fn envoy_abi() -> Option<EnvoyAbi> {
    ENVOY_ABI.get().copied()
}

/// One loaded filter configuration: the compiled chain and Envoy's ids for its metrics.
pub struct ModuleConfig {
    chain: Arc<Chain>,
    metric_ids: Vec<Option<usize>>,
    /// Drives the chain's background work, when it has any.
    ticker: Mutex<Option<Ticker>>,
    background: Mutex<BackgroundState>,
}

/// Callout answers that arrived while a tick was still starting callouts (Envoy may answer a
/// failing call inline), delivered once the tick registered its handles.
#[derive(Default)]
struct BackgroundState {
    in_tick: bool,
    early: Vec<(u64, Result<CalloutResponse, CalloutError>)>,
}

/// A thread that wakes every tick interval and commits an event on Envoy's config-level
/// scheduler, so the tick itself runs on Envoy's main thread (where config-level callouts are
/// allowed). Stopped and joined before the scheduler is deleted.
struct Ticker {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    fn start(scheduler: ConfigScheduler, interval: Duration) -> Option<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("payload-processor-ticker".into())
            .spawn(move || {
                // recv_timeout doubles as an interruptible sleep: any message or a dropped
                // sender ends the loop.
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    scheduler.commit(0);
                }
                drop(scheduler);
            })
            .ok()?;
        Some(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
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
                    .map(|metric| handle.define_metric(&metric.name, metric.kind))
                    .collect();
                let names: Vec<&str> = chain.processor_names().collect();
                log::info!("payload-processor {name}: loaded chain [{}]", names.join(", "));
                let ticker = match chain.tick_interval() {
                    Some(interval) => {
                        if envoy_abi() == Some(EnvoyAbi::V1_38) {
                            log::warn!(
                                "payload-processor {name}: Envoy 1.38 has no config-level metrics: the counters \
                                 and gauges of background work (metric scrapes, pool state) are not reported; \
                                 Envoy 1.39 or later reports them"
                            );
                        }
                        let Some(ticker) = handle
                            .new_scheduler()
                            .and_then(|scheduler| Ticker::start(scheduler, interval.max(Duration::from_millis(1))))
                        else {
                            log::error!("payload-processor {name}: cannot start the background ticker");
                            return None;
                        };
                        Some(ticker)
                    }
                    None => None,
                };
                Some(Self {
                    chain: Arc::new(chain),
                    metric_ids,
                    ticker: Mutex::new(ticker),
                    background: Mutex::new(BackgroundState::default()),
                })
            }
            Err(err) => {
                log::error!("payload-processor {name}: invalid configuration: {err}");
                None
            }
        }
    }
}

impl ModuleConfig {
    fn lock_background(&self) -> std::sync::MutexGuard<'_, BackgroundState> {
        self.background.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A tick on the main thread: the chain's background work, then any answers that came
    /// back while it was starting callouts.
    fn on_tick(&self, handle: ConfigHandle) {
        let mut host = EnvoyBackgroundHost::new(handle, &self.metric_ids);
        self.lock_background().in_tick = true;
        self.chain.on_tick(&mut host);
        let early = {
            let mut state = self.lock_background();
            state.in_tick = false;
            std::mem::take(&mut state.early)
        };
        for (id, result) in early {
            self.chain.on_callout_done(&mut host, id, result);
        }
    }

    fn on_callout_done(&self, handle: ConfigHandle, id: u64, result: Result<CalloutResponse, CalloutError>) {
        {
            let mut state = self.lock_background();
            if state.in_tick {
                state.early.push((id, result));
                return;
            }
        }
        let mut host = EnvoyBackgroundHost::new(handle, &self.metric_ids);
        self.chain.on_callout_done(&mut host, id, result);
    }

    /// Stops the ticker now (Envoy is destroying this configuration).
    fn stop_background(&self) {
        let ticker = self
            .ticker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        drop(ticker);
    }
}

/// Per-stream filter state.
pub struct HttpFilter {
    config: Arc<ModuleConfig>,
    stream: Stream,
    /// A panic was contained in one of this stream's hooks: its state cannot be trusted, so
    /// later hooks let the stream go on without running the engine again.
    poisoned: bool,
    /// The response headers hook let the headers go on: a contained panic after this resets
    /// the stream instead of answering.
    response_headers_sent: bool,
}

/// The status after a contained panic was answered with a local reply: stop, without asking
/// a body hook to buffer what will never be used.
fn panic_status(event: Event) -> HookStatus {
    match event {
        Event::RequestBody(_) | Event::ResponseBody(_) => HookStatus::Body(BodyStatus::StopIterationNoBuffer),
        Event::RequestHeaders(_) | Event::ResponseHeaders(_) => HookStatus::Headers(HeadersStatus::StopIteration),
        Event::RequestTrailers | Event::ResponseTrailers => HookStatus::Trailers(TrailersStatus::StopIteration),
    }
}

fn headers_status(flow: HeadersFlow) -> HookStatus {
    HookStatus::Headers(match flow {
        HeadersFlow::Continue => HeadersStatus::Continue,
        HeadersFlow::WaitForBody | HeadersFlow::WaitForCallout | HeadersFlow::Stop => HeadersStatus::StopIteration,
    })
}

fn body_status(flow: BodyFlow) -> HookStatus {
    HookStatus::Body(match flow {
        BodyFlow::Continue => BodyStatus::Continue,
        // Waiting for a callout: Envoy keeps the body until the answer resumes the stream.
        BodyFlow::Buffer | BodyFlow::WaitForCallout => BodyStatus::StopIterationAndBuffer,
        // Held bytes live in the engine and a stopped stream has answered: buffer nothing.
        BodyFlow::Hold | BodyFlow::Stop => BodyStatus::StopIterationNoBuffer,
    })
}

fn trailers_status(flow: BodyFlow) -> HookStatus {
    HookStatus::Trailers(match flow {
        BodyFlow::Continue => TrailersStatus::Continue,
        BodyFlow::Buffer | BodyFlow::Hold | BodyFlow::WaitForCallout | BodyFlow::Stop => TrailersStatus::StopIteration,
    })
}

impl HttpFilter {
    fn new(config: Arc<ModuleConfig>) -> Self {
        let stream = Stream::new(Arc::clone(&config.chain));
        Self {
            config,
            stream,
            poisoned: false,
            response_headers_sent: false,
        }
    }

    fn on_event(&mut self, handle: FilterHandle, event: Event) -> HookStatus {
        let in_body_hook = matches!(event, Event::RequestBody(_) | Event::ResponseBody(_));
        let mut host = EnvoyHost::new(handle, &self.config.metric_ids, in_body_hook);
        match event {
            Event::RequestHeaders(eos) => headers_status(self.stream.on_request_headers(&mut host, eos)),
            Event::RequestBody(eos) => body_status(self.stream.on_request_body(&mut host, eos)),
            Event::RequestTrailers => trailers_status(self.stream.on_request_trailers(&mut host)),
            Event::ResponseHeaders(eos) => {
                let status = headers_status(self.stream.on_response_headers(&mut host, eos));
                self.response_headers_sent = status == HookStatus::Headers(HeadersStatus::Continue);
                status
            }
            Event::ResponseBody(eos) => body_status(self.stream.on_response_body(&mut host, eos)),
            Event::ResponseTrailers => trailers_status(self.stream.on_response_trailers(&mut host)),
        }
    }
}

impl HttpFilter {
    /// A callout's answer: the engine goes on from the processor that waited, and the stopped
    /// direction resumes when the chain finished it.
    fn on_callout_done(&mut self, handle: FilterHandle, id: u64, outcome: Result<CalloutResponse, CalloutError>) {
        let mut host = EnvoyHost::new(handle, &self.config.metric_ids, false);
        match self.stream.on_callout_done(&mut host, id, outcome) {
            CalloutFlow::Resume(Direction::Request) => handle.continue_decoding(),
            CalloutFlow::Resume(Direction::Response) => {
                self.response_headers_sent = true;
                handle.continue_encoding();
            }
            CalloutFlow::Waiting | CalloutFlow::Replied | CalloutFlow::Ignored => {}
        }
    }
}

/// Routes the `log` facade to Envoy's log (component `dynamic_modules`).
struct EnvoyLogger;

fn envoy_level(level: log::Level) -> LogLevel {
    match level {
        log::Level::Trace => LogLevel::Trace,
        log::Level::Debug => LogLevel::Debug,
        log::Level::Info => LogLevel::Info,
        log::Level::Warn => LogLevel::Warn,
        log::Level::Error => LogLevel::Error,
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

#[cfg(test)]
mod tests {
    use super::*;
    use payload_processor_core::FilterConfig;

    #[test]
    fn a_contained_panic_stops_each_hook_as_that_hook_allows() {
        // Headers and trailers: StopIteration; bodies: StopIterationNoBuffer, never a request
        // to buffer a body no one will read after the local reply.
        let stop_headers = HookStatus::Headers(HeadersStatus::StopIteration);
        let stop_body = HookStatus::Body(BodyStatus::StopIterationNoBuffer);
        let stop_trailers = HookStatus::Trailers(TrailersStatus::StopIteration);
        for (event, status, raw) in [
            (Event::RequestHeaders(false), stop_headers, 1),
            (Event::RequestBody(false), stop_body, 3),
            (Event::RequestBody(true), stop_body, 3),
            (Event::RequestTrailers, stop_trailers, 1),
            (Event::ResponseHeaders(true), stop_headers, 1),
            (Event::ResponseBody(false), stop_body, 3),
            (Event::ResponseTrailers, stop_trailers, 1),
        ] {
            assert_eq!(panic_status(event), status, "{event:?}");
            assert_eq!(panic_status(event).raw(), raw, "{event:?}");
        }
    }

    #[test]
    fn engine_flows_map_to_the_statuses_envoy_expects() {
        // The C values of abi.h: headers Continue=0 StopIteration=1; body Continue=0,
        // StopIterationAndBuffer=1, StopIterationNoBuffer=3; trailers Continue=0 StopIteration=1.
        assert_eq!(headers_status(HeadersFlow::Continue).raw(), 0);
        assert_eq!(headers_status(HeadersFlow::WaitForBody).raw(), 1);
        assert_eq!(headers_status(HeadersFlow::Stop).raw(), 1);
        assert_eq!(body_status(BodyFlow::Continue).raw(), 0);
        assert_eq!(body_status(BodyFlow::Buffer).raw(), 1);
        assert_eq!(body_status(BodyFlow::Hold).raw(), 3);
        assert_eq!(body_status(BodyFlow::Stop).raw(), 3);
        assert_eq!(trailers_status(BodyFlow::Continue).raw(), 0);
        assert_eq!(trailers_status(BodyFlow::Buffer).raw(), 1);
        assert_eq!(trailers_status(BodyFlow::Stop).raw(), 1);
    }

    #[test]
    fn numbers_envoy_hands_back_are_converted_never_transmuted() {
        use ffi::abi::{CalloutInitResult, CalloutResult};
        assert_eq!(CalloutInitResult::from_raw(2), Some(CalloutInitResult::ClusterNotFound));
        assert_eq!(CalloutInitResult::from_raw(99), None);
        assert_eq!(CalloutResult::from_raw(1), Some(CalloutResult::Reset));
        assert_eq!(CalloutResult::from_raw(-1), None);
    }

    /// A filter on a chain that reads request bodies, outside Envoy (no callbacks resolved:
    /// any call into Envoy panics, which is what the test needs).
    fn filter() -> HttpFilter {
        let text = "processors: [{name: route, type: body-field-to-header}]";
        let chain = Chain::build(
            &FilterConfig::parse(text).unwrap(),
            &payload_processor_plugins::builtin_registry(),
        )
        .unwrap();
        let config = ModuleConfig {
            metric_ids: vec![None; chain.metrics().len()],
            chain: Arc::new(chain),
            ticker: Mutex::new(None),
            background: Mutex::new(BackgroundState::default()),
        };
        HttpFilter::new(Arc::new(config))
    }

    #[test]
    #[allow(unsafe_code)] // drives the FFI hook as Envoy does
    fn a_panic_poisons_the_stream_and_later_hooks_continue_without_the_engine() {
        let mut filter = filter();
        let pointer = (&mut filter as *mut HttpFilter).cast_const().cast();
        // The engine reads a header through Envoy, which is absent here: a panic, contained.
        // SAFETY: `pointer` is a live HttpFilter; the Envoy pointer is never dereferenced
        // (every callback is unresolved and panics before a call).
        let status = unsafe { ffi::on_event_status(std::ptr::null_mut(), pointer, Event::RequestHeaders(false)) };
        assert_eq!(status, HookStatus::Headers(HeadersStatus::StopIteration));
        assert!(filter.poisoned);
        // Later hooks of the stream let it go on and never run the engine (which would panic
        // again on the absent Envoy).
        for (event, status) in [
            (Event::RequestBody(true), HookStatus::Body(BodyStatus::Continue)),
            (
                Event::ResponseHeaders(false),
                HookStatus::Headers(HeadersStatus::Continue),
            ),
            (Event::ResponseBody(true), HookStatus::Body(BodyStatus::Continue)),
            (Event::ResponseTrailers, HookStatus::Trailers(TrailersStatus::Continue)),
        ] {
            // SAFETY: as above.
            let got = unsafe { ffi::on_event_status(std::ptr::null_mut(), pointer, event) };
            assert_eq!(got, status, "{event:?}");
        }
        assert!(!filter.response_headers_sent);
    }
}
