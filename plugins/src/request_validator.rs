//! `request-validator`: rejects a request that breaks declared rules before any upstream work,
//! with a 4xx OpenAI-shaped error and `x-should-retry: false` (the OpenAI SDKs honour it), so
//! a doomed request never costs a model server anything.
//!
//! The users' reference (a full example, every parameter, behaviour, quality): `docs/plugins/request-validator.md`.

use crate::common::field_path;
use payload_processor_core::{
    BuildContext, ConfigError, Context, Decision, FieldPath, LocalReply, PhaseNeed, Plugin, PluginError, RequestEdits,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

/// Registry key.
pub const TYPE_NAME: &str = "request-validator";

/// Parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(rename = "RequestValidatorParameters")]
pub struct Config {
    /// Fields (names or JSONPaths) that must be present and not null.
    #[serde(default)]
    pub required_fields: Vec<String>,
    /// The only models accepted.
    #[serde(default)]
    pub allowed_models: Option<Vec<String>>,
    /// Most entries in `messages`.
    #[serde(default)]
    pub max_messages: Option<usize>,
    /// Most characters of prompt text.
    #[serde(default)]
    pub max_prompt_chars: Option<usize>,
    /// Largest accepted output-token cap.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Whether `stream: true` is accepted (default true).
    #[serde(default = "yes")]
    pub allow_stream: bool,
    /// Request header with an absolute deadline.
    #[serde(default)]
    pub deadline_header: Option<String>,
    /// Body field with an absolute deadline or expiry.
    #[serde(default)]
    pub deadline_field: Option<String>,
    /// How long before the deadline a request is already refused.
    #[serde(default, deserialize_with = "payload_processor_core::config::deserialize_duration")]
    #[schemars(with = "Option<String>")]
    pub deadline_margin: Option<Duration>,
}

fn yes() -> bool {
    true
}

/// The plugin.
#[derive(Debug)]
pub struct RequestValidator {
    required: Vec<FieldPath>,
    allowed_models: Option<Vec<String>>,
    max_messages: Option<usize>,
    max_prompt_chars: Option<usize>,
    max_tokens: Option<u64>,
    allow_stream: bool,
    deadline_header: Option<String>,
    deadline_field: Option<FieldPath>,
    margin_nanos: u64,
    /// Some rule reads the whole document (decided at load).
    reads_document: bool,
}

/// Factory.
pub fn build(parameters: &Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    let config: Config = ctx.parameters(parameters)?;
    let required = config
        .required_fields
        .iter()
        .enumerate()
        .map(|(i, f)| field_path(f, &format!("requiredFields[{i}]")))
        .collect::<Result<_, _>>()?;
    if config.allowed_models.as_ref().is_some_and(Vec::is_empty) {
        return Err(ConfigError::new(
            "allowedModels",
            "an empty list would refuse every request",
        ));
    }
    if let Some(header) = &config.deadline_header {
        crate::common::validate_header_name(header, "deadlineHeader")?;
    }
    let reads_document = config.allowed_models.is_some()
        || config.max_messages.is_some()
        || config.max_prompt_chars.is_some()
        || config.max_tokens.is_some()
        || !config.allow_stream;
    Ok(Arc::new(RequestValidator {
        reads_document,
        required,
        allowed_models: config.allowed_models,
        max_messages: config.max_messages,
        max_prompt_chars: config.max_prompt_chars,
        max_tokens: config.max_tokens,
        allow_stream: config.allow_stream,
        deadline_header: config.deadline_header.map(|h| h.to_ascii_lowercase()),
        deadline_field: config
            .deadline_field
            .as_deref()
            .map(|f| field_path(f, "deadlineField"))
            .transpose()?,
        margin_nanos: config
            .deadline_margin
            .map_or(0, |m| u64::try_from(m.as_nanos()).unwrap_or(u64::MAX)),
    }))
}

/// A deadline as Unix seconds (integer or fraction) or RFC 3339, in nanoseconds.
fn parse_deadline(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_f64().filter(|s| *s >= 0.0).map(|s| (s * 1e9) as u64),
        Value::String(text) => {
            if let Ok(seconds) = text.trim().parse::<f64>() {
                return (seconds >= 0.0).then_some((seconds * 1e9) as u64);
            }
            let time = humantime::parse_rfc3339_weak(text.trim()).ok()?;
            u64::try_from(time.duration_since(UNIX_EPOCH).ok()?.as_nanos()).ok()
        }
        _ => None,
    }
}

