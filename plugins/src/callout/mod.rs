//! The callout family: processors that ask an external service through an Envoy cluster and
//! act on its answer, with the chain parked meanwhile (see [`payload_processor_core::Decision::Callout`]).
//!
//! - [`http_callout`]: the general plugin: a request built from a template, the answer mapped
//!   by rules (`rejectWhen`, `setHeaders`, `setBodyFields`, `setMetadata`).
//! - Presets speaking real services' APIs: [`openai_moderation`], [`llama_guard`],
//!   [`presidio`], [`ext_authz_body`].
//!
//! This module holds what they share: where a call goes ([`Endpoint`]), which direction it
//! inspects ([`Phase`]), the text a guard would inspect ([`inspected_texts`]), templates
//! ([`Template`]) and predicates ([`Predicate`]) over JSON.
//!
//! The users' reference: `docs/plugins/http-callout.md` and one page per preset.

pub mod ext_authz_body;
pub mod http_callout;
pub mod llama_guard;
pub mod openai_moderation;
pub mod presidio;

use crate::common::validate_header_name;
use crate::guard::engine::{each_text, inspected_paths};
use payload_processor_core::{
    CalloutRequest, CalloutResponse, ConfigError, Context, Direction, PluginError, SelectPath,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

/// How long a call may take when the processor sets no `timeout` budget (which, when set,
/// bounds the wait instead).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(2);

/// Which direction a callout plugin inspects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, JsonSchema)]
pub enum Phase {
    /// The request, at the end of its body (or at its headers when it has none).
    #[default]
    Request,
    /// A buffered JSON response, at the end of its body.
    Response,
}

impl Phase {
    /// What a plugin inspecting this phase needs of `direction`: the body there, nothing in
    /// the other.
    pub fn need(self, direction: Direction) -> payload_processor_core::PhaseNeed {
        if self.direction() == direction {
            payload_processor_core::PhaseNeed::Body
        } else {
            payload_processor_core::PhaseNeed::Skip
        }
    }

    /// The direction the phase inspects.
    pub fn direction(self) -> Direction {
        match self {
            Phase::Request => Direction::Request,
            Phase::Response => Direction::Response,
        }
    }
}

/// Where a call goes: an Envoy cluster, a path, the `:authority` and fixed headers.
#[derive(Debug, Clone)]
pub struct Endpoint {
    cluster: String,
    path: String,
    authority: String,
    headers: Vec<(String, String)>,
}

impl Endpoint {
    /// Validates the target of a callout plugin. `authority` defaults to the cluster name.
    pub(crate) fn new(
        cluster: &str,
        path: &str,
        authority: Option<&str>,
        headers: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        if cluster.trim().is_empty() {
            return Err(ConfigError::new("cluster", "name the Envoy cluster of the service"));
        }
        if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(ConfigError::new(
                "path",
                format!("{path:?} must start with / and hold no spaces or control characters"),
            ));
        }
        let mut fixed = Vec::new();
        for (name, value) in headers {
            let at = format!("headers.{name}");
            validate_header_name(name, &at)?;
            if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
                return Err(ConfigError::new(at, "header values must not hold control characters"));
            }
            fixed.push((name.to_ascii_lowercase(), value.clone()));
        }
        Ok(Self {
            cluster: cluster.to_string(),
            path: path.to_string(),
            authority: authority.unwrap_or(cluster).to_string(),
            headers: fixed,
        })
    }

    /// The cluster the call goes to.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// A JSON POST to the endpoint's path.
    pub(crate) fn post_json(&self, body: &Value) -> CalloutRequest {
        self.request("POST", &self.path, body_bytes(body), Some("application/json"))
    }

    /// A request to the endpoint with any method and path (`path` replaces the configured one).
    pub(crate) fn request(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
        content_type: Option<&str>,
    ) -> CalloutRequest {
        let mut headers = self.headers.clone();
        if let Some(content_type) = content_type {
            if !headers.iter().any(|(name, _)| name == "content-type") {
                headers.push(("content-type".into(), content_type.into()));
            }
        }
        CalloutRequest {
            cluster: self.cluster.clone(),
            method: method.to_string(),
            path: path.to_string(),
            authority: self.authority.clone(),
            headers,
            body,
            timeout: DEFAULT_WAIT,
        }
    }

    /// The path as configured.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }
}

fn body_bytes(body: &Value) -> Vec<u8> {
    serde_json::to_vec(body).expect("a JSON value serializes")
}

