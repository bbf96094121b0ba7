//! What `pii-guard` and `prompt-guard` share: which text of a request or response is
//! inspected, what happens to a finding (reject, mask, report), and how a streamed response
//! is guarded with a hold-back window so that no fragment of a value is released before the
//! whole value was seen.
//!
//! A guard is a [`Detector`] (finds rule matches in one text) plus the [`Rule`]s it reports.
//! [`Guard`] turns that into a plugin:
//! - **Requests and buffered responses**: the JSON body is parsed once, every text the paths
//!   select is scanned; any `Reject` finding rejects, `Mask` findings are replaced in place
//!   (the body is re-serialized with its new length), `Report` findings are only recorded.
//! - **Streams**: the assistant text of each choice or content block is assembled across
//!   events. The last `streamHoldBackBytes` of it are held back; text is scanned together
//!   with the held-back tail and an overlap of already released text, and a value that may
//!   still be growing is held whole. Each event carries on only the text released so far
//!   (possibly empty); the rest goes out in the event that ends the choice or block (or an
//!   event emitted just before it). A rejection ends the stream with the protocol's terminal
//!   event; no held-back text reaches the client.
//!
//! Findings are reported by rule name and count only: matched text never goes into logs,
//! stats, metadata or headers.

use hmac::{Hmac, Mac};
use payload_processor_core::{
    Api, BuildContext, ConfigError, Context, Counter, Decision, Direction, EventDecision, LocalReply, PhaseNeed,
    Plugin, PluginError, RequestEdits, SelectPath, SseEvent, StreamNeed,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Sha256;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

/// What to do with a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
pub enum Action {
    /// Refuse the request (or stop the response) with the configured reply.
    Reject,
    /// Replace the value and go on.
    Mask,
    /// Go on unchanged; record the finding (stats, metadata, optional header).
    Report,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Reject => "rejected",
            Action::Mask => "masked",
            Action::Report => "reported",
        }
    }
}

/// Which side of the exchange a guard inspects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
pub enum GuardDirection {
    /// Prompts only.
    Request,
    /// Model output only (buffered and streamed).
    Response,
    /// Both.
    Both,
}

impl GuardDirection {
    fn request(self) -> bool {
        self != GuardDirection::Response
    }
    fn response(self) -> bool {
        self != GuardDirection::Request
    }
}

/// How a masked value is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, JsonSchema)]
pub enum MaskStyle {
    /// A tag naming the kind: `[EMAIL]`.
    #[default]
    Tag,
    /// `*` for every letter and digit but the last `keepLast`, separators kept: `****-****-****-1111`.
    Partial,
    /// A tag with a keyed hash of the value, so equal values stay linkable: `[EMAIL:5f3a9c0e12ab44d1]`.
    Hash,
}

/// Masking parameters.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MaskConfig {
    /// How the value is replaced (default `Tag`).
    #[serde(default)]
    pub style: MaskStyle,
    /// Characters left readable by `Partial` (default 4).
    pub keep_last: Option<usize>,
    /// The tag text (default the rule name in capitals).
    pub tag: Option<String>,
    /// Key of the `Hash` style (required for it).
    pub hash_key: Option<String>,
}

/// A custom reply for rejections.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RejectConfig {
    /// HTTP status (default 400).
    pub status: Option<u16>,
    /// Extra response headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Response body (default an OpenAI-shaped error naming the rule).
    pub body: Option<String>,
}

/// Where the inspected text is, beyond (or instead of) the known API shapes.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TextPathsConfig {
    /// JSONPaths into request bodies.
    #[serde(default)]
    pub request: Vec<String>,
    /// JSONPaths into buffered response bodies.
    #[serde(default)]
    pub response: Vec<String>,
    /// JSONPaths into request bodies of retrieved documents and other third-party text (RAG
    /// context fields): scanned as the indirect channel.
    #[serde(default)]
    pub documents: Vec<String>,
    /// Use only these paths, not the built-in ones.
    #[serde(default)]
    pub replace: bool,
}

/// User-visible text of the known request shapes: OpenAI chat `messages[].content`,
/// completions `prompt`, responses API `input`, Anthropic `messages[].content` and `system`.
const REQUEST_PATHS: &[&str] = &[
    "$.messages[*].content",
    "$.prompt",
    "$.input",
    "$.input[*].content",
    "$.system",
];
/// The paths of the text the guards inspect by default in a JSON body of `direction` (the
/// prompt and system text of requests; the assistant text of responses), compiled once.
pub(crate) fn inspected_paths(direction: Direction) -> &'static [SelectPath] {
    static REQUEST: std::sync::OnceLock<Vec<SelectPath>> = std::sync::OnceLock::new();
    static RESPONSE: std::sync::OnceLock<Vec<SelectPath>> = std::sync::OnceLock::new();
    let (cell, texts) = match direction {
        Direction::Request => (&REQUEST, REQUEST_PATHS),
        Direction::Response => (&RESPONSE, RESPONSE_PATHS),
    };
    cell.get_or_init(|| {
        texts
            .iter()
            .map(|text| SelectPath::parse(text).expect("built-in paths parse"))
            .collect()
    })
}

