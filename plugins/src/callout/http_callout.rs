//! `http-callout`: calls a service through an Envoy cluster with a request built from a
//! template over the request (or the buffered response), and maps the JSON answer onto the
//! exchange: reject it, set headers, set body fields (RAG context), set metadata.
//!
//! The users' reference (a full example, every parameter, behaviour): `docs/plugins/http-callout.md`.

use super::{
    answer_error, inspected_texts, parse_answer, Endpoint, OneOrMany, Phase, Predicate, PredicateConfig, RejectConfig,
    Scope, Template, Windows,
};
use crate::common::validate_header_name;
use payload_processor_core::{
    BuildContext, CalloutRequest, CalloutResponse, ConfigError, Context, Counter, Decision, Direction, EventDecision,
    LocalReply, PhaseNeed, Plugin, PluginError, RequestEdits, SseEvent, StreamNeed, WritePath,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Registry key.
pub const TYPE_NAME: &str = "http-callout";

/// Parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(rename = "HttpCalloutParameters")]
pub struct Config {
    /// The Envoy cluster of the service.
    pub cluster: String,
    /// The path called.
    pub path: String,
    /// HTTP method (default `POST`).
    #[serde(default = "default_method")]
    pub method: String,
    /// `:authority` of the call (default: the cluster name).
    #[serde(default)]
    pub authority: Option<String>,
    /// Fixed headers of the call (an API key).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Request headers copied onto the call.
    #[serde(default)]
    pub forward_headers: Vec<String>,
    /// What is inspected: `Request` (default) or `Response` (buffered JSON answers).
    #[serde(default)]
    pub phase: Phase,
    /// The call's JSON body, a template: strings may hold `{{ text }}` (the inspected text),
    /// `{{ body }}`, `{{ headers.<name> }}` or `{{ $.json.path }}`; `null` sends no body.
    #[serde(default = "default_body")]
    pub body: Value,
    /// Reject when any of these holds on the answer.
    #[serde(default)]
    pub reject_when: Option<OneOrMany<PredicateConfig>>,
    /// The reply when `rejectWhen` holds (default 403 `callout_rejected`).
    #[serde(default)]
    pub reject: RejectConfig,
    /// Headers to set from the answer: name -> template over the answer.
    #[serde(default)]
    pub set_headers: BTreeMap<String, String>,
    /// Body fields to set from the answer.
    #[serde(default)]
    pub set_body_fields: Vec<BodyFieldRule>,
    /// Dynamic metadata to set from the answer: key -> template over the answer.
    #[serde(default)]
    pub set_metadata: BTreeMap<String, String>,
    /// Namespace of `setMetadata`.
    #[serde(default = "default_namespace")]
    pub metadata_namespace: String,
    /// With `phase: Response`, a streamed answer is released to the client only after the
    /// service's answer for its text, in windows of this many bytes (each one callout, with
    /// `{{ text }}` the window's text).
    #[serde(default = "super::default_stream_window")]
    pub stream_window_bytes: usize,
}

/// How a body field rule changes the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, JsonSchema)]
pub enum FieldAction {
    /// Replace (or create) the field.
    #[default]
    Set,
    /// Insert the value as the first element of the array at the path (created if absent).
    Prepend,
    /// Add the value as the last element of the array at the path (created if absent).
    Append,
}

/// A body field set from the answer.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BodyFieldRule {
    /// The field: member names and indexes (`$.messages`, `$.metadata.context`).
    pub path: String,
    /// The value, a template over the answer (`{{ $.documents[*].text }}`).
    pub value: Value,
    /// `Set` (default), `Prepend` or `Append`.
    #[serde(default)]
    pub action: FieldAction,
    /// Leave the body unchanged when every expression of the value is empty (no documents
    /// found).
    #[serde(default = "yes")]
    pub skip_empty: bool,
}

fn yes() -> bool {
    true
}

fn default_method() -> String {
    "POST".into()
}

fn default_body() -> Value {
    json!({"text": "{{ text }}"})
}

fn default_namespace() -> String {
    "envoy.payload_processor.callout".into()
}

struct BodyField {
    path: WritePath,
    value: Template,
    action: FieldAction,
    skip_empty: bool,
}

