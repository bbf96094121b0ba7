//! Runs a chain with a `semantic-router` over many prompts through the engine, for the quality
//! benchmark (`bench/semantic_eval.py`): each prompt goes as an OpenAI chat request asking for
//! `auto`, and the route header and score the router wrote come out.
//!
//! `cargo run --release -p payload-processor-plugins --example semantic_route -- CHAIN.yaml < prompts.jsonl`
//! prints one `{"route": ..., "score": ...}` per input line.

use payload_processor_core::testing::{run_request_phase, FakeHost};
use payload_processor_core::{Chain, Direction, Stream};
use std::io::{BufRead, Write};
use std::sync::Arc;

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: semantic_route CHAIN.yaml < prompts.jsonl");
    payload_processor_core::set_file_reader(|path| std::fs::read(path).map_err(|err| format!("{path}: {err}")));
    let text = std::fs::read_to_string(&path).expect("the chain file");
    let chain = Arc::new(
        Chain::load(&text, &payload_processor_plugins::builtin_registry()).unwrap_or_else(|err| panic!("{err}")),
    );
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for line in std::io::stdin().lock().lines() {
        let prompt: String = serde_json::from_str(&line.expect("stdin")).expect("one JSON string per line");
        let body = serde_json::json!({"model": "auto", "messages": [{"role": "user", "content": prompt}]});
        let mut host = FakeHost::request("/v1/chat/completions", &[], &serde_json::to_vec(&body).unwrap());
        let mut stream = Stream::new(chain.clone());
        run_request_phase(&mut stream, &mut host);
        let route = host.header_values(Direction::Request, "x-semantic-route").pop();
        let score = host
            .metadata
            .iter()
            .find(|((_, key), _)| key == "score")
            .and_then(|(_, v)| v.parse::<f64>().ok());
        writeln!(out, "{}", serde_json::json!({"route": route, "score": score})).expect("stdout");
    }
}