/// Assistant text of buffered responses: chat, completions, Anthropic, responses API.
const RESPONSE_PATHS: &[&str] = &[
    "$.choices[*].message.content",
    "$.choices[*].text",
    "$.content",
    "$.output[*].content",
];
const REQUEST_TOOL_PATHS: &[&str] = &[
    "$.messages[*].tool_calls[*].function.arguments",
    "$.messages[*].content[*].input",
];
const RESPONSE_TOOL_PATHS: &[&str] = &[
    "$.choices[*].message.tool_calls[*].function.arguments",
    "$.content[*].input",
];

/// A rule a detector reports findings for.
pub(crate) struct Rule {
    pub(crate) name: String,
    pub(crate) action: Action,
    pub(crate) mask: Masking,
    pub(crate) counter: Counter,
}

/// How one rule masks.
pub(crate) enum Masking {
    Tag(String),
    Partial { keep_last: usize },
    Hash { tag: String, key: Vec<u8> },
}

impl Masking {
    /// Compiles masking parameters; `default_tag` is used when none is given.
    pub(crate) fn build(config: Option<&MaskConfig>, default_tag: &str, at: &str) -> Result<Self, ConfigError> {
        let Some(config) = config else {
            return Ok(Masking::Tag(format!("[{default_tag}]")));
        };
        let tag = config.tag.clone().unwrap_or_else(|| default_tag.to_string());
        Ok(match config.style {
            MaskStyle::Tag => Masking::Tag(format!("[{tag}]")),
            MaskStyle::Partial => Masking::Partial {
                keep_last: config.keep_last.unwrap_or(4),
            },
            MaskStyle::Hash => {
                let key = config.hash_key.as_deref().unwrap_or_default();
                if key.len() < 16 {
                    return Err(ConfigError::new(
                        format!("{at}.hashKey"),
                        "the Hash style needs a hashKey of at least 16 characters",
                    ));
                }
                Masking::Hash {
                    tag,
                    key: key.as_bytes().to_vec(),
                }
            }
        })
    }

    fn apply(&self, value: &str, out: &mut String) {
        match self {
            Masking::Tag(tag) => out.push_str(tag),
            Masking::Partial { keep_last } => {
                let readable = value.chars().filter(|c| c.is_alphanumeric()).count();
                let mut seen = 0;
                for c in value.chars() {
                    if c.is_alphanumeric() {
                        seen += 1;
                        out.push(if seen + keep_last > readable { c } else { '*' });
                    } else {
                        out.push(c);
                    }
                }
            }
            Masking::Hash { tag, key } => {
                let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
                mac.update(value.as_bytes());
                let digest = mac.finalize().into_bytes();
                out.push('[');
                out.push_str(tag);
                out.push(':');
                for byte in &digest[..8] {
                    out.push_str(&format!("{byte:02x}"));
                }
                out.push(']');
            }
        }
    }
}

/// One match of a rule in a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Finding {
    pub(crate) span: Range<usize>,
    pub(crate) rule: usize,
}

/// Whose words a text is. Injection detection scores each channel on its own: the system
/// prompt is the operator's, not the attacker's; tool results and retrieved documents carry
/// indirect injections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Channel {
    /// The user's turns, prompts, and model output.
    User,
    /// `system`/`developer` messages and Anthropic's `system`.
    System,
    /// `tool`/`function` messages, tool-call arguments and `textPaths.documents`.
    Indirect,
}

/// Finds rule matches in one text.
pub(crate) trait Detector: Send + Sync + 'static {
    /// Appends the findings in `text` of `channel` (any order; overlaps are resolved by the
    /// caller).
    fn detect(&self, text: &str, channel: Channel, findings: &mut Vec<Finding>);
}

/// The channel of every role-bearing text of a request: `messages[*].content` and
/// `input[*].content` by their `role`, and Anthropic's `system`. Values are told apart by
/// address, so no path has to be evaluated twice.
fn channels_by_role(doc: &Value) -> Vec<(*const Value, Channel)> {
    let mut out = Vec::new();
    for list in ["messages", "input"] {
        if let Some(Value::Array(items)) = doc.get(list) {
            for item in items {
                let channel = match item.get("role").and_then(Value::as_str) {
                    Some("system" | "developer") => Channel::System,
                    Some("tool" | "function" | "ipython") => Channel::Indirect,
                    _ => continue,
                };
                if let Some(content) = item.get("content") {
                    out.push((content as *const Value, channel));
                }
            }
        }
    }
    if let Some(system) = doc.get("system") {
        out.push((system as *const Value, Channel::System));
    }
    out
}

