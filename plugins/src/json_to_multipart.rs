//! `json-to-multipart`: turns a JSON request into `multipart/form-data` for providers that want
//! uploads (audio transcription, image edits). Top-level fields become form fields; the
//! configured file fields, holding a data URL (`data:audio/wav;base64,...`) or plain base64,
//! become file parts with a filename and content type.
//!
//! The users' reference (a full example, every parameter, behaviour, quality): `docs/plugins/json-to-multipart.md`.

use base64::Engine;
use payload_processor_core::{BuildContext, ConfigError, Context, Counter, Decision, PhaseNeed, Plugin, PluginError};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::sync::Arc;

/// Registry key.
pub const TYPE_NAME: &str = "json-to-multipart";

/// Parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(rename = "JsonToMultipartParameters")]
pub struct Config {
    /// Fields that hold file contents.
    pub file_fields: Vec<FileFieldConfig>,
}

/// One file field.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileFieldConfig {
    /// Top-level JSON field.
    pub field: String,
    /// File name sent in the part (default: the field name).
    #[serde(default)]
    pub filename: Option<String>,
    /// Content type when the value is plain base64 (default `application/octet-stream`).
    #[serde(default)]
    pub content_type: Option<String>,
}

/// The plugin.
#[derive(Debug)]
pub struct JsonToMultipart {
    files: Vec<FileFieldConfig>,
    converted: Counter,
    passed_through: Counter,
}

fn safe_token(text: &str) -> bool {
    !text.is_empty() && !text.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f)
}

/// Factory.
pub fn build(parameters: &Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    let config: Config = ctx.parameters(parameters)?;
    if config.file_fields.is_empty() {
        return Err(ConfigError::new("fileFields", "give at least one file field"));
    }
    for (index, file) in config.file_fields.iter().enumerate() {
        let at = |field: &str| format!("fileFields[{index}].{field}");
        if !safe_token(&file.field) {
            return Err(ConfigError::new(
                at("field"),
                "must be a non-empty name without quotes or controls",
            ));
        }
        if file.filename.as_deref().is_some_and(|f| !safe_token(f)) {
            return Err(ConfigError::new(
                at("filename"),
                "must be a non-empty name without quotes or controls",
            ));
        }
        if file
            .content_type
            .as_deref()
            .is_some_and(|c| !safe_token(c) || !c.contains('/'))
        {
            return Err(ConfigError::new(
                at("contentType"),
                "must be a media type such as audio/wav",
            ));
        }
    }
    Ok(Arc::new(JsonToMultipart {
        files: config.file_fields,
        converted: ctx.counter("converted"),
        passed_through: ctx.counter("passed_through"),
    }))
}

/// The bytes and content type of a data URL or plain base64 value.
fn decode_file(value: &str, fallback_type: &str) -> Option<(Vec<u8>, String)> {
    let (content_type, payload) = match value.strip_prefix("data:") {
        Some(rest) => {
            let (meta, payload) = rest.split_once(',')?;
            let media = meta.strip_suffix(";base64")?;
            let media = if media.is_empty() { fallback_type } else { media };
            (media.to_string(), payload)
        }
        None => (fallback_type.to_string(), value),
    };
    // Line-wrapped base64 (MIME style) is accepted; most payloads have no whitespace to strip.
    let payload: Cow<'_, str> = if payload.bytes().any(|b| b.is_ascii_whitespace()) {
        Cow::Owned(payload.chars().filter(|c| !c.is_ascii_whitespace()).collect())
    } else {
        Cow::Borrowed(payload)
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload.as_bytes())
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')))
        .ok()?;
    Some((bytes, content_type))
}

