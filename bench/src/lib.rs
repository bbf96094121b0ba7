//! Shared pieces of the micro-benchmarks: request bodies of a given size in the shapes clients
//! send, and one request run through a chain on the fake host.

use payload_processor_core::testing::{run_request_phase, FakeHost};
use payload_processor_core::{Chain, Stream};
use serde_json::{json, Value};
use std::sync::Arc;

/// Body sizes the benchmarks use, with a label.
pub const SIZES: [(&str, usize); 3] = [("1KiB", 1024), ("16KiB", 16 * 1024), ("256KiB", 256 * 1024)];

/// Filler prose for prompts: words and punctuation, as a user would type.
fn prose(len: usize) -> String {
    const TEXT: &str = "Please summarise the quarterly report, list the three largest risks and \
                        suggest next steps for the team. ";
    TEXT.chars().cycle().take(len).collect()
}

/// An OpenAI chat request of about `size` bytes: a system prompt and user turns, `model` first
/// or last (the official openai client sends it after `messages`).
pub fn chat_body(size: usize, model_last: bool) -> Vec<u8> {
    let turns = (size / 2048).max(1);
    let overhead = 160 + turns * 40;
    let per_turn = size.saturating_sub(overhead) / turns;
    let mut messages = vec![json!({"role": "system", "content": "You are a helpful assistant."})];
    messages.extend((0..turns).map(|_| json!({"role": "user", "content": prose(per_turn)})));
    let body = if model_last {
        json!({"messages": messages, "max_tokens": 512, "temperature": 0.2, "stream": false, "model": "llama-3-8b"})
    } else {
        json!({"model": "llama-3-8b", "messages": messages, "max_tokens": 512, "temperature": 0.2, "stream": false})
    };
    serde_json::to_vec(&body).expect("serializes")
}

/// An audio transcription request of about `size` bytes whose `file` is a base64 data URL.
pub fn transcription_body(size: usize) -> Vec<u8> {
    use std::fmt::Write;
    let mut file = String::from("data:audio/wav;base64,");
    // Valid base64 of arbitrary bytes: groups of four alphabet characters.
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let groups = size.saturating_sub(120) / 4;
    for i in 0..groups {
        let _ = write!(
            file,
            "{}{}{}{}",
            alphabet[i % 64] as char,
            alphabet[(i * 7) % 64] as char,
            alphabet[(i * 13) % 64] as char,
            alphabet[(i * 29) % 64] as char
        );
    }
    serde_json::to_vec(&json!({"model": "whisper-1", "file": file, "language": "en", "temperature": 0}))
        .expect("serializes")
}

/// An MCP `tools/call` of about `size` bytes (the size is in the arguments).
pub fn mcp_call_body(size: usize) -> Vec<u8> {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": "search", "arguments": {"query": prose(size.saturating_sub(100))}}});
    serde_json::to_vec(&body).expect("serializes")
}

/// A loaded chain with one request to run through it again and again.
pub struct Case {
    chain: Arc<Chain>,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Case {
    /// Loads `chain_yaml` with the built-in plugins; panics on bad config (a benchmark bug).
    pub fn new(chain_yaml: &str, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Self {
        let chain = Chain::load(chain_yaml, &payload_processor_plugins::builtin_registry())
            .unwrap_or_else(|err| panic!("benchmark chain does not load: {err}"));
        Self {
            chain: Arc::new(chain),
            path: path.into(),
            headers: headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
            body,
        }
    }

    /// The request body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// A fresh host holding the request (setup, not measured).
    pub fn host(&self) -> FakeHost {
        let headers: Vec<(&str, &str)> = self.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        FakeHost::request(&self.path, &headers, &self.body)
    }

    /// The request phase on `host`, as the filter runs it: headers, then the whole body.
    pub fn run(&self, host: &mut FakeHost) {
        run_request_phase(&mut Stream::new(self.chain.clone()), host);
    }

    /// Runs once and checks the request went on (no local reply), so a benchmark never
    /// measures an error path by mistake.
    pub fn check(&self) -> FakeHost {
        let mut host = self.host();
        self.run(&mut host);
        if let Some(reply) = &host.reply {
            panic!(
                "benchmark request was refused: {} {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            );
        }
        host
    }
}

/// The JSON value at the body's `model`, parsed fully: the floor for any plugin that needs the
/// whole document.
pub fn full_parse_model(body: &[u8]) -> Option<String> {
    let doc: Value = serde_json::from_slice(body).ok()?;
    doc.get("model")?.as_str().map(str::to_owned)
}

/// Prompt text of `len` bytes for the guard benchmarks: ordinary prose with numbers, dates and
/// versions (the near misses recognizers must look at), and with `pii` one e-mail address,
/// phone number and card number in every 4 KiB.
pub fn guard_prompt_text(len: usize, pii: bool) -> String {
    const CLEAN: &str = "In Q3 2024 revenue grew 12.5% to 4,210,000 USD; release v2.14.3 shipped on \
                         2024-09-30 at 10:22 and order 58213377 is still open. Please summarise the \
                         quarterly report, list the three largest risks and suggest next steps. ";
    const PII: &str = "Contact jane.doe@example.com or (415) 555-0100, card 4111 1111 1111 1111. ";
    let mut text = String::with_capacity(len + 256);
    while text.len() < len {
        if pii && text.len() % 4096 < CLEAN.len() && !text.is_empty() {
            text.push_str(PII);
        }
        text.push_str(CLEAN);
    }
    text.truncate(len);
    text
}

/// An OpenAI chat request whose user turn is [`guard_prompt_text`] of about `size` bytes.
pub fn guard_chat_body(size: usize, pii: bool) -> Vec<u8> {
    let body = json!({"model": "llama-3-8b", "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": guard_prompt_text(size.saturating_sub(150), pii)}]});
    serde_json::to_vec(&body).expect("serializes")
}

/// The `prompt-guard` parameters of the speed target: 100 keywords, 20 regexes and the
/// `prompt-injection` set.
pub fn prompt_guard_target_parameters() -> String {
    let keywords: Vec<String> = (0..100).map(|i| format!("'forbidden phrase {i}'")).collect();
    let regexes: Vec<String> = (0..20)
        .map(|i| format!("{{name: r{i}, regex: '\\bproject[-_ ]?{i}[a-z]{{2}}[0-9]{{4}}\\b', caseInsensitive: true}}"))
        .collect();
    format!(
        "{{builtin: [prompt-injection], deny: [{{name: phrases, keywords: [{}], caseInsensitive: true}}, {}]}}",
        keywords.join(", "),
        regexes.join(", ")
    )
}
