//! The chain runner: compiles a configuration once, then drives each stream through it.

use crate::background::{BackgroundContext, BackgroundHost, CalloutError, CalloutResponse};
use crate::config::{FailureMode, FilterConfig, Limits};
use crate::error::ConfigError;
use crate::event_stream::{Api, EventStream};
use crate::host::{Direction, HeadersHold, Host, MetricId};
use crate::json::Body;
use crate::matcher::Matcher;
use crate::plugin::{
    Context, Decision, EventDecision, LocalReply, PhaseNeed, Plugin, PluginError, RequestEdits, StreamNeed,
};
use crate::registry::{BuildContext, Registry};
use crate::sse::SseEvent;
use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Kind of a metric the chain declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Monotonic counter.
    Counter,
    /// Histogram of samples (latencies in microseconds).
    Histogram,
    /// A value that goes up and down (set, not added to).
    Gauge,
}

/// A metric the adapter must define with the host before the first stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricDef {
    /// Full name below the filter's stat prefix, e.g. `processor.route.invocations`.
    pub name: String,
    /// Counter or histogram.
    pub kind: MetricKind,
}

#[derive(Debug, Clone, Copy)]
struct ProcessorMetrics {
    invocations: MetricId,
    rejections: MetricId,
    errors: MetricId,
    fail_open: MetricId,
    budget_overruns: MetricId,
    panics: MetricId,
    latency_us: MetricId,
    skipped_non_json: MetricId,
    skipped_encoded: MetricId,
}

struct Processor {
    name: String,
    failure_mode: FailureMode,
    timeout_nanos: Option<u64>,
    matcher: Matcher,
    plugin: Arc<dyn Plugin>,
    request: PhaseNeed,
    response: PhaseNeed,
    stream: Option<StreamNeed>,
    /// What it may change in the request after reading the body.
    edits: RequestEdits,
    metrics: ProcessorMetrics,
    counters: Vec<MetricId>,
    gauges: Vec<MetricId>,
}

impl Processor {
    fn need(&self, direction: Direction) -> PhaseNeed {
        match direction {
            Direction::Request => self.request,
            Direction::Response => self.response,
        }
    }

    /// Reads the request body and then changes routing: needs the request headers held.
    fn steers_after_body(&self) -> bool {
        self.request == PhaseNeed::Body && self.edits.headers
    }
}

/// A compiled chain, shared by every stream of one filter configuration.
pub struct Chain {
    limits: Limits,
    processors: Vec<Processor>,
    metrics: Vec<MetricDef>,
    request_body_too_large: MetricId,
    response_body_too_large: MetricId,
    /// Background callouts in flight: host handle -> (processor index, plugin tag).
    callouts: Mutex<HashMap<u64, (usize, u64)>>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.processors.iter().map(|p| p.name.as_str()).collect();
        f.debug_struct("Chain")
            .field("limits", &self.limits)
            .field("processors", &names)
            .finish()
    }
}

impl Chain {
    /// Parses and compiles a YAML or JSON configuration.
    pub fn load(text: &str, registry: &Registry) -> Result<Chain, ConfigError> {
        Self::build(&FilterConfig::parse(text)?, registry)
    }

