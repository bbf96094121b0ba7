//! `body-mutation`: ordered, declarative edits of the JSON request body at any depth, then of
//! request headers.
//!
//! The users' reference (a full example, every parameter, behaviour, quality): `docs/plugins/body-mutation.md`.

use crate::common::validate_header_name;
use crate::common::{field_as_text, field_path};
use payload_processor_core::{
    BuildContext, ConfigError, Context, Counter, Decision, FieldPath, JsonError, PhaseNeed, Plugin, PluginError,
    RequestEdits, WritePath,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Number, Value};
use std::sync::Arc;

/// Registry key.
pub const TYPE_NAME: &str = "body-mutation";

/// Parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(rename = "BodyMutationParameters")]
pub struct Config {
    /// Body operations, applied in order.
    #[serde(default)]
    pub operations: Vec<OperationConfig>,
    /// Header operations, applied in order after the body operations.
    #[serde(default)]
    pub headers: Vec<HeaderOperationConfig>,
}

payload_processor_core::config_enum! {
    /// Kind of a body operation.
    pub enum Op {
        /// Write `value` (or the `from` source) at `path`.
        Set = "Set" | "set",
        /// Like `Set`, only when `path` is absent.
        SetDefault = "SetDefault" | "setDefault",
        /// Delete `path`.
        Remove = "Remove" | "remove",
        /// Move the value at `path` to `to`.
        Rename = "Rename" | "rename",
        /// Bound the number at `path` by `min` and/or `max`.
        Clamp = "Clamp" | "clamp",
    }
}

/// One body operation.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OperationConfig {
    /// What to do.
    pub op: Op,
    /// Where.
    pub path: String,
    /// A literal value (`set`, `setDefault`).
    pub value: Option<Value>,
    /// A source instead of a literal: a JSONPath or `header:<name>`.
    pub from: Option<String>,
    /// Destination of `rename`.
    pub to: Option<String>,
    /// Lower bound of `clamp`.
    pub min: Option<f64>,
    /// Upper bound of `clamp`.
    pub max: Option<f64>,
    /// A missing path or source is a 400 instead of a skip.
    #[serde(default)]
    pub required: bool,
}

payload_processor_core::config_enum! {
    /// Kind of a header operation.
    pub enum HeaderOp {
        /// Set `name` to `value`.
        Set = "Set" | "set",
        /// Remove `name`.
        Remove = "Remove" | "remove",
        /// Set `name` from the body field at `path`.
        SetFromBody = "SetFromBody" | "setFromBody",
    }
}

/// One header operation.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOperationConfig {
    /// What to do.
    pub op: HeaderOp,
    /// Header name.
    pub name: String,
    /// Value for `set`.
    pub value: Option<String>,
    /// Body field for `setFromBody`.
    pub path: Option<String>,
    /// A missing body field is a 400 instead of removing the header.
    #[serde(default)]
    pub required: bool,
}

#[derive(Debug)]
enum Source {
    Literal(Value),
    Header(String),
    Body(FieldPath),
}

#[derive(Debug)]
enum Operation {
    Set {
        path: WritePath,
        source: Source,
        only_if_absent: bool,
    },
    Remove {
        path: WritePath,
    },
    Rename {
        path: WritePath,
        to: WritePath,
    },
    Clamp {
        path: WritePath,
        min: Option<f64>,
        max: Option<f64>,
    },
}

#[derive(Debug)]
struct Step {
    operation: Operation,
    required: bool,
    label: String,
}

#[derive(Debug)]
enum HeaderStep {
    Set {
        name: String,
        value: String,
    },
    Remove {
        name: String,
    },
    FromBody {
        name: String,
        path: FieldPath,
        required: bool,
    },
}

/// The plugin.
#[derive(Debug)]
pub struct BodyMutation {
    steps: Vec<Step>,
    headers: Vec<HeaderStep>,
    missing: Counter,
}

fn write_path(text: &str, at: &str) -> Result<WritePath, ConfigError> {
    WritePath::parse(text).map_err(|msg| ConfigError::new(at, msg))
}

