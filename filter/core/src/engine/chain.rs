//! The chain: compiled once per configuration (processors, matchers, metrics), shared by
//! every stream; background ticks and callouts.

use crate::background::{BackgroundContext, BackgroundHost, CalloutError, CalloutResponse};
use crate::config::{FailureMode, FilterConfig, Limits};
use crate::error::ConfigError;
use crate::host::{Direction, MetricId};
use crate::matcher::Matcher;
use crate::plugin::{PhaseNeed, Plugin, RequestEdits, StreamNeed};
use crate::registry::{BuildContext, Registry};
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
pub(super) struct ProcessorMetrics {
    pub(super) invocations: MetricId,
    pub(super) rejections: MetricId,
    pub(super) errors: MetricId,
    pub(super) fail_open: MetricId,
    pub(super) budget_overruns: MetricId,
    pub(super) panics: MetricId,
    pub(super) latency_us: MetricId,
    pub(super) skipped_non_json: MetricId,
    pub(super) skipped_encoded: MetricId,
}

pub(super) struct Processor {
    pub(super) name: String,
    pub(super) failure_mode: FailureMode,
    pub(super) timeout_nanos: Option<u64>,
    pub(super) matcher: Matcher,
    pub(super) plugin: Arc<dyn Plugin>,
    pub(super) request: PhaseNeed,
    pub(super) response: PhaseNeed,
    pub(super) stream: Option<StreamNeed>,
    /// What it may change in the request after reading the body.
    pub(super) edits: RequestEdits,
    pub(super) metrics: ProcessorMetrics,
    pub(super) counters: Vec<MetricId>,
    pub(super) gauges: Vec<MetricId>,
}

impl Processor {
    pub(super) fn need(&self, direction: Direction) -> PhaseNeed {
        match direction {
            Direction::Request => self.request,
            Direction::Response => self.response,
        }
    }

    /// Reads the request body and then changes routing: needs the request headers held.
    pub(super) fn steers_after_body(&self) -> bool {
        self.request == PhaseNeed::Body && self.edits.headers
    }
}

/// A compiled chain, shared by every stream of one filter configuration.
pub struct Chain {
    pub(super) limits: Limits,
    pub(super) processors: Vec<Processor>,
    pub(super) metrics: Vec<MetricDef>,
    pub(super) request_body_too_large: MetricId,
    pub(super) response_body_too_large: MetricId,
    /// Background callouts in flight: host handle -> (processor index, plugin tag).
    pub(super) callouts: Mutex<HashMap<u64, (usize, u64)>>,
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

    pub(super) fn lock_callouts(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (usize, u64)>> {
        // A panic while holding the lock cannot leave the map half-updated: recover it.
        self.callouts.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn run_background(
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
