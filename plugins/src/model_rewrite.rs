//! `model-rewrite`: rewrites the request's `model` by exact name or regex, optionally split by
//! weight between several targets (canaries, version migrations), as the Inference
//! Extension's model rewrite and traffic splitting do, without the ext_proc hop.
//!
//! The users' reference (a full example, every parameter, behaviour, quality): `docs/plugins/model-rewrite.md`.

use crate::common::field_as_text;
use crate::common::validate_header_name;
use payload_processor_core::{
    BuildContext, ConfigError, Context, Counter, Decision, FieldPath, PhaseNeed, Plugin, PluginError,
};
use regex::Regex;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

/// Registry key.
pub const TYPE_NAME: &str = "model-rewrite";

/// Parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(rename = "ModelRewriteParameters")]
pub struct Config {
    /// Rules, first match wins.
    pub rules: Vec<RuleConfig>,
    /// Header whose value keeps a client on one target.
    #[serde(default)]
    pub sticky_header: Option<String>,
    /// Routing header set to the target.
    #[serde(default = "default_model_header")]
    pub model_header: String,
    /// Header reporting the target.
    #[serde(default = "default_report_header")]
    pub report_header: String,
    /// Metadata namespace for `original_model` and `target_model`.
    #[serde(default = "default_namespace")]
    pub metadata_namespace: String,
}

fn default_model_header() -> String {
    "X-Gateway-Model-Name".into()
}
fn default_report_header() -> String {
    "x-gateway-model-target".into()
}
fn default_namespace() -> String {
    "io.envoy.ai_gateway".into()
}

/// One rule.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleConfig {
    /// Exact model name.
    pub model: Option<String>,
    /// Regex over the model name; captures expand in target names (`$1`).
    pub model_regex: Option<String>,
    /// Where to send it.
    pub targets: Vec<TargetConfig>,
}

/// One target.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetConfig {
    /// Target model name.
    pub model: String,
    /// Relative weight (default 1).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug)]
enum Matcher {
    Exact(String),
    Regex(Regex),
}

#[derive(Debug)]
struct Rule {
    matcher: Matcher,
    targets: Vec<(String, u32)>,
    total_weight: u64,
}

/// The plugin.
#[derive(Debug)]
pub struct ModelRewrite {
    rules: Vec<Rule>,
    sticky_header: Option<String>,
    model_header: String,
    report_header: String,
    namespace: String,
    model: FieldPath,
    rewritten: Counter,
    unmatched: Counter,
}

/// Factory.
pub fn build(parameters: &Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    let config: Config = ctx.parameters(parameters)?;
    if config.rules.is_empty() {
        return Err(ConfigError::new("rules", "give at least one rule"));
    }
    for (name, at) in [
        (&config.model_header, "modelHeader"),
        (&config.report_header, "reportHeader"),
    ] {
        validate_header_name(name, at)?;
    }
    if let Some(sticky) = &config.sticky_header {
        validate_header_name(sticky, "stickyHeader")?;
    }
    let rules = config
        .rules
        .iter()
        .enumerate()
        .map(|(index, rule)| build_rule(rule).map_err(|err| err.within(&format!("rules[{index}]"))))
        .collect::<Result<_, _>>()?;
    Ok(Arc::new(ModelRewrite {
        rules,
        sticky_header: config.sticky_header.map(|h| h.to_ascii_lowercase()),
        model_header: config.model_header.to_ascii_lowercase(),
        report_header: config.report_header.to_ascii_lowercase(),
        namespace: config.metadata_namespace,
        model: FieldPath::Members(vec!["model".into()]),
        rewritten: ctx.counter("rewritten"),
        unmatched: ctx.counter("unmatched"),
    }))
}

fn build_rule(rule: &RuleConfig) -> Result<Rule, ConfigError> {
    let matcher = match (&rule.model, &rule.model_regex) {
        (Some(model), None) if !model.is_empty() => Matcher::Exact(model.clone()),
        (None, Some(pattern)) => {
            Matcher::Regex(Regex::new(pattern).map_err(|err| ConfigError::new("modelRegex", err.to_string()))?)
        }
        (Some(_), Some(_)) => return Err(ConfigError::new("modelRegex", "give model or modelRegex, not both")),
        _ => return Err(ConfigError::new("model", "give a model name or a modelRegex")),
    };
    if rule.targets.is_empty() {
        return Err(ConfigError::new("targets", "give at least one target"));
    }
    for (index, target) in rule.targets.iter().enumerate() {
        if target.model.is_empty() {
            return Err(ConfigError::new(format!("targets[{index}].model"), "must not be empty"));
        }
    }
    let total_weight: u64 = rule.targets.iter().map(|t| u64::from(t.weight)).sum();
    if total_weight == 0 {
        return Err(ConfigError::new("targets", "weights must not all be zero"));
    }
    Ok(Rule {
        matcher,
        targets: rule.targets.iter().map(|t| (t.model.clone(), t.weight)).collect(),
        total_weight,
    })
}

