//! `endpoint-picker`: chooses the model-server pod for each inference request inside Envoy,
//! the Gateway API Inference Extension's endpoint-picker protocol without the ext_proc hop.
//!
//! The users' reference (a full example, every parameter, behaviour, quality): `docs/plugins/endpoint-picker.md`.

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