fn text_of(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// A boundary that appears in none of the parts (derived from their content, so no randomness).
fn boundary_for(parts: &[&[u8]]) -> String {
    let mut seed: u64 = parts.iter().map(|p| p.len() as u64).sum();
    for part in parts {
        for byte in part.iter().step_by(part.len() / 16 + 1) {
            seed = (seed ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    free_boundary(seed, parts)
}

fn free_boundary(mut seed: u64, parts: &[&[u8]]) -> String {
    loop {
        let boundary = format!("payload-processor-{seed:016x}");
        let finder = memchr::memmem::Finder::new(boundary.as_bytes());
        if parts.iter().all(|part| finder.find(part).is_none()) {
            return boundary;
        }
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    }
}

enum Part {
    Text(String, String),
    File {
        name: String,
        filename: String,
        content_type: String,
        bytes: Vec<u8>,
    },
}

fn encode(parts: &[Part]) -> (Vec<u8>, String) {
    let contents: Vec<&[u8]> = parts
        .iter()
        .map(|part| match part {
            Part::Text(_, text) => text.as_bytes(),
            Part::File { bytes, .. } => bytes.as_slice(),
        })
        .collect();
    let boundary = boundary_for(&contents);
    let size: usize = contents.iter().map(|c| c.len()).sum();
    let mut body = Vec::with_capacity(size + parts.len() * 128);
    for part in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match part {
            Part::Text(name, text) => {
                body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes());
                body.extend_from_slice(text.as_bytes());
            }
            Part::File {
                name,
                filename,
                content_type,
                bytes,
            } => {
                body.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n\
                         Content-Type: {content_type}\r\n\r\n"
                    )
                    .as_bytes(),
                );
                body.extend_from_slice(bytes);
            }
        }
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (body, boundary)
}

impl JsonToMultipart {
    fn parts(&self, object: &Map<String, Value>) -> Result<Vec<Part>, PluginError> {
        let mut parts = Vec::new();
        for (name, value) in object {
            if !safe_token(name) {
                return Err(PluginError::bad_request(
                    "invalid_field",
                    "a field name cannot be a form field name",
                ));
            }
            if let Some(file) = self.files.iter().find(|f| &f.field == name) {
                let fallback = file.content_type.as_deref().unwrap_or("application/octet-stream");
                let (bytes, content_type) = value.as_str().and_then(|v| decode_file(v, fallback)).ok_or_else(|| {
                    PluginError::bad_request("invalid_file", format!("field {name} is not a data URL or base64"))
                })?;
                if !safe_token(&content_type) {
                    return Err(PluginError::bad_request(
                        "invalid_file",
                        format!("field {name} has a bad media type"),
                    ));
                }
                parts.push(Part::File {
                    name: name.clone(),
                    filename: file.filename.clone().unwrap_or_else(|| name.clone()),
                    content_type,
                    bytes,
                });
                continue;
            }
            match value {
                Value::Array(items) if items.iter().all(|i| !i.is_array() && !i.is_object()) => {
                    parts.extend(
                        items
                            .iter()
                            .filter_map(text_of)
                            .map(|t| Part::Text(format!("{name}[]"), t)),
                    );
                }
                other => parts.extend(text_of(other).map(|t| Part::Text(name.clone(), t))),
            }
        }
        Ok(parts)
    }
}

impl Plugin for JsonToMultipart {
    fn request_need(&self) -> PhaseNeed {
        PhaseNeed::Body
    }

    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        let is_json = ctx
            .header("content-type")
            .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("application/json"));
        let parts = match ctx.body().doc() {
            Ok(Value::Object(object)) if is_json && self.files.iter().any(|f| object.contains_key(&f.field)) => {
                Some(self.parts(object))
            }
            _ => None,
        };
        let Some(parts) = parts else {
            ctx.increment(self.passed_through);
            return Ok(Decision::Continue);
        };
        let (body, boundary) = encode(&parts?);
        ctx.body().replace(body);
        ctx.set_header("content-type", &format!("multipart/form-data; boundary={boundary}"))?;
        ctx.increment(self.converted);
        Ok(Decision::Continue)
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::run_request_at;
    use payload_processor_core::Direction;

    const CHAIN: &str = "processors: [{name: form, type: json-to-multipart, parameters: {fileFields: [{field: file, filename: a.wav}]}}]";

    #[test]
    fn builds_a_form_with_a_file_part() {
        let body = br#"{"model":"whisper-1","file":"data:audio/wav;base64,UklGRg==","temperature":0,"timestamp_granularities":["word","segment"],"prompt":null}"#;
        let (host, chain) = run_request_at(
            "/v1/audio/transcriptions",
            CHAIN,
            &[("content-type", "application/json")],
            body,
        );
        let content_type = host.header_values(Direction::Request, "content-type").pop().unwrap();
        let boundary = content_type.strip_prefix("multipart/form-data; boundary=").unwrap();
        let text = String::from_utf8_lossy(&host.request_body).to_string();
        assert!(
            text.contains("name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\r\n"),
            "{text}"
        );
        assert!(text.contains("name=\"model\"\r\n\r\nwhisper-1\r\n"));
        assert!(text.contains("name=\"timestamp_granularities[]\"\r\n\r\nword\r\n"));
        assert!(!text.contains("prompt"));
        assert!(text.ends_with(&format!("--{boundary}--\r\n")));
        assert_eq!(
            host.header_values(Direction::Request, "content-length"),
            vec![host.request_body.len().to_string()]
        );
        assert_eq!(host.counter(&chain, "processor.form.converted"), 1);
    }

    #[test]
    fn wrapped_base64_is_read() {
        let body = br#"{"file": "UklG\r\nRg==", "prompt": "hello"}"#;
        let (host, _) = run_request_at("/v1/x", CHAIN, &[("content-type", "application/json")], body);
        let text = String::from_utf8_lossy(&host.request_body).to_string();
        assert!(text.contains("\r\n\r\nRIFF\r\n"), "{text}");
    }

    #[test]
    fn a_boundary_found_in_a_part_is_never_used() {
        let taken = super::free_boundary(7, &[b"x"]);
        let content = format!("text with {taken} inside");
        let chosen = super::free_boundary(7, &[b"x", content.as_bytes()]);
        assert_ne!(chosen, taken);
        assert!(!content.contains(&chosen));
    }

    #[test]
    fn other_requests_pass_byte_for_byte_and_bad_base64_is_refused() {
        let body = br#"{"model":"whisper-1", "no_file": 1}"#;
        let (host, chain) = run_request_at("/v1/x", CHAIN, &[("content-type", "application/json")], body);
        assert_eq!(host.request_body, body);
        assert_eq!(host.counter(&chain, "processor.form.passed_through"), 1);
        let (host, _) = run_request_at(
            "/v1/x",
            CHAIN,
            &[("content-type", "application/json")],
            br#"{"file":"%%%"}"#,
        );
        assert_eq!(host.reply.unwrap().json()["error"]["code"], "invalid_file");
    }

    #[test]
    fn bad_configs_are_refused_with_paths() {
        for (parameters, expected) in [
            ("{fileFields: []}", "processors[0].parameters.fileFields:"),
            (
                "{fileFields: [{field: 'a\"b'}]}",
                "processors[0].parameters.fileFields[0].field:",
            ),
            (
                "{fileFields: [{field: f, contentType: wav}]}",
                "processors[0].parameters.fileFields[0].contentType:",
            ),
        ] {
            let yaml = format!("processors: [{{name: f, type: json-to-multipart, parameters: {parameters}}}]");
            let err = payload_processor_core::Chain::load(&yaml, &crate::builtin_registry())
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(expected), "{parameters}: {err}");
        }
    }
}