/// A well-mixed 64-bit hash of a key (FNV-1a, then a splitmix64 finalizer so that the low bits
/// used for the weighted pick are uniform).
fn mix(key: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

impl Rule {
    /// The target for `model`, if this rule matches it.
    fn pick(&self, model: &str, key: &[u8]) -> Option<String> {
        let captures = match &self.matcher {
            Matcher::Exact(name) if name == model => None,
            Matcher::Exact(_) => return None,
            Matcher::Regex(regex) => Some(regex.captures(model)?),
        };
        let mut slot = mix(key) % self.total_weight;
        let (target, _) = self
            .targets
            .iter()
            .find(|(_, weight)| {
                let hit = slot < u64::from(*weight);
                slot = slot.saturating_sub(u64::from(*weight));
                hit
            })
            .expect("slot is below the total weight");
        Some(match captures {
            Some(captures) => {
                let mut expanded = String::new();
                captures.expand(target, &mut expanded);
                expanded
            }
            None => target.clone(),
        })
    }
}

impl Plugin for ModelRewrite {
    fn request_need(&self) -> PhaseNeed {
        PhaseNeed::Body
    }

    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        let Some(model) = field_as_text(ctx, &self.model)? else {
            ctx.remove_header(&self.report_header); // only the gateway reports a rewrite
            ctx.increment(self.unmatched);
            return Ok(Decision::Continue);
        };
        let key = self
            .sticky_header
            .as_deref()
            .and_then(|name| ctx.header(name))
            .or_else(|| ctx.header("x-request-id"))
            .unwrap_or_else(|| ctx.now_nanos().to_string());
        let Some(target) = self.rules.iter().find_map(|rule| rule.pick(&model, key.as_bytes())) else {
            ctx.remove_header(&self.report_header);
            ctx.increment(self.unmatched);
            return Ok(Decision::Continue);
        };
        if target != model {
            ctx.body()
                .set(&self.model, Value::String(target.clone()))
                .map_err(|err| PluginError::bad_request("invalid_json", err.to_string()))?;
        }
        ctx.set_header(&self.model_header, &target)?;
        ctx.set_header(&self.report_header, &target)?;
        ctx.set_metadata(&self.namespace, "original_model", &model);
        ctx.set_metadata(&self.namespace, "target_model", &target);
        ctx.increment(self.rewritten);
        Ok(Decision::Continue)
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::run_request;
    use payload_processor_core::Direction;
    use serde_json::json;

    const CHAIN: &str = r#"
processors:
  - name: split
    type: model-rewrite
    parameters:
      stickyHeader: x-user
      rules:
        - { model: gpt-4o, targets: [{model: gpt-4o-new, weight: 3}, {model: gpt-4o-old, weight: 1}] }
        - { modelRegex: "^llama-3-(.+)$", targets: [{model: "llama-3.1-$1"}] }
"#;

    fn target(headers: &[(&str, &str)], model: &str) -> (Option<String>, serde_json::Value) {
        let (host, _) = run_request(CHAIN, headers, &json!({"model": model, "messages": []}));
        let body = serde_json::from_slice(&host.request_body).unwrap();
        (
            host.header_values(Direction::Request, "x-gateway-model-name").pop(),
            body,
        )
    }

    #[test]
    fn weighted_split_is_close_to_the_weights_and_sticky() {
        let mut new = 0;
        for i in 0..4000 {
            let id = format!("req-{i}");
            let (header, body) = target(&[("x-request-id", id.as_str())], "gpt-4o");
            assert_eq!(header.as_deref(), body["model"].as_str());
            if header.as_deref() == Some("gpt-4o-new") {
                new += 1;
            }
        }
        let share = f64::from(new) / 4000.0;
        assert!((share - 0.75).abs() < 0.03, "share {share}");
        let first = target(&[("x-user", "alice"), ("x-request-id", "1")], "gpt-4o").0;
        for i in 0..50 {
            let id = i.to_string();
            assert_eq!(
                target(&[("x-user", "alice"), ("x-request-id", id.as_str())], "gpt-4o").0,
                first
            );
        }
    }

    #[test]
    fn regex_rules_expand_captures_and_unmatched_models_pass() {
        let (header, body) = target(&[], "llama-3-8b");
        assert_eq!(header.as_deref(), Some("llama-3.1-8b"));
        assert_eq!(body["model"], "llama-3.1-8b");
        let (host, chain) = run_request(CHAIN, &[], &json!({"model": "mistral"}));
        assert_eq!(host.body_replacements, 0);
        assert_eq!(host.counter(&chain, "processor.split.unmatched"), 1);
        assert_eq!(
            host.metadata
                .get(&("io.envoy.ai_gateway".into(), "target_model".into())),
            None
        );
    }

    #[test]
    fn bad_configs_are_refused_with_paths() {
        let cases = [
            ("{rules: []}", "processors[0].parameters.rules: give at least one"),
            (
                "{rules: [{modelRegex: '(', targets: [{model: a}]}]}",
                "processors[0].parameters.rules[0].modelRegex:",
            ),
            (
                "{rules: [{model: a, targets: []}]}",
                "processors[0].parameters.rules[0].targets:",
            ),
            (
                "{rules: [{model: a, targets: [{model: b, weight: 0}]}]}",
                "processors[0].parameters.rules[0].targets: weights",
            ),
            (
                "{rules: [{targets: [{model: b}]}]}",
                "processors[0].parameters.rules[0].model:",
            ),
            (
                "{rules: [{model: a, targets: [{model: b, weight: -1}]}]}",
                "processors[0].parameters.rules[0].targets[0].weight:",
            ),
        ];
        for (parameters, expected) in cases {
            let yaml = format!("processors: [{{name: m, type: model-rewrite, parameters: {parameters}}}]");
            let err = payload_processor_core::Chain::load(&yaml, &crate::builtin_registry())
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(expected), "{parameters}: {err}");
        }
    }
}
