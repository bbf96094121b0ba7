//! Choosing an endpoint per request: the picker, its build from the parameters, the request
//! and response phases.

use super::*;
use crate::common::validate_header_name;
use payload_processor_core::{
    Background, BuildContext, ConfigError, Context, Counter, Decision, Gauge, LocalReply, PhaseNeed, Plugin,
    PluginError, RequestEdits,
};
use serde_json::Value;
use std::collections::HashSet;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// An endpoint as configured.
#[derive(Debug, Clone)]
pub(super) struct Endpoint {
    pub(super) address: String,
    pub(super) adapters: Vec<String>,
    pub(super) picks: Counter,
    pub(super) scrape_failures: Counter,
    pub(super) stale_skips: Counter,
    pub(super) metrics_age_ms: Gauge,
}

/// What the picker knows of an endpoint right now.
#[derive(Debug, Clone, Default)]
pub(super) struct EndpointState {
    pub(super) metrics: ServerMetrics,
    /// Host clock of the last good scrape.
    pub(super) scraped_at: Option<u64>,
    /// Host clock when the scrape in flight started.
    pub(super) scrape_started: Option<u64>,
    /// Host clock when the next scrape is due.
    pub(super) next_scrape: u64,
}

/// The plugin. Its pool view is shared by every stream of this configuration: every worker
/// thread in the dynamic module; in wasm every stream of one VM, the VMs electing one scraper
/// and sharing its metrics through the host's shared data.
pub struct EndpointPicker {
    pub(super) name: String,
    pub(super) endpoints: Vec<Endpoint>,
    pub(super) state: RwLock<Vec<EndpointState>>,
    pub(super) prefix: PrefixIndex,
    pub(super) prefix_config: PrefixConfig,
    pub(super) metrics_cluster: Option<String>,
    pub(super) metrics_path: String,
    pub(super) metric_names: MetricNames,
    pub(super) scrape_interval: Duration,
    pub(super) scrape_timeout: Duration,
    pub(super) stale_after: Duration,
    pub(super) saturation: Saturation,
    pub(super) weights: Weights,
    pub(super) fallback_endpoints: usize,
    pub(super) sheddable_header: String,
    pub(super) served_header: Option<String>,
    pub(super) model_field: String,
    pub(super) reads_body: bool,
    pub(super) seed: AtomicU64,
    /// Shared-data key prefix of this configuration's pool (same in every copy of it).
    pub(super) shared_key: String,
    /// This copy's identity in the scrape lease.
    pub(super) instance: u64,
    pub(super) no_endpoint: Counter,
    pub(super) shed: Counter,
    pub(super) served_other: Counter,
}

impl std::fmt::Debug for EndpointPicker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointPicker")
            .field("name", &self.name)
            .field(
                "endpoints",
                &self.endpoints.iter().map(|e| &e.address).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A stat-name-safe form of an address (`10.0.0.1:8000` -> `10_0_0_1_8000`).
pub(super) fn stat_label(address: &str) -> String {
    address
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect::<String>()
        .trim_matches('_')
        .to_string()
}

pub(super) fn check_weight(value: f64, at: &str) -> Result<f64, ConfigError> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(ConfigError::new(
            at,
            format!("weight {value} must be a finite number >= 0"),
        ))
    }
}