/// A failure of the service's answer: a plugin error, handled by the failure mode.
pub(crate) fn answer_error(ctx_name: &str, endpoint: &Endpoint, what: impl std::fmt::Display) -> PluginError {
    PluginError {
        status: Some(503),
        code: "callout_failed".into(),
        message: format!(
            "processor {ctx_name}: the service at cluster {} {what}",
            endpoint.cluster()
        ),
    }
}

/// The answer as JSON, when it is a 2xx with a JSON body; otherwise the error to fail with.
pub(crate) fn json_answer(name: &str, endpoint: &Endpoint, response: &CalloutResponse) -> Result<Value, PluginError> {
    if !(200..300).contains(&response.status) {
        return Err(answer_error(
            name,
            endpoint,
            format_args!("answered {}", response.status),
        ));
    }
    serde_json::from_slice(&response.body)
        .map_err(|err| answer_error(name, endpoint, format_args!("sent an answer that is not JSON ({err})")))
}

/// The texts a guard inspects in the body of `direction` (chat, completions, responses and
/// Anthropic shapes), in document order. Empty when the body is blank; an error when it is
/// not JSON.
pub(crate) fn inspected_texts(ctx: &mut Context<'_>, name: &str) -> Result<Vec<String>, PluginError> {
    if ctx.body().is_blank() {
        return Ok(Vec::new());
    }
    let direction = ctx.direction();
    let doc = ctx
        .body()
        .doc()
        .map_err(|err| PluginError::bad_request("invalid_json", format!("{name} cannot read the body: {err}")))?;
    let mut texts = Vec::new();
    for path in inspected_paths(direction) {
        path.for_each(doc, &mut |value| {
            each_text(value, &mut |text| texts.push(text.to_string()))
        });
    }
    Ok(texts)
}

/// One expression inside `{{ }}`.
#[derive(Debug, Clone)]
pub(crate) enum Expr {
    /// `text`: the inspected text (request phase: the prompt; response: the answer).
    Text,
    /// `body`: the whole JSON document.
    Body,
    /// `status`: the answer's HTTP status (answer templates only).
    Status,
    /// `headers.<name>`: a header.
    Header(String),
    /// `$...`: a JSONPath of names, indexes and `[*]`.
    Path(SelectPath),
}

/// What a template's expressions are evaluated against.
pub(crate) struct Scope<'a> {
    /// The JSON document (`$...` and `body`).
    pub(crate) doc: &'a Value,
    /// The inspected text.
    pub(crate) text: &'a str,
    /// Header lookup.
    pub(crate) header: &'a dyn Fn(&str) -> Option<String>,
    /// The answer's status.
    pub(crate) status: u16,
}

impl Expr {
    fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        match text {
            "text" => Ok(Expr::Text),
            "body" => Ok(Expr::Body),
            "status" => Ok(Expr::Status),
            _ if text.starts_with("headers.") => {
                let name = &text["headers.".len()..];
                validate_header_name(name, "").map_err(|_| format!("{name:?} is not a header name"))?;
                Ok(Expr::Header(name.to_ascii_lowercase()))
            }
            _ if text.starts_with('$') => SelectPath::parse(text).map(Expr::Path),
            _ => Err(format!(
                "unknown template expression {text:?}: use text, body, status, headers.<name> or a JSONPath ($...)"
            )),
        }
    }

    fn eval(&self, scope: &Scope<'_>) -> Value {
        match self {
            Expr::Text => Value::String(scope.text.to_string()),
            Expr::Body => scope.doc.clone(),
            Expr::Status => Value::from(scope.status),
            Expr::Header(name) => (scope.header)(name).map_or(Value::Null, Value::String),
            Expr::Path(path) => {
                let mut found = Vec::new();
                path.for_each(scope.doc, &mut |value| found.push(value.clone()));
                match found.len() {
                    0 => Value::Null,
                    1 => found.pop().expect("one value"),
                    _ => Value::Array(found),
                }
            }
        }
    }
}

/// A value as text inside a string: strings as they are, lists of strings joined by
/// `separator`, `null` as nothing, anything else as JSON.
fn joined(value: &Value, separator: &str) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(separator),
        other => other.to_string(),
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Part {
    Literal(String),
    Expr(Expr),
}

/// A JSON value whose strings may hold `{{ expression }}`s. A string that is exactly one
/// expression becomes the expression's JSON value (an object stays an object); expressions
/// inside longer strings are interpolated as text. Values are inserted as JSON, never spliced
/// into JSON text, so a prompt cannot break out of its string.
#[derive(Debug, Clone)]
pub(crate) enum Template {
    Literal(Value),
    Whole(Expr),
    Text(Vec<Part>),
    Array(Vec<Template>),
    Object(Vec<(String, Template)>),
}

