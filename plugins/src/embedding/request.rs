//! What a request's prompt is, and its embedding computed once per request: every processor
//! that embeds the same text with the same model gets the vector the first one made.

use super::{normalize, StaticModel};
use payload_processor_core::Context;
use serde_json::Value;
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::Arc;

payload_processor_core::config_enum! {
    /// What text is embedded.
    #[derive(Default)]
    pub enum TextSource {
        #[default]
        /// The last user message (chat `messages`, Anthropic `messages`, responses `input`,
        /// completions `prompt`).
        LastUserMessage = "LastUserMessage",
        /// Every user and system text of the conversation, joined.
        Conversation = "Conversation",
    }
}

/// The text of a message's `content`: a string, or the text parts of a list.
pub fn content_text(content: &Value) -> Option<String> {
    match content {
        Value::String(text) => Some(text.clone()),
        Value::Array(parts) => {
            let texts: Vec<&str> = parts
                .iter()
                .filter_map(|part| part.get("text").and_then(Value::as_str).or_else(|| part.as_str()))
                .collect();
            (!texts.is_empty()).then(|| texts.join("\n"))
        }
        _ => None,
    }
}

/// The conversation of a request of the known API shapes: chat or Anthropic `messages`, or the
/// responses API's `input` list.
pub fn messages(doc: &Value) -> Option<&Vec<Value>> {
    doc.get("messages")
        .or_else(|| doc.get("input").filter(|input| input.is_array()))
        .and_then(Value::as_array)
}

/// A message's role (`user` when it has none, as the responses API's plain inputs).
pub fn role(message: &Value) -> &str {
    message.get("role").and_then(Value::as_str).unwrap_or("user")
}

/// The text to embed from a request document of the known API shapes.
pub fn request_text(doc: &Value, source: TextSource) -> Option<String> {
    if let Some(messages) = messages(doc) {
        return match source {
            TextSource::LastUserMessage => messages
                .iter()
                .rev()
                .find(|m| role(m) == "user")
                .and_then(|m| m.get("content").and_then(content_text)),
            TextSource::Conversation => {
                let mut texts: Vec<String> = doc.get("system").and_then(content_text).into_iter().collect();
                texts.extend(
                    messages
                        .iter()
                        .filter(|m| matches!(role(m), "user" | "system" | "developer"))
                        .filter_map(|m| m.get("content").and_then(content_text)),
                );
                (!texts.is_empty()).then(|| texts.join("\n"))
            }
        };
    }
    doc.get("input")
        .or_else(|| doc.get("prompt"))
        .and_then(|v| content_text(v).or_else(|| v.as_array()?.first().and_then(content_text)))
}

/// A text's unit-length embedding, kept with the text it was made from.
struct RequestEmbedding {
    model: usize,
    text: String,
    vector: Rc<[f32]>,
}

/// The unit-length embedding of `text` under `model`, computed at most once per request: a
/// processor earlier in the chain that embedded the same text with the same model (loaded once
/// per process, so the same table) already paid for it.
pub fn request_embedding(ctx: &mut Context<'_>, model: &Arc<StaticModel>, text: &str) -> Rc<[f32]> {
    let model_id = Arc::as_ptr(model) as usize;
    let mut hasher = rustc_hash::FxHasher::default();
    (model_id, text).hash(&mut hasher);
    let key = hasher.finish();
    if let Some(kept) = ctx.derived::<RequestEmbedding>(key) {
        if kept.model == model_id && kept.text == text {
            return Rc::clone(&kept.vector);
        }
    }
    let mut vector = model.embed(text);
    normalize(&mut vector);
    #[cfg(test)]
    tests::EMBEDDED.with(|count| count.set(count.get() + 1));
    let vector: Rc<[f32]> = vector.into();
    ctx.keep_derived(
        key,
        Rc::new(RequestEmbedding {
            model: model_id,
            text: text.to_string(),
            vector: Rc::clone(&vector),
        }),
    );
    vector
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::Cell;

    thread_local! {
        /// Embeddings computed on this thread (tests run each on its own thread).
        pub(crate) static EMBEDDED: Cell<usize> = const { Cell::new(0) };
    }

    pub(crate) fn embedded() -> usize {
        EMBEDDED.with(Cell::get)
    }
}