/// Factory.
pub fn build(parameters: &Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    let config: Config = ctx.parameters(parameters)?;
    if config.endpoints.is_empty() {
        return Err(ConfigError::new("endpoints", "at least one endpoint is required"));
    }
    let mut seen = HashSet::new();
    let mut endpoints = Vec::with_capacity(config.endpoints.len());
    for (index, endpoint) in config.endpoints.iter().enumerate() {
        let (address, adapters, at) = match endpoint {
            EndpointConfig::Address(address) => (address, &[][..], format!("endpoints[{index}]")),
            EndpointConfig::Detailed { address, adapters } => {
                (address, adapters.as_slice(), format!("endpoints[{index}].address"))
            }
        };
        let parsed: SocketAddr = address
            .trim()
            .parse()
            .map_err(|_| ConfigError::new(&at, format!("{address:?} is not an ip:port address")))?;
        if parsed.port() == 0 {
            return Err(ConfigError::new(&at, format!("{address:?} needs a port")));
        }
        // Envoy writes IPv6 hosts as [addr]:port; so do we, whatever spelling was configured.
        let address = parsed.to_string();
        if !seen.insert(address.clone()) {
            return Err(ConfigError::new(&at, format!("duplicate endpoint {address}")));
        }
        if let Some(position) = adapters.iter().position(|a| a.trim().is_empty()) {
            return Err(ConfigError::new(
                format!("endpoints[{index}].adapters[{position}]"),
                "adapter names must not be empty",
            ));
        }
        let label = format!("endpoint.{}", stat_label(&address));
        endpoints.push(Endpoint {
            adapters: adapters.to_vec(),
            picks: ctx.counter(&format!("{label}.picks")),
            scrape_failures: ctx.counter(&format!("{label}.scrape_failures")),
            stale_skips: ctx.counter(&format!("{label}.stale_skips")),
            metrics_age_ms: ctx.gauge(&format!("{label}.metrics_age_ms")),
            address,
        });
    }
    if let Some(cluster) = &config.metrics_cluster {
        if cluster.trim().is_empty() {
            return Err(ConfigError::new("metricsCluster", "must not be empty"));
        }
    }
    if !config.metrics_path.starts_with('/') {
        return Err(ConfigError::new("metricsPath", "must start with /"));
    }
    for (names, at) in [
        (&config.metric_names.waiting, "metricNames.waiting"),
        (&config.metric_names.kv_cache_usage, "metricNames.kvCacheUsage"),
    ] {
        if names.is_empty() {
            return Err(ConfigError::new(at, "at least one metric name is required"));
        }
    }
    let saturation = config.saturation;
    if !(saturation.queue_depth.is_finite() && saturation.queue_depth >= 0.0) {
        return Err(ConfigError::new("saturation.queueDepth", "must be a number >= 0"));
    }
    if !(0.0..=1.0).contains(&saturation.kv_cache_usage) {
        return Err(ConfigError::new("saturation.kvCacheUsage", "must be between 0 and 1"));
    }
    let weights = Weights {
        queue: check_weight(config.scorers.queue, "scorers.queue")?,
        kv_cache: check_weight(config.scorers.kv_cache, "scorers.kvCache")?,
        prefix_cache: check_weight(config.scorers.prefix_cache, "scorers.prefixCache")?,
        lora_affinity: check_weight(config.scorers.lora_affinity, "scorers.loraAffinity")?,
    };
    let prefix_config = config.prefix;
    if prefix_config.block_size == 0 || prefix_config.max_blocks == 0 {
        return Err(ConfigError::new(
            "prefix",
            "blockSize and maxBlocks must be greater than zero",
        ));
    }
    let capacity = NonZeroUsize::new(prefix_config.lru_capacity_per_endpoint)
        .ok_or_else(|| ConfigError::new("prefix.lruCapacityPerEndpoint", "must be greater than zero"))?;
    if config.fallback_endpoints >= endpoints.len() {
        return Err(ConfigError::new(
            "fallbackEndpoints",
            format!(
                "{} fallbacks need more than {} endpoints",
                config.fallback_endpoints,
                endpoints.len()
            ),
        ));
    }
    validate_header_name(&config.sheddable_header, "sheddableHeader")?;
    if let Some(header) = &config.served_header {
        validate_header_name(header, "servedHeader")?;
    }
    let model_field = config.model_field.trim().to_string();
    if model_field.is_empty() {
        return Err(ConfigError::new("modelField", "must not be empty"));
    }
    let reads_body = weights.prefix_cache > 0.0 || weights.lora_affinity > 0.0;
    let count = endpoints.len();
    // Copies of this configuration (one per wasm VM) find each other under a key made of what
    // defines the pool; two different pools never share one.
    let identity = format!(
        "{}|{:?}|{:?}|{}",
        ctx.processor_name(),
        endpoints.iter().map(|e| &e.address).collect::<Vec<_>>(),
        config.metrics_cluster,
        config.metrics_path
    );
    let shared_key = format!(
        "payload-processor/endpoint-picker/{:016x}",
        xxhash_rust::xxh3::xxh3_64(identity.as_bytes())
    );
    Ok(Arc::new(EndpointPicker {
        name: ctx.processor_name().to_string(),
        state: RwLock::new(vec![EndpointState::default(); count]),
        prefix: PrefixIndex::new(count, capacity),
        endpoints,
        prefix_config,
        metrics_cluster: config.metrics_cluster,
        metrics_path: config.metrics_path,
        metric_names: config.metric_names,
        scrape_interval: config.scrape_interval.unwrap_or(Duration::from_millis(50)),
        scrape_timeout: config.scrape_timeout.unwrap_or(Duration::from_secs(1)),
        stale_after: config.stale_after.unwrap_or(Duration::from_millis(200)),
        saturation,
        weights,
        fallback_endpoints: config.fallback_endpoints,
        sheddable_header: config.sheddable_header.to_ascii_lowercase(),
        served_header: config.served_header.map(|h| h.to_ascii_lowercase()),
        model_field,
        reads_body,
        seed: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
        shared_key,
        // Random per copy (RandomState draws from the OS, WASI's random_get in wasm).
        instance: std::collections::hash_map::RandomState::new().hash_one(0u8) | 1,
        no_endpoint: ctx.counter("no_endpoint"),
        shed: ctx.counter("shed"),
        served_other: ctx.counter("served_other_than_picked"),
    }))
}

