//! `base-model-to-header`: maps the requested model (a LoRA adapter or a base model) to its
//! base model and writes it to a header (default `X-Gateway-Base-Model-Name`), so routes can
//! send every adapter of one base model to the pool that serves it.
//!
//! The users' reference (a full example, every parameter, behaviour, quality): `docs/plugins/base-model-to-header.md`.

use crate::common::validate_header_name;
use crate::common::{field_as_text, field_path};
use payload_processor_core::{
    BuildContext, ConfigError, Context, Decision, FieldPath, PhaseNeed, Plugin, PluginError, RequestEdits,
};
use schemars::JsonSchema;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;

/// Registry key.
pub const TYPE_NAME: &str = "base-model-to-header";

/// Parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(rename = "BaseModelToHeaderParameters")]
pub struct Config {
    /// LoRA adapter name -> base model.
    #[serde(default)]
    pub adapters: HashMap<String, String>,
    /// Header to write.
    #[serde(default = "default_header")]
    pub header_name: String,
    /// Where the model is in the body.
    #[serde(default = "default_field")]
    pub field_name: String,
}

fn default_header() -> String {
    "X-Gateway-Base-Model-Name".into()
}

fn default_field() -> String {
    "model".into()
}

/// The plugin.
#[derive(Debug)]
pub struct BaseModelToHeader {
    adapters: HashMap<String, String>,
    header: String,
    field: FieldPath,
}

/// Factory.
pub fn build(parameters: &serde_json::Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    let config: Config = ctx.parameters(parameters)?;
    validate_header_name(&config.header_name, "headerName")?;
    if let Some((adapter, _)) = config
        .adapters
        .iter()
        .find(|(adapter, base)| adapter.is_empty() || base.is_empty())
    {
        return Err(ConfigError::new(
            format!("adapters.{adapter}"),
            "adapter and base model names must not be empty",
        ));
    }
    Ok(Arc::new(BaseModelToHeader {
        adapters: config.adapters,
        header: config.header_name.to_ascii_lowercase(),
        field: field_path(&config.field_name, "fieldName")?,
    }))
}

impl Plugin for BaseModelToHeader {
    fn request_edits(&self) -> RequestEdits {
        RequestEdits::HEADERS
    }

    fn request_need(&self) -> PhaseNeed {
        PhaseNeed::Body
    }

    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        match field_as_text(ctx, &self.field)? {
            Some(model) => {
                let base = self.adapters.get(&model).unwrap_or(&model).clone();
                ctx.set_header(&self.header, &base)?;
            }
            None => ctx.remove_header(&self.header),
        }
        Ok(Decision::Continue)
    }
}

#[cfg(test)]
mod tests {
    use crate::builtin_registry;
    use payload_processor_core::testing::FakeHost;
    use payload_processor_core::{Chain, Direction, Stream};
    use std::sync::Arc;

    fn base_header(body: &str) -> Vec<String> {
        let config = "processors:\n- name: b\n  type: base-model-to-header\n  parameters: {adapters: {sql-lora: llama-3, chat-lora: llama-3}}\n";
        let chain = Arc::new(Chain::load(config, &builtin_registry()).unwrap());
        let mut host = FakeHost::request(
            "/v1/completions",
            &[("x-gateway-base-model-name", "spoofed")],
            body.as_bytes(),
        );
        let mut stream = Stream::new(chain);
        stream.on_request_headers(&mut host, false);
        stream.on_request_body(&mut host, true);
        host.header_values(Direction::Request, "x-gateway-base-model-name")
    }

    #[test]
    fn adapters_map_to_their_base_and_other_models_to_themselves() {
        assert_eq!(base_header(r#"{"model":"sql-lora"}"#), vec!["llama-3"]);
        assert_eq!(base_header(r#"{"model":"mistral"}"#), vec!["mistral"]);
        assert!(base_header(r#"{"prompt":"x"}"#).is_empty());
    }

    #[test]
    fn empty_names_are_refused() {
        let config = "processors:\n- name: b\n  type: base-model-to-header\n  parameters: {adapters: {a: ''}}\n";
        let err = Chain::load(config, &builtin_registry()).unwrap_err().to_string();
        assert!(err.starts_with("processors[0].parameters.adapters.a:"), "{err}");
    }
}