fn build_operation(config: &OperationConfig) -> Result<Operation, ConfigError> {
    let unexpected = |field: &str, present: bool| {
        if present {
            Err(ConfigError::new(field, format!("not used by op {:?}", config.op)))
        } else {
            Ok(())
        }
    };
    let path = write_path(&config.path, "path")?;
    match config.op {
        Op::Set | Op::SetDefault => {
            unexpected("to", config.to.is_some())?;
            unexpected("min", config.min.is_some())?;
            unexpected("max", config.max.is_some())?;
            let source = match (&config.value, &config.from) {
                (Some(value), None) => Source::Literal(value.clone()),
                (None, Some(from)) => match from.strip_prefix("header:") {
                    Some(name) => {
                        validate_header_name(name, "from")?;
                        Source::Header(name.to_ascii_lowercase())
                    }
                    None => Source::Body(field_path(from, "from")?),
                },
                (Some(_), Some(_)) => return Err(ConfigError::new("from", "give either value or from, not both")),
                (None, None) => return Err(ConfigError::new("value", "set needs a value or a from source")),
            };
            Ok(Operation::Set {
                path,
                source,
                only_if_absent: config.op == Op::SetDefault,
            })
        }
        Op::Remove => {
            for (field, present) in [
                ("value", config.value.is_some()),
                ("from", config.from.is_some()),
                ("to", config.to.is_some()),
                ("min", config.min.is_some()),
                ("max", config.max.is_some()),
            ] {
                unexpected(field, present)?;
            }
            Ok(Operation::Remove { path })
        }
        Op::Rename => {
            unexpected("value", config.value.is_some())?;
            unexpected("from", config.from.is_some())?;
            let to = config
                .to
                .as_deref()
                .ok_or_else(|| ConfigError::new("to", "rename needs a destination path"))?;
            Ok(Operation::Rename {
                path,
                to: write_path(to, "to")?,
            })
        }
        Op::Clamp => {
            unexpected("value", config.value.is_some())?;
            unexpected("from", config.from.is_some())?;
            unexpected("to", config.to.is_some())?;
            match (config.min, config.max) {
                (None, None) => Err(ConfigError::new("min", "clamp needs min, max or both")),
                (Some(min), Some(max)) if min > max => Err(ConfigError::new("max", "must not be below min")),
                (min, max) => Ok(Operation::Clamp { path, min, max }),
            }
        }
    }
}

fn build_header(config: &HeaderOperationConfig) -> Result<HeaderStep, ConfigError> {
    validate_header_name(&config.name, "name")?;
    let name = config.name.to_ascii_lowercase();
    match config.op {
        HeaderOp::Set => {
            let value = config
                .value
                .clone()
                .ok_or_else(|| ConfigError::new("value", "set needs a value"))?;
            if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
                return Err(ConfigError::new(
                    "value",
                    "header values must not contain control characters",
                ));
            }
            Ok(HeaderStep::Set { name, value })
        }
        HeaderOp::Remove => Ok(HeaderStep::Remove { name }),
        HeaderOp::SetFromBody => {
            let path = config
                .path
                .as_deref()
                .ok_or_else(|| ConfigError::new("path", "setFromBody needs a body path"))?;
            Ok(HeaderStep::FromBody {
                name,
                path: field_path(path, "path")?,
                required: config.required,
            })
        }
    }
}

/// Factory.
pub fn build(parameters: &Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    let config: Config = ctx.parameters(parameters)?;
    if config.operations.is_empty() && config.headers.is_empty() {
        return Err(ConfigError::new(
            "operations",
            "give at least one operation or header operation",
        ));
    }
    let steps = config
        .operations
        .iter()
        .enumerate()
        .map(|(index, op)| {
            let at = format!("operations[{index}]");
            Ok(Step {
                operation: build_operation(op).map_err(|err| err.within(&at))?,
                required: op.required,
                label: format!("{at} ({:?} {})", op.op, op.path),
            })
        })
        .collect::<Result<_, ConfigError>>()?;
    let headers = config
        .headers
        .iter()
        .enumerate()
        .map(|(index, op)| build_header(op).map_err(|err| err.within(&format!("headers[{index}]"))))
        .collect::<Result<_, ConfigError>>()?;
    Ok(Arc::new(BodyMutation {
        steps,
        headers,
        missing: ctx.counter("path_missing"),
    }))
}

fn invalid_json(err: JsonError) -> PluginError {
    PluginError::bad_request("invalid_json", err.to_string())
}

/// `value` bounded by `min`/`max`; integers stay integers when the bound is whole.
fn clamp(value: &Number, min: Option<f64>, max: Option<f64>) -> Option<Value> {
    let number = value.as_f64()?;
    let bound = match (min, max) {
        (Some(min), _) if number < min => min,
        (_, Some(max)) if number > max => max,
        _ => return None, // already within bounds: nothing to write
    };
    if (value.is_i64() || value.is_u64()) && bound.fract() == 0.0 && bound.abs() < 9.0e15 {
        return Some(Value::from(bound as i64));
    }
    Number::from_f64(bound).map(Value::Number)
}

