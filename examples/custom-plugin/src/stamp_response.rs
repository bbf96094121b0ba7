//! `stamp-response`: sets a field of a JSON response (`path`, default `gateway_stamp`) to
//! `value`, so the client receives a re-serialized body with a corrected content-length.

use payload_processor_core::{BuildContext, ConfigError, Context, Decision, FieldPath, PhaseNeed, Plugin, PluginError};
use serde::Deserialize;
use std::sync::Arc;

pub const TYPE_NAME: &str = "stamp-response";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    #[serde(default = "default_path")]
    path: String,
    value: serde_json::Value,
}

fn default_path() -> String {
    "gateway_stamp".into()
}

struct StampResponse {
    path: FieldPath,
    value: serde_json::Value,
}

pub fn build(parameters: &serde_json::Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    let config: Config = ctx.parameters(parameters)?;
    let path = FieldPath::parse(&config.path).map_err(|msg| ConfigError::new("path", msg))?;
    Ok(Arc::new(StampResponse {
        path,
        value: config.value,
    }))
}

impl Plugin for StampResponse {
    fn response_need(&self) -> PhaseNeed {
        PhaseNeed::Body
    }

    fn on_response(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        ctx.body()
            .set(&self.path, self.value.clone())
            .map_err(|err| PluginError::internal("invalid_json", err.to_string()))?;
        ctx.set_header("x-stamped", "true")?;
        Ok(Decision::Continue)
    }
}
