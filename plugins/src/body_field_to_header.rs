//! `body-field-to-header`: copies a JSON body field (by default `model`) into a request header
//! (by default `X-Gateway-Model-Name`) so Envoy routes can match it: body-based routing, as
//! the Gateway API Inference Extension's Body-Based Router does, without the ext_proc hop.
//!
//! The users' reference (a full example, every parameter, behaviour, quality): `docs/plugins/body-field-to-header.md`.

use crate::common::{field_as_text, field_path, validate_header_name};
use payload_processor_core::{
    BuildContext, ConfigError, Context, Counter, Decision, FieldPath, LocalReply, PhaseNeed, Plugin, PluginError,
    RequestEdits,
};
use schemars::JsonSchema;
use serde::Deserialize;
use std::sync::Arc;

/// Registry key.
pub const TYPE_NAME: &str = "body-field-to-header";

/// Parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(rename = "BodyFieldToHeaderParameters")]
pub struct Config {
    /// Top-level key, or a JSONPath such as `$.metadata.tenant`.
    #[serde(default = "default_field")]
    pub field_name: String,
    /// Header to write.
    #[serde(default = "default_header")]
    pub header_name: String,
    /// Reject requests without the field (400).
    #[serde(default)]
    pub required: bool,
}

fn default_field() -> String {
    "model".into()
}

fn default_header() -> String {
    "X-Gateway-Model-Name".into()
}

/// The plugin.
#[derive(Debug)]
pub struct BodyFieldToHeader {
    field: FieldPath,
    header: String,
    required: bool,
    missing: Counter,
}

/// Factory.
pub fn build(parameters: &serde_json::Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    let config: Config = ctx.parameters(parameters)?;
    validate_header_name(&config.header_name, "headerName")?;
    Ok(Arc::new(BodyFieldToHeader {
        field: field_path(&config.field_name, "fieldName")?,
        header: config.header_name.to_ascii_lowercase(),
        required: config.required,
        missing: ctx.counter("missing_field"),
    }))
}

impl Plugin for BodyFieldToHeader {
    fn request_edits(&self) -> RequestEdits {
        RequestEdits::HEADERS
    }

    fn request_need(&self) -> PhaseNeed {
        PhaseNeed::Body
    }

    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        match field_as_text(ctx, &self.field)? {
            Some(value) => ctx.set_header(&self.header, &value)?,
            None if self.required => {
                let message = format!("request body has no field {}", self.field.describe());
                return Ok(Decision::Reject(LocalReply::json_error(400, "missing_field", &message)));
            }
            None => {
                ctx.increment(self.missing);
                ctx.remove_header(&self.header);
            }
        }
        Ok(Decision::Continue)
    }
}

#[cfg(test)]
mod tests {
    use crate::builtin_registry;
    use payload_processor_core::testing::FakeHost;
    use payload_processor_core::{BodyFlow, Chain, Direction, HeadersFlow, Stream};
    use std::sync::Arc;

    fn run(params: &str, body: &str, headers: &[(&str, &str)]) -> (FakeHost, Arc<Chain>) {
        let config = format!("processors:\n- name: p\n  type: body-field-to-header\n  parameters: {params}\n");
        let chain = Arc::new(Chain::load(&config, &builtin_registry()).unwrap());
        let mut host = FakeHost::request("/v1/chat/completions", headers, body.as_bytes());
        let mut stream = Stream::new(chain.clone());
        assert_eq!(stream.on_request_headers(&mut host, false), HeadersFlow::WaitForBody);
        let flow = stream.on_request_body(&mut host, true);
        assert_eq!(flow == BodyFlow::Stop, host.reply.is_some());
        (host, chain)
    }

    /// Runs `config` on a body the host lends in 7-byte slices (Envoy keeps a body in several
    /// buffers); answers the host.
    fn run_in_slices(config: &str, body: &str) -> FakeHost {
        let chain = Arc::new(Chain::load(config, &builtin_registry()).unwrap());
        let mut host = FakeHost::request("/v1/chat/completions", &[], body.as_bytes());
        host.body_slice_bytes = Some(7);
        let mut stream = Stream::new(chain);
        assert_eq!(stream.on_request_headers(&mut host, false), HeadersFlow::WaitForBody);
        assert_eq!(stream.on_request_body(&mut host, true), BodyFlow::Continue);
        host
    }

