//! `prompt-decorator`: adds platform messages to chat requests: OpenAI chat completions
//! (`messages`) and Anthropic messages (`messages` plus the top-level `system`).
//!
//! The users' reference (a full example, every parameter, behaviour, quality): `docs/plugins/prompt-decorator.md`.

use payload_processor_core::{
    Api, BuildContext, ConfigError, Context, Counter, Decision, PhaseNeed, Plugin, PluginError, RequestEdits,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Registry key.
pub const TYPE_NAME: &str = "prompt-decorator";

/// Parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(rename = "PromptDecoratorParameters")]
pub struct Config {
    /// Messages put before the request's own.
    #[serde(default)]
    pub prepend: Vec<MessageConfig>,
    /// Messages put after the request's own.
    #[serde(default)]
    pub append: Vec<MessageConfig>,
    /// Skip the system additions when the request already has a system prompt.
    #[serde(default)]
    pub only_if_no_system: bool,
}

/// One message to add.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MessageConfig {
    /// `system`, `developer`, `user` or `assistant`.
    pub role: String,
    /// Text.
    pub content: String,
}

impl MessageConfig {
    fn is_system(&self) -> bool {
        self.role == "system" || self.role == "developer"
    }
}

/// The plugin.
#[derive(Debug)]
pub struct PromptDecorator {
    prepend: Vec<MessageConfig>,
    append: Vec<MessageConfig>,
    only_if_no_system: bool,
    decorated: Counter,
    not_chat: Counter,
}

/// Factory.
pub fn build(parameters: &Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    let config: Config = ctx.parameters(parameters)?;
    if config.prepend.is_empty() && config.append.is_empty() {
        return Err(ConfigError::new(
            "prepend",
            "give at least one message to prepend or append",
        ));
    }
    for (list, messages) in [("prepend", &config.prepend), ("append", &config.append)] {
        for (index, message) in messages.iter().enumerate() {
            if !["system", "developer", "user", "assistant"].contains(&message.role.as_str()) {
                return Err(ConfigError::new(
                    format!("{list}[{index}].role"),
                    format!(
                        "unknown role {:?}; use system, developer, user or assistant",
                        message.role
                    ),
                ));
            }
            if message.content.is_empty() {
                return Err(ConfigError::new(
                    format!("{list}[{index}].content"),
                    "must not be empty",
                ));
            }
        }
    }
    Ok(Arc::new(PromptDecorator {
        prepend: config.prepend,
        append: config.append,
        only_if_no_system: config.only_if_no_system,
        decorated: ctx.counter("decorated"),
        not_chat: ctx.counter("not_chat"),
    }))
}

/// Adds text to Anthropic's top-level `system` (absent, a string, or a list of blocks).
fn extend_system(doc: &mut Value, before: &[String], after: &[String]) {
    if before.is_empty() && after.is_empty() {
        return;
    }
    let object = doc.as_object_mut().expect("checked to be an object");
    match object.get_mut("system") {
        Some(Value::Array(blocks)) => {
            let block = |text: &String| json!({"type": "text", "text": text});
            let mut merged: Vec<Value> = before.iter().map(block).collect();
            merged.append(blocks);
            merged.extend(after.iter().map(block));
            *blocks = merged;
        }
        existing => {
            let current = existing
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .map(str::to_string);
            let parts: Vec<&str> = before
                .iter()
                .map(String::as_str)
                .chain(current.as_deref())
                .chain(after.iter().map(String::as_str))
                .collect();
            let joined = parts.join("\n\n");
            object.insert("system".into(), Value::String(joined));
        }
    }
}

impl Plugin for PromptDecorator {
    fn request_edits(&self) -> RequestEdits {
        RequestEdits::BODY
    }