    /// Compiles a parsed configuration: builds every plugin, compiles matchers, declares metrics.
    pub fn build(config: &FilterConfig, registry: &Registry) -> Result<Chain, ConfigError> {
        let mut metrics = Vec::new();
        let mut define = |name: String, kind: MetricKind| {
            metrics.push(MetricDef { name, kind });
            MetricId(metrics.len() - 1)
        };
        let request_body_too_large = define("request_body_too_large".into(), MetricKind::Counter);
        let response_body_too_large = define("response_body_too_large".into(), MetricKind::Counter);
        let mut names = HashSet::new();
        let mut processors = Vec::with_capacity(config.processors.len());
        for (index, processor) in config.processors.iter().enumerate() {
            let at = |err: ConfigError| err.within(&format!("processors[{index}]"));
            let name = &processor.name;
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(at(ConfigError::new(
                    "name",
                    format!("processor name {name:?} must be non-empty letters, digits, '-' or '_'"),
                )));
            }
            if !names.insert(name.clone()) {
                return Err(at(ConfigError::new(
                    "name",
                    format!("duplicate processor name {name:?}"),
                )));
            }
            let factory = registry
                .factory(&processor.plugin_type)
                .map_err(|msg| at(ConfigError::new("type", msg)))?;
            let mut build_ctx = BuildContext::new(name);
            let plugin = factory
                .build(&processor.parameters, &mut build_ctx)
                .map_err(|err| at(err.within("parameters")))?;
            let matcher = match &processor.match_ {
                Some(config) => Matcher::compile(config).map_err(|err| at(err.within("match")))?,
                None => Matcher::default(),
            };
            let prefix = format!("processor.{name}");
            let mut define = |suffix: &str, kind| define(format!("{prefix}.{suffix}"), kind);
            let processor_metrics = ProcessorMetrics {
                invocations: define("invocations", MetricKind::Counter),
                rejections: define("rejections", MetricKind::Counter),
                errors: define("errors", MetricKind::Counter),
                fail_open: define("fail_open", MetricKind::Counter),
                budget_overruns: define("budget_overruns", MetricKind::Counter),
                panics: define("panics", MetricKind::Counter),
                latency_us: define("latency_us", MetricKind::Histogram),
                skipped_non_json: define("skipped_non_json", MetricKind::Counter),
                skipped_encoded: define("skipped_encoded", MetricKind::Counter),
            };
            let (counter_names, gauge_names) = build_ctx.into_metrics();
            let counters = counter_names
                .iter()
                .map(|counter| define(counter, MetricKind::Counter))
                .collect();
            let gauges = gauge_names
                .iter()
                .map(|gauge| define(gauge, MetricKind::Gauge))
                .collect();
            processors.push(Processor {
                name: name.clone(),
                failure_mode: processor.failure_mode,
                timeout_nanos: processor
                    .timeout
                    .map(|t| u64::try_from(t.as_nanos()).unwrap_or(u64::MAX)),
                matcher,
                request: plugin.request_need(),
                response: plugin.response_need(),
                stream: plugin.stream_need(),
                edits: plugin.request_edits(),
                plugin,
                metrics: processor_metrics,
                counters,
                gauges,
            });
        }
        Ok(Chain {
            limits: config.limits,
            processors,
            metrics,
            request_body_too_large,
            response_body_too_large,
            callouts: Mutex::new(HashMap::new()),
        })
    }

    /// Every metric the chain uses, in [`MetricId`] order.
    pub fn metrics(&self) -> &[MetricDef] {
        &self.metrics
    }

    /// The configured body limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Whether a processor reads a body (request, response or event stream), so headers wait
    /// for it when the host can hold them (see [`HeadersHold`]).
    pub fn reads_bodies(&self) -> bool {
        self.processors
            .iter()
            .any(|p| p.request == PhaseNeed::Body || p.response == PhaseNeed::Body || p.stream.is_some())
    }

    /// The processors that change routing after reading the request body.
    pub fn steering_processors(&self) -> impl Iterator<Item = &str> {
        self.processors
            .iter()
            .filter(|p| p.steers_after_body())
            .map(|p| p.name.as_str())
    }

    /// Processor names, in chain order.
    pub fn processor_names(&self) -> impl Iterator<Item = &str> {
        self.processors.iter().map(|p| p.name.as_str())
    }

    /// How often the adapter should call [`Chain::on_tick`]: the shortest interval any
    /// processor with background work asks for; `None` when none has any.
    pub fn tick_interval(&self) -> Option<Duration> {
        self.processors
            .iter()
            .filter_map(|p| p.plugin.background())
            .map(|background| background.tick_interval())
            .min()
    }

    /// Runs every processor's background tick. A panic is contained and logged.
    pub fn on_tick(&self, host: &mut dyn BackgroundHost) {
        for (index, processor) in self.processors.iter().enumerate() {
            let Some(background) = processor.plugin.background() else {
                continue;
            };
            self.run_background(host, index, |ctx| background.on_tick(ctx));
        }
    }

    /// Hands the answer of a background callout to the processor that sent it. Unknown
    /// handles (a callout of an earlier configuration) are ignored.
    pub fn on_callout_done(
        &self,
        host: &mut dyn BackgroundHost,
        handle: u64,
        result: Result<CalloutResponse, CalloutError>,
    ) {
        let Some((index, tag)) = self.lock_callouts().remove(&handle) else {
            return;
        };
        let Some(background) = self.processors.get(index).and_then(|p| p.plugin.background()) else {
            return;
        };
        self.run_background(host, index, |ctx| background.on_callout_done(ctx, tag, result));
    }

    fn lock_callouts(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (usize, u64)>> {
        // A panic while holding the lock cannot leave the map half-updated: recover it.
        self.callouts.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn run_background(
        &self,
        host: &mut dyn BackgroundHost,
        index: usize,
        work: impl FnOnce(&mut BackgroundContext<'_>),
    ) {
        let processor = &self.processors[index];
        let mut ctx = BackgroundContext {
            host,
            counters: &processor.counters,
            gauges: &processor.gauges,
            started: Vec::new(),
        };
        if catch_unwind(AssertUnwindSafe(|| work(&mut ctx))).is_err() {
            log::error!(
                "payload-processor: processor {} panicked in background work",
                processor.name
            );
            ctx.host.increment_counter(processor.metrics.panics, 1);
        }
        let started = std::mem::take(&mut ctx.started);
        let mut callouts = self.lock_callouts();
        for (handle, tag) in started {
            callouts.insert(handle, (index, tag));
        }
    }
}

/// What the adapter should tell the proxy after a headers callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadersFlow {
    /// Let the headers go on.
    Continue,
    /// Hold the headers until the body has been buffered and processed (or, for a streamed
    /// response, until the first processed bytes go out).
    WaitForBody,
    /// A local reply was sent; stop this direction.
    Stop,
}

/// What the adapter should tell the proxy after a body (or trailers) callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFlow {
    /// Let the data (and anything buffered) go on.
    Continue,
    /// Keep buffering.
    Buffer,
    /// The engine took this chunk's bytes into its own state: pass nothing on, keep the
    /// headers held, buffer nothing (a streamed response whose first bytes are still held).
    Hold,
    /// A local reply was sent; drop the data.
    Stop,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum PhaseState {
    #[default]
    Idle,
    Buffering,
    Streaming,
    Done,
}

/// Per-stream state. Create one per HTTP stream with [`Stream::new`].
pub struct Stream {
    chain: Arc<Chain>,
    /// Processors whose `match` matched the request.
    active: Vec<bool>,
    /// Processors that take part in the response, decided when its headers arrive (a body
    /// reader is dropped for a response it cannot read).
    response_active: Vec<bool>,
    request: PhaseState,
    response: PhaseState,
    events: Option<EventStream>,
    replied: bool,
    /// Each processor's per-stream state ([`Context::state`]).
    states: Vec<Option<Box<dyn Any>>>,
    started_nanos: u64,
    /// The request path, kept when a streamed response may need it (its protocol); some
    /// hosts cannot read request headers any more once the response arrives.
    request_path: String,
    /// The request headers went on before the body (the host could not hold them): the
    /// header-stage processors already ran, and the body processors cannot change headers.
    request_released: bool,
    /// The same for the response headers.
    response_released: bool,
}

enum Failure {
    Error(PluginError),
    Overrun,
    Panic,
}

/// What a plugin asked for, whichever callback it was.
enum Step {
    Continue,
    Drop,
    Reject(LocalReply),
}

impl From<Decision> for Step {
    fn from(decision: Decision) -> Self {
        match decision {
            Decision::Continue => Step::Continue,
            Decision::Reject(reply) => Step::Reject(reply),
        }
    }
}

impl From<EventDecision> for Step {
    fn from(decision: EventDecision) -> Self {
        match decision {
            EventDecision::Continue => Step::Continue,
            EventDecision::Drop => Step::Drop,
            EventDecision::Reject(reply) => Step::Reject(reply),
        }
    }
}

/// What one processor callback works on.
struct Scope<'b> {
    direction: Direction,
    body: &'b mut Body,
    /// Set when the plugin changed a request header (the route cache must be cleared).
    request_headers_changed: Option<&'b mut bool>,
    headers_sent: bool,
    /// Where events a plugin emits go (only while it handles a streamed response).
    emitted: Option<&'b mut Vec<SseEvent>>,
}

