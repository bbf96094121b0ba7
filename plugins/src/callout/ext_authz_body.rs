//! `ext-authz-body`: external authorization with payload data. Sends the request's method and
//! path (after a prefix), the headers it allows, and the body fields it names (as a JSON
//! object) to an authorization service. A 2xx allows and adds the headers the service
//! returns to the upstream request; any other status denies with the service's own status
//! and body, as Envoy's `ext_authz` HTTP service does.
//!
//! The users' reference: `docs/plugins/ext-authz-body.md`.

use super::Endpoint;
use crate::common::{field_path, validate_header_name};
use payload_processor_core::{
    BuildContext, CalloutResponse, ConfigError, Context, Counter, Decision, FieldPath, LocalReply, PhaseNeed, Plugin,
    PluginError, RequestEdits,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Registry key.
pub const TYPE_NAME: &str = "ext-authz-body";

/// Parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(rename = "ExtAuthzBodyParameters")]
pub struct Config {
    /// The Envoy cluster of the authorization service.
    pub cluster: String,
    /// Prefix put before the request's own path (Envoy `ext_authz`'s `path_prefix`).
    #[serde(default)]
    pub path: String,
    /// `:authority` of the call (default: the cluster name).
    #[serde(default)]
    pub authority: Option<String>,
    /// Fixed headers of the call.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The body fields sent: top-level names or JSONPaths (`model`, `$.metadata.tenant`).
    /// The service receives `{"<field>": value, ...}` keyed as configured (without `$.`).
    pub body_fields: Vec<String>,
    /// Request headers sent to the service.
    #[serde(default = "default_allowed")]
    pub allowed_headers: Vec<String>,
    /// Headers of an allowing answer added to the upstream request; default: every `x-`
    /// header of the answer (not `x-envoy-`). `[]` adds none (then the filter never needs to
    /// hold the request headers for it).
    #[serde(default)]
    pub upstream_headers: Option<Vec<String>>,
}

fn default_allowed() -> Vec<String> {
    vec!["authorization".into(), "cookie".into()]
}

/// The plugin.
pub struct ExtAuthzBody {
    endpoint: Endpoint,
    prefix: String,
    fields: Vec<(String, FieldPath)>,
    allowed: Vec<String>,
    upstream: Option<Vec<String>>,
    calls: Counter,
    denied: Counter,
}

/// Factory.
pub fn build(parameters: &Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    let config: Config = ctx.parameters(parameters)?;
    let prefix = config.path.trim_end_matches('/').to_string();
    let endpoint = Endpoint::new(
        &config.cluster,
        if prefix.is_empty() { "/" } else { &prefix },
        config.authority.as_deref(),
        &config.headers,
    )?;
    if config.body_fields.is_empty() {
        return Err(ConfigError::new("bodyFields", "name at least one body field to send"));
    }
    let fields = config
        .body_fields
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let key = text.trim_start_matches("$.").to_string();
            Ok((key, field_path(text, &format!("bodyFields[{index}]"))?))
        })
        .collect::<Result<_, ConfigError>>()?;
    for (index, name) in config.allowed_headers.iter().enumerate() {
        validate_header_name(name, &format!("allowedHeaders[{index}]"))?;
    }
    for (index, name) in config.upstream_headers.iter().flatten().enumerate() {
        validate_header_name(name, &format!("upstreamHeaders[{index}]"))?;
    }
    Ok(Arc::new(ExtAuthzBody {
        endpoint,
        prefix,
        fields,
        allowed: config.allowed_headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
        upstream: config
            .upstream_headers
            .map(|list| list.iter().map(|h| h.to_ascii_lowercase()).collect()),
        calls: ctx.counter("calls"),
        denied: ctx.counter("denied"),
    }))
}

/// Hop-by-hop and framing headers never copied from the answer.
fn copyable(name: &str) -> bool {
    !name.starts_with(':')
        && !name.starts_with("x-envoy-")
        && !matches!(
            name,
            "content-length" | "content-type" | "transfer-encoding" | "connection" | "date" | "server"
        )
}

impl Plugin for ExtAuthzBody {
    fn request_need(&self) -> PhaseNeed {
        PhaseNeed::Body
    }

    fn request_edits(&self) -> RequestEdits {
        match &self.upstream {
            Some(list) if list.is_empty() => RequestEdits::NONE,
            _ => RequestEdits::HEADERS,
        }
    }

    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        let method = ctx.header(":method").unwrap_or_else(|| "POST".into());
        let path = format!("{}{}", self.prefix, ctx.header(":path").unwrap_or_else(|| "/".into()));
        let headers: Vec<(String, String)> = self
            .allowed
            .iter()
            .filter_map(|name| ctx.header(name).map(|value| (name.clone(), value)))
            .collect();
        let mut fields = Map::new();
        if !ctx.body_is_blank() {
            for (key, path) in &self.fields {
                let value = ctx.body_field(path).map_err(|err| {
                    PluginError::bad_request("invalid_json", format!("the request body cannot be read: {err}"))
                })?;
                if let Some(value) = value {
                    fields.insert(key.clone(), value);
                }
            }
        }
        let body = serde_json::to_vec(&Value::Object(fields)).expect("JSON serializes");
        let mut request = self.endpoint.request(&method, &path, body, Some("application/json"));
        request.headers.extend(headers);
        ctx.increment(self.calls);
        Ok(Decision::Callout(request))
    }

    fn on_callout_done(&self, ctx: &mut Context<'_>, response: CalloutResponse) -> Result<Decision, PluginError> {
        if !(200..300).contains(&response.status) {
            ctx.increment(self.denied);
            // The service's own status and body; a status Envoy cannot send becomes 403.
            let status = if (400..=599).contains(&response.status) {
                response.status
            } else {
                403
            };
            let headers = response
                .headers
                .iter()
                .filter(|(name, _)| {
                    name.eq_ignore_ascii_case("content-type") || name.eq_ignore_ascii_case("www-authenticate")
                })
                .cloned()
                .collect();
            return Ok(Decision::Reject(LocalReply {
                status,
                headers,
                body: response.body,
            }));
        }
        for (name, value) in &response.headers {
            let name = name.to_ascii_lowercase();
            let wanted = match &self.upstream {
                Some(list) => list.contains(&name),
                None => name.starts_with("x-") && copyable(&name),
            };
            if wanted && copyable(&name) {
                ctx.set_header(&name, value)?;
            }
        }
        Ok(Decision::Continue)
    }
}