/// Sorts findings and drops overlaps (the earlier, then the longer, wins).
fn normalize(findings: &mut Vec<Finding>) {
    findings.sort_by_key(|f| (f.span.start, std::cmp::Reverse(f.span.end)));
    let mut last_end = None;
    findings.retain(|f| {
        let keep = last_end.map_or(true, |end| f.span.start >= end) && !f.span.is_empty();
        if keep {
            last_end = Some(f.span.end);
        }
        keep
    });
}

/// The parameters both guards share, checked.
pub(crate) struct GuardOptions {
    pub(crate) direction: GuardDirection,
    /// Request paths, and whether what they select is indirect (else: by role).
    pub(crate) request_paths: Vec<(SelectPath, bool)>,
    pub(crate) response_paths: Vec<SelectPath>,
    pub(crate) reject: RejectConfig,
    pub(crate) report_header: Option<String>,
    pub(crate) namespace: String,
    pub(crate) hold_back: usize,
}

impl GuardOptions {
    /// Compiles the shared parameters.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn build(
        direction: GuardDirection,
        text_paths: Option<&TextPathsConfig>,
        inspect_tool_arguments: bool,
        reject: Option<&RejectConfig>,
        report_header: Option<&str>,
        namespace: &str,
        hold_back: usize,
    ) -> Result<Self, ConfigError> {
        let compile = |list: &str, defaults: &[&str], tools: &[&str], extra: &[String]| {
            let replace = text_paths.is_some_and(|paths| paths.replace);
            let builtin = defaults
                .iter()
                .chain(if inspect_tool_arguments { tools } else { &[] })
                .filter(|_| !replace)
                .map(|path| SelectPath::parse(path).expect("built-in paths parse"));
            let mut paths: Vec<SelectPath> = builtin.collect();
            for (index, text) in extra.iter().enumerate() {
                paths.push(
                    SelectPath::parse(text)
                        .map_err(|msg| ConfigError::new(format!("textPaths.{list}[{index}]"), msg))?,
                );
            }
            Ok::<_, ConfigError>(paths)
        };
        let empty = TextPathsConfig::default();
        let extra = text_paths.unwrap_or(&empty);
        let tool_paths: Vec<SelectPath> = if inspect_tool_arguments && !extra.replace {
            REQUEST_TOOL_PATHS
                .iter()
                .map(|path| SelectPath::parse(path).expect("built-in paths parse"))
                .collect()
        } else {
            Vec::new()
        };
        let mut request_paths: Vec<(SelectPath, bool)> = compile("request", REQUEST_PATHS, &[], &extra.request)?
            .into_iter()
            .map(|path| (path, false))
            .collect();
        request_paths.extend(tool_paths.into_iter().map(|path| (path, true)));
        for (index, text) in extra.documents.iter().enumerate() {
            let path = SelectPath::parse(text)
                .map_err(|msg| ConfigError::new(format!("textPaths.documents[{index}]"), msg))?;
            request_paths.push((path, true));
        }
        let response_paths = compile("response", RESPONSE_PATHS, RESPONSE_TOOL_PATHS, &extra.response)?;
        if extra.replace && request_paths.is_empty() && response_paths.is_empty() {
            return Err(ConfigError::new("textPaths", "replace is set but no path is given"));
        }
        if let Some(status) = reject.and_then(|reject| reject.status) {
            if !(200..=599).contains(&status) {
                return Err(ConfigError::new(
                    "reject.status",
                    format!("{status} is not an HTTP status"),
                ));
            }
        }
        if let Some(header) = report_header {
            if header.is_empty()
                || !header
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(ConfigError::new(
                    "reportHeader",
                    format!("{header:?} is not a header name"),
                ));
            }
        }
        if namespace.trim().is_empty() {
            return Err(ConfigError::new("metadataNamespace", "must not be empty"));
        }
        if !(16..=65536).contains(&hold_back) {
            return Err(ConfigError::new(
                "streamHoldBackBytes",
                format!("{hold_back} is out of range 16..=65536"),
            ));
        }
        Ok(Self {
            direction,
            request_paths,
            response_paths,
            reject: reject.cloned().unwrap_or_default(),
            report_header: report_header.map(str::to_ascii_lowercase),
            namespace: namespace.to_string(),
            hold_back,
        })
    }
}

/// Counters every guard declares.
pub(crate) struct GuardCounters {
    pub(crate) rejected: Counter,
    pub(crate) masked: Counter,
    pub(crate) reported: Counter,
    pub(crate) unreadable: Counter,
}

