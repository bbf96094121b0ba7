//! `word-guard`: blocks a response whose assistant text contains `word`, buffered or streamed.
//! A small third-party streaming plugin: it keeps the tail of the text seen so far in its
//! per-stream state, so a word split over several events is still found, and asks the engine
//! for a hold-back window (`holdBackBytes`) so the events holding the start of the word can
//! still be kept from the client.

use payload_processor_core::{
    BuildContext, ConfigError, Context, Decision, EventDecision, LocalReply, PhaseNeed, Plugin, PluginError, SseEvent,
    StreamNeed,
};
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

pub const TYPE_NAME: &str = "word-guard";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    word: String,
    #[serde(default)]
    hold_back_bytes: usize,
    #[serde(default = "default_status")]
    status: u16,
}

fn default_status() -> u16 {
    403
}

struct WordGuard {
    word: String,
    hold_back: usize,
    status: u16,
}

pub fn build(parameters: &Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
    let config: Config = ctx.parameters(parameters)?;
    if config.word.is_empty() {
        return Err(ConfigError::new("word", "must not be empty"));
    }
    if !(400..=599).contains(&config.status) {
        return Err(ConfigError::new("status", "must be a 4xx or 5xx status"));
    }
    Ok(Arc::new(WordGuard {
        word: config.word,
        hold_back: config.hold_back_bytes,
        status: config.status,
    }))
}

/// The generated text an event carries, for the OpenAI and Anthropic stream shapes.
fn event_text(event: &mut SseEvent) -> Option<String> {
    let data = event.json().ok()?;
    let text = data["choices"][0]["delta"]["content"]
        .as_str()
        .or_else(|| data["choices"][0]["text"].as_str())
        .or_else(|| data["delta"]["text"].as_str())
        .or_else(|| data["delta"].as_str())?;
    Some(text.to_string())
}

impl WordGuard {
    fn blocked(&self) -> LocalReply {
        LocalReply::json_error(self.status, "word_blocked", "the response contained a blocked word")
    }
}

impl Plugin for WordGuard {
    fn response_need(&self) -> PhaseNeed {
        PhaseNeed::Body
    }

    fn stream_need(&self) -> Option<StreamNeed> {
        Some(StreamNeed {
            hold_back_bytes: self.hold_back,
        })
    }

    fn on_response(&self, ctx: &mut Context<'_>) -> Result<Decision, PluginError> {
        let word = self.word.as_bytes();
        let found = ctx.body().raw().windows(word.len()).any(|window| window == word);
        Ok(if found {
            Decision::Reject(self.blocked())
        } else {
            Decision::Continue
        })
    }

    fn on_response_event(&self, ctx: &mut Context<'_>, event: &mut SseEvent) -> Result<EventDecision, PluginError> {
        let Some(text) = event_text(event) else {
            return Ok(EventDecision::Continue);
        };
        let tail = ctx.state::<String>();
        tail.push_str(&text);
        if tail.contains(&self.word) {
            return Ok(EventDecision::Reject(self.blocked()));
        }
        // Keep just enough text to find a word that continues in the next event.
        let keep = self.word.len().saturating_sub(1);
        if tail.len() > keep {
            let mut cut = tail.len() - keep;
            while !tail.is_char_boundary(cut) {
                cut += 1;
            }
            tail.drain(..cut);
        }
        Ok(EventDecision::Continue)
    }
}
