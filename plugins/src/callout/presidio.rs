//! `presidio`: sends the inspected text to Presidio analyzer's REST API (`POST /analyze` with
//! `{text, language, entities?, score_threshold?}`) and acts on the entity spans it returns:
//! `Reject` (400 `pii_detected`), `Mask` (each span replaced by `[ENTITY_TYPE]`, in place,
//! as `pii-guard` masks) or `Report` (metadata and a counter). Presidio's NER recognizers
//! complement the in-process `pii-guard` in the same chain.
//!
//! The users' reference: `docs/plugins/presidio.md`.

use super::{answer_error, inspected_texts, json_answer, with_detail, Endpoint, Phase, RejectConfig};
use crate::guard::engine::{each_text_mut, inspected_paths};
use crate::guard::Action;
use payload_processor_core::{
    BuildContext, CalloutResponse, ConfigError, Context, Counter, Decision, Direction, LocalReply, PhaseNeed, Plugin,
    PluginError, RequestEdits,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Registry key.
pub const TYPE_NAME: &str = "presidio";

/// Parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(rename = "PresidioParameters")]
pub struct Config {
    /// The Envoy cluster of the Presidio analyzer.
    pub cluster: String,
    /// Path of its analyze endpoint.
    #[serde(default = "default_path")]
    pub path: String,
    /// `:authority` of the call (default: the cluster name).
    #[serde(default)]
    pub authority: Option<String>,
    /// Fixed headers of the call.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Language of the text (Presidio's `language`).
    #[serde(default = "default_language")]
    pub language: String,
    /// Entity types asked for (`PERSON`, `EMAIL_ADDRESS`, ...); default: every type the
    /// analyzer knows.
    #[serde(default)]
    pub entities: Option<Vec<String>>,
    /// Minimum score of a finding (Presidio's `score_threshold`).
    #[serde(default)]
    pub score_threshold: Option<f64>,
    /// `Reject`, `Mask` (default) or `Report`.
    #[serde(default = "default_action")]
    pub action: Action,
    /// What is inspected: `Request` (default) or `Response`.
    #[serde(default)]
    pub phase: Phase,
    /// The reply of `Reject` (default 400 `pii_detected`).
    #[serde(default)]
    pub reject: RejectConfig,
    /// Namespace of the metadata written (`<name>.entities`).
    #[serde(default = "default_namespace")]
    pub metadata_namespace: String,
}

fn default_path() -> String {
    "/analyze".into()
}

fn default_language() -> String {
    "en".into()
}

fn default_action() -> Action {
    Action::Mask
}

fn default_namespace() -> String {
    "envoy.payload_processor.guard".into()
}

/// The plugin.
pub struct Presidio {
    name: String,
    endpoint: Endpoint,
    language: String,
    entities: Option<Vec<String>>,
    score_threshold: Option<f64>,
    action: Action,
    phase: Phase,
    reject: LocalReply,
    namespace: String,
    calls: Counter,
    found: Counter,
}

/// Factory.
pub fn build(parameters: &Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    let config: Config = ctx.parameters(parameters)?;
    let endpoint = Endpoint::new(
        &config.cluster,
        &config.path,
        config.authority.as_deref(),
        &config.headers,
    )?;
    if config.language.trim().is_empty() {
        return Err(ConfigError::new("language", "name the language (en, de, ...)"));
    }
    if let Some((index, _)) = config.entities.iter().flatten().enumerate().find(|(_, e)| {
        e.is_empty()
            || !e
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b == b'_' || b.is_ascii_digit())
    }) {
        return Err(ConfigError::new(
            format!("entities[{index}]"),
            "entity types are Presidio's upper-case names (PERSON, EMAIL_ADDRESS, ...)",
        ));
    }
    if let Some(threshold) = config.score_threshold.filter(|t| !(0.0..=1.0).contains(t)) {
        return Err(ConfigError::new(
            "scoreThreshold",
            format!("{threshold} is not between 0 and 1"),
        ));
    }
    let reject = config
        .reject
        .reply(400, "pii_detected", "the request contains personal data", "reject")?;
    Ok(Arc::new(Presidio {
        name: ctx.processor_name().to_string(),
        endpoint,
        language: config.language,
        entities: config.entities,
        score_threshold: config.score_threshold,
        action: config.action,
        phase: config.phase,
        reject,
        namespace: config.metadata_namespace,
        calls: ctx.counter("calls"),
        found: ctx.counter("found"),
    }))
}

/// The texts sent, joined by a blank line, and where each starts in the joined text, in
/// characters (Presidio's offsets are Python string indexes: code points).
#[derive(Default)]
struct Sent {
    texts: Vec<String>,
    starts: Vec<usize>,
}

const SEPARATOR: &str = "\n\n";

/// One finding: entity type and code point span in the joined text.
struct Span {
    entity: String,
    start: usize,
    end: usize,
}

fn spans(answer: &Value) -> Option<Vec<Span>> {
    answer
        .as_array()?
        .iter()
        .map(|item| {
            Some(Span {
                entity: item.get("entity_type")?.as_str()?.to_string(),
                start: usize::try_from(item.get("start")?.as_u64()?).ok()?,
                end: usize::try_from(item.get("end")?.as_u64()?).ok()?,
            })
        })
        .collect()
}