impl BodyMutation {
    /// Applies one body operation; `Ok(false)` when its path or source was absent.
    fn apply(&self, ctx: &mut Context<'_>, step: &Step) -> Result<bool, PluginError> {
        match &step.operation {
            Operation::Set {
                path,
                source,
                only_if_absent,
            } => {
                if *only_if_absent && path.get(ctx.body().doc().map_err(invalid_json)?).is_some() {
                    return Ok(true);
                }
                let value = match source {
                    Source::Literal(value) => value.clone(),
                    Source::Header(name) => match ctx.header(name) {
                        Some(value) => Value::String(value),
                        None => return Ok(false),
                    },
                    Source::Body(from) => match ctx.body_field(from).map_err(invalid_json)? {
                        Some(value) => value,
                        None => return Ok(false),
                    },
                };
                let doc = ctx.body().doc_mut().map_err(invalid_json)?;
                Ok(path.set(doc, value).is_ok())
            }
            Operation::Remove { path } => {
                if path.get(ctx.body().doc().map_err(invalid_json)?).is_none() {
                    return Ok(false);
                }
                Ok(path.remove(ctx.body().doc_mut().map_err(invalid_json)?).is_some())
            }
            Operation::Rename { path, to } => {
                if path.get(ctx.body().doc().map_err(invalid_json)?).is_none() {
                    return Ok(false);
                }
                let doc = ctx.body().doc_mut().map_err(invalid_json)?;
                let value = path.remove(doc).expect("present above");
                Ok(to.set(doc, value).is_ok())
            }
            Operation::Clamp { path, min, max } => {
                let bounded = match path.get(ctx.body().doc().map_err(invalid_json)?) {
                    None => return Ok(false),
                    Some(Value::Number(number)) => clamp(number, *min, *max),
                    Some(_) => {
                        return Err(PluginError::bad_request(
                            "invalid_field",
                            format!("field {} must be a number", path.describe()),
                        ))
                    }
                };
                if let Some(bounded) = bounded {
                    *path
                        .get_mut(ctx.body().doc_mut().map_err(invalid_json)?)
                        .expect("present above") = bounded;
                }
                Ok(true)
            }
        }
    }
}

impl Plugin for BodyMutation {
    fn request_edits(&self) -> RequestEdits {
        RequestEdits {
            headers: !self.headers.is_empty(),
            body: !self.steps.is_empty(),
        }
    }

    fn request_need(&self) -> PhaseNeed {
        let reads_body =
            !self.steps.is_empty() || self.headers.iter().any(|h| matches!(h, HeaderStep::FromBody { .. }));
        if reads_body {
            PhaseNeed::Body
        } else {
            PhaseNeed::Headers
        }
    }

    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        for step in &self.steps {
            if !self.apply(ctx, step)? {
                if step.required {
                    return Err(PluginError::bad_request(
                        "missing_field",
                        format!("{}: path or source not found", step.label),
                    ));
                }
                ctx.increment(self.missing);
            }
        }
        for header in &self.headers {
            match header {
                HeaderStep::Set { name, value } => ctx.set_header(name, value)?,
                HeaderStep::Remove { name } => ctx.remove_header(name),
                HeaderStep::FromBody { name, path, required } => match field_as_text(ctx, path)? {
                    Some(value) => ctx.set_header(name, &value)?,
                    None if *required => {
                        return Err(PluginError::bad_request(
                            "missing_field",
                            format!("field {} is required", path.describe()),
                        ))
                    }
                    None => {
                        ctx.remove_header(name); // never let a client-sent value stand in
                        ctx.increment(self.missing);
                    }
                },
            }
        }
        Ok(Decision::Continue)
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::run_request;
    use serde_json::json;

    const CHAIN: &str = r#"
processors:
  - name: shape
    type: body-mutation
    parameters:
      operations:
        - { op: setDefault, path: temperature, value: 0.7 }
        - { op: setDefault, path: top_p, value: 1 }
        - { op: set, path: $.metadata.user, from: "header:x-user-id" }
        - { op: set, path: $.metadata.first, from: "$.messages[0].content" }
        - { op: rename, path: max_tokens, to: max_completion_tokens }
        - { op: clamp, path: max_completion_tokens, min: 1, max: 4096 }
        - { op: remove, path: "$.messages[-1].name" }
        - { op: remove, path: absent }
      headers:
        - { op: setFromBody, name: x-gateway-user, path: $.metadata.user }
        - { op: set, name: x-shaped, value: "yes" }
        - { op: remove, name: x-debug }
"#;

