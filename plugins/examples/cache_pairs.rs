//! Runs pairs of prompts through a chain with a `response-cache`, for the hit and false-hit
//! figures (`bench/cache_eval.py`): the first prompt of a pair is answered by a stand-in
//! upstream and kept, then the second is asked; the output says whether the cache served it.
//! Each pair gets its own partition (`x-pair`), so pairs do not meet.
//!
//! `cargo run --release -p payload-processor-plugins --example cache_pairs -- CHAIN.yaml < pairs.jsonl`
//! reads `["first", "second"]` per line and prints `true` (served from the cache) or `false`.

use payload_processor_core::testing::{run_request_phase, FakeHost};
use payload_processor_core::{Chain, Stream};
use std::io::{BufRead, Write};
use std::sync::Arc;

fn ask(chain: &Arc<Chain>, pair: usize, prompt: &str) -> bool {
    let body = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": prompt}]});
    let partition = pair.to_string();
    let headers = [("x-pair", partition.as_str())];
    let mut host = FakeHost::request("/v1/chat/completions", &headers, &serde_json::to_vec(&body).unwrap());
    let mut stream = Stream::new(chain.clone());
    run_request_phase(&mut stream, &mut host);
    if host.reply.is_some() {
        return true;
    }
    host.response_headers.push((":status".into(), "200".into()));
    host.response_headers
        .push(("content-type".into(), "application/json".into()));
    host.response_body = br#"{"choices":[{"message":{"role":"assistant","content":"an answer"}}]}"#.to_vec();
    stream.on_response_headers(&mut host, false);
    stream.on_response_body(&mut host, true);
    false
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: cache_pairs CHAIN.yaml < pairs.jsonl");
    payload_processor_core::set_file_reader(|path| std::fs::read(path).map_err(|err| format!("{path}: {err}")));
    let text = std::fs::read_to_string(&path).expect("the chain file");
    let chain = Arc::new(
        Chain::load(&text, &payload_processor_plugins::builtin_registry()).unwrap_or_else(|err| panic!("{err}")),
    );
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (pair, line) in std::io::stdin().lock().lines().enumerate() {
        let [first, second]: [String; 2] =
            serde_json::from_str(&line.expect("stdin")).expect("[first, second] per line");
        assert!(!ask(&chain, pair, &first), "a fresh partition cannot hit");
        writeln!(out, "{}", ask(&chain, pair, &second)).unwrap();
    }
}
