//! Helpers several plugins share: header-name validation and reading body fields as header
//! text. No plugin imports another plugin; they import these.

use payload_processor_core::{ConfigError, Context, FieldPath, JsonError, PluginError};
use serde_json::Value;

/// A header name a plugin may set: an HTTP token, not a pseudo-header.
pub(crate) fn validate_header_name(name: &str, at: &str) -> Result<(), ConfigError> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(ConfigError::new(
            at,
            format!("{name:?} is not a valid HTTP header name"),
        ));
    }
    Ok(())
}

/// Reads a body field as header text: strings as they are, numbers and booleans as their JSON
/// text; `null` counts as absent. Objects and arrays cannot be a header value.
pub(crate) fn field_as_text(ctx: &mut Context<'_>, path: &FieldPath) -> Result<Option<String>, PluginError> {
    let value = ctx.body_field(path).map_err(|err| match err {
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
