//! `response-cache`: answers a repeated question from memory, without the upstream. `Exact`
//! mode keys on a hash of everything in the request that changes an answer; `Semantic` mode also
//! serves a paraphrase: the same model, system prompt, earlier turns, parameters and partition,
//! a last user message within `similarityThreshold` (cosine of static embeddings), and the same
//! numbers, negations and names in the same order (the words those embeddings are blind to).
//!
//! - [`key`]: request digests and guard words.
//! - [`store`]: LRU + TTL memory, semantic buckets and their scan.
//!
//! The users' reference: `docs/plugins/response-cache.md`.

pub mod key;
pub mod store;
#[cfg(test)]
mod tests;

use crate::common::validate_header_name;
use crate::embedding::request::{content_text, messages, role};
use crate::embedding::{request_embedding, EmbeddingConfig, ModelSource, StaticModel};
use key::{default_negations, extend, guard_words, request_digest, Digest32, GuardWords};
use payload_processor_core::{
    Background, BuildContext, ConfigError, Context, Counter, Decision, EventDecision, Gauge, LocalReply, PhaseNeed,
    Plugin, PluginError, RequestEdits, SseEvent, StreamNeed,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{Answer, Churn, Query, Store};

/// Registry key.
pub const TYPE_NAME: &str = "response-cache";

/// Parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(rename = "ResponseCacheParameters")]
pub struct Config {
    /// `Exact` (default) or `Semantic` (needs `embedding`).
    #[serde(default)]
    pub mode: CacheMode,
    /// Cosine similarity of the last user messages a semantic hit needs (default 0.95).
    #[serde(default = "default_threshold")]
    pub similarity_threshold: f32,
    /// How long an answer is served (default 5m).
    #[serde(default, deserialize_with = "payload_processor_core::config::deserialize_duration")]
    #[schemars(with = "Option<String>")]
    pub ttl: Option<Duration>,
    /// Answers kept at most (default 10000).
    #[serde(default = "default_max_entries")]
    pub max_entries: usize,
    /// Bytes kept at most: answers, keys and vectors (default 64 MiB).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Response header saying `hit` or `miss` (default `x-cache`).
    #[serde(default = "default_cache_header")]
    pub cache_header: String,
    /// Request headers whose values must match for a hit (a tenant, an API key's hash).
    #[serde(default)]
    pub partition_by: Vec<String>,
    /// The static embedding model (semantic mode).
    pub embedding: Option<EmbeddingConfig>,
    /// Words that must agree, in order, for a semantic hit.
    #[serde(default)]
    pub guard_words: GuardWordsConfig,
    /// Also keep answers an earlier processor (a guard) masked (default false).
    #[serde(default)]
    pub store_redacted: bool,
}

/// Which words must agree for a semantic hit.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GuardWordsConfig {
    /// Words with a digit (default true).
    #[serde(default = "yes")]
    pub numbers: bool,
    /// Capitalised words not opening a sentence: names (default true).
    #[serde(default = "yes")]
    pub capitalized: bool,
    /// Negation words (default: an English list); any word ending in "n't" counts too, unless
    /// the list is empty (`[]` turns negations off).
    pub negations: Option<Vec<String>>,
}

impl Default for GuardWordsConfig {
    fn default() -> Self {
        Self {
            numbers: true,
            capitalized: true,
            negations: None,
        }
    }
}

payload_processor_core::config_enum! {
    /// How requests are matched.
    #[derive(Default)]
    pub enum CacheMode {
        #[default]
        /// The same request, byte for byte up to key order and caller fields.
        Exact = "Exact",
        /// The same request up to a paraphrase of the last user message.
        Semantic = "Semantic",
    }
}

fn yes() -> bool {
    true
}
fn default_threshold() -> f32 {
    0.95
}
fn default_max_entries() -> usize {
    10_000
}
fn default_max_bytes() -> u64 {
    64 << 20
}
fn default_cache_header() -> String {
    "x-cache".into()
}

/// The limits every store of this processor gets.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_entries: usize,
    max_bytes: usize,
    ttl_nanos: u64,
}

/// A semantic cache's model and store (made once the model is there).
struct Semantic {
    model: Arc<StaticModel>,
    store: Mutex<Store>,
}

enum Backing {
    Exact(Mutex<Store>),
    Semantic(Box<ModelSource<Semantic>>),
}

/// The plugin.
pub struct ResponseCache {
    backing: Backing,
    threshold: f32,
    cache_header: String,
    partition_by: Vec<String>,
    guard: GuardWords,
    store_redacted: bool,
    counters: Counters,
    limits: Limits,
}

#[derive(Debug, Clone, Copy)]
struct Counters {
    hits: Counter,
    misses: Counter,
    stores: Counter,
    evictions: Counter,
    expired: Counter,
    bypassed: Counter,
    not_stored: Counter,
    bytes: Gauge,
    entries: Gauge,
}

