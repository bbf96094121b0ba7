//! `fault-injector`: misbehaves on demand, for testing failure handling. The request header
//! named by `header` (default `x-fault`) selects: `error` (a PluginError with `status`),
//! `panic`, or `slow` (spins until the processor's latency budget is used up). `phase` picks
//! where: `request-headers` (default), `request-body`, `response-headers`, `response-body`
//! (buffered JSON responses) or `stream-events` (the first event of a streamed response).
//! The choice is read with the request headers and kept for the response (some hosts cannot
//! read request headers once the response arrives).

use payload_processor_core::{
    BuildContext, ConfigError, Context, Decision, EventDecision, PhaseNeed, Plugin, PluginError, SseEvent,
    StreamNeed,
};
use serde::Deserialize;
use std::sync::Arc;

pub const TYPE_NAME: &str = "fault-injector";

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum Phase {
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
    ResponseBody,
    StreamEvents,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    #[serde(default = "default_header")]
    header: String,
    #[serde(default)]
    status: Option<u16>,
    /// Run at end of body instead of at headers (the same as `phase: request-body`).
    #[serde(default)]
    needs_body: bool,
    phase: Option<Phase>,
}

fn default_header() -> String {
    "x-fault".into()
}

struct FaultInjector {
    header: String,
    status: Option<u16>,
    phase: Phase,
}

/// The fault this stream asked for, kept from the request headers.
#[derive(Default)]
struct Chosen(Option<String>);

pub fn build(parameters: &serde_json::Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    let config: Config = ctx.parameters(parameters)?;
    let phase = config
        .phase
        .unwrap_or(if config.needs_body { Phase::RequestBody } else { Phase::RequestHeaders });
    Ok(Arc::new(FaultInjector {
        header: config.header,
        status: config.status,
        phase,
    }))
}

impl FaultInjector {
    fn misbehave(&self, ctx: &mut Context<'_>) -> Result<(), PluginError> {
        match ctx.state::<Chosen>().0.take().as_deref() {
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
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

impl Plugin for FaultInjector {
    fn request_need(&self) -> PhaseNeed {
        if self.phase == Phase::RequestBody {
            PhaseNeed::Body
        } else {
            PhaseNeed::Headers
        }
    }

    fn response_need(&self) -> PhaseNeed {
        match self.phase {
            Phase::ResponseHeaders => PhaseNeed::Headers,
            Phase::ResponseBody => PhaseNeed::Body,
            _ => PhaseNeed::Skip,
        }
    }

    fn stream_need(&self) -> Option<StreamNeed> {
        (self.phase == Phase::StreamEvents).then(StreamNeed::default)
    }

    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        let chosen = ctx.request_header(&self.header);
        ctx.state::<Chosen>().0 = chosen;
        if matches!(self.phase, Phase::RequestHeaders | Phase::RequestBody) {
            self.misbehave(ctx)?;
        }
        Ok(Decision::Continue)
    }

    fn on_response(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        self.misbehave(ctx)?;
        Ok(Decision::Continue)
    }

    fn on_response_event(&self, ctx: &mut Context<'_>, _event: &mut SseEvent) -> Result<EventDecision, PluginError> {
        self.misbehave(ctx)?;
        Ok(EventDecision::Continue)
    }
}