/// A guard plugin: a detector, its rules and the shared options.
pub(crate) struct Guard<D> {
    pub(crate) name: String,
    /// Error code of rejections (`pii_detected`, `prompt_blocked`).
    pub(crate) code: &'static str,
    pub(crate) detector: D,
    pub(crate) rules: Vec<Rule>,
    pub(crate) options: GuardOptions,
    pub(crate) counters: GuardCounters,
}

/// One assembled text of a streamed response (a choice, a content block).
#[derive(Debug, Default)]
struct Track {
    /// Text received but not yet released, as received.
    pending: String,
    /// The last released text, as received (left context for the next scan).
    context: String,
}

/// Where a streamed text lives, to put released text back and to make flush events.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum TrackKey {
    /// OpenAI chat (`delta.content`) or completions (`text`) choice index.
    Choice(u64),
    /// Anthropic content block index.
    Block(u64),
    /// Responses API output text: item id, output index, content index.
    Output(String, u64, u64),
}

/// Per-stream state.
#[derive(Default)]
struct GuardState {
    /// Rules found so far (names for reports), request and response.
    found: BTreeSet<usize>,
    tracks: BTreeMap<TrackKey, Track>,
    /// `id`, `created`, `model`, `object` of the first OpenAI chunk, for flush chunks.
    chunk_template: Option<Value>,
    api: Option<Api>,
}

/// Calls `visit` for every text inside a selected value: a string, a list of strings, or
/// content parts / blocks with a `text` member.
/// Visits the strings of one selected value: a string, or the `text` of content parts.
pub(crate) fn each_text<'v>(value: &'v Value, visit: &mut dyn FnMut(&'v str)) {
    match value {
        Value::String(text) => visit(text),
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::String(text) => visit(text),
                    Value::Object(part) => {
                        if let Some(Value::String(text)) = part.get("text") {
                            visit(text);
                        }
                    }
                    _ => {}
                }
            }
        }
        Value::Object(part) => {
            if let Some(Value::String(text)) = part.get("text") {
                visit(text);
            }
        }
        _ => {}
    }
}

/// [`each_text`] for editing.
pub(crate) fn each_text_mut(value: &mut Value, visit: &mut dyn FnMut(&mut String)) {
    match value {
        Value::String(text) => visit(text),
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::String(text) => visit(text),
                    Value::Object(part) => {
                        if let Some(Value::String(text)) = part.get_mut("text") {
                            visit(text);
                        }
                    }
                    _ => {}
                }
            }
        }
        Value::Object(part) => {
            if let Some(Value::String(text)) = part.get_mut("text") {
                visit(text);
            }
        }
        _ => {}
    }
}

