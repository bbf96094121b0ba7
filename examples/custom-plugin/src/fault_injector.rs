//! `fault-injector`: misbehaves on demand, for testing failure handling. The request header
//! named by `header` (default `x-fault`) selects: `error` (a PluginError with `status`),
//! `panic`, or `slow` (spins until the processor's latency budget is used up).

use payload_processor_core::{BuildContext, ConfigError, Context, Decision, PhaseNeed, Plugin, PluginError};
use serde::Deserialize;
use std::sync::Arc;

pub const TYPE_NAME: &str = "fault-injector";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    #[serde(default = "default_header")]
    header: String,
    #[serde(default)]
    status: Option<u16>,
    /// Run at end of body instead of at headers.
    #[serde(default)]
    needs_body: bool,
}

fn default_header() -> String {
    "x-fault".into()
}

struct FaultInjector {
    header: String,
    status: Option<u16>,
    needs_body: bool,
}

pub fn build(parameters: &serde_json::Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    let config: Config = ctx.parameters(parameters)?;
    Ok(Arc::new(FaultInjector {
        header: config.header,
        status: config.status,
        needs_body: config.needs_body,
    }))
}

impl Plugin for FaultInjector {
    fn request_need(&self) -> PhaseNeed {
        if self.needs_body {
            PhaseNeed::Body
        } else {
            PhaseNeed::Headers
        }
    }

    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        match ctx.request_header(&self.header).as_deref() {
            Some("error") => Err(PluginError {
                status: self.status,
                code: "injected_fault".into(),
                message: "injected fault".into(),
            }),
            Some("panic") => panic!("injected panic"),
            Some("slow") => {
                // Spin until the budget is gone (bounded, in case no budget is configured).
                for _ in 0..50_000_000u64 {
                    if ctx.deadline_exceeded() {
                        break;
                    }
                }
                Ok(Decision::Continue)
            }
            _ => Ok(Decision::Continue),
        }
    }
}