impl Template {
    /// Compiles a template value; `at` is its configuration path for errors.
    pub(crate) fn compile(value: &Value, at: &str) -> Result<Self, ConfigError> {
        Ok(match value {
            Value::String(text) => {
                let parts = parse_parts(text).map_err(|msg| ConfigError::new(at, msg))?;
                match parts.as_slice() {
                    [] => Template::Literal(Value::String(String::new())),
                    [Part::Literal(text)] => Template::Literal(Value::String(text.clone())),
                    [Part::Expr(expr)] => Template::Whole(expr.clone()),
                    _ => Template::Text(parts),
                }
            }
            Value::Array(items) => Template::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| Template::compile(item, &format!("{at}[{i}]")))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(members) => Template::Object(
                members
                    .iter()
                    .map(|(key, item)| Ok((key.clone(), Template::compile(item, &format!("{at}.{key}"))?)))
                    .collect::<Result<_, ConfigError>>()?,
            ),
            other => Template::Literal(other.clone()),
        })
    }

    /// Compiles a template that must produce text (a header value, a message).
    pub(crate) fn compile_text(text: &str, at: &str) -> Result<Self, ConfigError> {
        Self::compile(&Value::String(text.to_string()), at)
    }

    /// The value for one scope.
    pub(crate) fn render(&self, scope: &Scope<'_>) -> Value {
        self.render_joining(scope, "\n")
    }

    /// Renders, writing lists of strings inside text joined by `separator`.
    fn render_joining(&self, scope: &Scope<'_>, separator: &str) -> Value {
        match self {
            Template::Literal(value) => value.clone(),
            Template::Whole(expr) => expr.eval(scope),
            Template::Text(parts) => {
                let mut out = String::new();
                for part in parts {
                    match part {
                        Part::Literal(text) => out.push_str(text),
                        Part::Expr(expr) => out.push_str(&joined(&expr.eval(scope), separator)),
                    }
                }
                Value::String(out)
            }
            Template::Array(items) => {
                Value::Array(items.iter().map(|item| item.render_joining(scope, separator)).collect())
            }
            Template::Object(members) => Value::Object(
                members
                    .iter()
                    .map(|(key, item)| (key.clone(), item.render_joining(scope, separator)))
                    .collect(),
            ),
        }
    }

    /// False when the template has expressions and every one of them is empty here (`null`,
    /// `""`, `[]`): nothing was found to insert.
    pub(crate) fn found_anything(&self, scope: &Scope<'_>) -> bool {
        fn exprs<'t>(template: &'t Template, out: &mut Vec<&'t Expr>) {
            match template {
                Template::Literal(_) => {}
                Template::Whole(expr) => out.push(expr),
                Template::Text(parts) => out.extend(parts.iter().filter_map(|part| match part {
                    Part::Expr(expr) => Some(expr),
                    Part::Literal(_) => None,
                })),
                Template::Array(items) => items.iter().for_each(|item| exprs(item, out)),
                Template::Object(members) => members.iter().for_each(|(_, item)| exprs(item, out)),
            }
        }
        let mut found = Vec::new();
        exprs(self, &mut found);
        found.is_empty()
            || found.iter().any(|expr| match expr.eval(scope) {
                Value::Null => false,
                Value::String(text) => !text.trim().is_empty(),
                Value::Array(items) => !items.is_empty(),
                _ => true,
            })
    }

    /// Adds the names of the headers the template reads.
    pub(crate) fn header_names(&self, out: &mut Vec<String>) {
        match self {
            Template::Whole(Expr::Header(name)) => out.push(name.clone()),
            Template::Text(parts) => out.extend(parts.iter().filter_map(|part| match part {
                Part::Expr(Expr::Header(name)) => Some(name.clone()),
                _ => None,
            })),
            Template::Array(items) => items.iter().for_each(|item| item.header_names(out)),
            Template::Object(members) => members.iter().for_each(|(_, item)| item.header_names(out)),
            Template::Literal(_) | Template::Whole(_) => {}
        }
    }

    /// The value as one line (for headers and metadata): list items joined by commas.
    pub(crate) fn render_line(&self, scope: &Scope<'_>) -> String {
        joined(&self.render_joining(scope, ","), ",")
    }
}

