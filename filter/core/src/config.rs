//! The declarative chain configuration, identical bytes for every form of the filter.
//!
//! YAML is read into a JSON value first, so that every error (YAML or JSON input) is reported
//! with the same path syntax. All structs reject unknown fields and use camelCase keys.

use crate::error::ConfigError;
use schemars::JsonSchema;
use serde::Deserialize;
use std::time::Duration;

/// Default for both body limits: 2 MiB.
pub const DEFAULT_BODY_LIMIT: u64 = 2 * 1024 * 1024;

/// Top level of a chain configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilterConfig {
    /// Body size limits for buffering processors.
    #[serde(default)]
    pub limits: Limits,
    /// The ordered chain.
    #[serde(default)]
    pub processors: Vec<ProcessorConfig>,
}

/// Body size limits. A body above the limit is answered with 413 (request) or 502 (response).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Largest request body a buffering processor accepts.
    #[serde(default = "default_limit")]
    pub max_request_body_bytes: u64,
    /// Largest response body a buffering processor accepts.
    #[serde(default = "default_limit")]
    pub max_response_body_bytes: u64,
}

fn default_limit() -> u64 {
    DEFAULT_BODY_LIMIT
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_body_bytes: DEFAULT_BODY_LIMIT,
            max_response_body_bytes: DEFAULT_BODY_LIMIT,
        }
    }
}

/// What happens when a processor fails (error, panic, budget overrun).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, JsonSchema)]
pub enum FailureMode {
    /// The request is answered with an error (the default: a guard that fails must not let traffic through).
    #[default]
    FailClosed,
    /// The failure is logged and counted, and the chain goes on without this processor.
    FailOpen,
}

/// One processor of the chain.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProcessorConfig {
    /// Unique name; used in stats and logs.
    pub name: String,
    /// Registry key of the plugin type (kebab-case, e.g. `body-field-to-header`).
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// Failure mode; `FailClosed` by default.
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// Latency budget such as `500us` or `2ms`.
    #[serde(default, deserialize_with = "deserialize_duration")]
    #[schemars(with = "Option<String>")]
    pub timeout: Option<Duration>,
    /// Conditions under which the processor runs; always when absent.
    #[serde(default, rename = "match")]
    pub match_: Option<MatchConfig>,
    /// The plugin's own typed configuration.
    #[serde(default)]
    #[schemars(with = "Option<serde_json::Map<String, serde_json::Value>>")]
    pub parameters: serde_json::Value,
}

/// Match conditions; all given conditions must hold.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MatchConfig {
    /// The request path (without query) must start with one of these.
    #[serde(default)]
    pub path_prefixes: Vec<String>,
    /// The request method must be one of these (case-insensitive).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Every header condition must hold.
    #[serde(default)]
    pub headers: Vec<HeaderCondition>,
}

/// A condition on one request header. Exactly one of `exact`, `prefix`, `regex`, `present`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderCondition {
    /// Header name (case-insensitive).
    pub name: String,
    /// Value equals this.
    #[serde(default)]
    pub exact: Option<String>,
    /// Value starts with this.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Value matches this regex (whole value).
    #[serde(default)]
    pub regex: Option<String>,
    /// Header is present (true) or absent (false).
    #[serde(default)]
    pub present: Option<bool>,
}

/// Deserializes an optional duration with [`parse_duration`] (for plugin configs too:
/// `#[serde(default, deserialize_with = "payload_processor_core::config::deserialize_duration")]`).
pub fn deserialize_duration<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<Duration>, D::Error> {
    let text: Option<String> = Option::deserialize(de)?;
    match text {
        None => Ok(None),
        Some(text) => parse_duration(&text).map(Some).map_err(serde::de::Error::custom),
    }
}

/// Parses a duration such as `500us`, `2ms`, `1s`; zero is refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|err| format!("invalid duration {text:?} ({err}); use forms like 500us, 2ms, 1s"))?;
    if duration.is_zero() {
        return Err(format!("duration {text:?} must be greater than zero"));
    }
    Ok(duration)
}

impl FilterConfig {
    /// Parses YAML or JSON text (JSON when it starts with `{`).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let value = parse_document(text)?;
        ConfigError::parse_value(&value)
    }
}

/// Reads YAML or JSON text into a JSON value.
pub fn parse_document(text: &str) -> Result<serde_json::Value, ConfigError> {
    let trimmed = text.trim_start_matches('\u{feff}').trim();
    if trimmed.is_empty() {
        return Err(ConfigError::new(
            "",
            "configuration is empty; expected a mapping with `processors`",
        ));
    }
    let value: serde_json::Value = if trimmed.starts_with('{') {
        serde_json::from_str(trimmed).map_err(|err| ConfigError::new("", format!("invalid JSON: {err}")))?
    } else {
        serde_yaml_ng::from_str(trimmed).map_err(|err| ConfigError::new("", format!("invalid YAML: {err}")))?
    };
    if !value.is_object() {
        return Err(ConfigError::new(
            "",
            "configuration must be a mapping with `processors`",
        ));
    }
    Ok(value)
}