/// Factory.
pub fn build(parameters: &Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    let config: Config = ctx.parameters(parameters)?;
    validate_header_name(&config.cache_header, "cacheHeader")?;
    for (i, header) in config.partition_by.iter().enumerate() {
        validate_header_name(header, &format!("partitionBy[{i}]"))?;
    }
    if !(0.0..=1.0).contains(&config.similarity_threshold) {
        return Err(ConfigError::new(
            "similarityThreshold",
            "a cosine similarity between 0 and 1",
        ));
    }
    if config.max_entries == 0 {
        return Err(ConfigError::new("maxEntries", "must be at least 1"));
    }
    if config.max_bytes < 1024 {
        return Err(ConfigError::new("maxBytes", "must be at least 1024"));
    }
    let limits = Limits {
        max_entries: config.max_entries,
        max_bytes: usize::try_from(config.max_bytes).unwrap_or(usize::MAX),
        ttl_nanos: u64::try_from(config.ttl.unwrap_or(Duration::from_secs(300)).as_nanos()).unwrap_or(u64::MAX),
    };
    let backing = match (config.mode, &config.embedding) {
        (CacheMode::Exact, None) => Backing::Exact(Mutex::new(Store::new(
            limits.max_entries,
            limits.max_bytes,
            limits.ttl_nanos,
            Vec::new(),
        ))),
        (CacheMode::Exact, Some(_)) => {
            return Err(ConfigError::new("embedding", "only used with mode: Semantic"));
        }
        (CacheMode::Semantic, None) => {
            return Err(ConfigError::new("embedding", "mode: Semantic needs an embedding model"));
        }
        (CacheMode::Semantic, Some(embedding)) => Backing::Semantic(Box::new(ModelSource::build(
            embedding,
            ctx,
            Box::new(move |model: Arc<StaticModel>| {
                let store = Store::new(limits.max_entries, limits.max_bytes, limits.ttl_nanos, model.mean_row());
                Ok(Semantic {
                    model,
                    store: Mutex::new(store),
                })
            }),
        )?)),
    };
    let counters = Counters {
        hits: ctx.counter("hits"),
        misses: ctx.counter("misses"),
        stores: ctx.counter("stores"),
        evictions: ctx.counter("evictions"),
        expired: ctx.counter("expired"),
        bypassed: ctx.counter("bypassed"),
        not_stored: ctx.counter("not_stored"),
        bytes: ctx.gauge("bytes"),
        entries: ctx.gauge("entries"),
    };
    Ok(Arc::new(ResponseCache {
        backing,
        threshold: config.similarity_threshold,
        cache_header: config.cache_header.to_ascii_lowercase(),
        partition_by: config.partition_by.iter().map(|h| h.to_ascii_lowercase()).collect(),
        guard: GuardWords {
            numbers: config.guard_words.numbers,
            capitalized: config.guard_words.capitalized,
            negations: config
                .guard_words
                .negations
                .map(|words| words.iter().map(|w| w.to_lowercase()).collect())
                .unwrap_or_else(default_negations),
        },
        store_redacted: config.store_redacted,
        counters,
        limits,
    }))
}

/// A miss that may be stored when its answer comes.
#[derive(Clone)]
struct Pending {
    key: Digest32,
    /// Semantic entries: the bucket and the prompt's vector.
    semantic: Option<(Digest32, Rc<[f32]>)>,
    /// The client asked for an event stream.
    streamed: bool,
}

/// Per-stream state.
#[derive(Default)]
struct CacheState {
    pending: Option<Pending>,
    /// The events recorded so far (streamed answers).
    recording: Vec<u8>,
    /// The response was checked (status, cache-control, type) and may be stored.
    storable: Option<bool>,
    /// Bytes of the recording already kept at the stream's terminal event.
    stored_len: Option<usize>,
}

/// `cache-control` directives of a header value, lower case.
fn directives(value: Option<String>) -> Vec<String> {
    value
        .unwrap_or_default()
        .split(',')
        .map(|d| d.split('=').next().unwrap_or_default().trim().to_ascii_lowercase())
        .filter(|d| !d.is_empty())
        .collect()
}

/// How a request is looked up: the entry key, and for semantic entries the bucket, the text
/// whose embedding is compared.
struct Lookup {
    key: Digest32,
    semantic: Option<(Digest32, String)>,
}

