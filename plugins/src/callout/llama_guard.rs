//! `llama-guard`: asks a Llama Guard model behind an OpenAI-compatible chat completions server
//! whether the prompt (or the answer, with its prompt) is safe. The model answers `safe`, or
//! `unsafe` and a line of categories (`S1,S9`); each category has an action: `Reject` (400
//! `content_flagged`, the default) or `Report` (metadata and a counter).
//!
//! The users' reference: `docs/plugins/llama-guard.md`.

use super::{answer_error, inspected_texts, json_answer, with_detail, Endpoint, Phase, RejectConfig, Windows};
use payload_processor_core::{
    BuildContext, CalloutRequest, CalloutResponse, ConfigError, Context, Counter, Decision, Direction, EventDecision,
    LocalReply, PhaseNeed, Plugin, PluginError, RequestEdits, SseEvent, StreamNeed,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Registry key.
pub const TYPE_NAME: &str = "llama-guard";

/// What a flagged category does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
pub enum CategoryAction {
    /// Reject the exchange.
    Reject,
    /// Record it (metadata `<name>.categories`, counter `reported`) and let it through.
    Report,
}

/// Parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(rename = "LlamaGuardParameters")]
pub struct Config {
    /// The Envoy cluster of the server hosting the model.
    pub cluster: String,
    /// Path of its chat completions endpoint.
    #[serde(default = "default_path")]
    pub path: String,
    /// `:authority` of the call (default: the cluster name).
    #[serde(default)]
    pub authority: Option<String>,
    /// Fixed headers of the call.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The model name the server knows (`meta-llama/Llama-Guard-3-8B`).
    pub model: String,
    /// `Request` (default): classify the prompt; `Response`: classify the answer to it.
    #[serde(default)]
    pub phase: Phase,
    /// Action per category code (`S1` ... `S14`); others take `defaultAction`.
    #[serde(default)]
    pub categories: BTreeMap<String, CategoryAction>,
    /// Action of categories not listed.
    #[serde(default = "default_action")]
    pub default_action: CategoryAction,
    /// The reply (default 400 `content_flagged`).
    #[serde(default)]
    pub reject: RejectConfig,
    /// Namespace of the metadata written.
    #[serde(default = "default_namespace")]
    pub metadata_namespace: String,
    /// With `phase: Response`, a streamed answer is released to the client only after the
    /// model judged its text safe, in windows of this many bytes (each one callout).
    #[serde(default = "super::default_stream_window")]
    pub stream_window_bytes: usize,
}

fn default_path() -> String {
    "/v1/chat/completions".into()
}

fn default_action() -> CategoryAction {
    CategoryAction::Reject
}

fn default_namespace() -> String {
    "envoy.payload_processor.callout".into()
}

/// The plugin.
pub struct LlamaGuard {
    name: String,
    endpoint: Endpoint,
    model: String,
    phase: Phase,
    categories: BTreeMap<String, CategoryAction>,
    default_action: CategoryAction,
    reject: LocalReply,
    namespace: String,
    window: usize,
    calls: Counter,
    flagged: Counter,
    reported: Counter,
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
        return Err(ConfigError::new("model", "name the Llama Guard model"));
    }
    for code in config.categories.keys() {
        let valid = code.len() >= 2 && code.starts_with('S') && code[1..].bytes().all(|b| b.is_ascii_digit());
        if !valid {
            return Err(ConfigError::new(
                format!("categories.{code}"),
                "category codes look like S1 ... S14",
            ));
        }
    }
    let reject = config
        .reject
        .reply(400, "content_flagged", "the content was flagged as unsafe", "reject")?;
    if config.stream_window_bytes == 0 {
        return Err(ConfigError::new("streamWindowBytes", "must be at least 1"));
    }
    Ok(Arc::new(LlamaGuard {
        name: ctx.processor_name().to_string(),
        endpoint,
        model: config.model,
        phase: config.phase,
        categories: config.categories,
        default_action: config.default_action,
        reject,
        namespace: config.metadata_namespace,
        window: config.stream_window_bytes,
        calls: ctx.counter("calls"),
        flagged: ctx.counter("flagged"),
        reported: ctx.counter("reported"),
    }))
}

/// Per stream: the prompt of the request, kept for classifying its answer, and the windows
/// of a streamed answer.
#[derive(Default)]
struct GuardState {
    prompt: String,
    windows: Windows,
}