/// What one stream remembers between request and response.
#[derive(Debug, Default)]
pub(super) struct PickState {
    /// Indexes of the endpoints written to the header, best first.
    pub(super) picked: Vec<usize>,
    /// The prompt's block hashes (learnt by the endpoint that answers).
    pub(super) blocks: Vec<u64>,
}

/// Members of an inference request that make up its prompt, in the order they are hashed:
/// Anthropic's `system`, chat `messages`, the responses API's `input`, a completions `prompt`.
pub(super) const PROMPT_MEMBERS: [&str; 4] = ["system", "messages", "input", "prompt"];

/// The model and the prompt bytes of a request body. The prompt is the members' JSON text as
/// the client wrote it: one application writes the same system prompt the same way every time,
/// which is what prefix affinity needs, and it costs one scan instead of a parse. The members
/// are read where the proxy keeps the body, and at most `limit` prompt bytes are copied: only
/// those get hashed.
pub(super) fn model_and_prompt(
    ctx: &mut Context<'_>,
    model_field: &str,
    limit: usize,
) -> Result<(String, Vec<u8>), PluginError> {
    let [model, system, messages, input, prompt_member] = ctx
        .body_member_texts(
            [
                model_field,
                PROMPT_MEMBERS[0],
                PROMPT_MEMBERS[1],
                PROMPT_MEMBERS[2],
                PROMPT_MEMBERS[3],
            ],
            limit,
        )
        .map_err(|err| PluginError::bad_request("invalid_json", err.to_string()))?;
    let model = model.and_then(|text| serde_json::from_slice::<String>(&text).ok());
    let mut prompt = Vec::new();
    for text in [system, messages, input, prompt_member].into_iter().flatten() {
        let room = limit.saturating_sub(prompt.len());
        prompt.extend_from_slice(&text[..text.len().min(room)]);
    }
    Ok((model.unwrap_or_default(), prompt))
}

/// Why no endpoint could be picked.
pub(super) enum NoPick {
    /// Nothing eligible (an error: 503 under FailClosed).
    Unavailable(String),
    /// Sheddable and every endpoint saturated: 429.
    Shed,
}

impl EndpointPicker {
    pub(super) fn is_stale(&self, state: &EndpointState, now: u64) -> bool {
        if self.metrics_cluster.is_none() {
            return false;
        }
        let limit = u64::try_from(self.stale_after.as_nanos()).unwrap_or(u64::MAX);
        state.scraped_at.map_or(true, |at| now.saturating_sub(at) > limit)
    }

    pub(super) fn is_saturated(&self, metrics: &ServerMetrics) -> bool {
        metrics.waiting >= self.saturation.queue_depth && metrics.kv_cache_usage >= self.saturation.kv_cache_usage
    }