impl ResponseCache {
    fn lookup_keys(&self, path: &str, partition: &[Option<String>], doc: &Value) -> Lookup {
        if let Backing::Semantic(_) = self.backing {
            // The last user message: compared by meaning, everything else exactly.
            let last_user = match messages(doc) {
                Some(messages) => messages
                    .iter()
                    .rev()
                    .find(|m| role(m) == "user")
                    .and_then(|m| m.get("content")),
                None => doc.get("prompt").or_else(|| doc.get("input")),
            };
            if let Some((value, text)) = last_user.and_then(|v| content_text(v).map(|t| (v, t))) {
                if !text.trim().is_empty() {
                    let words = guard_words(&text, &self.guard);
                    let bucket = extend(&request_digest(path, partition, doc, Some(value)), &[&words]);
                    let key = extend(&bucket, &[&text]);
                    return Lookup {
                        key,
                        semantic: Some((bucket, text)),
                    };
                }
            }
        }
        Lookup {
            key: request_digest(path, partition, doc, None),
            semantic: None,
        }
    }

    fn report(&self, ctx: &mut Context<'_>, store: &Store, churn: Churn) {
        for _ in 0..churn.evicted {
            ctx.increment(self.counters.evictions);
        }
        for _ in 0..churn.expired {
            ctx.increment(self.counters.expired);
        }
        ctx.set_gauge(self.counters.bytes, store.bytes() as u64);
        ctx.set_gauge(self.counters.entries, store.entries() as u64);
    }

    /// The store and (semantic) model, or None while the model is not there yet.
    fn parts(&self) -> Option<(&Mutex<Store>, Option<&Arc<StaticModel>>)> {
        match &self.backing {
            Backing::Exact(store) => Some((store, None)),
            Backing::Semantic(source) => source.get().map(|s| (&s.store, Some(&s.model))),
        }
    }

    fn hit_reply(&self, answer: &Answer, now: u64) -> LocalReply {
        let age = now.saturating_sub(answer.stored_nanos) / 1_000_000_000;
        LocalReply {
            status: 200,
            headers: vec![
                ("content-type".into(), answer.content_type.clone()),
                (self.cache_header.clone(), "hit".into()),
                ("age".into(), age.to_string()),
            ],
            body: answer.body.to_vec(),
        }
    }

    /// Whether the answer may be kept: a 200 of the kind asked for (JSON, or an event stream
    /// for a streaming request), not marked `private` or `no-store` by the upstream. Also says
    /// `miss` in the cache header while the headers can still change.
    fn check_response(&self, ctx: &mut Context<'_>, streamed: bool) -> bool {
        if !ctx.headers_sent() {
            let _ = ctx.set_header(&self.cache_header, "miss");
        }
        let status = ctx.header(":status").unwrap_or_default();
        let media = ctx
            .header("content-type")
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        let kind_matches = if streamed {
            media == "text/event-stream"
        } else {
            media == "application/json" || media.ends_with("+json")
        };
        // An upstream's `no-cache` is not a refusal here: model servers put it on every event
        // stream so that proxies do not buffer it, and it allows storing.
        let control = directives(ctx.header("cache-control"));
        let forbidden = control.iter().any(|d| matches!(d.as_str(), "no-store" | "private"));
        status.trim() == "200" && kind_matches && !forbidden
    }

    fn store_answer(&self, ctx: &mut Context<'_>, pending: &Pending, body: Vec<u8>, content_type: String) {
        if ctx.response_redacted() && !self.store_redacted {
            ctx.increment(self.counters.not_stored);
            return;
        }
        let Some((store, _)) = self.parts() else { return };
        let now = ctx.now_nanos();
        let answer = Answer {
            body: body.into(),
            content_type,
            streamed: pending.streamed,
            stored_nanos: now,
        };
        let mut churn = Churn::default();
        let mut store = store.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let semantic = pending.semantic.as_ref().map(|(bucket, vector)| (bucket, &vector[..]));
        if store.insert(pending.key, answer, semantic, now, &mut churn) {
            ctx.increment(self.counters.stores);
        } else {
            ctx.increment(self.counters.not_stored);
        }
        self.report(ctx, &store, churn);
    }
}

impl Plugin for ResponseCache {
    fn request_need(&self) -> PhaseNeed {
        PhaseNeed::Body
    }

    fn response_need(&self) -> PhaseNeed {
        PhaseNeed::Body
    }

    fn request_edits(&self) -> RequestEdits {
        RequestEdits::NONE
    }

    fn stream_need(&self) -> Option<StreamNeed> {
        Some(StreamNeed::default())
    }

    fn background(&self) -> Option<&dyn Background> {
        match &self.backing {
            Backing::Semantic(source) => source.background(),
            Backing::Exact(_) => None,
        }
    }

