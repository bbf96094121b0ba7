//! `token-usage`: reads token usage from OpenAI (chat completions, completions, responses API)
//! and Anthropic (messages) responses, buffered or streamed, and records it in Envoy dynamic
//! metadata, so rate limits and access logs can use it, with no ext_proc hop.
//!
//! The users' reference (a full example, every parameter, behaviour, quality): `docs/plugins/token-usage.md`.

use crate::common::validate_header_name;
use payload_processor_core::{
    Api, BuildContext, ConfigError, Context, Counter, Decision, EventDecision, FieldPath, PhaseNeed, Plugin,
    PluginError, RequestEdits, SseEvent, StreamNeed,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

/// Registry key.
pub const TYPE_NAME: &str = "token-usage";

/// Parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(rename = "TokenUsageParameters")]
pub struct Config {
    /// Dynamic metadata namespace.
    #[serde(default = "default_namespace")]
    pub metadata_namespace: String,
    /// Ask OpenAI-style upstreams for usage on streams even when the client did not.
    #[serde(default)]
    pub force_include_usage: bool,
    /// Prefix of usage response headers on buffered responses (`x-usage-`).
    #[serde(default)]
    pub response_headers: Option<String>,
    /// The key names in `metadataNamespace`: ours (`input_tokens`, ...) or the OpenTelemetry
    /// GenAI attribute names (`gen_ai.usage.input_tokens`, ...).
    #[serde(default)]
    pub metadata_keys: MetadataKeys,
    /// Also write Envoy's own AI record, `envoy.data.ai.v3.TokenUsage`, as typed dynamic
    /// metadata and its Struct projection in namespace `envoy.ai.token_usage`, where the host
    /// can (the `.so` on Envoy 1.40; default true).
    #[serde(default = "yes")]
    pub envoy_ai_metadata: bool,
}

fn yes() -> bool {
    true
}

payload_processor_core::config_enum! {
    /// Which names the usage keys get.
    #[derive(Default)]
    pub enum MetadataKeys {
        #[default]
        /// `input_tokens`, `output_tokens`, `total_tokens`, `cached_input_tokens`, `model`,
        /// `ttft_ms`, `itl_ms`.
        Default = "Default",
        /// The OpenTelemetry GenAI names where one exists: `gen_ai.usage.input_tokens`,
        /// `gen_ai.usage.output_tokens`, `gen_ai.usage.cache_read.input_tokens`,
        /// `gen_ai.response.model`; the others keep their names.
        OpenTelemetry = "OpenTelemetry",
    }
}

impl MetadataKeys {
    fn key(self, ours: &'static str) -> &'static str {
        match (self, ours) {
            (MetadataKeys::OpenTelemetry, "input_tokens") => "gen_ai.usage.input_tokens",
            (MetadataKeys::OpenTelemetry, "output_tokens") => "gen_ai.usage.output_tokens",
            (MetadataKeys::OpenTelemetry, "cached_input_tokens") => "gen_ai.usage.cache_read.input_tokens",
            (MetadataKeys::OpenTelemetry, "model") => "gen_ai.response.model",
            _ => ours,
        }
    }
}

/// Envoy's namespace for token usage (what its AI filters write and read).
pub const ENVOY_AI_NAMESPACE: &str = "envoy.ai.token_usage";
/// The type URL of Envoy's token usage record.
pub const ENVOY_AI_TYPE_URL: &str = "type.googleapis.com/envoy.data.ai.v3.TokenUsage";

/// `envoy.data.ai.v3.TokenUsage` as Envoy 1.40 declares it (field numbers from its
/// descriptor); counts are `google.protobuf.UInt64Value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EnvoyTokenUsage {
    /// `envoy.type.ai.v3.LLMProtocol`.
    #[prost(int32, tag = "1")]
    pub llm_protocol: i32,
    /// The model the response reported.
    #[prost(string, tag = "2")]
    pub model: String,
    /// Every input token (cached and cache writes included).
    #[prost(message, optional, tag = "3")]
    pub input_tokens: Option<u64>,
    /// Generated tokens.
    #[prost(message, optional, tag = "4")]
    pub output_tokens: Option<u64>,
    /// `input_tokens + output_tokens`, when both are known.
    #[prost(message, optional, tag = "5")]
    pub total_tokens: Option<u64>,
    /// Cache reads.
    #[prost(message, optional, tag = "6")]
    pub input_token_details: Option<EnvoyInputTokenDetails>,
    /// The total the provider reported.
    #[prost(message, optional, tag = "8")]
    pub provider_total_tokens: Option<u64>,
    /// `ExtractionStatus`: COMPLETE = 1.
    #[prost(int32, tag = "9")]
    pub extraction_status: i32,
}

/// `envoy.data.ai.v3.InputTokenDetails`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EnvoyInputTokenDetails {
    /// Cache-read input tokens.
    #[prost(message, optional, tag = "1")]
    pub cached_tokens: Option<u64>,
}

