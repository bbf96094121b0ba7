//! proxy-wasm form of envoy-payload-processor: `payload_processor.wasm`, for Envoy's
//! `envoy.filters.http.wasm` with the v8 runtime, Envoy Gateway's `EnvoyExtensionPolicy.wasm`
//! and other proxy-wasm hosts. It drives the same engine and plugins as the dynamic module;
//! this crate is the only place that calls proxy-wasm.
//!
//! The plugin `configuration` (a `StringValue`) holds the same YAML or JSON chain. It is
//! parsed and validated once per VM in `on_configure`; a bad configuration fails it, so Envoy
//! refuses to load the filter, and the path-qualified reason is logged.
//!
//! Differences forced by the host (documented in the README):
//! - the per-stream buffer limit cannot be raised from wasm; set the listener's
//!   `per_connection_buffer_limit_bytes` at least as large as `maxRequestBodyBytes`;
//! - Rust wasm builds abort on panic, so a plugin panic traps the VM instead of being caught;
//!   with `failure_policy: FAIL_RELOAD` Envoy answers that request with 503 and starts a
//!   fresh VM for the next one (the dynamic module answers 500 `processor_panic`);
//! - Envoy prefixes wasm metrics with `wasmcustom.`;
//! - background work (the endpoint picker's metric scrapes) runs on each VM's tick; plugins
//!   coordinate the VMs through shared data (the picker elects one scraper and shares its
//!   metrics), where the dynamic module has one plugin instance for every worker;
//! - dynamic metadata cannot be written: the endpoint picker also sets the typed filter state
//!   `envoy.network.transport_socket.original_dst_address`, which ORIGINAL_DST clusters honour.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod headers_hold;
mod host;

pub use payload_processor_core::Registry;
#[doc(hidden)]
pub use proxy_wasm;

use headers_hold::HeadersHoldTracker;
use host::{HeaderSnapshot, WasmBackgroundHost, WasmHost};
use payload_processor_core::{BodyFlow, CalloutFlow, Chain, HeadersFlow, HeadersHold, MetricKind, Stream};
use payload_processor_core::{CalloutResponse, Direction};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

#[cfg(feature = "builtin-exports")]
mod builtin_exports {
    crate::export_proxy_wasm!(payload_processor_plugins::builtin_registry);
}

/// Exports the proxy-wasm entry point backed by the plugins of `$registry` (a `fn() -> Registry`).
#[macro_export]
macro_rules! export_proxy_wasm {
    ($registry:path) => {
        $crate::proxy_wasm::main! {{
            $crate::start($registry);
        }}
    };
}

/// Installs the logger and the root context; called from the generated `_initialize`.
#[doc(hidden)]
pub fn start(registry: fn() -> Registry) {
    // The root-context factory must be a plain fn, so the registry travels through a static.
    let _ = REGISTRY.set(registry);
    proxy_wasm::set_log_level(LogLevel::Trace);
    // Panics abort in wasm, so the engine cannot catch them: the VM traps and Envoy's
    // failure policy answers the request (503; a reply sent from here is overridden). Log why.
    std::panic::set_hook(Box::new(|info| {
        log::error!("payload-processor: panic, the VM will trap: {info}");
    }));
    proxy_wasm::set_root_context(|_| {
        let registry = *REGISTRY.get().expect("set before the root context is created");
        Box::new(Root { registry, loaded: None })
    });
}

static REGISTRY: std::sync::OnceLock<fn() -> Registry> = std::sync::OnceLock::new();

struct Loaded {
    chain: Arc<Chain>,
    metric_ids: Arc<[Option<u32>]>,
    memory_gauge: Option<u32>,
    headers_hold: Rc<HeadersHoldTracker>,
    /// The chain's own background interval, and when it is next due (the tick may run more
    /// often while paused requests are watched).
    chain_tick: Option<std::time::Duration>,
    next_chain_tick_nanos: u64,
}

