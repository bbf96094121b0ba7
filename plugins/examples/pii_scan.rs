//! Runs the built-in PII recognizers over texts, for the evaluation script
//! (`bench/guard_eval.sh`): reads JSON lines `{"text": ...}` on stdin, writes one JSON line
//! per text with the findings (`[entity, start, end]`, character offsets), then a last line
//! with the scanning time of the whole corpus (I/O and JSON excluded).

use payload_processor_plugins::pii::{drop_overlapped, Entity, Text};
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::time::Instant;

fn main() {
    let texts: Vec<String> = std::io::stdin()
        .lock()
        .lines()
        .map(|line| {
            let line = line.expect("stdin is readable");
            let value: Value = serde_json::from_str(&line).expect("each line is JSON");
            value["text"].as_str().expect("each line has a text").to_string()
        })
        .collect();
    let recognizers: Vec<_> = Entity::ALL.iter().map(|entity| entity.recognizer()).collect();
    let mut results = Vec::with_capacity(texts.len());
    let started = Instant::now();
    // Several rounds so the time is measurable; the findings of the last are printed.
    let rounds = 20;
    for round in 0..rounds {
        results.clear();
        for text in &texts {
            let scan = Text::new(text);
            let mut found = Vec::new();
            for recognizer in &recognizers {
                let mut spans = Vec::new();
                recognizer.find(&scan, &mut spans);
                found.extend(spans.into_iter().map(|span| (recognizer.entity(), span)));
            }
            // As pii-guard reports them: a value is one kind.
            drop_overlapped(&mut found, |(entity, span)| (*entity, span.clone()));
            if round == rounds - 1 {
                results.push(found);
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64() / f64::from(rounds);
    // Each recognizer alone over the corpus (the digit-run scan it may share is counted in
    // every one that uses it).
    let per_recognizer: serde_json::Map<String, Value> = recognizers
        .iter()
        .map(|recognizer| {
            let started = Instant::now();
            for _ in 0..rounds {
                for text in &texts {
                    let mut spans = Vec::new();
                    recognizer.find(&Text::new(std::hint::black_box(text)), &mut spans);
                    std::hint::black_box(spans);
                }
            }
            let seconds = started.elapsed().as_secs_f64() / f64::from(rounds);
            (recognizer.entity().name().to_string(), json!(seconds))
        })
        .collect();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (text, found) in texts.iter().zip(&results) {
        // Byte offsets to character offsets, as Python counts.
        let chars = |byte: usize| text[..byte].chars().count();
        let spans: Vec<Value> = found
            .iter()
            .map(|(entity, span)| json!([entity.name(), chars(span.start), chars(span.end)]))
            .collect();
        writeln!(out, "{}", json!({ "found": spans })).expect("stdout is writable");
    }
    let bytes: usize = texts.iter().map(String::len).sum();
    writeln!(
        out,
        "{}",
        json!({ "seconds": seconds, "bytes": bytes, "per_recognizer": per_recognizer })
    )
    .expect("stdout is writable");
}