/// `envoy.type.ai.v3.LLMProtocol` of an API.
fn llm_protocol(api: Api) -> (i32, &'static str) {
    match api {
        Api::OpenAiChat => (1, "OPENAI_CHAT_COMPLETIONS"),
        Api::OpenAiResponses => (2, "OPENAI_RESPONSES"),
        Api::Anthropic => (3, "ANTHROPIC_MESSAGES"),
        Api::OpenAiCompletions | Api::Unknown => (0, "LLM_PROTOCOL_UNSPECIFIED"),
    }
}

fn default_namespace() -> String {
    "io.envoy.ai_gateway".into()
}

/// Token counts as a response reports them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Every prompt token, cached ones included.
    pub input: Option<u64>,
    /// Generated tokens.
    pub output: Option<u64>,
    /// Input plus output (as reported, else computed).
    pub total: Option<u64>,
    /// Prompt tokens served from a cache.
    pub cached_input: Option<u64>,
}

impl Usage {
    /// Reads a `usage` object of any supported provider.
    pub fn from_value(usage: &Value) -> Option<Usage> {
        let usage = usage.as_object()?;
        let number = |key: &str| usage.get(key).and_then(Value::as_u64);
        let nested = |outer: &str, key: &str| usage.get(outer).and_then(|o| o.get(key)).and_then(Value::as_u64);
        let parsed = if usage.contains_key("prompt_tokens") || usage.contains_key("completion_tokens") {
            // OpenAI chat completions and completions.
            Usage {
                input: number("prompt_tokens"),
                output: number("completion_tokens"),
                total: number("total_tokens"),
                cached_input: nested("prompt_tokens_details", "cached_tokens"),
            }
        } else if usage.contains_key("total_tokens") || usage.contains_key("input_tokens_details") {
            // OpenAI responses API.
            Usage {
                input: number("input_tokens"),
                output: number("output_tokens"),
                total: number("total_tokens"),
                cached_input: nested("input_tokens_details", "cached_tokens"),
            }
        } else {
            // Anthropic: cache reads and writes are counted apart from input_tokens.
            let cache_read = number("cache_read_input_tokens");
            let cache_write = number("cache_creation_input_tokens");
            let input = match (number("input_tokens"), cache_read, cache_write) {
                (None, None, None) => None,
                (a, b, c) => Some(a.unwrap_or(0) + b.unwrap_or(0) + c.unwrap_or(0)),
            };
            Usage {
                input,
                output: number("output_tokens"),
                total: None,
                cached_input: cache_read,
            }
        };
        (parsed != Usage::default()).then_some(parsed)
    }

    /// Later reports win field by field (Anthropic splits usage over two events).
    fn merge(&mut self, later: Usage) {
        self.input = later.input.or(self.input);
        self.output = later.output.or(self.output);
        self.total = later.total.or(self.total);
        self.cached_input = later.cached_input.or(self.cached_input);
    }

    fn total(&self) -> Option<u64> {
        self.total.or_else(|| Some(self.input? + self.output?))
    }
}

/// Per-stream state.
#[derive(Debug, Default)]
struct StreamState {
    /// The request was changed to ask for usage the client did not ask for.
    strip_usage_chunk: bool,
    usage: Usage,
    model: Option<String>,
    first_content_nanos: Option<u64>,
    last_content_nanos: u64,
    content_events: u64,
    /// The record of the complete answer was written (at the terminal event, or the end).
    finished: bool,
}

/// The plugin.
#[derive(Debug)]
pub struct TokenUsage {
    namespace: String,
    keys: MetadataKeys,
    envoy_ai_metadata: bool,
    envoy_record: Counter,
    force_include_usage: bool,
    header_prefix: Option<String>,
    recorded: Counter,
    missing: Counter,
    unreadable: Counter,
    forced: Counter,
    stripped: Counter,
    stream_path: FieldPath,
    include_path: FieldPath,
}

