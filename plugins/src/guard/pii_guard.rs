//! `pii-guard`: finds personal data and secrets in prompts and model output and rejects,
//! masks or reports them.
//!
//! The users' reference (a full example, every parameter, behaviour, quality): `docs/plugins/pii-guard.md`.

use crate::guard::{
    guard_counters, Action, Channel, Detector, Finding, Guard, GuardDirection, GuardOptions, MaskConfig, Masking,
    RejectConfig, Rule, TextPathsConfig,
};
use crate::pii::{drop_overlapped, Entity, Recognizer, Text};
use payload_processor_core::{BuildContext, ConfigError, Plugin};
use regex::{Regex, RegexBuilder};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Registry key.
pub const TYPE_NAME: &str = "pii-guard";

/// Parameters. The fields both guards share (`direction` to `streamHoldBackBytes`) are
/// repeated in each guard's config rather than flattened: serde cannot refuse unknown fields
/// through `flatten`, and a misspelt guard parameter must be an error.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(rename = "PiiGuardParameters")]
pub struct Config {
    /// Built-in entities to look for (default: all).
    #[serde(default = "all_entities")]
    pub entities: Vec<Entity>,
    /// What to do with a finding (default `Mask`).
    #[serde(default = "default_action")]
    pub action: Action,
    /// Masking for every entity without its own (default a tag such as `[EMAIL]`).
    pub mask: Option<MaskConfig>,
    /// Which side is inspected (default `Both`).
    #[serde(default = "default_direction")]
    pub direction: GuardDirection,
    /// Per-entity action and masking.
    #[serde(default)]
    pub overrides: BTreeMap<Entity, EntityOverride>,
    /// More recognizers, as regexes.
    #[serde(default)]
    pub custom_patterns: Vec<CustomPattern>,
    /// Where the text is, beyond or instead of the known API shapes.
    pub text_paths: Option<TextPathsConfig>,
    /// Also inspect tool-call arguments (default false).
    #[serde(default)]
    pub inspect_tool_arguments: bool,
    /// The reply for rejections (default an OpenAI-shaped 400 naming the entity).
    pub reject: Option<RejectConfig>,
    /// A response header listing the entities found (never the values).
    pub report_header: Option<String>,
    /// Dynamic metadata namespace for `<name>.findings` and `<name>.outcome`.
    #[serde(default = "crate::guard::default_namespace")]
    pub metadata_namespace: String,
    /// Bytes of streamed text held back so a value split across events is seen whole.
    #[serde(default = "crate::guard::default_hold_back")]
    pub stream_hold_back_bytes: usize,
}

/// Action and masking of one entity.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntityOverride {
    /// Action for this entity.
    pub action: Option<Action>,
    /// Masking for this entity.
    pub mask: Option<MaskConfig>,
}

/// A recognizer given as a regex.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CustomPattern {
    /// Name in reports and the default mask tag (lower-case letters, digits, `_`, `-`).
    pub name: String,
    /// The pattern (Rust regex syntax).
    pub regex: String,
    /// Case-insensitive matching (default false).
    #[serde(default)]
    pub case_insensitive: bool,
    /// Action (default the guard's).
    pub action: Option<Action>,
    /// Masking (default the guard's).
    pub mask: Option<MaskConfig>,
}

fn all_entities() -> Vec<Entity> {
    Entity::ALL.to_vec()
}
fn default_action() -> Action {
    Action::Mask
}
fn default_direction() -> GuardDirection {
    GuardDirection::Both
}

/// The recognizers and custom patterns, each tied to its rule.
pub struct PiiDetector {
    recognizers: Vec<(Box<dyn Recognizer>, usize)>,
    custom: Vec<(Regex, usize)>,
}

impl Detector for PiiDetector {
    fn detect(&self, text: &str, _channel: Channel, findings: &mut Vec<Finding>) {
        let mut spans = Vec::new();
        // Number runs are found once and shared by the recognizers that start from them.
        let scan = Text::new(text);
        let mut built_in = Vec::new();
        for (recognizer, rule) in &self.recognizers {
            spans.clear();
            recognizer.find(&scan, &mut spans);
            built_in.extend(spans.drain(..).map(|span| (recognizer.entity(), span, *rule)));
        }
        drop_overlapped(&mut built_in, |(entity, span, _)| (*entity, span.clone()));
        findings.extend(built_in.into_iter().map(|(_, span, rule)| Finding { span, rule }));
        for (regex, rule) in &self.custom {
            findings.extend(regex.find_iter(text).map(|m| Finding {
                span: m.range(),
                rule: *rule,
            }));
        }
    }
}

