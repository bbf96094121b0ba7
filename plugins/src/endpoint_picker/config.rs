//! The picker's parameters and their defaults.

use super::*;
use payload_processor_core::config::deserialize_duration;
use schemars::JsonSchema;
use serde::Deserialize;
use std::time::Duration;

/// One endpoint: `"ip:port"` or `{address, adapters}`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum EndpointConfig {
    /// `ip:port`.
    Address(String),
    /// `ip:port` with the LoRA adapters it serves.
    Detailed {
        /// `ip:port`.
        address: String,
        /// LoRA adapters known to be served there (metrics may report more).
        #[serde(default)]
        adapters: Vec<String>,
    },
}

/// When an endpoint counts as saturated.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Saturation {
    /// Waiting-queue depth at or above which...
    #[serde(default = "default_queue_depth")]
    pub queue_depth: f64,
    /// ...together with KV-cache usage at or above this, the endpoint is saturated.
    #[serde(default = "default_kv_cache_usage")]
    pub kv_cache_usage: f64,
}

fn default_queue_depth() -> f64 {
    5.0
}
fn default_kv_cache_usage() -> f64 {
    0.8
}

impl Default for Saturation {
    fn default() -> Self {
        Self {
            queue_depth: default_queue_depth(),
            kv_cache_usage: default_kv_cache_usage(),
        }
    }
}

/// Scorer weights (zero turns one off).
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScorerWeights {
    /// Queue depth.
    #[serde(default = "two")]
    pub queue: f64,
    /// KV-cache headroom.
    #[serde(default = "two")]
    pub kv_cache: f64,
    /// Prefix-cache affinity.
    #[serde(default = "three")]
    pub prefix_cache: f64,
    /// LoRA affinity.
    #[serde(default = "one")]
    pub lora_affinity: f64,
}

fn one() -> f64 {
    1.0
}
fn two() -> f64 {
    2.0
}
fn three() -> f64 {
    3.0
}

impl Default for ScorerWeights {
    fn default() -> Self {
        Self {
            queue: 2.0,
            kv_cache: 2.0,
            prefix_cache: 3.0,
            lora_affinity: 1.0,
        }
    }
}

/// Prefix-cache index settings.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrefixConfig {
    /// Prompt bytes per block.
    #[serde(default = "default_block_size")]
    pub block_size: usize,
    /// Blocks of a prompt considered (longer prompts: the first ones).
    #[serde(default = "default_max_blocks")]
    pub max_blocks: usize,
    /// Blocks remembered per endpoint (LRU).
    #[serde(default = "default_lru_capacity")]
    pub lru_capacity_per_endpoint: usize,
}

fn default_block_size() -> usize {
    64
}
fn default_max_blocks() -> usize {
    256
}
fn default_lru_capacity() -> usize {
    31_250
}

impl Default for PrefixConfig {
    fn default() -> Self {
        Self {
            block_size: default_block_size(),
            max_blocks: default_max_blocks(),
            lru_capacity_per_endpoint: default_lru_capacity(),
        }
    }
}

/// Parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(rename = "EndpointPickerParameters")]
pub struct Config {
    /// The pool.
    pub endpoints: Vec<EndpointConfig>,
    /// Envoy cluster that reaches every endpoint for metric scrapes; none: no scraping.
    #[serde(default)]
    pub metrics_cluster: Option<String>,
    /// Path of the metrics page.
    #[serde(default = "default_metrics_path")]
    pub metrics_path: String,
    /// How often each endpoint is scraped (default 50ms).
    #[serde(default, deserialize_with = "deserialize_duration")]
    #[schemars(with = "Option<String>")]
    pub scrape_interval: Option<Duration>,
    /// How long a scrape may take (default 1s).
    #[serde(default, deserialize_with = "deserialize_duration")]
    #[schemars(with = "Option<String>")]
    pub scrape_timeout: Option<Duration>,
    /// Metrics older than this make an endpoint stale (default 200ms).
    #[serde(default, deserialize_with = "deserialize_duration")]
    #[schemars(with = "Option<String>")]
    pub stale_after: Option<Duration>,
    /// Metric names.
    #[serde(default)]
    pub metric_names: MetricNames,
    /// Saturation thresholds.
    #[serde(default)]
    pub saturation: Saturation,
    /// Scorer weights.
    #[serde(default)]
    pub scorers: ScorerWeights,
    /// Prefix index settings.
    #[serde(default)]
    pub prefix: PrefixConfig,
    /// How many runners-up follow the winner in the header, for override_host retries.
    #[serde(default)]
    pub fallback_endpoints: usize,
    /// Request header marking a request sheddable (`true`/`1`/`yes`).
    #[serde(default = "default_sheddable_header")]
    pub sheddable_header: String,
    /// Response header that reports the endpoint that answered (none by default).
    #[serde(default)]
    pub served_header: Option<String>,
    /// Body field holding the model (LoRA affinity, prefix chain seed).
    #[serde(default = "default_model_field")]
    pub model_field: String,
}

fn default_metrics_path() -> String {
    "/metrics".into()
}
fn default_sheddable_header() -> String {
    "x-gateway-sheddable".into()
}
fn default_model_field() -> String {
    "model".into()
}