    /// LoRA affinity of `endpoint` for `model`: 1 when it serves the adapter, 0.8 when it
    /// has room to load one more, 0 otherwise (and 0 for every endpoint when the model is
    /// not an adapter anyone knows).
    pub(super) fn lora_affinity(&self, endpoint: &Endpoint, state: &EndpointState, model: &str) -> f64 {
        let serves = endpoint.adapters.iter().any(|a| a == model)
            || state
                .metrics
                .lora
                .as_ref()
                .is_some_and(|l| l.active.iter().any(|a| a == model));
        if serves {
            return 1.0;
        }
        match &state.metrics.lora {
            Some(LoraInfo { active, max: Some(max) }) if active.len() < *max => 0.8,
            _ => 0.0,
        }
    }

    pub(super) fn is_known_adapter(&self, states: &[EndpointState], model: &str) -> bool {
        self.endpoints.iter().any(|e| e.adapters.iter().any(|a| a == model))
            || states.iter().any(|s| {
                s.metrics
                    .lora
                    .as_ref()
                    .is_some_and(|l| l.active.iter().any(|a| a == model))
            })
    }

    /// Runs the filters and scorers; returns the ranked endpoint indexes.
    pub(super) fn pick(
        &self,
        ctx: &mut Context<'_>,
        subset: &[String],
        model: &str,
        blocks: &[u64],
        sheddable: bool,
    ) -> Result<(Vec<usize>, Vec<Scores>), NoPick> {
        let now = ctx.now_nanos();
        let states = self.state.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut eligible: Vec<usize> = (0..self.endpoints.len()).collect();
        if !subset.is_empty() {
            eligible.retain(|&i| subset.iter().any(|s| s == &self.endpoints[i].address));
            if eligible.is_empty() {
                return Err(NoPick::Unavailable(format!(
                    "no endpoint of the subset hint ({}) is in the pool",
                    subset.join(",")
                )));
            }
        }
        let before = eligible.len();
        let mut stale = Vec::new();
        eligible.retain(|&i| {
            let fresh = !self.is_stale(&states[i], now);
            if !fresh {
                stale.push(i);
            }
            fresh
        });
        for i in stale {
            ctx.increment(self.endpoints[i].stale_skips);
        }
        if eligible.is_empty() {
            return Err(NoPick::Unavailable(format!(
                "none of the {before} candidate endpoints has fresh metrics"
            )));
        }
        let unsaturated: Vec<usize> = eligible
            .iter()
            .copied()
            .filter(|&i| !self.is_saturated(&states[i].metrics))
            .collect();
        if unsaturated.is_empty() {
            if sheddable {
                return Err(NoPick::Shed);
            }
        } else {
            eligible = unsaturated;
        }
        let lora_request = !model.is_empty() && self.is_known_adapter(&states, model);
        let candidates: Vec<Candidate> = eligible
            .iter()
            .map(|&i| {
                let state = &states[i];
                let prefix_match = if blocks.is_empty() || self.weights.prefix_cache == 0.0 {
                    0.0
                } else {
                    self.prefix.matched_blocks(i, blocks) as f64 / blocks.len() as f64
                };
                Candidate {
                    waiting: state.metrics.waiting,
                    kv_cache_usage: state.metrics.kv_cache_usage,
                    prefix_match,
                    lora: if lora_request {
                        self.lora_affinity(&self.endpoints[i], state, model)
                    } else {
                        0.0
                    },
                }
            })
            .collect();
        drop(states);
        let scores = score(&candidates, &self.weights);
        let seed = self.seed.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed) ^ now;
        let order = rank(&scores, &mut fastrand::Rng::with_seed(seed));
        let ranked = order.iter().map(|&k| eligible[k]).collect();
        let ranked_scores = order.iter().map(|&k| scores[k]).collect();
        Ok((ranked, ranked_scores))
    }

    pub(super) fn request_features(&self, ctx: &mut Context<'_>) -> Result<(String, Vec<u64>), PluginError> {
        if !self.reads_body || ctx.body_is_blank() {
            return Ok((String::new(), Vec::new()));
        }
        let limit = self
            .prefix_config
            .block_size
            .saturating_mul(self.prefix_config.max_blocks);
        let (model, prompt) = model_and_prompt(ctx, &self.model_field, limit)?;
        let blocks = if self.weights.prefix_cache > 0.0 {
            block_hashes(
                &model,
                &prompt,
                self.prefix_config.block_size,
                self.prefix_config.max_blocks,
            )
        } else {
            Vec::new()
        };
        Ok((model, blocks))
    }
}