fn parse_parts(text: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        if open > 0 {
            parts.push(Part::Literal(rest[..open].to_string()));
        }
        let after = &rest[open + 2..];
        let close = after
            .find("}}")
            .ok_or_else(|| format!("unclosed {{{{ in template {text:?}"))?;
        parts.push(Part::Expr(Expr::parse(&after[..close])?));
        rest = &after[close + 2..];
    }
    if !rest.is_empty() {
        parts.push(Part::Literal(rest.to_string()));
    }
    Ok(parts)
}

/// A condition on a JSON answer, as configured: the values a JSONPath selects, compared.
/// It holds when any selected value passes every comparison given; with no comparison, when
/// any selected value is `true`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PredicateConfig {
    /// JSONPath into the answer (`$.results[*].flagged`), or `status` for the HTTP status.
    pub path: String,
    /// Holds for a value equal to this.
    #[serde(default)]
    pub equals: Option<Value>,
    /// Holds for a value equal to one of these.
    #[serde(default, rename = "in")]
    pub one_of: Option<Vec<Value>>,
    /// Holds for a number above this.
    #[serde(default)]
    pub greater_than: Option<f64>,
    /// `true`: holds when the path selects a non-null value; `false`: when it selects none.
    #[serde(default)]
    pub exists: Option<bool>,
}

/// A compiled [`PredicateConfig`].
#[derive(Debug, Clone)]
pub(crate) struct Predicate {
    source: Option<SelectPath>,
    config: PredicateConfig,
}

impl Predicate {
    pub(crate) fn compile(config: &PredicateConfig, at: &str) -> Result<Self, ConfigError> {
        let source = if config.path == "status" {
            None
        } else {
            Some(SelectPath::parse(&config.path).map_err(|msg| ConfigError::new(format!("{at}.path"), msg))?)
        };
        Ok(Self {
            source,
            config: config.clone(),
        })
    }

    /// Whether it holds for an answer.
    pub(crate) fn holds(&self, answer: &Value, status: u16) -> bool {
        let mut values = Vec::new();
        match &self.source {
            Some(path) => path.for_each(answer, &mut |value| {
                if !value.is_null() {
                    values.push(value.clone());
                }
            }),
            None => values.push(Value::from(status)),
        }
        if let Some(exists) = self.config.exists {
            if exists == values.is_empty() {
                return false;
            }
            if !exists {
                return true;
            }
        }
        let plain = self.config.equals.is_none() && self.config.one_of.is_none() && self.config.greater_than.is_none();
        values.iter().any(|value| {
            if plain {
                return self.config.exists.is_some() || *value == Value::Bool(true);
            }
            self.config.equals.as_ref().map_or(true, |expected| expected == value)
                && self
                    .config
                    .one_of
                    .as_ref()
                    .map_or(true, |options| options.contains(value))
                && self
                    .config
                    .greater_than
                    .map_or(true, |bound| value.as_f64().is_some_and(|number| number > bound))
        })
    }
}

/// One or several items, as YAML users write them.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// A single item.
    One(T),
    /// A list.
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// The items as a list.
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(item) => vec![item.clone()],
            OneOrMany::Many(items) => items.clone(),
        }
    }
}

#[cfg(test)]
mod tests;

/// The reply to a request a callout plugin rejects. Every field has a per-plugin default.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RejectConfig {
    /// HTTP status (400-599).
    #[serde(default)]
    pub status: Option<u16>,
    /// The `error.code` of the OpenAI-shaped body.
    #[serde(default)]
    pub code: Option<String>,
    /// The `error.message`.
    #[serde(default)]
    pub message: Option<String>,
}

impl RejectConfig {
    /// The reply, with the plugin's defaults for what is not configured.
    pub(crate) fn reply(
        &self,
        status: u16,
        code: &str,
        message: &str,
        at: &str,
    ) -> Result<payload_processor_core::LocalReply, ConfigError> {
        let status = self.status.unwrap_or(status);
        if !(400..=599).contains(&status) {
            return Err(ConfigError::new(
                format!("{at}.status"),
                format!("{status} is not a 4xx or 5xx status"),
            ));
        }
        Ok(payload_processor_core::LocalReply::json_error(
            status,
            self.code.as_deref().unwrap_or(code),
            self.message.as_deref().unwrap_or(message),
        ))
    }
}