/// Factory.
pub fn build(parameters: &Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    let config: Config = ctx.parameters(parameters)?;
    if config.metadata_namespace.trim().is_empty() {
        return Err(ConfigError::new("metadataNamespace", "must not be empty"));
    }
    if let Some(prefix) = &config.response_headers {
        validate_header_name(prefix, "responseHeaders")?;
    }
    Ok(Arc::new(TokenUsage {
        namespace: config.metadata_namespace,
        keys: config.metadata_keys,
        envoy_ai_metadata: config.envoy_ai_metadata,
        envoy_record: ctx.counter("envoy_ai_record"),
        force_include_usage: config.force_include_usage,
        header_prefix: config.response_headers.map(|p| p.to_ascii_lowercase()),
        recorded: ctx.counter("usage_recorded"),
        missing: ctx.counter("usage_missing"),
        unreadable: ctx.counter("unreadable"),
        forced: ctx.counter("include_usage_forced"),
        stripped: ctx.counter("usage_chunk_stripped"),
        stream_path: FieldPath::Members(vec!["stream".into()]),
        include_path: FieldPath::Members(vec!["stream_options".into(), "include_usage".into()]),
    }))
}

/// Does this streamed event carry generated output (the clock for TTFT and ITL)?
fn is_content_event(event: &mut SseEvent) -> bool {
    match event.event_type() {
        Some("content_block_delta") => return true,
        Some(kind) if kind.starts_with("response.") => return kind.ends_with(".delta"),
        Some(_) => return false,
        None => {}
    }
    if event.is_done_marker() {
        return false;
    }
    let Ok(chunk) = event.json() else { return false };
    let Some(choices) = chunk.get("choices").and_then(Value::as_array) else {
        return false;
    };
    choices.iter().any(|choice| {
        let text = choice
            .get("text")
            .and_then(Value::as_str)
            .is_some_and(|t| !t.is_empty());
        let delta = choice.get("delta").and_then(Value::as_object).is_some_and(|delta| {
            ["content", "tool_calls", "reasoning_content", "refusal", "function_call"]
                .iter()
                .any(|key| match delta.get(*key) {
                    None | Some(Value::Null) => false,
                    Some(Value::String(s)) => !s.is_empty(),
                    Some(_) => true,
                })
        });
        text || delta
    })
}

/// Usage and model carried by one streamed event, for every supported shape.
fn event_usage(data: &Value) -> (Option<Usage>, Option<String>) {
    let model = |v: &Value| v.get("model").and_then(Value::as_str).map(str::to_string);
    match data.get("type").and_then(Value::as_str) {
        // Anthropic: usage in message_start.message and in message_delta.
        Some("message_start") => {
            let message = data.get("message").unwrap_or(&Value::Null);
            (message.get("usage").and_then(Usage::from_value), model(message))
        }
        // OpenAI responses API: the final response object.
        Some(kind) if kind.starts_with("response.") => {
            let response = data.get("response").unwrap_or(&Value::Null);
            (response.get("usage").and_then(Usage::from_value), model(response))
        }
        _ => (data.get("usage").and_then(Usage::from_value), model(data)),
    }
}

impl TokenUsage {
    /// The usage headers belong to the gateway: whatever the upstream sent under the prefix goes.
    fn remove_spoofed_headers(&self, ctx: &mut Context<'_>) {
        if let Some(prefix) = &self.header_prefix {
            for name in ["input-tokens", "output-tokens", "total-tokens", "cached-input-tokens"] {
                ctx.remove_header(&format!("{prefix}{name}"));
            }
        }
    }

    fn write_usage(&self, ctx: &mut Context<'_>, usage: &Usage) {
        let fields = [
            ("input_tokens", usage.input),
            ("output_tokens", usage.output),
            ("total_tokens", usage.total()),
            ("cached_input_tokens", usage.cached_input),
        ];
        for (key, value) in fields {
            if let Some(value) = value {
                ctx.set_metadata_number(&self.namespace, self.keys.key(key), value as f64);
            }
        }
    }

    fn write_model(&self, ctx: &mut Context<'_>, model: &str) {
        ctx.set_metadata(&self.namespace, self.keys.key("model"), model);
    }

