//! `stamp-request`: sets a JSON body field (`path`, default `gateway_stamp`) to `value`, so the
//! upstream receives a re-serialized body.

use payload_processor_core::{BuildContext, ConfigError, Context, Decision, FieldPath, PhaseNeed, Plugin, PluginError};
use serde::Deserialize;
use std::sync::Arc;

pub const TYPE_NAME: &str = "stamp-request";

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

struct StampRequest {
    path: FieldPath,
    value: serde_json::Value,
}

pub fn build(parameters: &serde_json::Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    let config: Config = ctx.parameters(parameters)?;
    let path = FieldPath::parse(&config.path).map_err(|msg| ConfigError::new("path", msg))?;
    Ok(Arc::new(StampRequest {
        path,
        value: config.value,
    }))
}

impl Plugin for StampRequest {
    fn request_need(&self) -> PhaseNeed {
        PhaseNeed::Body
    }

    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        ctx.body()
            .set(&self.path, self.value.clone())
            .map_err(|err| PluginError::bad_request("invalid_json", err.to_string()))?;
        Ok(Decision::Continue)
    }
}
