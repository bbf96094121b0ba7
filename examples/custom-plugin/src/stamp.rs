//! `stamp-request` and `stamp-response`: set a JSON body field (`path`, default
//! `gateway_stamp`) to `value`, so the upstream (or the client) receives a re-serialized body
//! with a corrected content-length. `stamp-response` also sets `x-stamped: true`.

use payload_processor_core::{BuildContext, ConfigError, Context, Decision, FieldPath, PhaseNeed, Plugin, PluginError};
use serde::Deserialize;
use std::sync::Arc;

pub const REQUEST_TYPE_NAME: &str = "stamp-request";
pub const RESPONSE_TYPE_NAME: &str = "stamp-response";

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

struct Stamp {
    path: FieldPath,
    value: serde_json::Value,
    response: bool,
}

fn build(
    parameters: &serde_json::Value,
    ctx: &mut BuildContext,
    response: bool,
) -> Result<Arc<dyn Plugin>, ConfigError> {
    let config: Config = ctx.parameters(parameters)?;
    let path = FieldPath::parse(&config.path).map_err(|msg| ConfigError::new("path", msg))?;
    Ok(Arc::new(Stamp {
        path,
        value: config.value,
        response,
    }))
}

pub fn build_request(parameters: &serde_json::Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    build(parameters, ctx, false)
}

pub fn build_response(parameters: &serde_json::Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    build(parameters, ctx, true)
}

impl Stamp {
    fn stamp(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        ctx.body().set(&self.path, self.value.clone()).map_err(|err| {
            let code = "invalid_json";
            if self.response {
                PluginError::internal(code, err.to_string()) // the upstream's fault, not the client's
            } else {
                PluginError::bad_request(code, err.to_string())
            }
        })?;
        if self.response {
            ctx.set_header("x-stamped", "true")?;
        }
        Ok(Decision::Continue)
    }
}

impl Plugin for Stamp {
    fn request_need(&self) -> PhaseNeed {
        if self.response {
            PhaseNeed::Skip
        } else {
            PhaseNeed::Body
        }
    }

    fn response_need(&self) -> PhaseNeed {
        if self.response {
            PhaseNeed::Body
        } else {
            PhaseNeed::Skip
        }
    }

    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        self.stamp(ctx)
    }

    fn on_response(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        self.stamp(ctx)
    }
}