    fn on_request(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        let control = directives(ctx.request_header("cache-control"));
        if control.iter().any(|d| d == "no-store") || ctx.body().is_blank() {
            ctx.increment(self.counters.bypassed);
            return Ok(Decision::Continue);
        }
        let Some((store, model)) = self.parts() else {
            // The model is still loading: a cache only saves work, so the request goes on.
            ctx.increment(self.counters.bypassed);
            return Ok(Decision::Continue);
        };
        let path = ctx.request_header(":path").unwrap_or_default();
        let path = path.split('?').next().unwrap_or_default().to_string();
        let partition: Vec<Option<String>> = self.partition_by.iter().map(|h| ctx.request_header(h)).collect();
        let Ok(doc) = ctx.body().doc() else {
            ctx.increment(self.counters.bypassed);
            return Ok(Decision::Continue);
        };
        let streamed = doc.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let lookup = self.lookup_keys(&path, &partition, doc);
        let semantic = match (&lookup.semantic, model) {
            (Some((bucket, text)), Some(model)) => Some((*bucket, request_embedding(ctx, model, text))),
            _ => None,
        };
        if !control.iter().any(|d| d == "no-cache") {
            let now = ctx.now_nanos();
            let mut churn = Churn::default();
            let mut store = store.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut key = Some(lookup.key).filter(|key| store.get(key, now, &mut churn).is_some());
            if key.is_none() {
                if let Some((bucket, vector)) = &semantic {
                    let code = store.code(vector);
                    let query = Query {
                        bucket,
                        vector,
                        code: &code,
                        threshold: self.threshold,
                    };
                    key = store.nearest(&query, now, &mut churn).map(|(key, _)| key);
                }
            }
            let reply = key.and_then(|key| store.get(&key, now, &mut churn).map(|a| self.hit_reply(a, now)));
            self.report(ctx, &store, churn);
            drop(store);
            if let Some(reply) = reply {
                ctx.increment(self.counters.hits);
                return Ok(Decision::Respond(reply));
            }
        }
        ctx.increment(self.counters.misses);
        ctx.state::<CacheState>().pending = Some(Pending {
            key: lookup.key,
            semantic,
            streamed,
        });
        Ok(Decision::Continue)
    }

    fn on_response(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        let Some(pending) = ctx.state::<CacheState>().pending.take() else {
            return Ok(Decision::Continue);
        };
        if pending.streamed || !self.check_response(ctx, false) {
            ctx.increment(self.counters.not_stored);
            return Ok(Decision::Continue);
        }
        let body = ctx.body().current().into_owned();
        let content_type = ctx.header("content-type").unwrap_or_else(|| "application/json".into());
        self.store_answer(ctx, &pending, body, content_type);
        Ok(Decision::Continue)
    }

    fn on_response_event(&self, ctx: &mut Context<'_>, event: &mut SseEvent) -> Result<EventDecision, PluginError> {
        if ctx.state::<CacheState>().pending.is_none() {
            return Ok(EventDecision::Continue);
        }
        let storable = match ctx.state::<CacheState>().storable {
            Some(storable) => storable,
            None => {
                let streamed = ctx.state::<CacheState>().pending.as_ref().is_some_and(|p| p.streamed);
                let storable = streamed && self.check_response(ctx, true);
                ctx.state::<CacheState>().storable = Some(storable);
                storable
            }
        };
        let limit = self.limits.max_bytes;
        let state = ctx.state::<CacheState>();
        if !storable || state.recording.len() > limit {
            // Too big to keep: stop recording.
            state.recording = Vec::new();
            state.storable = Some(false);
            return Ok(EventDecision::Continue);
        }
        state.recording.extend_from_slice(&event.to_bytes());
        // Clients often close the connection right after the protocol's last event, before the
        // stream's end reaches the filter: the answer is complete here, keep it now.
        if event.is_terminal() && state.stored_len.is_none() {
            state.stored_len = Some(state.recording.len());
            let recording = state.recording.clone();
            if let Some(pending) = state.pending.clone() {
                self.store_answer(ctx, &pending, recording, "text/event-stream".into());
            }
        }
        Ok(EventDecision::Continue)
    }

    fn on_stream_end(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        let state = ctx.state::<CacheState>();
        let Some(pending) = state.pending.take() else {
            return Ok(Decision::Continue);
        };
        let recording = std::mem::take(&mut state.recording);
        let stored_len = state.stored_len;
        if state.storable != Some(true) || recording.is_empty() {
            ctx.increment(self.counters.not_stored);
            return Ok(Decision::Continue);
        }
        if stored_len == Some(recording.len()) && (self.store_redacted || !ctx.response_redacted()) {
            return Ok(Decision::Continue); // kept at the terminal event, nothing came after
        }
        if stored_len.is_some() && ctx.response_redacted() && !self.store_redacted {
            // A guard masked what came after the terminal event: the kept answer goes.
            if let Some((store, _)) = self.parts() {
                store
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .remove(&pending.key);
            }
        }
        // Events after the terminal one (a guard's held-back text): keep the whole stream.
        self.store_answer(ctx, &pending, recording, "text/event-stream".into());
        Ok(Decision::Continue)
    }
}