/// Factory.
pub fn build(parameters: &Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    let config: Config = ctx.parameters(parameters)?;
    if config.entities.is_empty() && config.custom_patterns.is_empty() {
        return Err(ConfigError::new(
            "entities",
            "give at least one entity or custom pattern",
        ));
    }
    let mut rules = Vec::new();
    let mut recognizers = Vec::new();
    let mut entities = config.entities.clone();
    entities.sort();
    entities.dedup();
    for entity in entities {
        let custom = config.overrides.get(&entity);
        let own = custom.and_then(|o| o.mask.as_ref());
        let at = match own {
            Some(_) => format!("overrides.{}.mask", entity.name()),
            None => "mask".to_string(),
        };
        let mask = own.or(config.mask.as_ref());
        rules.push(Rule {
            name: entity.name().to_string(),
            action: custom.and_then(|o| o.action).unwrap_or(config.action),
            mask: Masking::build(mask, &entity.name().to_ascii_uppercase(), &at)?,
            counter: ctx.counter(&format!("found.{}", entity.name())),
        });
        recognizers.push((entity.recognizer(), rules.len() - 1));
    }
    for entity in config.overrides.keys() {
        if !config.entities.contains(entity) {
            return Err(ConfigError::new(
                format!("overrides.{}", entity.name()),
                "this entity is not in entities",
            ));
        }
    }
    let mut custom = Vec::new();
    for (index, pattern) in config.custom_patterns.iter().enumerate() {
        let at = format!("customPatterns[{index}]");
        let valid_name = !pattern.name.is_empty()
            && pattern
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !valid_name {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!("{:?} must be lower-case letters, digits, '_' or '-'", pattern.name),
            ));
        }
        if rules.iter().any(|rule: &Rule| rule.name == pattern.name) {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!("duplicate rule name {:?}", pattern.name),
            ));
        }
        let regex = RegexBuilder::new(&pattern.regex)
            .case_insensitive(pattern.case_insensitive)
            .build()
            .map_err(|err| ConfigError::new(format!("{at}.regex"), err.to_string()))?;
        if regex.is_match("") {
            return Err(ConfigError::new(
                format!("{at}.regex"),
                "the pattern matches empty text",
            ));
        }
        let mask_at = if pattern.mask.is_some() {
            format!("{at}.mask")
        } else {
            "mask".into()
        };
        let mask = pattern.mask.as_ref().or(config.mask.as_ref());
        rules.push(Rule {
            name: pattern.name.clone(),
            action: pattern.action.unwrap_or(config.action),
            mask: Masking::build(mask, &pattern.name.to_ascii_uppercase(), &mask_at)?,
            counter: ctx.counter(&format!("found.{}", pattern.name)),
        });
        custom.push((regex, rules.len() - 1));
    }
    if config.mask.is_some() {
        Masking::build(config.mask.as_ref(), "PII", "mask")?;
    }
    let options = GuardOptions::build(
        config.direction,
        config.text_paths.as_ref(),
        config.inspect_tool_arguments,
        config.reject.as_ref(),
        config.report_header.as_deref(),
        &config.metadata_namespace,
        config.stream_hold_back_bytes,
    )?;
    Ok(Arc::new(Guard {
        name: ctx.processor_name().to_string(),
        code: "pii_detected",
        detector: PiiDetector { recognizers, custom },
        rules,
        options,
        counters: guard_counters(ctx),
    }))
}

#[cfg(test)]
mod tests {
    use crate::testing::{run_request, run_request_at};
    use payload_processor_core::testing::FakeHost;
    use payload_processor_core::{Chain, Direction, Stream};
    use serde_json::{json, Value};
    use std::sync::Arc;

    const EMAIL_AND_CARD: &str = "mail jane.doe@example.com, card 4111 1111 1111 1111";

    fn chat(text: &str) -> Value {
        json!({"model": "m", "messages": [{"role": "user", "content": text}]})
    }

