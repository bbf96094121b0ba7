//! Embeds texts with a static embedding model, for the parity check against the reference
//! library (`tests/e2e/test_embedding.py`) and for trying a model by hand.
//!
//! `cargo run --release -p payload-processor-plugins --example embed -- WEIGHTS TOKENIZER < texts.jsonl`
//! reads one JSON string per line and prints one JSON object per line: `{"ids": [...], "vector": [...]}`.

use payload_processor_plugins::embedding::StaticModel;
use std::io::{BufRead, Write};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, weights, tokenizer] = args.as_slice() else {
        eprintln!("usage: embed WEIGHTS.safetensors TOKENIZER.json < texts.jsonl");
        std::process::exit(2);
    };
    let read = |path: &str| std::fs::read(path).unwrap_or_else(|err| panic!("{path}: {err}"));
    let model = StaticModel::load(&read(weights), &read(tokenizer)).unwrap_or_else(|err| panic!("{err:?}"));
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for line in std::io::stdin().lock().lines() {
        let text: String = serde_json::from_str(&line.expect("stdin")).expect("one JSON string per line");
        let record = serde_json::json!({"ids": model.tokenize(&text), "vector": model.embed(&text)});
        writeln!(out, "{record}").expect("stdout");
    }
}