/// `reply` with ` (detail)` added to its `error.message`: the categories or entity types
/// found, never the text itself.
pub(crate) fn with_detail(
    reply: &payload_processor_core::LocalReply,
    detail: &str,
) -> payload_processor_core::LocalReply {
    let mut reply = reply.clone();
    if detail.is_empty() {
        return reply;
    }
    if let Ok(mut body) = serde_json::from_slice::<Value>(&reply.body) {
        if let Some(message) = body["error"]["message"].as_str() {
            body["error"]["message"] = Value::String(format!("{message} ({detail})"));
            reply.body = serde_json::to_vec(&body).expect("JSON serializes");
        }
    }
    reply
}

/// The answer of a callout, parsed: JSON when the body is JSON, `null` when empty.
pub(crate) fn parse_answer(response: &CalloutResponse) -> Option<Value> {
    if response.body.iter().all(u8::is_ascii_whitespace) {
        return Some(Value::Null);
    }
    serde_json::from_slice(&response.body).ok()
}

/// The default `streamWindowBytes`: text approved per callout on a streamed answer.
pub(crate) fn default_stream_window() -> usize {
    1024
}

/// Characters of the last approved window sent again before the next one, so a phrase split
/// at a window boundary is judged whole.
const WINDOW_CONTEXT_CHARS: usize = 200;

/// The text an event of a streamed answer adds: OpenAI chat (`choices[].delta.content`) and
/// completions (`choices[].text`), Anthropic (`content_block_delta`), the responses API
/// (`response.output_text.delta`).
pub(crate) fn event_text(event: &mut payload_processor_core::SseEvent) -> String {
    if event.is_done_marker() {
        return String::new();
    }
    let Ok(doc) = event.json() else { return String::new() };
    let mut text = String::new();
    if let Some(choices) = doc.get("choices").and_then(Value::as_array) {
        for choice in choices {
            let piece = choice
                .pointer("/delta/content")
                .or_else(|| choice.get("text"))
                .and_then(Value::as_str);
            text.push_str(piece.unwrap_or_default());
        }
    }
    match doc.get("type").and_then(Value::as_str) {
        Some("content_block_delta") => {
            text.push_str(doc.pointer("/delta/text").and_then(Value::as_str).unwrap_or_default())
        }
        Some("response.output_text.delta") => {
            text.push_str(doc.get("delta").and_then(Value::as_str).unwrap_or_default())
        }
        _ => {}
    }
    text
}

/// A streamed answer's text, approved window by window: the events wait at the processor
/// (the engine's hold) until the service approved the text they carry.
#[derive(Debug, Default)]
pub(crate) struct Windows {
    /// Text not yet sent for approval.
    unsent: String,
    /// The end of the last window sent, sent again as context.
    context: String,
}

/// What to do with one event of a streamed answer.
pub(crate) enum WindowStep {
    /// Nothing held and no text: let it go.
    Continue,
    /// Keep it until the window is approved.
    Hold,
    /// A window boundary without text to judge: it and what is held go on.
    Release,
    /// Have this text judged (the event is held with its window).
    Judge(String),
}

impl Windows {
    /// Adds an event's text; a window is judged when `window` bytes of text gathered, or at
    /// the protocol's terminal event.
    pub(crate) fn on_event(&mut self, event: &mut payload_processor_core::SseEvent, window: usize) -> WindowStep {
        let text = event_text(event);
        self.unsent.push_str(&text);
        if self.unsent.len() >= window || event.is_terminal() {
            if self.unsent.trim().is_empty() {
                self.unsent.clear();
                return WindowStep::Release;
            }
            return WindowStep::Judge(self.take());
        }
        if self.unsent.is_empty() {
            WindowStep::Continue
        } else {
            WindowStep::Hold
        }
    }

    /// At the stream's end: the text still to judge, if any.
    pub(crate) fn at_end(&mut self) -> Option<String> {
        if self.unsent.trim().is_empty() {
            return None;
        }
        Some(self.take())
    }

    fn take(&mut self) -> String {
        let window = std::mem::take(&mut self.unsent);
        let judged = format!("{}{window}", self.context);
        let keep = window.chars().count().saturating_sub(WINDOW_CONTEXT_CHARS);
        self.context = window.chars().skip(keep).collect();
        judged
    }
}

impl WindowStep {
    /// The event decision, with `judge` making the callout for a window's text.
    pub(crate) fn decide(self, judge: impl FnOnce(String) -> CalloutRequest) -> payload_processor_core::EventDecision {
        use payload_processor_core::EventDecision;
        match self {
            WindowStep::Continue => EventDecision::Continue,
            WindowStep::Hold => EventDecision::Hold,
            WindowStep::Release => EventDecision::Release,
            WindowStep::Judge(text) => EventDecision::Callout(judge(text)),
        }
    }
}