    fn upstream_text(host: &FakeHost) -> String {
        host.request_json()["messages"][0]["content"]
            .as_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn masks_every_entity_with_tags_by_default() {
        let text = "a@b.io, +1-415-555-0100, 4111-1111-1111-1111, 123-45-6789, DE89370400440532013000, \
                    10.0.0.1, AKIAZ3MHQ2XKJ4WV7PLN";
        let (host, chain) = run_request("processors: [{name: p, type: pii-guard}]", &[], &chat(text));
        assert_eq!(
            upstream_text(&host),
            "[EMAIL], [PHONE], [CREDIT_CARD], [US_SSN], [IBAN], [IP_ADDRESS], [SECRET]"
        );
        assert_eq!(host.counter(&chain, "processor.p.masked"), 1);
        assert_eq!(host.counter(&chain, "processor.p.found.email"), 1);
        assert_eq!(
            host.header_values(Direction::Request, "content-length"),
            vec![host.request_body.len().to_string()]
        );
    }

    #[test]
    fn rejects_without_echoing_the_value() {
        let (host, chain) = run_request(
            "processors: [{name: p, type: pii-guard, parameters: {action: Reject}}]",
            &[],
            &chat(EMAIL_AND_CARD),
        );
        let reply = host.reply.clone().expect("rejected");
        assert_eq!(reply.status, 400);
        let body = String::from_utf8(reply.body).unwrap();
        assert!(body.contains("pii_detected") && body.contains("credit_card") || body.contains("email"));
        assert!(!body.contains("jane") && !body.contains("4111"), "{body}");
        assert_eq!(host.counter(&chain, "processor.p.rejected"), 1);
    }

    #[test]
    fn overrides_and_partial_and_hash_masks() {
        let chain = r#"processors:
- name: p
  type: pii-guard
  parameters:
    entities: [email, credit_card]
    mask: {style: Hash, hashKey: "0123456789abcdef"}
    overrides: {credit_card: {mask: {style: Partial, keepLast: 4}}}"#;
        let (host, _) = run_request(chain, &[], &chat(EMAIL_AND_CARD));
        let text = upstream_text(&host);
        assert!(text.starts_with("mail [EMAIL:"), "{text}");
        assert!(text.ends_with("card **** **** **** 1111"), "{text}");
        // The same value always hashes the same, other values differently.
        let (again, _) = run_request(chain, &[], &chat(EMAIL_AND_CARD));
        assert_eq!(upstream_text(&again), text);
        let (other, _) = run_request(chain, &[], &chat("mail john@example.com"));
        let other = upstream_text(&other);
        assert!(other.starts_with("mail [EMAIL:") && other != text[..other.len()]);
    }

    #[test]
    fn report_records_metadata_and_leaves_the_body_alone() {
        let body = chat(EMAIL_AND_CARD);
        let (host, _) = run_request(
            "processors: [{name: p, type: pii-guard, parameters: {action: Report}}]",
            &[],
            &body,
        );
        assert_eq!(host.request_json(), body);
        assert_eq!(host.body_replacements, 0);
        assert_eq!(
            host.metadata
                .get(&("envoy.payload_processor.guard".into(), "p.findings".into())),
            Some(&"credit_card,email".to_string())
        );
        assert_eq!(
            host.metadata
                .get(&("envoy.payload_processor.guard".into(), "p.outcome".into())),
            Some(&"reported".to_string())
        );
    }

    #[test]
    fn inspects_known_shapes_and_custom_patterns() {
        let chain = r#"processors:
- name: p
  type: pii-guard
  parameters:
    entities: [email]
    customPatterns: [{name: employee_id, regex: "emp-[0-9]{6}", caseInsensitive: true}]"#;
        let anthropic = json!({"model": "m", "system": [{"type": "text", "text": "a@b.io"}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "id EMP-123456"}]}]});
        let (host, _) = run_request_at("/v1/messages", chain, &[], &serde_json::to_vec(&anthropic).unwrap());
        let sent = host.request_json();
        assert_eq!(sent["system"][0]["text"], "[EMAIL]");
        assert_eq!(sent["messages"][0]["content"][0]["text"], "id [EMPLOYEE_ID]");
        let completions = json!({"model": "m", "prompt": ["x a@b.io"]});
        let (host, _) = run_request_at(
            "/v1/completions",
            chain,
            &[],
            &serde_json::to_vec(&completions).unwrap(),
        );
        assert_eq!(host.request_json()["prompt"][0], "x [EMAIL]");
        let responses = json!({"model": "m", "input": [{"role": "user", "content": "a@b.io"}]});
        let (host, _) = run_request_at("/v1/responses", chain, &[], &serde_json::to_vec(&responses).unwrap());
        assert_eq!(host.request_json()["input"][0]["content"], "[EMAIL]");
    }

    #[test]
    fn masking_leaves_nothing_recognizable() {
        // Regressions found by the pii_mask fuzz target: the tag of a masked number made the
        // next bare number look like a phone number by context; masking an address glued to
        // an IPv6 address freed the IPv6 address; a chain of numbers where each masked one
        // frees the next needs many rounds. (Bytes the fuzzer sent as invalid UTF-8 arrive
        // here as U+FFFD, as they do through JSON.)
        let fuzzed = "-\u{fffd}\u{fffd}024145l6VVVV\n&\u{14}&sk-Z-0024145492639980541+212(492639980541+212(\
                      2280541+212(492639980541+212(2222222::2:2\u{fffd}:a\u{fffd}\u{fffd}";
        let cases = [
            ("@4155511171:211111171:21", "@[PHONE]:211111171:21"),
            ("4:2::GT08U@pii.out:@$", "[IP_ADDRESS][EMAIL]:@$"),
            (
                fuzzed,
                // `+212(2222222` is a repeated digit run, not a phone number, since issue 18.
                "-\u{fffd}\u{fffd}024145l6VVVV\n&\u{14}&[SECRET][PHONE][PHONE][PHONE]+212(2222222::2:2\
                 \u{fffd}:a\u{fffd}\u{fffd}",
            ),
        ];
        for (text, expected) in cases {
            let (host, _) = run_request("processors: [{name: p, type: pii-guard}]", &[], &chat(text));
            let masked = upstream_text(&host);
            assert_eq!(masked, expected);
            let scan = crate::pii::Text::new(&masked);
            for entity in crate::pii::Entity::ALL {
                let mut found = Vec::new();
                entity.recognizer().find(&scan, &mut found);
                assert!(found.is_empty(), "{entity:?} in {masked}");
            }
        }
    }

    #[test]
    fn non_json_bodies_are_refused() {
        let (host, _) = run_request_at(
            "/v1/chat/completions",
            "processors: [{name: p, type: pii-guard}]",
            &[],
            b"not json a@b.io",
        );
        let reply = host.reply.clone().expect("refused");
        assert_eq!(reply.status, 400);
        assert!(!String::from_utf8_lossy(&reply.body).contains("a@b.io"));
    }

    fn stream_chain(action: &str) -> Arc<Chain> {
        let yaml = format!(
            "processors: [{{name: p, type: pii-guard, parameters: {{action: {action}, direction: Response, \
             streamHoldBackBytes: 16, overrides: {{}}}}}}]"
        );
        Arc::new(Chain::load(&yaml, &crate::builtin_registry()).unwrap())
    }

    /// Streams `text` as one OpenAI chunk per `piece` bytes, each upstream chunk `split` bytes.
    fn run_stream(chain: Arc<Chain>, text: &str, piece: usize, split: usize) -> (Vec<u8>, String) {
        let mut events = Vec::new();
        let chars: Vec<char> = text.chars().collect();
        for part in chars.chunks(piece) {
            let content: String = part.iter().collect();
            let chunk = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]});
            events.extend(format!("data: {chunk}\n\n").into_bytes());
        }
        let last = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
        events.extend(format!("data: {last}\n\ndata: [DONE]\n\n").into_bytes());
        let mut host = FakeHost::request("/v1/chat/completions", &[], b"{}");
        let mut stream = Stream::new(chain);
        payload_processor_core::testing::run_request_phase(&mut stream, &mut host);
        let out = payload_processor_core::testing::run_streamed_response(&mut stream, &mut host, &events, split);
        let mut assembled = String::new();
        for event in String::from_utf8_lossy(&out).split("\n\n") {
            if let Some(data) = event.strip_prefix("data: ") {
                if let Ok(chunk) = serde_json::from_str::<Value>(data) {
                    if let Some(content) = chunk.pointer("/choices/0/delta/content").and_then(Value::as_str) {
                        assembled.push_str(content);
                    }
                }
            }
        }
        (out, assembled)
    }

    #[test]
    fn streamed_values_split_anywhere_are_masked_whole() {
        let text = "Reach me at jane.doe@example.com or 4111 1111 1111 1111, thanks. Bye now, see you.";
        for piece in [1, 2, 3, 7] {
            for split in [1, 5, 64, 4096] {
                let (out, assembled) = run_stream(stream_chain("Mask"), text, piece, split);
                assert_eq!(
                    assembled, "Reach me at [EMAIL] or [CREDIT_CARD], thanks. Bye now, see you.",
                    "piece {piece} split {split}"
                );
                let raw = String::from_utf8_lossy(&out);
                for fragment in ["jane", "doe@", "example.com", "4111"] {
                    assert!(!raw.contains(fragment), "{fragment} leaked");
                }
            }
        }
    }

    #[test]
    fn streamed_rejection_ends_with_content_filter_and_leaks_nothing() {
        let text = "Sure. The card is 4111 1111 1111 1111 and that is all I can say about it today.";
        for piece in [1, 4] {
            let (out, assembled) = run_stream(stream_chain("Reject"), text, piece, 3);
            let raw = String::from_utf8_lossy(&out);
            assert!(raw.contains("\"finish_reason\":\"content_filter\""), "{raw}");
            assert!(raw.ends_with("data: [DONE]\n\n"));
            assert!(
                !assembled.contains("4111") && !assembled.contains("1111"),
                "{assembled}"
            );
        }
    }

    #[test]
    fn responses_api_streams_are_masked_in_deltas_and_in_the_full_texts() {
        let text = "Mail jane.doe@example.com now";
        let mut events = String::new();
        for piece in text.as_bytes().chunks(3) {
            let delta = String::from_utf8_lossy(piece);
            let event = json!({"type": "response.output_text.delta", "item_id": "m1", "output_index": 0,
                               "content_index": 0, "delta": delta});
            events += &format!("event: response.output_text.delta\ndata: {event}\n\n");
        }
        let done = json!({"type": "response.output_text.done", "item_id": "m1", "output_index": 0,
                          "content_index": 0, "text": text});
        let completed = json!({"type": "response.completed", "response": {"output": [
            {"type": "message", "content": [{"type": "output_text", "text": text}]}]}});
        events += &format!("event: response.output_text.done\ndata: {done}\n\n");
        events += &format!("event: response.completed\ndata: {completed}\n\n");
        let mut host = FakeHost::request("/v1/responses", &[], b"{}");
        let mut stream = Stream::new(stream_chain("Mask"));
        payload_processor_core::testing::run_request_phase(&mut stream, &mut host);
        let out = payload_processor_core::testing::run_streamed_response(&mut stream, &mut host, events.as_bytes(), 7);
        let out = String::from_utf8(out).unwrap();
        assert!(!out.contains("jane") && !out.contains("example.com"), "{out}");
        let mut deltas = String::new();
        let mut full_texts = Vec::new();
        for event in out.split("\n\n").filter(|e| !e.is_empty()) {
            let data = event.lines().find_map(|line| line.strip_prefix("data: ")).unwrap();
            let value: Value = serde_json::from_str(data).unwrap();
            match value["type"].as_str().unwrap() {
                "response.output_text.delta" => deltas += value["delta"].as_str().unwrap(),
                "response.output_text.done" => full_texts.push(value["text"].clone()),
                "response.completed" => full_texts.push(value["response"]["output"][0]["content"][0]["text"].clone()),
                other => panic!("unexpected event {other}"),
            }
        }
        assert_eq!(deltas, "Mail [EMAIL] now");
        assert_eq!(full_texts, vec![json!("Mail [EMAIL] now"), json!("Mail [EMAIL] now")]);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let registry = crate::builtin_registry();
        let cases = [
            ("{entities: [email, passport]}", "processors[0].parameters.entities[1]"),
            ("{entities: []}", "processors[0].parameters.entities"),
            ("{action: Block}", "processors[0].parameters.action"),
            (
                "{customPatterns: [{name: x, regex: '(['}]}",
                "processors[0].parameters.customPatterns[0].regex",
            ),
            (
                "{customPatterns: [{name: x, regex: 'a*'}]}",
                "processors[0].parameters.customPatterns[0].regex",
            ),
            (
                "{customPatterns: [{name: Bad Name, regex: 'a'}]}",
                "processors[0].parameters.customPatterns[0].name",
            ),
            (
                "{entities: [email], overrides: {phone: {action: Reject}}}",
                "processors[0].parameters.overrides.phone",
            ),
            ("{mask: {style: Hash}}", "processors[0].parameters.mask.hashKey"),
            (
                "{textPaths: {request: ['$..x']}}",
                "processors[0].parameters.textPaths.request[0]",
            ),
            (
                "{streamHoldBackBytes: 1}",
                "processors[0].parameters.streamHoldBackBytes",
            ),
            ("{reportHeader: 'bad header'}", "processors[0].parameters.reportHeader"),
            ("{entitys: [email]}", "processors[0].parameters"),
        ];
        for (parameters, path) in cases {
            let yaml = format!("processors: [{{name: p, type: pii-guard, parameters: {parameters}}}]");
            let err = Chain::load(&yaml, &registry).expect_err(parameters).to_string();
            assert!(err.starts_with(path), "{parameters}: {err}");
        }
    }
}