    #[test]
    fn reads_the_field_where_the_host_keeps_the_body_without_copying_it() {
        let body =
            r#"{"messages":[{"role":"user","content":"a prompt long enough to span slices"}],"model":"llama-3-8b"}"#;
        let host = run_in_slices("processors: [{name: p, type: body-field-to-header}]", body);
        assert_eq!(header(&host, "x-gateway-model-name"), vec!["llama-3-8b"]);
        assert_eq!(host.body_reads.get(), 0, "the body was copied out of the host");
        assert_eq!(host.request_body, body.as_bytes());
        // A processor that edits the body needs it whole: copied once, for it alone.
        let host = run_in_slices(
            "processors: [{name: p, type: body-field-to-header, parameters: {headerName: x-before}}, \
             {name: r, type: model-rewrite, parameters: {rules: [{model: llama-3-8b, targets: [{model: llama-3.1-8b}]}]}}, \
             {name: q, type: body-field-to-header, parameters: {headerName: x-after}}]",
            body,
        );
        assert_eq!(header(&host, "x-before"), vec!["llama-3-8b"]);
        assert_eq!(header(&host, "x-after"), vec!["llama-3.1-8b"]);
        assert_eq!(host.body_reads.get(), 1);
    }

    fn header(host: &FakeHost, name: &str) -> Vec<String> {
        host.header_values(Direction::Request, name)
    }

    #[test]
    fn copies_model_and_overwrites_client_value() {
        let (host, _) = run(
            "{}",
            r#"{"messages":[],"model":"llama"}"#,
            &[("x-gateway-model-name", "spoofed")],
        );
        assert_eq!(header(&host, "x-gateway-model-name"), vec!["llama"]);
        assert_eq!(host.route_cache_clears, 1);
        assert_eq!(host.body_replacements, 0, "unchanged body is not rewritten");
    }

    #[test]
    fn numbers_and_booleans_become_json_text() {
        let (host, _) = run("{}", r#"{"model":42}"#, &[]);
        assert_eq!(header(&host, "x-gateway-model-name"), vec!["42"]);
        let (host, _) = run("{}", r#"{"model":true}"#, &[]);
        assert_eq!(header(&host, "x-gateway-model-name"), vec!["true"]);
    }

    #[test]
    fn nested_jsonpath_and_custom_header() {
        let (host, _) = run(
            "{fieldName: $.metadata.tenant, headerName: X-Tenant}",
            r#"{"metadata":{"tenant":"acme"}}"#,
            &[],
        );
        assert_eq!(header(&host, "x-tenant"), vec!["acme"]);
    }

    #[test]
    fn missing_field_is_skipped_counted_and_clears_spoofed_header() {
        let (host, chain) = run("{}", r#"{"messages":[]}"#, &[("x-gateway-model-name", "spoofed")]);
        assert!(host.reply.is_none());
        assert!(header(&host, "x-gateway-model-name").is_empty());
        assert_eq!(host.counter(&chain, "processor.p.missing_field"), 1);
    }

    #[test]
    fn missing_required_field_is_400() {
        let (host, chain) = run("{required: true}", r#"{"messages":[]}"#, &[]);
        let reply = host.reply.clone().unwrap();
        assert_eq!(reply.status, 400);
        assert_eq!(reply.json()["error"]["code"], "missing_field");
        assert_eq!(host.counter(&chain, "processor.p.rejections"), 1);
    }

    #[test]
    fn invalid_json_is_400_and_objects_are_refused() {
        let (host, chain) = run("{}", "model=llama", &[]);
        let reply = host.reply.clone().unwrap();
        assert_eq!(
            (reply.status, reply.json()["error"]["code"].as_str()),
            (400, Some("invalid_json"))
        );
        assert_eq!(host.counter(&chain, "processor.p.errors"), 1);
        let (host, _) = run("{}", r#"{"model":{"a":1}}"#, &[]);
        assert_eq!(host.reply.clone().unwrap().json()["error"]["code"], "invalid_field");
    }

    #[test]
    fn header_injection_is_impossible() {
        let (host, _) = run("{}", r#"{"model":"a\r\nx-admin: 1"}"#, &[]);
        assert_eq!(host.reply.clone().unwrap().status, 400);
        assert!(header(&host, "x-admin").is_empty());
    }

    #[test]
    fn bad_parameters_are_refused_with_paths() {
        for (params, expected) in [
            ("{fieldName: 3}", "processors[0].parameters.fieldName: invalid type"),
            (
                "{fieldName: '$['}",
                "processors[0].parameters.fieldName: invalid JSONPath",
            ),
            ("{headerName: 'bad header'}", "processors[0].parameters.headerName:"),
            ("{nope: 1}", "processors[0].parameters.nope: unknown field `nope`"),
        ] {
            let config = format!("processors:\n- name: p\n  type: body-field-to-header\n  parameters: {params}\n");
            let err = Chain::load(&config, &builtin_registry()).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{params}: {err}");
        }
    }
}