    /// Envoy's own record, once per exchange, as typed metadata and its Struct projection
    /// (the shape Envoy's AI filters publish), where the host can write them.
    fn write_envoy_record(&self, ctx: &mut Context<'_>, usage: &Usage, model: Option<&str>) {
        if !self.envoy_ai_metadata {
            return;
        }
        let path = ctx.request_header(":path").unwrap_or_default();
        let (protocol, protocol_name) = llm_protocol(Api::from_path(&path));
        let total = match (usage.input, usage.output) {
            (Some(input), Some(output)) => Some(input + output),
            _ => None,
        };
        let record = EnvoyTokenUsage {
            llm_protocol: protocol,
            model: model.unwrap_or_default().to_string(),
            input_tokens: usage.input,
            output_tokens: usage.output,
            total_tokens: total,
            input_token_details: usage.cached_input.map(|cached| EnvoyInputTokenDetails {
                cached_tokens: Some(cached),
            }),
            provider_total_tokens: usage.total,
            extraction_status: 1,
        };
        let typed = ctx.set_typed_metadata(
            ENVOY_AI_NAMESPACE,
            ENVOY_AI_TYPE_URL,
            &prost::Message::encode_to_vec(&record),
        );
        let mut projection = serde_json::Map::new();
        projection.insert("llm_protocol".into(), protocol_name.into());
        if let Some(model) = model {
            projection.insert("model".into(), model.into());
        }
        for (key, value) in [
            ("input_tokens", usage.input),
            ("output_tokens", usage.output),
            ("total_tokens", total),
            ("provider_total_tokens", usage.total),
        ] {
            if let Some(value) = value {
                projection.insert(key.into(), value.into());
            }
        }
        if let Some(cached) = usage.cached_input {
            projection.insert(
                "input_token_details".into(),
                serde_json::json!({"cached_tokens": cached}),
            );
        }
        projection.insert("extraction_status".into(), "COMPLETE".into());
        let projected = ctx.set_metadata_struct(ENVOY_AI_NAMESPACE, &projection);
        if typed && projected {
            ctx.increment(self.envoy_record);
        }
    }
}

impl Plugin for TokenUsage {
    fn request_edits(&self) -> RequestEdits {
        RequestEdits::BODY
    }

    fn request_need(&self) -> PhaseNeed {
        if self.force_include_usage {
            PhaseNeed::Body
        } else {
            PhaseNeed::Skip
        }
    }

    fn response_need(&self) -> PhaseNeed {
        PhaseNeed::Body
    }

    fn stream_need(&self) -> Option<StreamNeed> {
        Some(StreamNeed::default())
    }

    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        let path = ctx.request_header(":path").unwrap_or_default();
        if !matches!(Api::from_path(&path), Api::OpenAiChat | Api::OpenAiCompletions) {
            return Ok(Decision::Continue);
        }
        let asked = match (ctx.body_field(&self.stream_path), ctx.body_field(&self.include_path)) {
            (Ok(stream), Ok(include)) => (stream == Some(Value::Bool(true))).then_some(include),
            _ => {
                ctx.increment(self.unreadable);
                return Ok(Decision::Continue);
            }
        };
        let Some(include) = asked else {
            return Ok(Decision::Continue); // not a streamed request
        };
        if include != Some(Value::Bool(true)) {
            if ctx.body().set(&self.include_path, Value::Bool(true)).is_err() {
                ctx.increment(self.unreadable); // stream_options is not an object
                return Ok(Decision::Continue);
            }
            ctx.state::<StreamState>().strip_usage_chunk = true;
            ctx.increment(self.forced);
        }
        Ok(Decision::Continue)
    }

    fn on_response(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        self.remove_spoofed_headers(ctx);
        if ctx.body_is_blank() {
            return Ok(Decision::Continue);
        }
        // Two members read where Envoy keeps the answer: no copy, no parse of the whole answer.
        let (usage, model) = match ctx.body_member_texts(["usage", "model"], usize::MAX) {
            Ok([usage, model]) => (
                usage
                    .and_then(|text| serde_json::from_slice::<Value>(&text).ok())
                    .as_ref()
                    .and_then(Usage::from_value),
                model.and_then(|text| serde_json::from_slice::<String>(&text).ok()),
            ),
            Err(_) => {
                ctx.increment(self.unreadable);
                return Ok(Decision::Continue);
            }
        };
        if let Some(model) = &model {
            self.write_model(ctx, model);
        }
        let Some(usage) = usage else {
            ctx.increment(self.missing);
            return Ok(Decision::Continue);
        };
        self.write_usage(ctx, &usage);
        self.write_envoy_record(ctx, &usage, model.as_deref());
        ctx.increment(self.recorded);
        if let Some(prefix) = &self.header_prefix {
            let headers = [
                ("input-tokens", usage.input),
                ("output-tokens", usage.output),
                ("total-tokens", usage.total()),
                ("cached-input-tokens", usage.cached_input),
            ];
            for (name, value) in headers {
                if let Some(value) = value {
                    ctx.set_header(&format!("{prefix}{name}"), &value.to_string())?;
                }
            }
        }
        Ok(Decision::Continue)
    }

    fn on_response_event(&self, ctx: &mut Context<'_>, event: &mut SseEvent) -> Result<EventDecision, PluginError> {
        let decision = self.observe_event(ctx, event)?;
        // The answer is complete at the protocol's last event; clients often leave right after
        // it, before the stream's end reaches the filter.
        if event.is_terminal() && !ctx.state::<StreamState>().finished {
            self.finish_stream(ctx);
        }
        Ok(decision)
    }

    fn on_stream_end(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        if !ctx.state::<StreamState>().finished {
            self.finish_stream(ctx);
        }
        Ok(Decision::Continue)
    }
}