/// The plugin.
pub struct HttpCallout {
    name: String,
    endpoint: Endpoint,
    method: String,
    forward_headers: Vec<String>,
    phase: Phase,
    body: Option<Template>,
    template_headers: Vec<String>,
    reject_when: Vec<Predicate>,
    reject: LocalReply,
    set_headers: Vec<(String, Template)>,
    set_body_fields: Vec<BodyField>,
    set_metadata: Vec<(String, Template)>,
    namespace: String,
    window: usize,
    calls: Counter,
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
    let method = config.method.to_ascii_uppercase();
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(ConfigError::new(
            "method",
            format!("{:?} is not an HTTP method", config.method),
        ));
    }
    for (index, name) in config.forward_headers.iter().enumerate() {
        validate_header_name(name, &format!("forwardHeaders[{index}]"))?;
    }
    let body = (!config.body.is_null())
        .then(|| Template::compile(&config.body, "body"))
        .transpose()?;
    let mut template_headers = Vec::new();
    if let Some(body) = &body {
        body.header_names(&mut template_headers);
    }
    let reject_when = config
        .reject_when
        .as_ref()
        .map(OneOrMany::to_vec)
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(index, predicate)| Predicate::compile(predicate, &format!("rejectWhen[{index}]")))
        .collect::<Result<_, _>>()?;
    let name = ctx.processor_name().to_string();
    let reject = config.reject.reply(
        403,
        "callout_rejected",
        &format!("the request was rejected by {name}"),
        "reject",
    )?;
    let mut set_headers = Vec::new();
    for (header, template) in &config.set_headers {
        let at = format!("setHeaders.{header}");
        validate_header_name(header, &at)?;
        set_headers.push((header.to_ascii_lowercase(), Template::compile_text(template, &at)?));
    }
    let set_body_fields = config
        .set_body_fields
        .iter()
        .enumerate()
        .map(|(index, rule)| {
            let at = format!("setBodyFields[{index}]");
            Ok(BodyField {
                path: WritePath::parse(&rule.path).map_err(|msg| ConfigError::new(format!("{at}.path"), msg))?,
                value: Template::compile(&rule.value, &format!("{at}.value"))?,
                action: rule.action,
                skip_empty: rule.skip_empty,
            })
        })
        .collect::<Result<_, ConfigError>>()?;
    let set_metadata = config
        .set_metadata
        .iter()
        .map(|(key, template)| {
            Ok((
                key.clone(),
                Template::compile_text(template, &format!("setMetadata.{key}"))?,
            ))
        })
        .collect::<Result<_, ConfigError>>()?;
    Ok(Arc::new(HttpCallout {
        name,
        endpoint,
        method,
        forward_headers: config.forward_headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
        phase: config.phase,
        body,
        template_headers,
        reject_when,
        reject,
        set_headers,
        set_body_fields,
        set_metadata,
        namespace: config.metadata_namespace,
        window: config.stream_window_bytes.max(1),
        calls: ctx.counter("calls"),
    }))
}

/// The text the guards would inspect, one text per line.
fn joined_text(ctx: &mut Context<'_>, name: &str) -> Result<String, PluginError> {
    Ok(inspected_texts(ctx, name)?.join("\n"))
}

/// Per stream: whether the answer is streamed, and its windows.
#[derive(Default)]
struct StreamState {
    streaming: bool,
    windows: Windows,
}

impl HttpCallout {
    fn call(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        let text = joined_text(ctx, &self.name)?;
        let doc = if ctx.body().is_blank() {
            Value::Null
        } else {
            ctx.body()
                .doc()
                .map_err(|err| {
                    PluginError::bad_request("invalid_json", format!("{} cannot read the body: {err}", self.name))
                })?
                .clone()
        };
        Ok(Decision::Callout(self.request(ctx, &text, &doc)))
    }