impl<'b> Scope<'b> {
    /// A response event or end of stream: no body, no request headers to change.
    fn response_event(body: &'b mut Body, headers_sent: bool, emitted: &'b mut Vec<SseEvent>) -> Self {
        Scope {
            direction: Direction::Response,
            body,
            request_headers_changed: None,
            headers_sent,
            emitted: Some(emitted),
        }
    }
}

/// A processor's outcome after its failure mode was applied.
enum Verdict {
    /// Go on (the plugin continued, or failed open).
    Continue,
    /// Go on without this event.
    Drop,
    /// End the exchange with this reply; the second field is the response code details.
    Stop(LocalReply, String),
}

/// Media type of a `content-type` value, lower-cased, without parameters.
fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

impl Stream {
    /// A fresh stream of `chain`.
    pub fn new(chain: Arc<Chain>) -> Self {
        Self {
            chain,
            active: Vec::new(),
            response_active: Vec::new(),
            request: PhaseState::Idle,
            response: PhaseState::Idle,
            events: None,
            replied: false,
            states: Vec::new(),
            started_nanos: 0,
            request_path: String::new(),
            request_released: false,
            response_released: false,
        }
    }

    /// Whether this direction's headers went on before its body (the host could not hold
    /// them): a host that can only read held headers must read them another way.
    pub fn headers_released(&self, direction: Direction) -> bool {
        self.released(direction)
    }

    /// True once the engine sent a local reply for this stream.
    pub fn replied(&self) -> bool {
        self.replied
    }

    /// Request headers arrived. Decides which processors apply and whether to buffer.
    pub fn on_request_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> HeadersFlow {
        let chain = Arc::clone(&self.chain);
        self.started_nanos = host.now_nanos();
        self.active = chain.processors.iter().map(|p| p.matcher.matches(host)).collect();
        self.response_active = vec![false; chain.processors.len()];
        self.states = chain.processors.iter().map(|_| None).collect();
        let reads_response = chain
            .processors
            .iter()
            .zip(&self.active)
            .any(|(p, active)| *active && (p.response == PhaseNeed::Body || p.stream.is_some()));
        let reads_events = chain
            .processors
            .iter()
            .zip(&self.active)
            .any(|(p, active)| *active && p.stream.is_some());
        if reads_events {
            self.request_path = host.header(Direction::Request, ":path").unwrap_or_default();
        }
        if reads_response {
            // Response plugins must see plain text: ask the upstream not to compress. (To
            // compress towards the client, put Envoy's compressor filter before this one.)
            host.set_header(Direction::Request, "accept-encoding", "identity");
        }
        // A compressed request body cannot be inspected (decoding in the proxy would cost every
        // request CPU and memory): refuse it when a fail-closed body reader needs it (415),
        // otherwise those readers sit this request out.
        let encoding = host
            .header(Direction::Request, "content-encoding")
            .map(|e| e.trim().to_ascii_lowercase())
            .filter(|e| !e.is_empty() && e != "identity");
        if let Some(encoding) = encoding.filter(|_| !end_of_stream) {
            for (index, processor) in chain.processors.iter().enumerate() {
                if !self.active[index] || processor.request != PhaseNeed::Body {
                    continue;
                }
                if processor.failure_mode == FailureMode::FailClosed {
                    let message = format!(
                        "request bodies with content-encoding {encoding} cannot be inspected by processor {}; \
                         send the body uncompressed",
                        processor.name
                    );
                    let reply = LocalReply::json_error(415, "unsupported_content_encoding", &message);
                    self.reply(host, &reply, "payload_processor.request_encoded");
                    return HeadersFlow::Stop;
                }
                host.increment_counter(processor.metrics.skipped_encoded, 1);
                self.active[index] = false;
            }
        }
        self.on_headers(host, Direction::Request, end_of_stream)
    }