impl TokenUsage {
    fn observe_event(&self, ctx: &mut Context<'_>, event: &mut SseEvent) -> Result<EventDecision, PluginError> {
        if !ctx.headers_sent() {
            self.remove_spoofed_headers(ctx); // a stream's usage comes too late for headers
        }
        let now = ctx.now_nanos();
        if is_content_event(event) {
            let started = ctx.stream_started_nanos();
            let state = ctx.state::<StreamState>();
            state.content_events += 1;
            state.last_content_nanos = now;
            if state.first_content_nanos.is_none() {
                state.first_content_nanos = Some(now);
                let ttft_ms = now.saturating_sub(started) as f64 / 1e6;
                ctx.set_metadata_number(&self.namespace, "ttft_ms", ttft_ms);
            }
        }
        if event.is_done_marker() || !event.data().is_some_and(|d| d.trim_start().starts_with('{')) {
            return Ok(EventDecision::Continue);
        }
        let (usage, model) = match event.json() {
            Ok(data) => event_usage(data),
            Err(_) => {
                ctx.increment(self.unreadable);
                return Ok(EventDecision::Continue);
            }
        };
        let state = ctx.state::<StreamState>();
        let new_model = model.filter(|m| state.model.as_deref() != Some(m.as_str()));
        if let Some(model) = &new_model {
            state.model = Some(model.clone());
        }
        let strip = usage.is_some() && state.strip_usage_chunk;
        if let Some(usage) = usage {
            state.usage.merge(usage);
        }
        let merged = state.usage;
        if let Some(model) = new_model {
            self.write_model(ctx, &model);
        }
        if usage.is_none() {
            return Ok(EventDecision::Continue);
        }
        self.write_usage(ctx, &merged);
        if !strip {
            return Ok(EventDecision::Continue);
        }
        // The client did not ask for usage: hide what forceIncludeUsage added.
        ctx.increment(self.stripped);
        let chunk = event
            .json_mut()
            .map_err(|err| PluginError::internal("unreadable", err.to_string()))?;
        let has_choices = chunk
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(|c| !c.is_empty());
        if !has_choices {
            return Ok(EventDecision::Drop);
        }
        if let Some(object) = chunk.as_object_mut() {
            object.shift_remove("usage");
        }
        Ok(EventDecision::Continue)
    }