/// Characters of user-visible prompt text in the known request shapes.
fn prompt_chars(doc: &Value) -> usize {
    fn text(value: &Value) -> usize {
        match value {
            Value::String(s) => s.chars().count(),
            Value::Array(items) => items.iter().map(text).sum(),
            Value::Object(object) => ["content", "text"]
                .iter()
                .filter_map(|key| object.get(*key))
                .map(text)
                .sum(),
            _ => 0,
        }
    }
    ["messages", "prompt", "input", "system"]
        .iter()
        .filter_map(|key| doc.get(*key))
        .map(text)
        .sum()
}

fn refuse(status: u16, code: &str, message: String) -> Decision {
    let mut reply = LocalReply::json_error(status, code, &message);
    reply.headers.push(("x-should-retry".into(), "false".into()));
    Decision::Reject(reply)
}

impl RequestValidator {
    fn check_deadline(&self, ctx: &mut Context<'_>, doc_deadline: Option<Value>) -> Option<Decision> {
        let now = ctx.unix_time_nanos();
        let header = self.deadline_header.as_deref().and_then(|h| ctx.header(h));
        let sources = [
            header.map(Value::String).map(|v| ("deadline header", v)),
            doc_deadline.map(|v| ("deadline field", v)),
        ];
        for (what, value) in sources.into_iter().flatten() {
            let Some(deadline) = parse_deadline(&value) else {
                return Some(refuse(
                    400,
                    "invalid_deadline",
                    format!("the {what} is not a Unix time or RFC 3339"),
                ));
            };
            if deadline <= now.saturating_add(self.margin_nanos) {
                return Some(refuse(
                    400,
                    "deadline_exceeded",
                    format!("the {what} has passed or will before the request could complete"),
                ));
            }
        }
        None
    }
}

impl Plugin for RequestValidator {
    fn request_edits(&self) -> RequestEdits {
        RequestEdits::NONE
    }

    fn request_need(&self) -> PhaseNeed {
        PhaseNeed::Body
    }

    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        let invalid =
            |err: payload_processor_core::JsonError| PluginError::bad_request("invalid_json", err.to_string());
        // Rules on the whole document need it parsed anyway: parse once up front so the field
        // reads below use the tree instead of scanning the bytes again.
        if self.reads_document {
            ctx.body().doc().map_err(invalid)?;
        }
        // Deadlines first: the cheapest and the most final.
        let doc_deadline = match &self.deadline_field {
            Some(path) => ctx.body_field(path).map_err(invalid)?,
            None => None,
        };
        if let Some(refusal) = self.check_deadline(ctx, doc_deadline) {
            return Ok(refusal);
        }
        for path in &self.required {
            if matches!(ctx.body_field(path).map_err(invalid)?, None | Some(Value::Null)) {
                return Ok(refuse(
                    400,
                    "missing_field",
                    format!("field {} is required", path.describe()),
                ));
            }
        }
        if !self.reads_document {
            return Ok(Decision::Continue);
        }
        let doc = ctx.body().doc().map_err(invalid)?;
        if let Some(allowed) = &self.allowed_models {
            let model = doc.get("model").and_then(Value::as_str).unwrap_or_default();
            if !allowed.iter().any(|m| m == model) {
                return Ok(refuse(
                    400,
                    "model_not_allowed",
                    format!("model {model:?} is not offered here"),
                ));
            }
        }
        if let Some(max) = self.max_messages {
            let count = doc.get("messages").and_then(Value::as_array).map_or(0, Vec::len);
            if count > max {
                return Ok(refuse(
                    400,
                    "too_many_messages",
                    format!("{count} messages; at most {max} allowed"),
                ));
            }
        }
        if let Some(max) = self.max_prompt_chars {
            let chars = prompt_chars(doc);
            if chars > max {
                return Ok(refuse(
                    400,
                    "prompt_too_long",
                    format!("{chars} prompt characters; at most {max}"),
                ));
            }
        }
        if let Some(max) = self.max_tokens {
            for key in ["max_tokens", "max_completion_tokens", "max_output_tokens"] {
                if let Some(asked) = doc.get(key).and_then(Value::as_u64).filter(|asked| *asked > max) {
                    return Ok(refuse(
                        400,
                        "max_tokens_too_large",
                        format!("{key} {asked} exceeds {max}"),
                    ));
                }
            }
        }
        if !self.allow_stream && doc.get("stream") == Some(&Value::Bool(true)) {
            return Ok(refuse(
                400,
                "stream_not_allowed",
                "streaming is not offered here".into(),
            ));
        }
        Ok(Decision::Continue)
    }
}