    /// The call for this text and document; `headers.<name>` and `forwardHeaders` read the
    /// request's headers.
    fn request(&self, ctx: &mut Context<'_>, text: &str, doc: &Value) -> CalloutRequest {
        let headers: Vec<(String, Option<String>)> = self
            .template_headers
            .iter()
            .chain(&self.forward_headers)
            .map(|name| (name.clone(), ctx.request_header(name)))
            .collect();
        let lookup = |name: &str| {
            headers
                .iter()
                .find(|(known, _)| known == name)
                .and_then(|(_, value)| value.clone())
        };
        let scope = Scope {
            doc,
            text,
            header: &lookup,
            status: 0,
        };
        let body = self.body.as_ref().map(|template| template.render(&scope));
        let bytes = body
            .map(|body| serde_json::to_vec(&body).expect("JSON serializes"))
            .unwrap_or_default();
        let content_type = (!bytes.is_empty()).then_some("application/json");
        let mut request = self
            .endpoint
            .request(&self.method, self.endpoint.path(), bytes, content_type);
        for name in &self.forward_headers {
            if let Some(value) = lookup(name) {
                request.headers.push((name.clone(), value));
            }
        }
        ctx.increment(self.calls);
        request
    }
}

impl Plugin for HttpCallout {
    fn request_need(&self) -> PhaseNeed {
        self.phase.need(Direction::Request)
    }

    fn response_need(&self) -> PhaseNeed {
        self.phase.need(Direction::Response)
    }

    fn request_edits(&self) -> RequestEdits {
        RequestEdits {
            headers: !self.set_headers.is_empty(),
            body: !self.set_body_fields.is_empty(),
        }
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
        let state = ctx.state::<StreamState>();
        state.streaming = true;
        let step = state.windows.on_event(event, self.window);
        Ok(step.decide(|text| self.request(ctx, &text, &Value::Null)))
    }

    fn on_stream_end(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        Ok(match ctx.state::<StreamState>().windows.at_end() {
            Some(text) => Decision::Callout(self.request(ctx, &text, &Value::Null)),
            None => Decision::Continue,
        })
    }

    fn on_callout_done(&self, ctx: &mut Context<'_>, response: CalloutResponse) -> Result<Decision, PluginError> {
        if !(200..300).contains(&response.status) {
            let what = format!("answered {}", response.status);
            return Err(answer_error(&self.name, &self.endpoint, what));
        }
        let answer = parse_answer(&response)
            .ok_or_else(|| answer_error(&self.name, &self.endpoint, "sent an answer that is not JSON"))?;
        if self.reject_when.iter().any(|p| p.holds(&answer, response.status)) {
            return Ok(Decision::Reject(self.reject.clone()));
        }
        // A streamed answer's headers went out and it has no JSON body: only the verdict and
        // metadata apply to it.
        let streaming = ctx.direction() == Direction::Response && ctx.state::<StreamState>().streaming;
        let text = if self.set_body_fields.is_empty() {
            String::new()
        } else {
            joined_text(ctx, &self.name)?
        };
        let lookup = |name: &str| {
            response
                .headers
                .iter()
                .find(|(known, _)| known.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.clone())
        };
        let scope = Scope {
            doc: &answer,
            text: &text,
            header: &lookup,
            status: response.status,
        };
        for (header, template) in self.set_headers.iter().filter(|_| !streaming) {
            let value = template.render_line(&scope);
            if value.is_empty() {
                ctx.remove_header(header);
            } else {
                ctx.set_header(header, &value)?;
            }
        }
        for (key, template) in &self.set_metadata {
            ctx.set_metadata(&self.namespace, key, &template.render_line(&scope));
        }
        for field in self.set_body_fields.iter().filter(|_| !streaming) {
            if field.skip_empty && !field.value.found_anything(&scope) {
                continue;
            }
            let value = field.value.render(&scope);
            let doc = ctx
                .body()
                .doc_mut()
                .map_err(|err| PluginError::bad_request("invalid_json", format!("{}: {err}", self.name)))?;
            apply(doc, field, value).map_err(|message| PluginError::internal("set_body_field", message))?;
        }
        Ok(Decision::Continue)
    }
}

fn apply(doc: &mut Value, field: &BodyField, value: Value) -> Result<(), String> {
    match field.action {
        FieldAction::Set => field.path.set(doc, value).map_err(|err| err.to_string()),
        FieldAction::Prepend | FieldAction::Append => match field.path.get_mut(doc) {
            Some(Value::Array(items)) => {
                if field.action == FieldAction::Prepend {
                    items.insert(0, value);
                } else {
                    items.push(value);
                }
                Ok(())
            }
            Some(Value::Null) | None => field
                .path
                .set(doc, Value::Array(vec![value]))
                .map_err(|err| err.to_string()),
            Some(_) => Err(format!("{} is not an array", field.path.describe())),
        },
    }
}