    /// A request body chunk arrived (`end_of_stream` on the last one).
    pub fn on_request_body(&mut self, host: &mut dyn Host, end_of_stream: bool) -> BodyFlow {
        self.on_body(host, Direction::Request, end_of_stream)
    }

    /// Request trailers arrived: the body (if any) is complete.
    pub fn on_request_trailers(&mut self, host: &mut dyn Host) -> BodyFlow {
        self.on_body(host, Direction::Request, true)
    }

    /// Response headers arrived. Decides, from the content type and encoding, which response
    /// processors can run, and whether to pass through, buffer, or stream events.
    pub fn on_response_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> HeadersFlow {
        if self.replied {
            return HeadersFlow::Continue; // our own local reply passing through the encoder
        }
        let chain = Arc::clone(&self.chain);
        if self.active.len() != chain.processors.len() {
            return HeadersFlow::Continue; // no request headers were seen
        }
        // Request-only chains (body routing) leave answers alone without reading a header.
        let looks_at_response = chain
            .processors
            .iter()
            .zip(&self.active)
            .any(|(p, active)| *active && (p.response != PhaseNeed::Skip || p.stream.is_some()));
        if !looks_at_response {
            return HeadersFlow::Continue;
        }
        let media = media_type(&host.header(Direction::Response, "content-type").unwrap_or_default());
        let event_stream = media == "text/event-stream";
        let json = media == "application/json" || media.ends_with("+json");
        let encoding = host
            .header(Direction::Response, "content-encoding")
            .map(|e| e.trim().to_ascii_lowercase())
            .filter(|e| !e.is_empty() && e != "identity");
        let mut hold_back: Option<usize> = None;
        for (index, processor) in chain.processors.iter().enumerate() {
            self.response_active[index] = false;
            if !self.active[index] {
                continue;
            }
            let reads_events = event_stream && !end_of_stream && processor.stream.is_some();
            let reads_body = processor.response == PhaseNeed::Body && (json || end_of_stream);
            if reads_events || reads_body {
                if let Some(encoding) = encoding.as_deref().filter(|_| !end_of_stream) {
                    if processor.failure_mode == FailureMode::FailClosed {
                        let message = format!(
                            "the upstream answered with content-encoding {encoding}, which processor {} cannot \
                             inspect",
                            processor.name
                        );
                        let reply = LocalReply::json_error(502, "response_encoded", &message);
                        self.reply(host, &reply, "payload_processor.response_encoded");
                        return HeadersFlow::Stop;
                    }
                    host.increment_counter(processor.metrics.skipped_encoded, 1);
                    continue;
                }
                self.response_active[index] = true;
                if reads_events {
                    let window = processor.stream.unwrap_or_default().hold_back_bytes;
                    hold_back = Some(hold_back.unwrap_or(0).max(window));
                }
            } else if processor.response == PhaseNeed::Body {
                host.increment_counter(processor.metrics.skipped_non_json, 1);
            } else if processor.response == PhaseNeed::Headers {
                self.response_active[index] = true;
            }
        }
        let Some(hold_back) = hold_back else {
            return self.on_headers(host, Direction::Response, end_of_stream);
        };
        let released = matches!(host.headers_hold(), HeadersHold::Unavailable(_));
        // A streamed response: header-stage processors run now, event processors per event.
        self.response = PhaseState::Streaming;
        if !self.run(host, Direction::Response, Body::default(), true) {
            return HeadersFlow::Stop;
        }
        // Events may change length; a stream with a content-length would be cut or padded.
        host.remove_header(Direction::Response, "content-length");
        let path = std::mem::take(&mut self.request_path);
        let max_event = usize::try_from(self.chain.limits.max_response_body_bytes).unwrap_or(usize::MAX);
        let processors = (0..chain.processors.len())
            .filter(|&i| self.response_active[i] && chain.processors[i].stream.is_some())
            .collect();
        let mut events = EventStream::new(max_event, hold_back, Api::from_path(&path), processors);
        if released {
            // The headers go now: a later rejection ends the stream with a terminal event.
            self.response_released = true;
            events.started = true;
            self.events = Some(events);
            return HeadersFlow::Continue;
        }
        self.events = Some(events);
        HeadersFlow::WaitForBody
    }