#[cfg(test)]
mod tests {
    use payload_processor_core::testing::{run_request_phase, FakeHost};
    use payload_processor_core::{Chain, Stream};
    use serde_json::{json, Value};
    use std::sync::Arc;

    const CHAIN: &str = r#"
processors:
  - name: v
    type: request-validator
    parameters:
      requiredFields: [model, "$.messages"]
      allowedModels: [m1, m2]
      maxMessages: 2
      maxPromptChars: 20
      maxTokens: 100
      allowStream: false
      deadlineHeader: x-deadline
      deadlineField: $.file.expires_at
      deadlineMargin: 2s
"#;
    const NOW: u64 = 1_800_000_000;

    fn check(headers: &[(&str, &str)], body: Value) -> Option<(u16, String)> {
        let chain = Arc::new(Chain::load(CHAIN, &crate::builtin_registry()).unwrap());
        let mut host = FakeHost::request("/v1/chat/completions", headers, &serde_json::to_vec(&body).unwrap());
        host.unix_time_nanos = NOW * 1_000_000_000;
        run_request_phase(&mut Stream::new(chain), &mut host);
        host.reply.map(|r| {
            assert_eq!(
                r.headers
                    .iter()
                    .find(|(k, _)| k == "x-should-retry")
                    .map(|(_, v)| v.as_str()),
                Some("false")
            );
            (r.status, r.json()["error"]["code"].as_str().unwrap().to_string())
        })
    }

    #[test]
    fn each_rule_refuses_with_its_own_code() {
        let ok = json!({"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50});
        assert_eq!(check(&[], ok.clone()), None);
        let with = |key: &str, value: Value| {
            let mut body = ok.clone();
            body[key] = value;
            body
        };
        let code = |headers: &[(&str, &str)], body| check(headers, body).map(|(_, code)| code);
        assert_eq!(code(&[], json!({"model": "m1"})).as_deref(), Some("missing_field"));
        assert_eq!(
            code(&[], with("model", json!("m3"))).as_deref(),
            Some("model_not_allowed")
        );
        assert_eq!(
            code(&[], with("messages", json!([{}, {}, {}]))).as_deref(),
            Some("too_many_messages")
        );
        let long = json!([{"role": "user", "content": [{"type": "text", "text": "x".repeat(21)}]}]);
        assert_eq!(code(&[], with("messages", long)).as_deref(), Some("prompt_too_long"));
        assert_eq!(
            code(&[], with("max_completion_tokens", json!(101))).as_deref(),
            Some("max_tokens_too_large")
        );
        assert_eq!(
            code(&[], with("stream", json!(true))).as_deref(),
            Some("stream_not_allowed")
        );
    }

    #[test]
    fn deadlines_in_headers_and_fields_with_a_margin() {
        let ok = json!({"model": "m1", "messages": []});
        let code = |headers: &[(&str, &str)], body| check(headers, body).map(|(_, code)| code);
        let future = (NOW + 60).to_string();
        let soon = (NOW + 1).to_string();
        assert_eq!(code(&[("x-deadline", &future)], ok.clone()), None);
        assert_eq!(
            code(&[("x-deadline", &soon)], ok.clone()).as_deref(),
            Some("deadline_exceeded"),
            "inside margin"
        );
        assert_eq!(
            code(&[("x-deadline", "2020-01-01T00:00:00Z")], ok.clone()).as_deref(),
            Some("deadline_exceeded")
        );
        assert_eq!(
            code(&[("x-deadline", "soon")], ok.clone()).as_deref(),
            Some("invalid_deadline")
        );
        let expired = json!({"model": "m1", "messages": [], "file": {"expires_at": NOW - 5}});
        assert_eq!(code(&[], expired).as_deref(), Some("deadline_exceeded"));
        let valid = json!({"model": "m1", "messages": [], "file": {"expires_at": "2030-01-01T00:00:00Z"}});
        assert_eq!(code(&[], valid), None);
    }

    #[test]
    fn bad_configs_are_refused_with_paths() {
        for (parameters, expected) in [
            ("{allowedModels: []}", "processors[0].parameters.allowedModels:"),
            (
                "{requiredFields: ['$.a[?@.b']}",
                "processors[0].parameters.requiredFields[0]:",
            ),
            ("{deadlineMargin: soon}", "processors[0].parameters.deadlineMargin:"),
            ("{maxMessages: -1}", "processors[0].parameters.maxMessages:"),
        ] {
            let yaml = format!("processors: [{{name: v, type: request-validator, parameters: {parameters}}}]");
            let err = Chain::load(&yaml, &crate::builtin_registry()).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{parameters}: {err}");
        }
    }
}