/// `text` with the spans (code points, relative to the text, sorted, overlapping ones
/// merged into the first) replaced by `[ENTITY]`.
fn mask(text: &str, spans: &[(usize, usize, &str)]) -> String {
    let bytes_at: Vec<usize> = text.char_indices().map(|(at, _)| at).chain([text.len()]).collect();
    let byte = |char_index: usize| bytes_at[char_index.min(bytes_at.len() - 1)];
    let mut out = String::with_capacity(text.len());
    let mut done = 0usize; // code points copied or replaced so far
    for &(start, end, entity) in spans {
        if end <= done {
            continue;
        }
        let start = start.max(done);
        out.push_str(&text[byte(done)..byte(start)]);
        out.push('[');
        out.push_str(entity);
        out.push(']');
        done = end;
    }
    out.push_str(&text[byte(done)..]);
    out
}

impl Presidio {
    fn call(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        let texts = inspected_texts(ctx, &self.name)?;
        if texts.iter().all(|text| text.trim().is_empty()) {
            return Ok(Decision::Continue);
        }
        let mut joined = String::new();
        let mut starts = Vec::with_capacity(texts.len());
        let mut chars = 0usize;
        for (index, text) in texts.iter().enumerate() {
            if index > 0 {
                joined.push_str(SEPARATOR);
                chars += SEPARATOR.chars().count();
            }
            starts.push(chars);
            joined.push_str(text);
            chars += text.chars().count();
        }
        let mut request = json!({"text": joined, "language": self.language});
        if let Some(entities) = &self.entities {
            request["entities"] = json!(entities);
        }
        if let Some(threshold) = self.score_threshold {
            request["score_threshold"] = json!(threshold);
        }
        *ctx.state::<Sent>() = Sent { texts, starts };
        ctx.increment(self.calls);
        Ok(Decision::Callout(self.endpoint.post_json(&request)))
    }

    /// The spans per sent text, relative to that text, sorted.
    fn per_text<'s>(&self, sent: &Sent, spans: &'s [Span]) -> Vec<Vec<(usize, usize, &'s str)>> {
        let mut out: Vec<Vec<(usize, usize, &str)>> = vec![Vec::new(); sent.texts.len()];
        for span in spans {
            for (index, text) in sent.texts.iter().enumerate() {
                let start = sent.starts[index];
                let end = start + text.chars().count();
                if span.start < end && span.end > start {
                    out[index].push((
                        span.start.max(start) - start,
                        span.end.min(end) - start,
                        span.entity.as_str(),
                    ));
                }
            }
        }
        for spans in &mut out {
            spans.sort_unstable();
        }
        out
    }
}

impl Plugin for Presidio {
    fn request_need(&self) -> PhaseNeed {
        self.phase.need(Direction::Request)
    }

    fn response_need(&self) -> PhaseNeed {
        self.phase.need(Direction::Response)
    }

    fn request_edits(&self) -> RequestEdits {
        if self.action == Action::Mask {
            RequestEdits::BODY
        } else {
            RequestEdits::NONE
        }
    }

    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        self.call(ctx)
    }

    fn on_response(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        self.call(ctx)
    }

    fn on_callout_done(&self, ctx: &mut Context<'_>, response: CalloutResponse) -> Result<Decision, PluginError> {
        let answer = json_answer(&self.name, &self.endpoint, &response)?;
        let spans = spans(&answer).ok_or_else(|| {
            answer_error(
                &self.name,
                &self.endpoint,
                "sent an answer that is not a list of entities",
            )
        })?;
        let entities: BTreeSet<&str> = spans.iter().map(|span| span.entity.as_str()).collect();
        let names = entities.into_iter().collect::<Vec<_>>().join(",");
        ctx.set_metadata(&self.namespace, &format!("{}.entities", self.name), &names);
        if spans.is_empty() {
            return Ok(Decision::Continue);
        }
        ctx.increment(self.found);
        match self.action {
            Action::Report => Ok(Decision::Continue),
            Action::Reject => {
                let reply = with_detail(&self.reject, &names);
                Ok(Decision::Reject(reply))
            }
            Action::Mask => {
                let sent = std::mem::take(ctx.state::<Sent>());
                let per_text = self.per_text(&sent, &spans);
                if ctx.direction() == payload_processor_core::Direction::Response {
                    ctx.mark_redacted();
                }
                let direction = ctx.direction();
                let doc = ctx
                    .body()
                    .doc_mut()
                    .map_err(|err| PluginError::bad_request("invalid_json", format!("{}: {err}", self.name)))?;
                // The same paths visit the same texts in the same order as when they were sent.
                let mut index = 0usize;
                for path in inspected_paths(direction) {
                    path.for_each_mut(doc, &mut |value| {
                        each_text_mut(value, &mut |text| {
                            if let (Some(original), Some(spans)) = (sent.texts.get(index), per_text.get(index)) {
                                if !spans.is_empty() && text == original {
                                    *text = mask(text, spans);
                                }
                            }
                            index += 1;
                        })
                    });
                }
                Ok(Decision::Continue)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mask;

    #[test]
    fn spans_are_code_points_and_overlaps_merge() {
        assert_eq!(mask("call Ana at 555", &[(5, 8, "PERSON")]), "call [PERSON] at 555");
        // Multi-byte text before the span: offsets count characters, not bytes.
        assert_eq!(mask("Grüße, Jörg!", &[(7, 11, "PERSON")]), "Grüße, [PERSON]!");
        assert_eq!(
            mask("ab cd ef", &[(0, 5, "A"), (3, 8, "B")]),
            "[A][B]",
            "an overlapping span masks what is left of it"
        );
        assert_eq!(mask("abc", &[(1, 99, "X")]), "a[X]");
        assert_eq!(mask("abc", &[]), "abc");
    }
}