    fn request_need(&self) -> PhaseNeed {
        PhaseNeed::Body
    }

    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        let anthropic = Api::from_path(&ctx.request_header(":path").unwrap_or_default()) == Api::Anthropic;
        let invalid =
            |err: payload_processor_core::JsonError| PluginError::bad_request("invalid_json", err.to_string());
        let doc = ctx.body().doc().map_err(invalid)?;
        let Some(messages) = doc.get("messages").and_then(Value::as_array) else {
            ctx.increment(self.not_chat);
            return Ok(Decision::Continue);
        };
        let has_system = messages
            .iter()
            .any(|m| matches!(m.get("role").and_then(Value::as_str), Some("system" | "developer")))
            || doc.get("system").is_some_and(|s| !s.is_null());
        let wanted = |m: &&MessageConfig| !(m.is_system() && self.only_if_no_system && has_system);
        let prepend: Vec<&MessageConfig> = self.prepend.iter().filter(wanted).collect();
        let append: Vec<&MessageConfig> = self.append.iter().filter(wanted).collect();
        if prepend.is_empty() && append.is_empty() {
            return Ok(Decision::Continue);
        }
        let to_message = |m: &&MessageConfig| json!({"role": m.role, "content": m.content});
        let doc = ctx.body().doc_mut().map_err(invalid)?;
        if anthropic {
            let system_text = |list: &[&MessageConfig]| -> Vec<String> {
                list.iter()
                    .filter(|m| m.is_system())
                    .map(|m| m.content.clone())
                    .collect()
            };
            extend_system(doc, &system_text(&prepend), &system_text(&append));
        }
        let in_messages = |m: &&&MessageConfig| !(anthropic && m.is_system());
        let messages = doc["messages"].as_array_mut().expect("checked above");
        let mut merged: Vec<Value> = prepend.iter().filter(in_messages).map(to_message).collect();
        merged.append(messages);
        merged.extend(append.iter().filter(in_messages).map(to_message));
        *messages = merged;
        ctx.increment(self.decorated);
        Ok(Decision::Continue)
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::run_request_at;
    use serde_json::{json, Value};

    const CHAIN: &str = r#"
processors:
  - name: deco
    type: prompt-decorator
    parameters:
      onlyIfNoSystem: true
      prepend: [{role: system, content: "Be brief."}]
      append: [{role: user, content: "Answer in English."}]
"#;

    fn decorate(path: &str, body: Value) -> Value {
        let (host, _) = run_request_at(path, CHAIN, &[], &serde_json::to_vec(&body).unwrap());
        assert!(host.reply.is_none());
        serde_json::from_slice(&host.request_body).unwrap()
    }

    #[test]
    fn openai_chat_gets_system_first_and_user_last() {
        let out = decorate(
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        );
        assert_eq!(
            out["messages"],
            json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                   {"role": "user", "content": "Answer in English."}])
        );
        let out = decorate(
            "/v1/chat/completions",
            json!({"messages": [{"role": "system", "content": "Own."}]}),
        );
        assert_eq!(
            out["messages"][0]["content"], "Own.",
            "onlyIfNoSystem keeps the client's system prompt alone"
        );
        assert_eq!(out["messages"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn anthropic_system_goes_top_level() {
        let out = decorate(
            "/v1/messages",
            json!({"model": "c", "messages": [{"role": "user", "content": "hi"}]}),
        );
        assert_eq!(out["system"], "Be brief.");
        assert_eq!(out["messages"].as_array().unwrap().len(), 2);
        assert_eq!(out["messages"][1]["content"], "Answer in English.");
        let out = decorate("/v1/messages", json!({"system": "Own.", "messages": []}));
        assert_eq!(out["system"], "Own.");
    }

    #[test]
    fn non_chat_bodies_pass_untouched() {
        let (host, chain) = run_request_at("/v1/embeddings", CHAIN, &[], br#"{"input":"x"}"#);
        assert_eq!(host.body_replacements, 0);
        assert_eq!(host.counter(&chain, "processor.deco.not_chat"), 1);
    }

    #[test]
    fn bad_configs_are_refused_with_paths() {
        for (parameters, expected) in [
            ("{}", "processors[0].parameters.prepend: give at least one"),
            (
                "{append: [{role: robot, content: x}]}",
                "processors[0].parameters.append[0].role: unknown role",
            ),
            (
                "{prepend: [{role: user, content: ''}]}",
                "processors[0].parameters.prepend[0].content:",
            ),
        ] {
            let yaml = format!("processors: [{{name: d, type: prompt-decorator, parameters: {parameters}}}]");
            let err = payload_processor_core::Chain::load(&yaml, &crate::builtin_registry())
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(expected), "{parameters}: {err}");
        }
    }
}