    /// A response body chunk arrived.
    pub fn on_response_body(&mut self, host: &mut dyn Host, end_of_stream: bool) -> BodyFlow {
        if self.replied && self.response == PhaseState::Idle {
            return BodyFlow::Continue;
        }
        if self.response == PhaseState::Streaming {
            return self.on_stream_data(host, end_of_stream);
        }
        self.on_body(host, Direction::Response, end_of_stream)
    }

    /// Response trailers arrived.
    pub fn on_response_trailers(&mut self, host: &mut dyn Host) -> BodyFlow {
        if self.response == PhaseState::Streaming {
            return self.on_stream_data(host, true);
        }
        self.on_body(host, Direction::Response, true)
    }

    fn mask(&self, direction: Direction) -> &[bool] {
        match direction {
            Direction::Request => &self.active,
            Direction::Response => &self.response_active,
        }
    }

    fn need(&self, direction: Direction) -> PhaseNeed {
        self.chain
            .processors
            .iter()
            .zip(self.mask(direction))
            .filter(|(_, active)| **active)
            .map(|(p, _)| p.need(direction))
            .max()
            .unwrap_or(PhaseNeed::Skip)
    }

    fn state(&mut self, direction: Direction) -> &mut PhaseState {
        match direction {
            Direction::Request => &mut self.request,
            Direction::Response => &mut self.response,
        }
    }

    fn limit(&self, direction: Direction) -> u64 {
        match direction {
            Direction::Request => self.chain.limits.max_request_body_bytes,
            Direction::Response => self.chain.limits.max_response_body_bytes,
        }
    }

    fn on_headers(&mut self, host: &mut dyn Host, direction: Direction, end_of_stream: bool) -> HeadersFlow {
        match self.need(direction) {
            PhaseNeed::Skip => HeadersFlow::Continue,
            PhaseNeed::Body if !end_of_stream => {
                let declared = host
                    .header(direction, "content-length")
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if declared.is_some_and(|len| len > self.limit(direction)) {
                    return self.too_large(host, direction);
                }
                host.raise_buffer_limit(self.limit(direction));
                *self.state(direction) = PhaseState::Buffering;
                // Unknown: hold, and the adapter finds out whether the hold takes effect.
                if let HeadersHold::Unavailable(fix) = host.headers_hold() {
                    return match direction {
                        Direction::Request => self.release_request_headers(host, fix),
                        Direction::Response => self.release_response_headers(host),
                    };
                }
                HeadersFlow::WaitForBody
            }
            // Header-only chains, and body chains when there is no body: run now on an empty body.
            _ => {
                *self.state(direction) = PhaseState::Done;
                if self.run(host, direction, Body::default(), false) {
                    HeadersFlow::Continue
                } else {
                    HeadersFlow::Stop
                }
            }
        }
    }