impl Plugin for EndpointPicker {
    fn request_edits(&self) -> RequestEdits {
        RequestEdits::HEADERS
    }

    fn request_need(&self) -> PhaseNeed {
        if self.reads_body {
            PhaseNeed::Body
        } else {
            PhaseNeed::Headers
        }
    }

    fn response_need(&self) -> PhaseNeed {
        PhaseNeed::Headers
    }

    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        // Whatever happens below, a client never chooses the endpoint itself.
        ctx.remove_header(DESTINATION);
        let (model, blocks) = self.request_features(ctx)?;
        let subset = ctx.metadata_strings(SUBSET_NAMESPACE, SUBSET_KEY);
        let sheddable = ctx.header(&self.sheddable_header).is_some_and(|value| {
            matches!(
                value.trim().to_ascii_lowercase().as_str(),
                "true" | "1" | "yes" | "sheddable"
            )
        });
        let (ranked, scores) = match self.pick(ctx, &subset, &model, &blocks, sheddable) {
            Ok(picked) => picked,
            Err(NoPick::Shed) => {
                ctx.increment(self.shed);
                return Ok(Decision::Reject(LocalReply::json_error(
                    429,
                    "endpoints_saturated",
                    "every model server is saturated and the request is sheddable; retry later",
                )));
            }
            Err(NoPick::Unavailable(reason)) => {
                ctx.increment(self.no_endpoint);
                return Err(PluginError {
                    status: Some(503),
                    code: "no_endpoint_available".into(),
                    message: format!("no model server endpoint is eligible: {reason}"),
                });
            }
        };
        let chosen: Vec<usize> = ranked.iter().copied().take(1 + self.fallback_endpoints).collect();
        let value = chosen
            .iter()
            .map(|&i| self.endpoints[i].address.as_str())
            .collect::<Vec<_>>()
            .join(",");
        if log::log_enabled!(log::Level::Debug) {
            let detail: Vec<String> = ranked
                .iter()
                .zip(&scores)
                .map(|(&i, s)| {
                    format!(
                        "{} total={:.3} queue={:.2} kv={:.2} prefix={:.2} lora={:.2}",
                        self.endpoints[i].address, s.total, s.queue, s.kv_cache, s.prefix_cache, s.lora_affinity
                    )
                })
                .collect();
            log::debug!(
                "endpoint-picker {}: picked {value}; scores: {}",
                self.name,
                detail.join("; ")
            );
        }
        ctx.set_header(DESTINATION, &value)?;
        ctx.set_metadata(LB_NAMESPACE, DESTINATION, &value);
        ctx.set_original_destination(&self.endpoints[chosen[0]].address);
        ctx.increment(self.endpoints[chosen[0]].picks);
        *ctx.state::<PickState>() = PickState { picked: chosen, blocks };
        Ok(Decision::Continue)
    }

    fn on_response(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        let state = std::mem::take(ctx.state::<PickState>());
        let Some(&first) = state.picked.first() else {
            return Ok(Decision::Continue); // nothing was picked (fail-open or no request phase)
        };
        // No upstream host: Envoy answered itself (no healthy host, connect failure before a
        // host was chosen). Nothing was served, nothing is reported or learnt.
        let Some(upstream) = ctx.upstream_address() else {
            return Ok(Decision::Continue);
        };
        let served = self.endpoints.iter().position(|e| e.address == upstream);
        if served.is_some_and(|s| s != first) {
            ctx.increment(self.served_other);
        }
        let served_address = served.map_or(upstream, |index| self.endpoints[index].address.clone());
        ctx.set_metadata(LB_NAMESPACE, SERVED, &served_address);
        if let Some(header) = &self.served_header {
            ctx.set_header(header, &served_address)?;
        }
        let status: u16 = ctx.header(":status").and_then(|s| s.parse().ok()).unwrap_or(0);
        if let Some(served) = served.filter(|_| (200..300).contains(&status) && !state.blocks.is_empty()) {
            self.prefix.record(served, &state.blocks);
        }
        Ok(Decision::Continue)
    }

    fn background(&self) -> Option<&dyn Background> {
        self.metrics_cluster.as_ref().map(|_| self as &dyn Background)
    }
}