    /// What happens once per streamed answer: the counters, Envoy's record, the mean gap
    /// between tokens.
    fn finish_stream(&self, ctx: &mut Context<'_>) {
        let state = ctx.state::<StreamState>();
        state.finished = true;
        let usage = state.usage;
        let model = state.model.clone();
        let timing = state.first_content_nanos.map(|first| (first, state.last_content_nanos));
        let content_events = state.content_events;
        if usage == Usage::default() {
            ctx.increment(self.missing);
        } else {
            ctx.increment(self.recorded);
            // Published once, at the end of the stream, as Envoy's AI filters do.
            self.write_envoy_record(ctx, &usage, model.as_deref());
        }
        if let Some((first, last)) = timing {
            // Mean gap between output tokens after the first; chunks stand in for tokens when
            // the upstream reported no usage.
            let intervals = usage.output.unwrap_or(content_events).saturating_sub(1);
            if intervals > 0 {
                let itl_ms = last.saturating_sub(first) as f64 / 1e6 / intervals as f64;
                ctx.set_metadata_number(&self.namespace, "itl_ms", itl_ms);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use payload_processor_core::testing::{run_request_phase, FakeHost};
    use payload_processor_core::{BodyFlow, Chain, Direction, HeadersFlow, Stream};
    use serde_json::json;

    fn chain(parameters: &str) -> Arc<Chain> {
        let yaml = format!("processors: [{{name: usage, type: token-usage, parameters: {parameters}}}]");
        Arc::new(Chain::load(&yaml, &crate::builtin_registry()).unwrap())
    }

    fn metadata(host: &FakeHost, key: &str) -> Option<String> {
        host.metadata
            .get(&("io.envoy.ai_gateway".to_string(), key.to_string()))
            .cloned()
    }

    fn buffered(chain: &Arc<Chain>, path: &str, body: Value) -> FakeHost {
        let mut host = FakeHost::request(path, &[], b"{}");
        let mut stream = Stream::new(chain.clone());
        stream.on_request_headers(&mut host, true);
        host.response_headers
            .push(("content-type".into(), "application/json".into()));
        host.response_body = serde_json::to_vec(&body).unwrap();
        assert_eq!(stream.on_response_headers(&mut host, false), HeadersFlow::WaitForBody);
        assert_eq!(stream.on_response_body(&mut host, true), BodyFlow::Continue);
        host
    }

    #[test]
    fn reads_every_buffered_shape() {
        let chain = chain("{responseHeaders: x-usage-}");
        let cases = [
            (
                "/v1/chat/completions",
                json!({"model": "gpt", "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                        "prompt_tokens_details": {"cached_tokens": 4}}}),
                ["10", "5", "15", "4"],
            ),
            (
                "/v1/completions",
                json!({"model": "gpt", "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}),
                ["3", "2", "5", ""],
            ),
            (
                "/v1/responses",
                json!({"model": "gpt", "usage": {"input_tokens": 7, "output_tokens": 8, "total_tokens": 15,
                        "input_tokens_details": {"cached_tokens": 1}}}),
                ["7", "8", "15", "1"],
            ),
            (
                "/v1/messages",
                json!({"model": "claude", "usage": {"input_tokens": 20, "output_tokens": 9,
                        "cache_read_input_tokens": 100, "cache_creation_input_tokens": 5}}),
                ["125", "9", "134", "100"],
            ),
        ];
        for (path, body, [input, output, total, cached]) in cases {
            let host = buffered(&chain, path, body.clone());
            let got = |key| metadata(&host, key).unwrap_or_default();
            assert_eq!(
                [
                    got("input_tokens"),
                    got("output_tokens"),
                    got("total_tokens"),
                    got("cached_input_tokens")
                ],
                [input, output, total, cached],
                "{path}"
            );
            assert_eq!(metadata(&host, "model"), body["model"].as_str().map(str::to_string));
            assert_eq!(
                host.header_values(Direction::Response, "x-usage-total-tokens"),
                vec![total]
            );
            assert_eq!(host.body_replacements, 0, "the body is forwarded unchanged");
        }
    }

    #[test]
    fn unreadable_and_usage_free_bodies_never_block() {
        let chain = chain("{}");
        let host = buffered(&chain, "/v1/chat/completions", json!({"error": {"message": "x"}}));
        assert!(host.reply.is_none());
        assert_eq!(host.counter(&chain, "processor.usage.usage_missing"), 1);

        let mut host = FakeHost::request("/v1/chat/completions", &[], b"{}");
        let mut stream = Stream::new(chain.clone());
        stream.on_request_headers(&mut host, true);
        host.response_headers
            .push(("content-type".into(), "application/json".into()));
        host.response_body = b"{not json".to_vec();
        stream.on_response_headers(&mut host, false);
        assert_eq!(stream.on_response_body(&mut host, true), BodyFlow::Continue);
        assert!(host.reply.is_none());
        assert_eq!(host.counter(&chain, "processor.usage.unreadable"), 1);
    }

    fn streamed(chain: &Arc<Chain>, path: &str, request: Value, events: &[String]) -> (FakeHost, Vec<u8>) {
        let body = serde_json::to_vec(&request).unwrap();
        let mut host = FakeHost::request(path, &[], &body);
        let mut stream = Stream::new(chain.clone());
        run_request_phase(&mut stream, &mut host);
        host.response_headers
            .push(("content-type".into(), "text/event-stream".into()));
        assert_eq!(stream.on_response_headers(&mut host, false), HeadersFlow::WaitForBody);
        let mut client = Vec::new();
        for (i, event) in events.iter().enumerate() {
            host.response_body = event.as_bytes().to_vec();
            host.now.set(host.now.get() + 10_000_000); // 10 ms between events
            if stream.on_response_body(&mut host, i + 1 == events.len()) == BodyFlow::Continue {
                client.extend_from_slice(&host.response_body);
            }
        }
        (host, client)
    }

    fn chat_chunk(content: Option<&str>, usage: Option<Value>) -> String {
        let choices = match content {
            Some(text) => json!([{"index": 0, "delta": {"content": text}, "finish_reason": null}]),
            None => json!([]),
        };
        let mut chunk = json!({"id": "c", "object": "chat.completion.chunk", "model": "gpt-x", "choices": choices});
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        format!("data: {chunk}\n\n")
    }

    #[test]
    fn force_include_usage_asks_for_usage_and_hides_the_extra_chunk() {
        let chain = chain("{forceIncludeUsage: true}");
        let usage = json!({"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7});
        let events = [
            chat_chunk(Some("a"), None),
            chat_chunk(Some("b"), None),
            chat_chunk(Some("c"), None),
            chat_chunk(None, Some(usage)),
            "data: [DONE]\n\n".to_string(),
        ];
        let request = json!({"model": "m", "stream": true, "messages": []});
        let (host, client) = streamed(&chain, "/v1/chat/completions", request, &events);
        let sent: Value = serde_json::from_slice(&host.request_body).unwrap();
        assert_eq!(sent["stream_options"]["include_usage"], true);
        let client = String::from_utf8(client).unwrap();
        assert!(!client.contains("prompt_tokens"), "usage chunk stripped: {client}");
        assert!(client.ends_with("data: [DONE]\n\n"));
        assert_eq!(metadata(&host, "total_tokens").as_deref(), Some("7"));
        assert_eq!(metadata(&host, "model").as_deref(), Some("gpt-x"));
        assert!(metadata(&host, "ttft_ms").is_some());
        // Three tokens 10 ms apart: two intervals of 10 ms.
        let itl: f64 = metadata(&host, "itl_ms").unwrap().parse().unwrap();
        assert!((itl - 10.0).abs() < 0.5, "itl {itl}");

        // A client that asked for usage keeps its usage chunk.
        let request = json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}});
        let (host, client) = streamed(&chain, "/v1/chat/completions", request, &events);
        assert!(String::from_utf8(client).unwrap().contains("prompt_tokens"));
        assert_eq!(host.counter(&chain, "processor.usage.include_usage_forced"), 0);
    }

    #[test]
    fn anthropic_usage_is_merged_from_message_start_and_message_delta() {
        let chain = chain("{}");
        let events = [
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-x\",\"usage\":{\"input_tokens\":12,\"cache_read_input_tokens\":3,\"output_tokens\":1}}}\n\n".to_string(),
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n".to_string(),
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":6}}\n\n".to_string(),
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_string(),
        ];
        let (host, client) = streamed(&chain, "/v1/messages", json!({}), &events);
        assert_eq!(
            client,
            events.concat().as_bytes(),
            "an unchanged stream is byte-for-byte"
        );
        assert_eq!(metadata(&host, "input_tokens").as_deref(), Some("15"));
        assert_eq!(metadata(&host, "output_tokens").as_deref(), Some("6"));
        assert_eq!(metadata(&host, "total_tokens").as_deref(), Some("21"));
        assert_eq!(metadata(&host, "cached_input_tokens").as_deref(), Some("3"));
        assert_eq!(metadata(&host, "model").as_deref(), Some("claude-x"));
    }

    #[test]
    fn responses_api_usage_comes_from_response_completed() {
        let chain = chain("{}");
        let events = [
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n".to_string(),
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"model\":\"o-x\",\"usage\":{\"input_tokens\":5,\"output_tokens\":2,\"total_tokens\":7}}}\n\n".to_string(),
        ];
        let (host, _) = streamed(&chain, "/v1/responses", json!({}), &events);
        assert_eq!(metadata(&host, "total_tokens").as_deref(), Some("7"));
        assert_eq!(metadata(&host, "model").as_deref(), Some("o-x"));
    }

    #[test]
    fn bad_parameters_are_refused_with_paths() {
        let registry = crate::builtin_registry();
        for (parameters, expected) in [
            (
                "{metadataNamespace: ''}",
                "processors[0].parameters.metadataNamespace: must not be empty",
            ),
            ("{responseHeaders: 'x y'}", "processors[0].parameters.responseHeaders:"),
            ("{forceIncludeUsage: 3}", "processors[0].parameters.forceIncludeUsage:"),
        ] {
            let yaml = format!("processors: [{{name: u, type: token-usage, parameters: {parameters}}}]");
            let err = Chain::load(&yaml, &registry).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{err}");
        }
    }

    fn buffered_on(chain: &Arc<Chain>, mut host: FakeHost, body: Value) -> FakeHost {
        let mut stream = Stream::new(chain.clone());
        stream.on_request_headers(&mut host, true);
        host.response_headers
            .push(("content-type".into(), "application/json".into()));
        host.response_body = serde_json::to_vec(&body).unwrap();
        stream.on_response_headers(&mut host, false);
        stream.on_response_body(&mut host, true);
        host
    }

    #[test]
    fn writes_envoys_token_usage_record_where_the_host_can() {
        let body = json!({"model": "claude", "usage": {"input_tokens": 10, "output_tokens": 5,
                          "cache_read_input_tokens": 3}});
        let mut host = FakeHost::request("/v1/messages", &[], b"{}");
        host.metadata_structs = Some(Default::default()); // a host that writes them (.so on 1.40)
        let host = buffered_on(&chain("{}"), host, body.clone());
        let (type_url, bytes) = &host.typed_metadata[ENVOY_AI_NAMESPACE];
        assert_eq!(type_url, "type.googleapis.com/envoy.data.ai.v3.TokenUsage");
        let record = <EnvoyTokenUsage as prost::Message>::decode(bytes.as_slice()).unwrap();
        assert_eq!(record.llm_protocol, 3, "ANTHROPIC_MESSAGES");
        assert_eq!(record.model, "claude");
        // Anthropic's cache reads are part of the canonical input, as Envoy counts them.
        assert_eq!(
            (record.input_tokens, record.output_tokens, record.total_tokens),
            (Some(13), Some(5), Some(18))
        );
        assert_eq!(record.input_token_details.unwrap().cached_tokens, Some(3));
        assert_eq!(record.provider_total_tokens, None, "Anthropic reports no total");
        assert_eq!(record.extraction_status, 1);
        let projection = &host.metadata_structs.as_ref().unwrap()[ENVOY_AI_NAMESPACE];
        assert_eq!(projection["llm_protocol"], "ANTHROPIC_MESSAGES");
        assert_eq!(projection["total_tokens"], 18);

        // A host that cannot (the .wasm) gets the flat keys only, and nothing fails.
        let host = buffered_on(
            &chain("{}"),
            FakeHost::request("/v1/messages", &[], b"{}"),
            body.clone(),
        );
        assert!(host.typed_metadata.is_empty());
        assert_eq!(metadata(&host, "input_tokens").as_deref(), Some("13"));

        // Turned off.
        let mut host = FakeHost::request("/v1/messages", &[], b"{}");
        host.metadata_structs = Some(Default::default());
        let host = buffered_on(&chain("{envoyAiMetadata: false}"), host, body);
        assert!(host.typed_metadata.is_empty() && host.metadata_structs.unwrap().is_empty());
    }

    #[test]
    fn a_streamed_record_is_written_at_the_terminal_event_once() {
        // The client leaves after [DONE]: the stream's end never reaches the filter.
        let chain = chain("{}");
        let mut host = FakeHost::request("/v1/chat/completions", &[], b"{}");
        host.metadata_structs = Some(Default::default());
        let mut stream = Stream::new(chain.clone());
        stream.on_request_headers(&mut host, true);
        host.response_headers
            .push(("content-type".into(), "text/event-stream".into()));
        stream.on_response_headers(&mut host, false);
        host.response_body = b"data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n\
              data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2,\"total_tokens\":6}}\n\n\
              data: [DONE]\n\n"
            .to_vec();
        stream.on_response_body(&mut host, false);
        let projection = &host.metadata_structs.as_ref().unwrap()[ENVOY_AI_NAMESPACE];
        assert_eq!(projection["total_tokens"], 6);
        assert_eq!(host.counter(&chain, "processor.usage.usage_recorded"), 1);
        // The end arriving after all changes nothing and counts nothing twice.
        host.response_body = Vec::new();
        stream.on_response_body(&mut host, true);
        assert_eq!(host.counter(&chain, "processor.usage.usage_recorded"), 1);
        assert_eq!(host.counter(&chain, "processor.usage.envoy_ai_record"), 1);
    }

    #[test]
    fn opentelemetry_key_names_where_genai_has_one() {
        let body = json!({"model": "gpt", "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                          "prompt_tokens_details": {"cached_tokens": 4}}});
        let host = buffered(&chain("{metadataKeys: OpenTelemetry}"), "/v1/chat/completions", body);
        for (key, value) in [
            ("gen_ai.usage.input_tokens", "10"),
            ("gen_ai.usage.output_tokens", "5"),
            ("gen_ai.usage.cache_read.input_tokens", "4"),
            ("gen_ai.response.model", "gpt"),
            ("total_tokens", "15"),
        ] {
            assert_eq!(metadata(&host, key).as_deref(), Some(value), "{key}");
        }
        assert_eq!(metadata(&host, "input_tokens"), None);
    }
}