/// What the model said: `None` for safe, else the category codes.
fn verdict(content: &str) -> Result<Option<Vec<String>>, String> {
    let mut lines = content.lines().map(str::trim).filter(|line| !line.is_empty());
    match lines.next().map(str::to_ascii_lowercase).as_deref() {
        Some("safe") => Ok(None),
        Some("unsafe") => Ok(Some(
            lines
                .next()
                .unwrap_or_default()
                .split(',')
                .map(|code| code.trim().to_ascii_uppercase())
                .filter(|code| !code.is_empty())
                .collect(),
        )),
        _ => Err("answered neither safe nor unsafe".into()),
    }
}

impl LlamaGuard {
    fn call(&self, ctx: &mut Context<'_>, messages: Value) -> CalloutRequest {
        ctx.increment(self.calls);
        self.endpoint.post_json(&json!({
            "model": self.model,
            "messages": messages,
            "max_tokens": 32,
            "temperature": 0,
        }))
    }

    /// An answer's text judged with its prompt, as the agent's turn.
    fn judge_answer(&self, ctx: &mut Context<'_>, answer: String) -> CalloutRequest {
        let prompt = ctx.state::<GuardState>().prompt.clone();
        self.call(
            ctx,
            json!([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]),
        )
    }
}

impl Plugin for LlamaGuard {
    fn request_need(&self) -> PhaseNeed {
        // Classifying an answer needs its prompt too.
        PhaseNeed::Body
    }

    fn response_need(&self) -> PhaseNeed {
        self.phase.need(Direction::Response)
    }

    fn request_edits(&self) -> RequestEdits {
        RequestEdits::NONE
    }

    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        let prompt = inspected_texts(ctx, &self.name)?.join("\n");
        if self.phase == Phase::Response {
            ctx.state::<GuardState>().prompt = prompt;
            return Ok(Decision::Continue);
        }
        if prompt.trim().is_empty() {
            return Ok(Decision::Continue);
        }
        Ok(Decision::Callout(
            self.call(ctx, json!([{"role": "user", "content": prompt}])),
        ))
    }

    fn on_response(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        let answer = inspected_texts(ctx, &self.name)?.join("\n");
        if answer.trim().is_empty() {
            return Ok(Decision::Continue);
        }
        Ok(Decision::Callout(self.judge_answer(ctx, answer)))
    }

    fn stream_need(&self) -> Option<StreamNeed> {
        (self.phase == Phase::Response).then(StreamNeed::default)
    }

    fn on_response_event(&self, ctx: &mut Context<'_>, event: &mut SseEvent) -> Result<EventDecision, PluginError> {
        let step = ctx.state::<GuardState>().windows.on_event(event, self.window);
        Ok(step.decide(|text| self.judge_answer(ctx, text)))
    }

    fn on_stream_end(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        Ok(match ctx.state::<GuardState>().windows.at_end() {
            Some(text) => Decision::Callout(self.judge_answer(ctx, text)),
            None => Decision::Continue,
        })
    }

    fn on_callout_done(&self, ctx: &mut Context<'_>, response: CalloutResponse) -> Result<Decision, PluginError> {
        let answer = json_answer(&self.name, &self.endpoint, &response)?;
        let content = answer
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .ok_or_else(|| answer_error(&self.name, &self.endpoint, "sent no choices[0].message.content"))?;
        let Some(codes) = verdict(content).map_err(|what| answer_error(&self.name, &self.endpoint, what))? else {
            return Ok(Decision::Continue);
        };
        ctx.set_metadata(&self.namespace, &format!("{}.categories", self.name), &codes.join(","));
        let action = |code: &String| *self.categories.get(code).unwrap_or(&self.default_action);
        // "unsafe" without a category line still rejects under the default action.
        let rejects = if codes.is_empty() {
            self.default_action == CategoryAction::Reject
        } else {
            codes.iter().any(|code| action(code) == CategoryAction::Reject)
        };
        if !rejects {
            ctx.increment(self.reported);
            return Ok(Decision::Continue);
        }
        ctx.increment(self.flagged);
        let reply = with_detail(&self.reject, &codes.join(","));
        Ok(Decision::Reject(reply))
    }
}

#[cfg(test)]
mod tests {
    use super::verdict;

    #[test]
    fn the_models_answer_is_read_as_documented() {
        assert_eq!(verdict("safe"), Ok(None));
        assert_eq!(verdict("\n\nsafe\n"), Ok(None));
        assert_eq!(verdict("unsafe\nS1,S9"), Ok(Some(vec!["S1".into(), "S9".into()])));
        assert_eq!(verdict(" unsafe \n s10 "), Ok(Some(vec!["S10".into()])));
        assert_eq!(verdict("unsafe"), Ok(Some(vec![])));
        assert!(verdict("I cannot help with that").is_err());
        assert!(verdict("").is_err());
    }
}