    /// Active processors that change routing after reading the request body.
    fn active_steering(&self) -> impl Iterator<Item = usize> + '_ {
        self.chain
            .processors
            .iter()
            .enumerate()
            .filter(|(index, p)| self.active[*index] && p.steers_after_body())
            .map(|(index, _)| index)
    }

    /// The adapter found that the request headers it was asked to hold went on waiting for a
    /// resume that no body callback would ever trigger (proxy-wasm without
    /// `allow_on_headers_stop_iteration`). Call it while the headers are still paused: the
    /// chain continues as [`HeadersHold::Unavailable`] prescribes. [`HeadersFlow::Continue`]
    /// means resume the request; [`HeadersFlow::Stop`] means a local reply was sent.
    pub fn on_request_headers_hold_failed(&mut self, host: &mut dyn Host, fix: &'static str) -> HeadersFlow {
        if self.replied || self.request != PhaseState::Buffering || self.request_released {
            return HeadersFlow::Continue;
        }
        self.release_request_headers(host, fix)
    }

    /// Lets the request headers go before the body: processors that change routing after the
    /// body follow their failure mode (fail-closed ones answer with an error saying how to fix
    /// the host, `fix`), header-stage processors run now while the headers are still here, and
    /// `content-length` goes when a body processor may change the body. The body processors
    /// run at the end of the body as usual, with the headers already gone.
    fn release_request_headers(&mut self, host: &mut dyn Host, fix: &'static str) -> HeadersFlow {
        let chain = Arc::clone(&self.chain);
        let steering: Vec<usize> = self.active_steering().collect();
        for index in steering {
            let processor = &chain.processors[index];
            if processor.failure_mode == FailureMode::FailClosed {
                let message = format!(
                    "processor {} changes routing after reading the request body, but this filter cannot hold the \
                     request headers until then: {fix}",
                    processor.name
                );
                host.increment_counter(processor.metrics.errors, 1);
                let reply = LocalReply::json_error(500, "headers_hold_unavailable", &message);
                self.reply(
                    host,
                    &reply,
                    &format!("payload_processor.{}.headers_hold_unavailable", processor.name),
                );
                return HeadersFlow::Stop;
            }
            log::debug!(
                "processor {} skipped: it changes routing after the body and the headers cannot wait",
                processor.name
            );
            host.increment_counter(processor.metrics.fail_open, 1);
            self.active[index] = false;
        }
        self.request_released = true;
        if !self.run(host, Direction::Request, Body::default(), true) {
            return HeadersFlow::Stop;
        }
        let edits_body = chain
            .processors
            .iter()
            .zip(&self.active)
            .any(|(p, active)| *active && p.request == PhaseNeed::Body && p.edits.body);
        if edits_body {
            // The body may change length after the headers left: send it chunked.
            host.remove_header(Direction::Request, "content-length");
        }
        HeadersFlow::Continue
    }

    /// Lets a buffered response's headers go before its body: header-stage processors run now,
    /// `content-length` goes (a processor may change the body), the body processors run at its
    /// end with the headers gone.
    fn release_response_headers(&mut self, host: &mut dyn Host) -> HeadersFlow {
        self.response_released = true;
        if !self.run(host, Direction::Response, Body::default(), true) {
            return HeadersFlow::Stop;
        }
        host.remove_header(Direction::Response, "content-length");
        HeadersFlow::Continue
    }

    fn released(&self, direction: Direction) -> bool {
        match direction {
            Direction::Request => self.request_released,
            Direction::Response => self.response_released,
        }
    }

    fn on_body(&mut self, host: &mut dyn Host, direction: Direction, end_of_stream: bool) -> BodyFlow {
        if self.replied {
            return BodyFlow::Stop;
        }
        if *self.state(direction) != PhaseState::Buffering {
            return BodyFlow::Continue;
        }
        if host.body_len(direction) > self.limit(direction) {
            return match self.too_large(host, direction) {
                HeadersFlow::Stop => BodyFlow::Stop,
                _ => BodyFlow::Continue,
            };
        }
        if !end_of_stream {
            return BodyFlow::Buffer;
        }
        *self.state(direction) = PhaseState::Done;
        let body = Body::new(host.read_body(direction));
        if self.run(host, direction, body, false) {
            BodyFlow::Continue
        } else {
            BodyFlow::Stop
        }
    }

    /// A body over the limit: 413 for requests. For responses, 502 when a fail-closed processor
    /// needed the body, otherwise the body-needing processors are skipped and bytes flow on.
    fn too_large(&mut self, host: &mut dyn Host, direction: Direction) -> HeadersFlow {
        let limit = self.limit(direction);
        match direction {
            Direction::Request => {
                host.increment_counter(self.chain.request_body_too_large, 1);
                let reply = LocalReply::json_error(
                    413,
                    "request_too_large",
                    &format!("request body exceeds the limit of {limit} bytes"),
                );
                self.reply(host, &reply, "payload_processor.request_body_too_large");
                HeadersFlow::Stop
            }
            Direction::Response => {
                host.increment_counter(self.chain.response_body_too_large, 1);
                *self.state(direction) = PhaseState::Done;
                let chain = Arc::clone(&self.chain);
                let readers = chain
                    .processors
                    .iter()
                    .zip(&self.response_active)
                    .filter(|(p, active)| **active && p.response == PhaseNeed::Body);
                if readers.clone().any(|(p, _)| p.failure_mode == FailureMode::FailClosed) {
                    if self.response_released {
                        log::warn!("response body over {limit} bytes after its headers went out: resetting the stream");
                        self.replied = true;
                        host.reset_stream();
                        return HeadersFlow::Stop;
                    }
                    let reply = LocalReply::json_error(
                        502,
                        "response_too_large",
                        &format!("response body exceeds the limit of {limit} bytes"),
                    );
                    self.reply(host, &reply, "payload_processor.response_body_too_large");
                    HeadersFlow::Stop
                } else {
                    for (p, _) in readers {
                        host.increment_counter(p.metrics.fail_open, 1);
                    }
                    log::warn!("response body over {limit} bytes: skipping fail-open response processors");
                    HeadersFlow::Continue
                }
            }
        }
    }

    fn reply(&mut self, host: &mut dyn Host, reply: &LocalReply, details: &str) {
        self.replied = true;
        host.send_local_reply(reply.status, &reply.headers, &reply.body, details);
    }

    /// Runs the active processors of `direction` in order (with `headers_stage`, only the
    /// header-only ones), then applies the changes. Returns false when a local reply was sent.
    fn run(&mut self, host: &mut dyn Host, direction: Direction, mut body: Body, headers_stage: bool) -> bool {
        let chain = Arc::clone(&self.chain);
        let mut request_headers_changed = false;
        // After an early release the header-stage processors already ran, and the headers
        // are gone.
        let headers_gone = self.released(direction) && !headers_stage;
        for (index, processor) in chain.processors.iter().enumerate() {
            let need = processor.need(direction);
            if !self.mask(direction)[index]
                || need == PhaseNeed::Skip
                || (headers_stage && need != PhaseNeed::Headers)
                || (headers_gone && need == PhaseNeed::Headers)
            {
                continue;
            }
            let verdict = self.invoke(
                host,
                index,
                Scope {
                    direction,
                    body: &mut body,
                    request_headers_changed: Some(&mut request_headers_changed),
                    headers_sent: headers_gone,
                    emitted: None,
                },
                |plugin, ctx| {
                    match direction {
                        Direction::Request => plugin.on_request(ctx),
                        Direction::Response => plugin.on_response(ctx),
                    }
                    .map(Step::from)
                },
            );
            if let Verdict::Stop(reply, details) = verdict {
                if headers_gone && direction == Direction::Response {
                    // The status went out with the headers: end the exchange instead.
                    log::warn!("{details}: the response headers already went out, resetting the stream");
                    self.replied = true;
                    host.reset_stream();
                    return false;
                }
                self.reply(host, &reply, &details);
                return false;
            }
        }
        if let Some(bytes) = body.take_changes() {
            host.replace_body(direction, &bytes);
            if !headers_gone {
                host.set_header(direction, "content-length", &bytes.len().to_string());
            }
        }
        if request_headers_changed && !headers_gone {
            host.clear_route_cache();
        }
        true
    }

    /// Runs one processor callback with its budget, metrics, panic guard and failure mode.
    fn invoke(
        &mut self,
        host: &mut dyn Host,
        index: usize,
        scope: Scope<'_>,
        call: impl FnOnce(&dyn Plugin, &mut Context<'_>) -> Result<Step, PluginError>,
    ) -> Verdict {
        let Scope {
            direction,
            body,
            request_headers_changed: changed_headers,
            headers_sent,
            emitted,
        } = scope;
        let mut request_headers_changed = false;
        let chain = Arc::clone(&self.chain);
        let processor = &chain.processors[index];
        let metrics = processor.metrics;
        let started = host.now_nanos();
        let deadline_nanos = processor.timeout_nanos.map(|budget| started.saturating_add(budget));
        let started_nanos = self.started_nanos;
        let state = &mut self.states[index];
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let mut ctx = Context {
                host: &mut *host,
                direction,
                body,
                request_headers_changed: &mut request_headers_changed,
                deadline_nanos,
                counters: &processor.counters,
                gauges: &processor.gauges,
                state,
                started_nanos,
                headers_sent,
                emitted,
            };
            call(processor.plugin.as_ref(), &mut ctx)
        }));
        if let Some(changed) = changed_headers {
            *changed |= request_headers_changed;
        }
        let elapsed = host.now_nanos().saturating_sub(started);
        host.increment_counter(metrics.invocations, 1);
        host.record_histogram(metrics.latency_us, elapsed / 1_000);
        let overran = processor.timeout_nanos.is_some_and(|budget| elapsed > budget);
        if overran {
            host.increment_counter(metrics.budget_overruns, 1);
        }
        let failure = match outcome {
            Ok(Ok(Step::Continue | Step::Drop)) if overran => Failure::Overrun,
            Ok(Ok(Step::Continue)) => return Verdict::Continue,
            Ok(Ok(Step::Drop)) => return Verdict::Drop,
            Ok(Ok(Step::Reject(reply))) => {
                host.increment_counter(metrics.rejections, 1);
                log::debug!(
                    "processor {} rejected the {} with {}",
                    processor.name,
                    direction.as_str(),
                    reply.status
                );
                return Verdict::Stop(reply, format!("payload_processor.{}.rejected", processor.name));
            }
            Ok(Err(error)) => Failure::Error(error),
            Err(_) => Failure::Panic,
        };
        let (reply, reason) = match &failure {
            Failure::Error(error) => {
                host.increment_counter(metrics.errors, 1);
                (
                    LocalReply::json_error(error.status.unwrap_or(500), &error.code, &error.message),
                    error.message.clone(),
                )
            }
            Failure::Overrun => (
                LocalReply::json_error(
                    500,
                    "processor_budget_exceeded",
                    &format!("processor {} exceeded its latency budget", processor.name),
                ),
                format!("latency budget exceeded ({elapsed} ns)"),
            ),
            Failure::Panic => {
                host.increment_counter(metrics.panics, 1);
                (
                    LocalReply::json_error(
                        500,
                        "processor_panic",
                        &format!("processor {} failed internally", processor.name),
                    ),
                    "panicked".to_string(),
                )
            }
        };
        // A panic leaves the plugin's work in an unknown state: always fail closed.
        if processor.failure_mode == FailureMode::FailOpen && !matches!(failure, Failure::Panic) {
            host.increment_counter(metrics.fail_open, 1);
            log::warn!(
                "processor {} failed open on the {}: {reason}",
                processor.name,
                direction.as_str()
            );
            return Verdict::Continue;
        }
        log::warn!(
            "processor {} failed closed on the {}: {reason}",
            processor.name,
            direction.as_str()
        );
        Verdict::Stop(reply, format!("payload_processor.{}.failed", processor.name))
    }

    /// A chunk of a streamed response: parse events, run the event processors on each, hold
    /// back the window, release the rest (everything at end of stream).
    fn on_stream_data(&mut self, host: &mut dyn Host, end_of_stream: bool) -> BodyFlow {
        if self.replied {
            return BodyFlow::Stop;
        }
        let Some(mut events) = self.events.take() else {
            return BodyFlow::Continue;
        };
        let flow = self.stream_chunk(host, &mut events, end_of_stream);
        self.events = Some(events);
        flow
    }

    fn stream_chunk(&mut self, host: &mut dyn Host, stream: &mut EventStream, end_of_stream: bool) -> BodyFlow {
        if stream.passthrough {
            return BodyFlow::Continue;
        }
        let chunk = host.read_body(Direction::Response);
        if stream.finished {
            // The client already has its terminal event: swallow the rest of the upstream's.
            if !chunk.is_empty() {
                host.replace_body(Direction::Response, &[]);
            }
            return BodyFlow::Continue;
        }
        stream.parser.push(&chunk);
        let processors = std::mem::take(&mut stream.processors);
        let mut stop: Option<(LocalReply, String)> = None;
        loop {
            match stream.parser.next_event(end_of_stream) {
                Ok(Some(mut event)) => {
                    if event.is_empty() {
                        stream.hold(event.to_bytes());
                        continue;
                    }
                    stream.observe(&mut event);
                    let mut passed = Vec::new();
                    stop = self.run_event(host, &processors, event, stream.started, &mut passed);
                    for event in passed {
                        stream.hold(event.to_bytes());
                    }
                    if stop.is_some() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(too_large) => {
                    host.increment_counter(self.chain.response_body_too_large, 1);
                    let chain = Arc::clone(&self.chain);
                    let fail_closed = processors
                        .iter()
                        .any(|&i| chain.processors[i].failure_mode == FailureMode::FailClosed);
                    if fail_closed {
                        let reply = LocalReply::json_error(502, "response_event_too_large", &too_large.to_string());
                        stop = Some((reply, "payload_processor.response_event_too_large".into()));
                    } else {
                        log::warn!("{too_large}: passing the rest of the stream through unread");
                        for &i in &processors {
                            host.increment_counter(chain.processors[i].metrics.fail_open, 1);
                        }
                        stream.passthrough = true;
                    }
                    break;
                }
            }
        }
        if stop.is_none() && end_of_stream && !stream.passthrough {
            let mut passed = Vec::new();
            stop = self.run_stream_end(host, &processors, stream.started, &mut passed);
            for event in passed {
                stream.hold(event.to_bytes());
            }
        }
        stream.processors = processors;
        let mut out = Vec::new();
        match stop {
            Some((reply, details)) => {
                stream.discard_held();
                stream.parser.take_pending();
                stream.finished = true;
                if !stream.started {
                    // Nothing reached the client yet: an ordinary error response.
                    self.reply(host, &reply, &details);
                    return BodyFlow::Stop;
                }
                log::debug!("ending a started event stream ({details})");
                out = stream.terminal_events(&reply);
            }
            None => {
                stream.release(&mut out, end_of_stream || stream.passthrough);
                if stream.passthrough {
                    out.extend(stream.parser.take_pending());
                }
            }
        }
        if out != chunk {
            host.replace_body(Direction::Response, &out);
        }
        if out.is_empty() && !stream.started && !end_of_stream {
            return BodyFlow::Hold;
        }
        stream.started = true;
        BodyFlow::Continue
    }

    /// Runs the event processors on one event, in order. Events a processor emits go through
    /// the processors after it, ahead of the event; whatever survives lands in `out`, in order.
    /// Returns the reply that stops the stream, if one did.
    fn run_event(
        &mut self,
        host: &mut dyn Host,
        processors: &[usize],
        mut event: SseEvent,
        headers_sent: bool,
        out: &mut Vec<SseEvent>,
    ) -> Option<(LocalReply, String)> {
        for (position, &index) in processors.iter().enumerate() {
            let mut emitted = Vec::new();
            let verdict = self.invoke(
                host,
                index,
                Scope::response_event(&mut Body::default(), headers_sent, &mut emitted),
                |plugin, ctx| plugin.on_response_event(ctx, &mut event).map(Step::from),
            );
            if let Verdict::Stop(reply, details) = verdict {
                return Some((reply, details));
            }
            for extra in emitted {
                if let Some(stop) = self.run_event(host, &processors[position + 1..], extra, headers_sent, out) {
                    return Some(stop);
                }
            }
            if let Verdict::Drop = verdict {
                return None;
            }
        }
        out.push(event);
        None
    }

    /// Tells the event processors the stream ended; the first rejection wins. Events they
    /// emit go through the processors after them and land in `out`.
    fn run_stream_end(
        &mut self,
        host: &mut dyn Host,
        processors: &[usize],
        headers_sent: bool,
        out: &mut Vec<SseEvent>,
    ) -> Option<(LocalReply, String)> {
        for (position, &index) in processors.iter().enumerate() {
            let mut emitted = Vec::new();
            let verdict = self.invoke(
                host,
                index,
                Scope::response_event(&mut Body::default(), headers_sent, &mut emitted),
                |plugin, ctx| plugin.on_stream_end(ctx).map(Step::from),
            );
            if let Verdict::Stop(reply, details) = verdict {
                return Some((reply, details));
            }
            for extra in emitted {
                if let Some(stop) = self.run_event(host, &processors[position + 1..], extra, headers_sent, out) {
                    return Some(stop);
                }
            }
        }
        None
    }
}
