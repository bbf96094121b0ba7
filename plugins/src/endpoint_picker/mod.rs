//! `endpoint-picker`: chooses the model-server pod for each inference request inside Envoy,
//! the Gateway API Inference Extension's endpoint-picker protocol without the ext_proc hop.
//!
//! ```yaml
//! - name: epp
//!   type: endpoint-picker
//!   parameters:
//!     endpoints: ["10.0.0.1:8000", {address: "10.0.0.2:8000", adapters: [sql-lora]}]
//!     metricsCluster: model_pool      # an Envoy cluster reaching every endpoint
//!     scrapeInterval: 50ms
//!     staleAfter: 200ms
//!     scorers: {queue: 2, kvCache: 2, prefixCache: 3, loraAffinity: 1}
//!     fallbackEndpoints: 1            # ordered retry candidates for override_host
//! ```
//!
//! - **Metrics**: every `scrapeInterval` each endpoint's `metricsPath` is fetched through the
//!   host's HTTP callouts to `metricsCluster`, with the endpoint in the callout's
//!   `x-gateway-destination-endpoint` header (so one ORIGINAL_DST cluster reaches them all),
//!   and parsed as Prometheus text (vLLM names by default, configurable in `metricNames`).
//!   Without `metricsCluster` nothing is scraped and no endpoint goes stale.
//! - **Scheduling**: endpoints outside the subset hint (dynamic metadata
//!   `envoy.lb.subset_hint` / `x-gateway-destination-endpoint-subset`) are dropped, then stale
//!   ones (no good scrape for `staleAfter`), then saturated ones (queue ≥ `queueDepth` and KV
//!   usage ≥ `kvCacheUsage`) unless that would leave none; the rest are scored (queue depth
//!   min-max normalised, KV-cache headroom, prefix-cache affinity over 64-byte prompt blocks,
//!   LoRA affinity), the weighted sums ranked, ties broken at random.
//! - **Protocol**: the winner (and `fallbackEndpoints` runners-up, comma-separated) goes to the
//!   `x-gateway-destination-endpoint` request header and dynamic metadata `envoy.lb` (same
//!   value), overwriting what a client sent. No eligible endpoint: an error (503 under
//!   FailClosed; under FailOpen the cluster's own load balancing decides). A sheddable
//!   request (`sheddableHeader: true`) when every endpoint is saturated: 429. The endpoint that
//!   answered is reported as `x-gateway-destination-endpoint-served` (metadata `envoy.lb`,
//!   and the response header `servedHeader` when set), and a successful answer teaches the
//!   prefix index which prompt blocks that endpoint now caches.

mod config;
mod metrics;
mod picker;
mod prefix;
mod refresh;
mod scheduler;

pub use config::*;
pub use metrics::{parse as parse_metrics, LoraInfo, MetricNames, ServerMetrics};
pub use picker::{build, EndpointPicker};
pub use prefix::{block_hashes, PrefixIndex};
pub use scheduler::{rank, score, Candidate, Scores, Weights};

/// Registry key.
pub const TYPE_NAME: &str = "endpoint-picker";

/// The header (and `envoy.lb` metadata key) carrying the chosen endpoint(s).
pub const DESTINATION: &str = "x-gateway-destination-endpoint";
/// The metadata key reporting the endpoint that answered.
pub const SERVED: &str = "x-gateway-destination-endpoint-served";
/// Namespace of the chosen endpoint in dynamic metadata.
pub const LB_NAMESPACE: &str = "envoy.lb";
/// Namespace and key of the subset hint an earlier filter may leave.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
/// Key of the subset hint.
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";

#[cfg(test)]
mod tests;