    #[test]
    fn operations_apply_in_order_and_missing_paths_are_counted() {
        let body = json!({"model": "m", "top_p": 0.5, "max_tokens": 100000,
                          "messages": [{"role": "user", "content": "hi", "name": "bob"}]});
        let (host, chain) = run_request(CHAIN, &[("x-user-id", "u-1"), ("x-debug", "1")], &body);
        assert!(host.reply.is_none(), "{:?}", host.reply);
        let sent: serde_json::Value = serde_json::from_slice(&host.request_body).unwrap();
        assert_eq!(
            sent,
            json!({"model": "m", "top_p": 0.5, "messages": [{"role": "user", "content": "hi"}],
                   "temperature": 0.7, "metadata": {"user": "u-1", "first": "hi"},
                   "max_completion_tokens": 4096})
        );
        assert_eq!(
            host.header_values(payload_processor_core::Direction::Request, "x-gateway-user"),
            ["u-1"]
        );
        assert_eq!(
            host.header_values(payload_processor_core::Direction::Request, "x-shaped"),
            ["yes"]
        );
        assert!(host
            .header_values(payload_processor_core::Direction::Request, "x-debug")
            .is_empty());
        assert_eq!(host.counter(&chain, "processor.shape.path_missing"), 1, "remove absent");
    }

    #[test]
    fn required_paths_reject_and_non_numbers_cannot_be_clamped() {
        let chain = "processors: [{name: m, type: body-mutation, parameters: {operations: [{op: remove, path: user, required: true}]}}]";
        let (host, _) = run_request(chain, &[], &json!({"model": "m"}));
        let reply = host.reply.unwrap();
        assert_eq!(reply.status, 400);
        assert_eq!(reply.json()["error"]["code"], "missing_field");
        let chain =
            "processors: [{name: m, type: body-mutation, parameters: {operations: [{op: clamp, path: n, max: 1}]}}]";
        let (host, _) = run_request(chain, &[], &json!({"n": "many"}));
        assert_eq!(host.reply.unwrap().json()["error"]["code"], "invalid_field");
    }

    #[test]
    fn an_unchanged_body_is_forwarded_byte_for_byte() {
        let chain = "processors: [{name: m, type: body-mutation, parameters: {operations: [{op: clamp, path: n, max: 10}, {op: setDefault, path: n, value: 1}]}}]";
        let (host, _) = run_request(chain, &[], &json!({"n": 5}));
        assert_eq!(host.body_replacements, 0);
    }

    #[test]
    fn bad_configs_are_refused_with_paths() {
        let cases = [
            ("{}", "processors[0].parameters.operations: give at least one"),
            (
                "{operations: [{op: set, path: a}]}",
                "processors[0].parameters.operations[0].value: set needs",
            ),
            (
                "{operations: [{op: set, path: a, value: 1, from: b}]}",
                "processors[0].parameters.operations[0].from:",
            ),
            (
                "{operations: [{op: set, path: '$.a[*]', value: 1}]}",
                "processors[0].parameters.operations[0].path: JSONPath",
            ),
            (
                "{operations: [{op: rename, path: a}]}",
                "processors[0].parameters.operations[0].to:",
            ),
            (
                "{operations: [{op: clamp, path: a, min: 5, max: 1}]}",
                "processors[0].parameters.operations[0].max:",
            ),
            (
                "{operations: [{op: remove, path: a, value: 1}]}",
                "processors[0].parameters.operations[0].value: not used",
            ),
            (
                "{operations: [{op: explode, path: a}]}",
                "processors[0].parameters.operations[0].op: unknown variant",
            ),
            (
                "{headers: [{op: set, name: 'bad name', value: x}]}",
                "processors[0].parameters.headers[0].name:",
            ),
            (
                "{headers: [{op: setFromBody, name: x-a}]}",
                "processors[0].parameters.headers[0].path:",
            ),
        ];
        for (parameters, expected) in cases {
            let yaml = format!("processors: [{{name: m, type: body-mutation, parameters: {parameters}}}]");
            let err = payload_processor_core::Chain::load(&yaml, &crate::builtin_registry())
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(expected), "{parameters}: {err}");
        }
    }
}
