//! `openai-moderation`: asks a server implementing OpenAI's moderation API
//! (`POST /v1/moderations` with `{input, model}`) about the prompt (or the buffered answer),
//! and rejects flagged content with 400 `content_flagged`, naming the flagged categories.
//!
//! The users' reference: `docs/plugins/openai-moderation.md`.

use super::{inspected_texts, json_answer, with_detail, Endpoint, Phase, RejectConfig, Windows};
use payload_processor_core::{
    BuildContext, CalloutRequest, CalloutResponse, ConfigError, Context, Counter, Decision, Direction, EventDecision,
    LocalReply, PhaseNeed, Plugin, PluginError, RequestEdits, SseEvent, StreamNeed,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Registry key.
pub const TYPE_NAME: &str = "openai-moderation";

/// Parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(rename = "OpenaiModerationParameters")]
pub struct Config {
    /// The Envoy cluster of the moderation server.
    pub cluster: String,
    /// Path of the moderation endpoint.
    #[serde(default = "default_path")]
    pub path: String,
    /// `:authority` of the call (default: the cluster name).
    #[serde(default)]
    pub authority: Option<String>,
    /// Fixed headers of the call (`authorization: Bearer ...`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The moderation model.
    #[serde(default = "default_model")]
    pub model: String,
    /// What is inspected: `Request` (default) or `Response`.
    #[serde(default)]
    pub phase: Phase,
    /// Reject only when one of these categories is flagged (`harassment`, `violence/graphic`,
    /// ...); default: whenever the server says `flagged`.
    #[serde(default)]
    pub categories: Option<Vec<String>>,
    /// Also reject when a category's score (of `categories`, or any) is above this.
    #[serde(default)]
    pub score_threshold: Option<f64>,
    /// The reply (default 400 `content_flagged`).
    #[serde(default)]
    pub reject: RejectConfig,
    /// Namespace of the metadata written (`<name>.categories`).
    #[serde(default = "default_namespace")]
    pub metadata_namespace: String,
    /// With `phase: Response`, a streamed answer is released to the client only after the
    /// service approved its text, in windows of this many bytes (each one callout).
    #[serde(default = "super::default_stream_window")]
    pub stream_window_bytes: usize,
}

fn default_path() -> String {
    "/v1/moderations".into()
}

fn default_model() -> String {
    "omni-moderation-latest".into()
}

fn default_namespace() -> String {
    "envoy.payload_processor.callout".into()
}

/// The plugin.
pub struct OpenaiModeration {
    name: String,
    endpoint: Endpoint,
    model: String,
    phase: Phase,
    categories: Option<BTreeSet<String>>,
    score_threshold: Option<f64>,
    reject: LocalReply,
    namespace: String,
    window: usize,
    calls: Counter,
    flagged: Counter,
}

/// Factory.
pub fn build(parameters: &Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    let config: Config = ctx.parameters(parameters)?;
    let endpoint = Endpoint::new(
        &config.cluster,
        &config.path,
        config.authority.as_deref(),
        &config.headers,
    )?;
    if config.model.trim().is_empty() {
        return Err(ConfigError::new("model", "name the moderation model"));
    }
    if let Some(threshold) = config.score_threshold.filter(|t| !(0.0..=1.0).contains(t)) {
        return Err(ConfigError::new(
            "scoreThreshold",
            format!("{threshold} is not between 0 and 1"),
        ));
    }
    let reject = config.reject.reply(
        400,
        "content_flagged",
        "the content was flagged by moderation",
        "reject",
    )?;
    Ok(Arc::new(OpenaiModeration {
        name: ctx.processor_name().to_string(),
        endpoint,
        model: config.model,
        phase: config.phase,
        categories: config.categories.map(|list| list.into_iter().collect()),
        score_threshold: config.score_threshold,
        reject,
        namespace: config.metadata_namespace,
        window: config.stream_window_bytes,
        calls: ctx.counter("calls"),
        flagged: ctx.counter("flagged"),
    }))
}

impl OpenaiModeration {
    fn call(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        let text = inspected_texts(ctx, &self.name)?.join("\n");
        if text.trim().is_empty() {
            return Ok(Decision::Continue);
        }
        Ok(Decision::Callout(self.judge(ctx, text)))
    }

    fn judge(&self, ctx: &mut Context<'_>, text: String) -> CalloutRequest {
        ctx.increment(self.calls);
        self.endpoint.post_json(&json!({"input": text, "model": self.model}))
    }

    fn watched(&self, category: &str) -> bool {
        self.categories.as_ref().map_or(true, |set| set.contains(category))
    }
}

impl Plugin for OpenaiModeration {
    fn request_need(&self) -> PhaseNeed {
        self.phase.need(Direction::Request)
    }

    fn response_need(&self) -> PhaseNeed {
        self.phase.need(Direction::Response)
    }

    fn request_edits(&self) -> RequestEdits {
        RequestEdits::NONE
    }

    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        self.call(ctx)
    }

    fn on_response(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        self.call(ctx)
    }

    fn stream_need(&self) -> Option<StreamNeed> {
        (self.phase == Phase::Response).then(StreamNeed::default)
    }

    fn on_response_event(&self, ctx: &mut Context<'_>, event: &mut SseEvent) -> Result<EventDecision, PluginError> {
        let step = ctx.state::<Windows>().on_event(event, self.window);
        Ok(step.decide(|text| self.judge(ctx, text)))
    }

    fn on_stream_end(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        Ok(match ctx.state::<Windows>().at_end() {
            Some(text) => Decision::Callout(self.judge(ctx, text)),
            None => Decision::Continue,
        })
    }

    fn on_callout_done(&self, ctx: &mut Context<'_>, response: CalloutResponse) -> Result<Decision, PluginError> {
        let answer = json_answer(&self.name, &self.endpoint, &response)?;
        let results = answer
            .get("results")
            .and_then(Value::as_array)
            .filter(|results| !results.is_empty())
            .ok_or_else(|| super::answer_error(&self.name, &self.endpoint, "sent no moderation results"))?;
        let mut hit: BTreeSet<String> = BTreeSet::new();
        let mut flagged = false;
        for result in results {
            let categories = result.get("categories").and_then(Value::as_object);
            for (category, value) in categories.into_iter().flatten() {
                if value == &Value::Bool(true) && self.watched(category) {
                    hit.insert(category.clone());
                }
            }
            if let (Some(threshold), Some(scores)) = (
                self.score_threshold,
                result.get("category_scores").and_then(Value::as_object),
            ) {
                for (category, score) in scores {
                    if score.as_f64().is_some_and(|s| s > threshold) && self.watched(category) {
                        hit.insert(category.clone());
                    }
                }
            }
            flagged |= result.get("flagged") == Some(&Value::Bool(true));
        }
        let reject = !hit.is_empty() || (self.categories.is_none() && flagged);
        let names = hit.into_iter().collect::<Vec<_>>().join(",");
        ctx.set_metadata(&self.namespace, &format!("{}.categories", self.name), &names);
        if !reject {
            return Ok(Decision::Continue);
        }
        ctx.increment(self.flagged);
        let reply = with_detail(&self.reject, &names);
        Ok(Decision::Reject(reply))
    }
}