struct Root {
    registry: fn() -> Registry,
    loaded: Option<Loaded>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        let Some(loaded) = &self.loaded else { return };
        let chain = Arc::clone(&loaded.chain);
        let metric_ids = Arc::clone(&loaded.metric_ids);
        let result = callout_result(self, num_headers, body_size);
        let mut host = WasmBackgroundHost::new(self, &metric_ids);
        chain.on_callout_done(&mut host, u64::from(token_id), result);
    }
}

/// The answer of an HTTP call, read in its response callback. Envoy reports a failed call
/// (connect failure, reset, timeout) as an answer without headers.
fn callout_result(
    context: &dyn Context,
    num_headers: usize,
    body_size: usize,
) -> Result<CalloutResponse, payload_processor_core::CalloutError> {
    if num_headers == 0 {
        return Err("no response (connection failure, reset or timeout)".to_string());
    }
    let headers: Vec<(String, String)> = context.get_http_call_response_headers();
    let status = headers
        .iter()
        .find(|(name, _)| name == ":status")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0);
    let body = context.get_http_call_response_body(0, body_size).unwrap_or_default();
    Ok(CalloutResponse { status, headers, body })
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(err) => {
                log::error!("payload-processor: invalid configuration: not UTF-8: {err}");
                return false;
            }
        };
        match Chain::load(&text, &(self.registry)()) {
            Ok(chain) => {
                let metric_ids = chain
                    .metrics()
                    .iter()
                    .map(|metric| {
                        let kind = match metric.kind {
                            MetricKind::Counter => MetricType::Counter,
                            MetricKind::Histogram => MetricType::Histogram,
                            MetricKind::Gauge => MetricType::Gauge,
                        };
                        proxy_wasm::hostcalls::define_metric(kind, &format!("payload_processor.{}", metric.name)).ok()
                    })
                    .collect();
                let names: Vec<&str> = chain.processor_names().collect();
                log::info!("payload-processor: loaded chain [{}]", names.join(", "));
                let memory_gauge =
                    proxy_wasm::hostcalls::define_metric(MetricType::Gauge, "payload_processor.wasm_memory_bytes").ok();
                let plugin_name = self
                    .get_property(vec!["plugin_name"])
                    .map(|name| String::from_utf8_lossy(&name).into_owned())
                    .unwrap_or_default();
                let headers_hold = Rc::new(HeadersHoldTracker::new(&plugin_name, chain.reads_bodies()));
                let chain_tick = chain
                    .tick_interval()
                    .map(|i| i.max(std::time::Duration::from_millis(1)));
                self.loaded = Some(Loaded {
                    chain: Arc::new(chain),
                    metric_ids,
                    memory_gauge,
                    headers_hold,
                    chain_tick,
                    next_chain_tick_nanos: 0,
                });
                self.schedule_ticks();
                true
            }
            Err(err) => {
                log::error!("payload-processor: invalid configuration: {err}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let Some(loaded) = &self.loaded else { return };
        let chain = Arc::clone(&loaded.chain);
        let metric_ids = Arc::clone(&loaded.metric_ids);
        let headers_hold = Rc::clone(&loaded.headers_hold);
        let (chain_tick, next_due) = (loaded.chain_tick, loaded.next_chain_tick_nanos);
        let was_probing = headers_hold.probing();
        if was_probing {
            let steering: Vec<&str> = chain.steering_processors().collect();
            headers_hold.check(&steering.join(", "), &metric_ids);
        }
        // Background work (metric scrapes) runs on this VM's tick, at the chain's interval;
        // plugins coordinate the VMs through shared data.
        if let Some(interval) = chain_tick {
            let now = self
                .get_current_time()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let now = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
            // Ticks come at the chain's own interval unless paused requests are watched.
            if !was_probing || now >= next_due {
                // Due times advance by the interval, so the faster probe ticks keep the chain's
                // cadence on average.
                let interval = u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX);
                if let Some(loaded) = &mut self.loaded {
                    let next = next_due.saturating_add(interval);
                    loaded.next_chain_tick_nanos = if next <= now {
                        now.saturating_add(interval)
                    } else {
                        next
                    };
                }
                let mut host = WasmBackgroundHost::new(self, &metric_ids);
                chain.on_tick(&mut host);
            }
        }
        if was_probing && !headers_hold.probing() {
            self.schedule_ticks();
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let loaded = self.loaded.as_ref()?;
        Some(Box::new(Filter {
            context_id,
            stream: Rc::new(RefCell::new(Stream::new(Arc::clone(&loaded.chain)))),
            metric_ids: Arc::clone(&loaded.metric_ids),
            memory_gauge: loaded.memory_gauge,
            headers_hold: Rc::clone(&loaded.headers_hold),
            watched: false,
            request_body: host::RequestBody::default(),
            request_headers: Rc::default(),
            response_headers: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl Root {
    /// Ticks at the chain's background interval, faster while paused requests are watched to
    /// learn whether Envoy holds request headers (see `headers_hold`), not at all otherwise.
    fn schedule_ticks(&self) {
        let Some(loaded) = &self.loaded else { return };
        let probe = loaded.headers_hold.probing().then_some(headers_hold::PROBE_INTERVAL);
        let period = match (loaded.chain_tick, probe) {
            (Some(chain), Some(probe)) => chain.min(probe),
            (chain, probe) => chain.or(probe).unwrap_or_default(),
        };
        self.set_tick_period(period);
    }
}

struct Filter {
    context_id: u32,
    /// Shared with the root context while the request is watched (see `headers_hold`).
    stream: Rc<RefCell<Stream>>,
    metric_ids: Arc<[Option<u32>]>,
    memory_gauge: Option<u32>,
    headers_hold: Rc<HeadersHoldTracker>,
    /// Paused at request headers while it is unknown whether Envoy holds them.
    watched: bool,
    /// The request body taken out of Envoy while the chain buffers it.
    request_body: host::RequestBody,
    /// Copies of headers that went on before their body (shared with the root context, which
    /// may release a watched request's headers).
    request_headers: Rc<RefCell<Option<HeaderSnapshot>>>,
    response_headers: Option<HeaderSnapshot>,
}

impl Drop for Filter {
    fn drop(&mut self) {
        if self.watched {
            self.headers_hold.forget(self.context_id);
        }
    }
}

/// Reports this VM's linear memory as the gauge `payload_processor.wasm_memory_bytes` whenever
/// it changed (it only grows, so this is rarely a host call), for soak tests and operators.
fn report_memory(gauge: Option<u32>) {
    #[cfg(target_arch = "wasm32")]
    {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static REPORTED: AtomicUsize = AtomicUsize::new(0);
        let bytes = core::arch::wasm32::memory_size::<0>() * 65536;
        if let Some(id) = gauge.filter(|_| REPORTED.swap(bytes, Ordering::Relaxed) != bytes) {
            let _ = proxy_wasm::hostcalls::record_metric(id, bytes as u64);
        }
    }
    #[cfg(not(target_arch = "wasm32"))]
    let _ = gauge;
}

fn headers_action(flow: HeadersFlow) -> Action {
    match flow {
        HeadersFlow::Continue => Action::Continue,
        HeadersFlow::WaitForBody | HeadersFlow::WaitForCallout | HeadersFlow::Stop => Action::Pause,
    }
}

// Pausing in a body callback buffers the data (while a callout is out, until its answer
// resumes the stream); after a local reply the stream is over. For `Hold` the engine already
// emptied the chunk, so what Envoy buffers is nothing.
fn body_action(flow: BodyFlow) -> Action {
    match flow {
        BodyFlow::Continue => Action::Continue,
        BodyFlow::Buffer | BodyFlow::Hold | BodyFlow::WaitForCallout | BodyFlow::Stop => Action::Pause,
    }
}

impl Filter {
    /// A request body callback: if this request was watched, Envoy does hold headers.
    fn body_arrived(&mut self) {
        if std::mem::take(&mut self.watched) {
            self.headers_hold.body_arrived(self.context_id);
        }
    }
}

impl Context for Filter {
    /// The answer to a callout the chain waits for: the engine goes on from the processor
    /// that waited, and the held direction resumes when the chain finished it.
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        let Some(direction) = self.stream.borrow().waiting_for_callout() else {
            return;
        };
        let result = callout_result(self, num_headers, body_size);
        // The body waits in Envoy's buffer (the body callback paused and buffered it).
        let size = host::buffered_size(direction == Direction::Request);
        let flow = {
            let (request, response) = (self.request_headers.borrow(), self.response_headers.as_ref());
            let mut host =
                WasmHost::new(&self.metric_ids, size, direction).with_gone_headers(request.as_ref(), response);
            self.stream
                .borrow_mut()
                .on_callout_done(&mut host, u64::from(token_id), result)
        };
        match flow {
            CalloutFlow::Resume(Direction::Request) => self.resume_http_request(),
            CalloutFlow::Resume(Direction::Response) => self.resume_http_response(),
            CalloutFlow::Waiting | CalloutFlow::Replied | CalloutFlow::Ignored => {}
        }
    }
}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _count: usize, end_of_stream: bool) -> Action {
        let hold = self.headers_hold.hold();
        let mut host = WasmHost::new(&self.metric_ids, 0, Direction::Request).with_hold(hold);
        let flow = self.stream.borrow_mut().on_request_headers(&mut host, end_of_stream);
        if self.stream.borrow().headers_released(Direction::Request) {
            *self.request_headers.borrow_mut() = Some(HeaderSnapshot::take(Direction::Request));
        }
        // While unknown, a request with a body is held (even if the chain only reads the
        // answer) so the hold is learned before any response needs it.
        let probe = hold == HeadersHold::Unknown
            && !end_of_stream
            && (flow == HeadersFlow::WaitForBody || (flow == HeadersFlow::Continue && self.headers_hold.probing()));
        if probe {
            self.headers_hold
                .watch(self.context_id, &self.stream, &self.request_headers);
            self.watched = true;
            return Action::Pause;
        }
        headers_action(flow)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.body_arrived();
        let (request, response) = (self.request_headers.borrow(), self.response_headers.as_ref());
        let mut host = WasmHost::new(&self.metric_ids, body_size, Direction::Request)
            .with_request_body(&mut self.request_body)
            .with_gone_headers(request.as_ref(), response);
        let flow = self.stream.borrow_mut().on_request_body(&mut host, end_of_stream);
        self.request_body.settle(body_size, flow);
        body_action(flow)
    }

    fn on_http_request_trailers(&mut self, _count: usize) -> Action {
        self.body_arrived();
        let size = host::buffered_size(true);
        let (request, response) = (self.request_headers.borrow(), self.response_headers.as_ref());
        let mut host = WasmHost::new(&self.metric_ids, size, Direction::Request)
            .with_request_body(&mut self.request_body)
            .with_gone_headers(request.as_ref(), response);
        let flow = self.stream.borrow_mut().on_request_trailers(&mut host);
        self.request_body.settle(size, flow);
        body_action(flow)
    }

    fn on_http_response_headers(&mut self, _count: usize, end_of_stream: bool) -> Action {
        let hold = self.headers_hold.hold_for_response();
        let request = self.request_headers.borrow();
        let mut host = WasmHost::new(&self.metric_ids, 0, Direction::Response)
            .with_hold(hold)
            .with_gone_headers(request.as_ref(), None);
        let flow = self.stream.borrow_mut().on_response_headers(&mut host, end_of_stream);
        if self.stream.borrow().headers_released(Direction::Response) {
            self.response_headers = Some(HeaderSnapshot::take(Direction::Response));
        }
        headers_action(flow)
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let request = self.request_headers.borrow();
        let mut host = WasmHost::new(&self.metric_ids, body_size, Direction::Response)
            .with_gone_headers(request.as_ref(), self.response_headers.as_ref());
        body_action(self.stream.borrow_mut().on_response_body(&mut host, end_of_stream))
    }

    fn on_http_response_trailers(&mut self, _count: usize) -> Action {
        let size = host::buffered_size(false);
        let request = self.request_headers.borrow();
        let mut host = WasmHost::new(&self.metric_ids, size, Direction::Response)
            .with_gone_headers(request.as_ref(), self.response_headers.as_ref());
        body_action(self.stream.borrow_mut().on_response_trailers(&mut host))
    }

    fn on_log(&mut self) {
        report_memory(self.memory_gauge);
    }
}
