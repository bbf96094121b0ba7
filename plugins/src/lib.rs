//! Built-in payload plugins of envoy-payload-processor, one file each, and the one function
//! that registers them all.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod base_model_to_header;
pub mod body_field_to_header;
pub mod body_mutation;
pub mod endpoint_picker;
mod guard;
pub mod injection_classifier;
pub mod json_to_multipart;
pub mod mcp_router;
pub mod model_rewrite;
pub mod pii;
pub mod pii_guard;
pub mod prompt_decorator;
pub mod prompt_guard;
pub mod request_validator;
pub mod token_usage;

#[cfg(test)]
mod testing;

use payload_processor_core::{BuildFn, ConfigError, Context, FieldPath, JsonError, PluginError, Registry};
use serde_json::Value;

/// Registers every built-in plugin type.
pub fn register_builtins(registry: &mut Registry) {
    let mut register = |name: &str, build: BuildFn| {
        registry
            .register(name, build)
            .expect("built-in plugin types are unique kebab-case names");
    };
    register(body_field_to_header::TYPE_NAME, body_field_to_header::build);
    register(base_model_to_header::TYPE_NAME, base_model_to_header::build);
    register(token_usage::TYPE_NAME, token_usage::build);
    register(body_mutation::TYPE_NAME, body_mutation::build);
    register(model_rewrite::TYPE_NAME, model_rewrite::build);
    register(prompt_decorator::TYPE_NAME, prompt_decorator::build);
    register(request_validator::TYPE_NAME, request_validator::build);
    register(json_to_multipart::TYPE_NAME, json_to_multipart::build);
    register(mcp_router::TYPE_NAME, mcp_router::build);
    register(pii_guard::TYPE_NAME, pii_guard::build);
    register(prompt_guard::TYPE_NAME, prompt_guard::build);
    register(endpoint_picker::TYPE_NAME, endpoint_picker::build);
}

/// A registry holding the built-in plugin types.
pub fn builtin_registry() -> Registry {
    let mut registry = Registry::new();
    register_builtins(&mut registry);
    registry
}

/// Reads a body field as header text: strings as they are, numbers and booleans as their JSON
/// text; `null` counts as absent. Objects and arrays cannot be a header value.
pub(crate) fn field_as_text(ctx: &mut Context<'_>, path: &FieldPath) -> Result<Option<String>, PluginError> {
    let value = ctx.body().get(path).map_err(|err| match err {
        JsonError::Path(_) => PluginError::internal("json_path", err.to_string()),
        _ => PluginError::bad_request("invalid_json", err.to_string()),
    })?;
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(value @ (Value::Number(_) | Value::Bool(_))) => Ok(Some(value.to_string())),
        Some(_) => Err(PluginError::bad_request(
            "invalid_field",
            format!("field {} must be a string, number or boolean", path.describe()),
        )),
    }
}

/// Compiles a field name or JSONPath parameter.
pub(crate) fn field_path(text: &str, at: &str) -> Result<FieldPath, ConfigError> {
    FieldPath::parse(text).map_err(|msg| ConfigError::new(at, msg))
}