fn floor_boundary(text: &str, mut at: usize) -> usize {
    at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

impl<D: Detector> Guard<D> {
    /// Findings in `text`, sorted, without overlaps.
    fn scan(&self, text: &str, channel: Channel, findings: &mut Vec<Finding>) {
        findings.clear();
        self.detector.detect(text, channel, findings);
        normalize(findings);
    }

    /// `text` with every `Mask` finding replaced (findings must be normalized).
    fn masked(&self, text: &str, findings: &[Finding]) -> String {
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for finding in findings {
            let rule = &self.rules[finding.rule];
            if rule.action != Action::Mask || finding.span.start < at {
                continue;
            }
            out.push_str(&text[at..finding.span.start]);
            rule.mask.apply(&text[finding.span.clone()], &mut out);
            at = finding.span.end;
        }
        out.push_str(&text[at..]);
        out
    }

    /// `text` masked, then masked again while the result still holds something to mask: a
    /// value removed can change a neighbour's context (an address glued to a word is no
    /// longer glued once the word is a tag; found by fuzzing), and nothing recognizable may
    /// remain. Every round turns original characters into tags, which are never recognized,
    /// so it ends; an input built to need more than `MAX_ROUNDS` is replaced whole (fail safe).
    fn masked_fully(&self, text: &str, channel: Channel, findings: &[Finding]) -> String {
        const MAX_ROUNDS: usize = 64;
        let mut out = self.masked(text, findings);
        let mut again = Vec::new();
        for _ in 0..MAX_ROUNDS {
            self.scan(&out, channel, &mut again);
            if !again.iter().any(|f| self.rules[f.rule].action == Action::Mask) {
                return out;
            }
            out = self.masked(&out, &again);
        }
        "[REDACTED]".to_string()
    }

    /// The reply for a rejection by `rule` (its name, never the matched text).
    pub(crate) fn reject_reply(&self, rule: usize) -> LocalReply {
        let reject = &self.options.reject;
        let status = reject.status.unwrap_or(400);
        let mut reply = match &reject.body {
            Some(body) => LocalReply {
                status,
                headers: Vec::new(),
                body: body.clone().into_bytes(),
            },
            None => LocalReply::json_error(
                status,
                self.code,
                &format!("blocked by {} rule {}", self.name, self.rules[rule].name),
            ),
        };
        if reject.body.is_some() && !reject.headers.keys().any(|k| k.eq_ignore_ascii_case("content-type")) {
            reply.headers.push(("content-type".into(), "application/json".into()));
        }
        reply
            .headers
            .extend(reject.headers.iter().map(|(name, value)| (name.clone(), value.clone())));
        reply
    }

    /// Counts and records what was found (by rule name only).
    fn record(&self, ctx: &mut Context<'_>, rules: &BTreeSet<usize>, outcome: Action) {
        if rules.is_empty() {
            return;
        }
        for &rule in rules {
            ctx.increment(self.rules[rule].counter);
        }
        ctx.increment(match outcome {
            Action::Reject => self.counters.rejected,
            Action::Mask => self.counters.masked,
            Action::Report => self.counters.reported,
        });
        if outcome == Action::Mask {
            ctx.mark_redacted(); // a response cache must not keep this answer
        }
        let state = ctx.state::<GuardState>();
        state.found.extend(rules.iter().copied());
        let names = self.names(&state.found);
        let namespace = &self.options.namespace;
        ctx.set_metadata(namespace, &format!("{}.findings", self.name), &names);
        ctx.set_metadata(namespace, &format!("{}.outcome", self.name), outcome.as_str());
    }

    fn names(&self, rules: &BTreeSet<usize>) -> String {
        let names: BTreeSet<&str> = rules.iter().map(|&rule| self.rules[rule].name.as_str()).collect();
        names.into_iter().collect::<Vec<_>>().join(",")
    }

    /// The strongest action among findings.
    fn outcome(&self, rules: &BTreeSet<usize>) -> Action {
        let actions: Vec<Action> = rules.iter().map(|&rule| self.rules[rule].action).collect();
        if actions.contains(&Action::Reject) {
            Action::Reject
        } else if actions.contains(&Action::Mask) {
            Action::Mask
        } else {
            Action::Report
        }
    }

    /// Scans (and masks) the JSON body of a request or buffered response.
    pub(crate) fn inspect_body(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        if ctx.body().is_blank() {
            return Ok(Decision::Continue);
        }
        let response_paths: Vec<(SelectPath, bool)>;
        let paths = match ctx.direction() {
            Direction::Request => &self.options.request_paths,
            Direction::Response => {
                response_paths = self
                    .options
                    .response_paths
                    .iter()
                    .map(|path| (path.clone(), false))
                    .collect();
                &response_paths
            }
        };
        let mut findings = Vec::new();
        let mut found = BTreeSet::new();
        let mut first_reject = None;
        // Texts with findings (and the findings), in visiting order, for the masking pass.
        let mut per_text: Vec<Option<(String, Vec<Finding>, Channel)>> = Vec::new();
        let request = ctx.direction() == Direction::Request;
        {
            let doc = ctx.body().doc().map_err(|err| {
                PluginError::bad_request("invalid_json", format!("{} cannot inspect the body: {err}", self.name))
            })?;
            let by_role = if request { channels_by_role(doc) } else { Vec::new() };
            for (path, indirect) in paths {
                path.for_each(doc, &mut |value| {
                    let channel = if *indirect {
                        Channel::Indirect
                    } else {
                        let address = value as *const Value;
                        by_role
                            .iter()
                            .find(|(known, _)| *known == address)
                            .map_or(Channel::User, |(_, channel)| *channel)
                    };
                    each_text(value, &mut |text| {
                        self.scan(text, channel, &mut findings);
                        for finding in &findings {
                            found.insert(finding.rule);
                            if self.rules[finding.rule].action == Action::Reject && first_reject.is_none() {
                                first_reject = Some(finding.rule);
                            }
                        }
                        per_text.push(
                            (!findings.is_empty()).then(|| (text.to_string(), std::mem::take(&mut findings), channel)),
                        );
                    })
                });
            }
        }
        let outcome = self.outcome(&found);
        self.record(ctx, &found, outcome);
        if let Some(rule) = first_reject {
            return Ok(Decision::Reject(self.reject_reply(rule)));
        }
        if outcome == Action::Mask {
            // The same paths visit the same texts in the same order.
            let mut per_text = per_text.into_iter();
            let doc = ctx.body().doc_mut().expect("parsed above");
            for (path, _) in paths {
                path.for_each_mut(doc, &mut |value| {
                    each_text_mut(value, &mut |text| {
                        let Some((scanned, mut findings, channel)) = per_text.next().flatten() else {
                            return;
                        };
                        // A text two paths select was already masked once: look at it afresh.
                        if *text != scanned {
                            self.scan(text, channel, &mut findings);
                        }
                        if findings.iter().any(|f| self.rules[f.rule].action == Action::Mask) {
                            *text = self.masked_fully(text, channel, &findings);
                        }
                    })
                });
            }
        }
        if ctx.direction() == Direction::Response {
            self.set_report_header(ctx);
        }
        Ok(Decision::Continue)
    }

    /// Adds the report header (rule names found in request and response) to the response.
    pub(crate) fn set_report_header(&self, ctx: &mut Context<'_>) {
        let Some(header) = self.options.report_header.clone() else {
            return;
        };
        let found = ctx.state::<GuardState>().found.clone();
        if found.is_empty() {
            ctx.remove_header(&header);
        } else {
            let names = self.names(&found);
            let _ = ctx.set_header(&header, &names);
        }
    }

    /// Appends `text` to a track and returns the text that may go out now (all of it with
    /// `flush`), masked; or the rule that rejects.
    fn advance(&self, ctx: &mut Context<'_>, key: &TrackKey, text: &str, flush: bool) -> Result<String, usize> {
        let hold_back = self.options.hold_back;
        let mut track = ctx.state::<GuardState>().tracks.remove(key).unwrap_or_default();
        track.pending.push_str(text);
        if !flush && track.pending.len() < 2 * hold_back {
            ctx.state::<GuardState>().tracks.insert(key.clone(), track);
            return Ok(String::new());
        }
        let base = track.context.len();
        let whole = format!("{}{}", track.context, track.pending);
        let mut findings = Vec::new();
        self.scan(&whole, Channel::User, &mut findings);
        findings.retain(|finding| finding.span.end > base);
        if let Some(finding) = findings.iter().find(|f| self.rules[f.rule].action == Action::Reject) {
            return Err(finding.rule);
        }
        // Release up to `cut` (in `whole`): never the last window, never part of a value
        // that reaches past the cut (it may still be growing).
        let mut cut = if flush {
            whole.len()
        } else {
            floor_boundary(&whole, whole.len() - hold_back)
        };
        loop {
            let reaching = findings
                .iter()
                .filter(|f| f.span.start < cut && f.span.end > cut)
                .map(|f| f.span.start.max(base))
                .min();
            match reaching {
                Some(start) if start < cut => cut = start,
                _ => break,
            }
        }
        cut = cut.max(base);
        let released: Vec<Finding> = findings
            .iter()
            .filter(|f| f.span.start < cut)
            .map(|f| Finding {
                span: f.span.start.max(base) - base..f.span.end.min(cut) - base,
                rule: f.rule,
            })
            .collect();
        let found: BTreeSet<usize> = released.iter().map(|f| f.rule).collect();
        let raw_released = &whole[base..cut];
        let out = self.masked(raw_released, &released);
        if !found.is_empty() {
            let outcome = self.outcome(&found);
            self.record(ctx, &found, outcome);
        }
        // Keep the last window of released text as context for the next scan.
        let context_from = floor_boundary(&whole, cut.saturating_sub(hold_back));
        track.context = whole[context_from..cut].to_string();
        track.pending = whole[cut..].to_string();
        if !(flush && track.pending.is_empty()) {
            ctx.state::<GuardState>().tracks.insert(key.clone(), track);
        }
        Ok(out)
    }

    /// Guards one event of a streamed response.
    pub(crate) fn on_event(&self, ctx: &mut Context<'_>, event: &mut SseEvent) -> Result<EventDecision, PluginError> {
        if !ctx.headers_sent() {
            // The first event: the headers are still ours to change (findings of the request).
            self.set_report_header(ctx);
        }
        if event.is_done_marker() {
            return self
                .flush_all(ctx)
                .map(|_| EventDecision::Continue)
                .or_else(|rule| self.stop(rule));
        }
        let Ok(value) = event.json() else {
            if event.data().is_some_and(|data| !data.trim().is_empty()) {
                ctx.increment(self.counters.unreadable);
            }
            return Ok(EventDecision::Continue);
        };
        let kind = value
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let result = if value.get("choices").is_some_and(Value::is_array) {
            self.openai_event(ctx, event)
        } else if kind == "content_block_delta" || kind == "content_block_stop" {
            self.anthropic_event(ctx, event, &kind)
        } else if kind.starts_with("response.") {
            self.responses_event(ctx, event, &kind)
        } else {
            Ok(())
        };
        match result {
            Ok(()) => Ok(EventDecision::Continue),
            Err(rule) => self.stop(rule),
        }
    }

    fn stop(&self, rule: usize) -> Result<EventDecision, PluginError> {
        Ok(EventDecision::Reject(self.reject_reply(rule)))
    }

    fn openai_event(&self, ctx: &mut Context<'_>, event: &mut SseEvent) -> Result<(), usize> {
        let value = event.json().expect("parsed by the caller");
        if ctx.state::<GuardState>().chunk_template.is_none() {
            let mut template = serde_json::Map::new();
            for key in ["id", "object", "created", "model", "system_fingerprint"] {
                if let Some(field) = value.get(key) {
                    template.insert(key.into(), field.clone());
                }
            }
            ctx.state::<GuardState>().chunk_template = Some(Value::Object(template));
        }
        // What each choice carries (position, index, chat or completions, text, finished),
        // taken out so the event can be edited afterwards.
        let choices: Vec<(usize, u64, bool, Option<String>, bool)> = value["choices"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(position, choice)| {
                let index = choice.get("index").and_then(Value::as_u64).unwrap_or(position as u64);
                let chat = choice.get("delta").is_some();
                let text = if chat {
                    choice.pointer("/delta/content").and_then(Value::as_str)
                } else {
                    choice.get("text").and_then(Value::as_str)
                };
                let finished = choice.get("finish_reason").is_some_and(|reason| !reason.is_null());
                (position, index, chat, text.map(str::to_string), finished)
            })
            .collect();
        let mut edits = Vec::new();
        for (position, index, chat, text, finished) in choices {
            if text.is_none() && !finished {
                continue;
            }
            ctx.state::<GuardState>().api = Some(if chat { Api::OpenAiChat } else { Api::OpenAiCompletions });
            let out = self.advance(
                ctx,
                &TrackKey::Choice(index),
                text.as_deref().unwrap_or_default(),
                finished,
            )?;
            if text.is_some() || !out.is_empty() {
                edits.push((position, chat, out));
            }
        }
        if !edits.is_empty() {
            let value = event.json_mut().expect("parsed by the caller");
            for (position, chat, out) in edits {
                let choice = &mut value["choices"][position];
                if chat {
                    if !choice["delta"].is_object() {
                        choice["delta"] = json!({});
                    }
                    choice["delta"]["content"] = Value::String(out);
                } else {
                    choice["text"] = Value::String(out);
                }
            }
        }
        Ok(())
    }

    fn anthropic_event(&self, ctx: &mut Context<'_>, event: &mut SseEvent, kind: &str) -> Result<(), usize> {
        let value = event.json().expect("parsed by the caller");
        let index = value.get("index").and_then(Value::as_u64).unwrap_or(0);
        ctx.state::<GuardState>().api = Some(Api::Anthropic);
        let key = TrackKey::Block(index);
        if kind == "content_block_stop" {
            if ctx.state::<GuardState>().tracks.contains_key(&key) {
                let out = self.advance(ctx, &key, "", true)?;
                if !out.is_empty() {
                    self.emit(ctx, &key, out);
                }
            }
            return Ok(());
        }
        let Some(text) = value.pointer("/delta/text").and_then(Value::as_str).map(str::to_string) else {
            return Ok(());
        };
        let out = self.advance(ctx, &key, &text, false)?;
        event.json_mut().expect("parsed by the caller")["delta"]["text"] = Value::String(out);
        Ok(())
    }

    fn responses_event(&self, ctx: &mut Context<'_>, event: &mut SseEvent, kind: &str) -> Result<(), usize> {
        let value = event.json().expect("parsed by the caller");
        let key = TrackKey::Output(
            value
                .get("item_id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            value.get("output_index").and_then(Value::as_u64).unwrap_or(0),
            value.get("content_index").and_then(Value::as_u64).unwrap_or(0),
        );
        let delta = value.get("delta").and_then(Value::as_str).map(str::to_string);
        ctx.state::<GuardState>().api = Some(Api::OpenAiResponses);
        match kind {
            "response.output_text.delta" => {
                let out = self.advance(ctx, &key, delta.as_deref().unwrap_or_default(), false)?;
                event.json_mut().expect("parsed by the caller")["delta"] = Value::String(out);
            }
            "response.output_text.done" => {
                if ctx.state::<GuardState>().tracks.contains_key(&key) {
                    let out = self.advance(ctx, &key, "", true)?;
                    if !out.is_empty() {
                        self.emit(ctx, &key, out);
                    }
                }
                self.mask_complete(event, &["/text"])?;
            }
            "response.content_part.done" => self.mask_complete(event, &["/part/text"])?,
            "response.output_item.done" => self.mask_complete(event, &["/item/content"])?,
            "response.completed" | "response.incomplete" => self.mask_complete(event, &["/response/output"])?,
            _ => {}
        }
        Ok(())
    }

    /// Masks the complete texts an event repeats (the responses API sends the whole text
    /// again when an item ends); a rejecting finding stops the stream.
    fn mask_complete(&self, event: &mut SseEvent, pointers: &[&str]) -> Result<(), usize> {
        let mut findings = Vec::new();
        let mut changed = false;
        let mut reject = None;
        let mut value = event.json().expect("parsed by the caller").clone();
        for pointer in pointers {
            let Some(target) = value.pointer_mut(pointer) else {
                continue;
            };
            let mut visit = |text: &mut String| {
                self.scan(text, Channel::User, &mut findings);
                if let Some(f) = findings.iter().find(|f| self.rules[f.rule].action == Action::Reject) {
                    reject.get_or_insert(f.rule);
                } else if findings.iter().any(|f| self.rules[f.rule].action == Action::Mask) {
                    *text = self.masked(text, &findings);
                    changed = true;
                }
            };
            match target {
                Value::Array(items) => {
                    for item in items {
                        if let Some(content) = item.get_mut("content") {
                            each_text_mut(content, &mut visit);
                        } else {
                            each_text_mut(item, &mut visit);
                        }
                    }
                }
                other => each_text_mut(other, &mut visit),
            }
        }
        if let Some(rule) = reject {
            return Err(rule);
        }
        if changed {
            *event.json_mut().expect("parsed by the caller") = value;
        }
        Ok(())
    }

    /// Emits an event carrying released text of a track, in the protocol of the stream.
    fn emit(&self, ctx: &mut Context<'_>, key: &TrackKey, text: String) {
        let state = ctx.state::<GuardState>();
        let event = match key {
            TrackKey::Choice(index) => {
                let mut chunk = state.chunk_template.clone().unwrap_or_else(|| json!({}));
                chunk["choices"] = if state.api == Some(Api::OpenAiCompletions) {
                    json!([{"index": index, "text": text, "finish_reason": null}])
                } else {
                    json!([{"index": index, "delta": {"content": text}, "finish_reason": null}])
                };
                SseEvent::new(None, &chunk.to_string())
            }
            TrackKey::Block(index) => SseEvent::new(
                Some("content_block_delta"),
                &json!({"type": "content_block_delta", "index": index,
                        "delta": {"type": "text_delta", "text": text}})
                .to_string(),
            ),
            TrackKey::Output(item, output, content) => SseEvent::new(
                Some("response.output_text.delta"),
                &json!({"type": "response.output_text.delta", "item_id": item, "output_index": output,
                        "content_index": content, "delta": text})
                .to_string(),
            ),
        };
        // Only fails outside a stream, and this is only called from stream callbacks.
        let _ = ctx.emit_event(event);
    }

    /// Releases every track (end of stream or `[DONE]`) in events of its own.
    fn flush_all(&self, ctx: &mut Context<'_>) -> Result<(), usize> {
        let keys: Vec<TrackKey> = ctx.state::<GuardState>().tracks.keys().cloned().collect();
        for key in keys {
            let out = self.advance(ctx, &key, "", true)?;
            if !out.is_empty() {
                self.emit(ctx, &key, out);
            }
        }
        Ok(())
    }

    /// End of a streamed response: whatever is still held goes out (or the stream is stopped).
    pub(crate) fn on_end(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        match self.flush_all(ctx) {
            Ok(()) => Ok(Decision::Continue),
            Err(rule) => Ok(Decision::Reject(self.reject_reply(rule))),
        }
    }
}

/// Declares the counters every guard has.
pub(crate) fn guard_counters(ctx: &mut BuildContext) -> GuardCounters {
    GuardCounters {
        rejected: ctx.counter("rejected"),
        masked: ctx.counter("masked"),
        reported: ctx.counter("reported"),
        unreadable: ctx.counter("unreadable"),
    }
}

impl<D: Detector> Plugin for Guard<D> {
    // Masking edits the body; findings are reported on the response only.
    fn request_edits(&self) -> RequestEdits {
        RequestEdits::BODY
    }

    fn request_need(&self) -> PhaseNeed {
        if self.options.direction.request() {
            PhaseNeed::Body
        } else {
            PhaseNeed::Skip
        }
    }

    fn response_need(&self) -> PhaseNeed {
        if self.options.direction.response() {
            PhaseNeed::Body
        } else if self.options.report_header.is_some() {
            PhaseNeed::Headers
        } else {
            PhaseNeed::Skip
        }
    }

    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        self.inspect_body(ctx)
    }

    fn on_response(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        if self.options.direction.response() {
            self.inspect_body(ctx)
        } else {
            self.set_report_header(ctx);
            Ok(Decision::Continue)
        }
    }

    fn stream_need(&self) -> Option<StreamNeed> {
        self.options
            .direction
            .response()
            .then_some(StreamNeed { hold_back_bytes: 0 })
    }

    fn on_response_event(&self, ctx: &mut Context<'_>, event: &mut SseEvent) -> Result<EventDecision, PluginError> {
        self.on_event(ctx, event)
    }

    fn on_stream_end(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        self.on_end(ctx)
    }
}

/// The dynamic metadata namespace both guards write to by default.
pub(crate) fn default_namespace() -> String {
    "envoy.payload_processor.guard".into()
}

/// Bytes of a stream's text held back by default.
pub(crate) fn default_hold_back() -> usize {
    256
}
