//! The chain runner: compiles a configuration once, then drives each stream through it.

use crate::config::{FailureMode, FilterConfig, Limits};
use crate::error::ConfigError;
use crate::host::{Direction, Host, MetricId};
use crate::json::Body;
use crate::matcher::Matcher;
use crate::plugin::{Context, Decision, LocalReply, PhaseNeed, Plugin, PluginError};
use crate::registry::{BuildContext, Registry};
use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// Kind of a metric the chain declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Monotonic counter.
    Counter,
    /// Histogram of samples (latencies in microseconds).
    Histogram,
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
}

struct Processor {
    name: String,
    failure_mode: FailureMode,
    timeout_nanos: Option<u64>,
    matcher: Matcher,
    plugin: Arc<dyn Plugin>,
    request: PhaseNeed,
    response: PhaseNeed,
    metrics: ProcessorMetrics,
    counters: Vec<MetricId>,
}

impl Processor {
    fn need(&self, direction: Direction) -> PhaseNeed {
        match direction {
            Direction::Request => self.request,
            Direction::Response => self.response,
        }
    }
}

/// A compiled chain, shared by every stream of one filter configuration.
pub struct Chain {
    limits: Limits,
    processors: Vec<Processor>,
    metrics: Vec<MetricDef>,
    request_body_too_large: MetricId,
    response_body_too_large: MetricId,
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
            };
            let counters = build_ctx
                .into_counters()
                .iter()
                .map(|counter| define(counter, MetricKind::Counter))
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
                plugin,
                metrics: processor_metrics,
                counters,
            });
        }
        Ok(Chain {
            limits: config.limits,
            processors,
            metrics,
            request_body_too_large,
            response_body_too_large,
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

    /// Processor names, in chain order.
    pub fn processor_names(&self) -> impl Iterator<Item = &str> {
        self.processors.iter().map(|p| p.name.as_str())
    }
}

/// What the adapter should tell the proxy after a headers callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadersFlow {
    /// Let the headers go on.
    Continue,
    /// Hold the headers until the body has been buffered and processed.
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
    /// A local reply was sent; drop the data.
    Stop,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum PhaseState {
    #[default]
    Idle,
    Buffering,
    Done,
}

/// Per-stream state. Create one per HTTP stream with [`Stream::new`].
pub struct Stream {
    chain: Arc<Chain>,
    active: Vec<bool>,
    request: PhaseState,
    response: PhaseState,
    replied: bool,
}

enum Failure {
    Error(PluginError),
    Overrun,
    Panic,
}

impl Stream {
    /// A fresh stream of `chain`.
    pub fn new(chain: Arc<Chain>) -> Self {
        Self {
            chain,
            active: Vec::new(),
            request: PhaseState::Idle,
            response: PhaseState::Idle,
            replied: false,
        }
    }

    /// True once the engine sent a local reply for this stream.
    pub fn replied(&self) -> bool {
        self.replied
    }

    /// Request headers arrived. Decides which processors apply and whether to buffer.
    pub fn on_request_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> HeadersFlow {
        let chain = Arc::clone(&self.chain);
        self.active = chain.processors.iter().map(|p| p.matcher.matches(host)).collect();
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

    /// Response headers arrived.
    pub fn on_response_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> HeadersFlow {
        if self.replied {
            return HeadersFlow::Continue; // our own local reply passing through the encoder
        }
        self.on_headers(host, Direction::Response, end_of_stream)
    }

    /// A response body chunk arrived.
    pub fn on_response_body(&mut self, host: &mut dyn Host, end_of_stream: bool) -> BodyFlow {
        if self.replied && self.response == PhaseState::Idle {
            return BodyFlow::Continue;
        }
        self.on_body(host, Direction::Response, end_of_stream)
    }

    /// Response trailers arrived.
    pub fn on_response_trailers(&mut self, host: &mut dyn Host) -> BodyFlow {
        self.on_body(host, Direction::Response, true)
    }

    fn need(&self, direction: Direction) -> PhaseNeed {
        self.chain
            .processors
            .iter()
            .zip(&self.active)
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
                HeadersFlow::WaitForBody
            }
            // Header-only chains, and body chains when there is no body: run now on an empty body.
            _ => {
                *self.state(direction) = PhaseState::Done;
                if self.run(host, direction, Body::default()) {
                    HeadersFlow::Continue
                } else {
                    HeadersFlow::Stop
                }
            }
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
        if self.run(host, direction, body) {
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
                let fail_closed = chain.processors.iter().zip(&self.active).any(|(p, active)| {
                    *active && p.response == PhaseNeed::Body && p.failure_mode == FailureMode::FailClosed
                });
                if fail_closed {
                    let reply = LocalReply::json_error(
                        502,
                        "response_too_large",
                        &format!("response body exceeds the limit of {limit} bytes"),
                    );
                    self.reply(host, &reply, "payload_processor.response_body_too_large");
                    HeadersFlow::Stop
                } else {
                    for (p, _) in chain
                        .processors
                        .iter()
                        .zip(&self.active)
                        .filter(|(p, a)| **a && p.response == PhaseNeed::Body)
                    {
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

    /// Runs the active processors of `direction` in order, then applies the changes.
    /// Returns false when a local reply was sent.
    fn run(&mut self, host: &mut dyn Host, direction: Direction, mut body: Body) -> bool {
        let chain = Arc::clone(&self.chain);
        let mut request_headers_changed = false;
        for (processor, _) in chain
            .processors
            .iter()
            .zip(&self.active)
            .filter(|(p, active)| **active && p.need(direction) != PhaseNeed::Skip)
        {
            let metrics = processor.metrics;
            let started = host.now_nanos();
            let deadline_nanos = processor.timeout_nanos.map(|budget| started.saturating_add(budget));
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                let mut ctx = Context {
                    host: &mut *host,
                    direction,
                    body: &mut body,
                    request_headers_changed: &mut request_headers_changed,
                    deadline_nanos,
                    counters: &processor.counters,
                };
                match direction {
                    Direction::Request => processor.plugin.on_request(&mut ctx),
                    Direction::Response => processor.plugin.on_response(&mut ctx),
                }
            }));
            let elapsed = host.now_nanos().saturating_sub(started);
            host.increment_counter(metrics.invocations, 1);
            host.record_histogram(metrics.latency_us, elapsed / 1_000);
            let overran = processor.timeout_nanos.is_some_and(|budget| elapsed > budget);
            if overran {
                host.increment_counter(metrics.budget_overruns, 1);
            }
            let result = match outcome {
                Ok(Ok(Decision::Continue)) if overran => Err(Failure::Overrun),
                Ok(Ok(decision)) => Ok(decision),
                Ok(Err(error)) => Err(Failure::Error(error)),
                Err(_) => Err(Failure::Panic),
            };
            match result {
                Ok(Decision::Continue) => {}
                Ok(Decision::Reject(reply)) => {
                    host.increment_counter(metrics.rejections, 1);
                    log::debug!(
                        "processor {} rejected the {} with {}",
                        processor.name,
                        direction.as_str(),
                        reply.status
                    );
                    self.reply(host, &reply, &format!("payload_processor.{}.rejected", processor.name));
                    return false;
                }
                Err(failure) => {
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
                        continue;
                    }
                    log::warn!(
                        "processor {} failed closed on the {}: {reason}",
                        processor.name,
                        direction.as_str()
                    );
                    self.reply(host, &reply, &format!("payload_processor.{}.failed", processor.name));
                    return false;
                }
            }
        }
        if let Some(bytes) = body.take_changes() {
            host.replace_body(direction, &bytes);
            host.set_header(direction, "content-length", &bytes.len().to_string());
        }
        if request_headers_changed {
            host.clear_route_cache();
        }
        true
    }
}
