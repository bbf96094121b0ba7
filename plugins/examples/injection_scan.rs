//! Scores texts with `prompt-guard`'s injection detection, for the training script
//! (`scripts/injection_train.sh`): reads JSON lines `{"text": ...}` on stdin and writes one JSON
//! line per text: `rules` (the rule set alone flags it) and, given a weights file as the first
//! argument, `classifier` (the classifier's probability, as the filter computes it). The last
//! line has the time per KiB of each stage.

use payload_processor_plugins::injection_classifier::InjectionClassifier;
use payload_processor_plugins::prompt_guard::injection_rules_flag;
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::time::Instant;

fn main() {
    let classifier = std::env::args().nth(1).map(|path| {
        let bytes = std::fs::read(&path).unwrap_or_else(|err| panic!("{path}: {err}"));
        InjectionClassifier::from_safetensors(&bytes).unwrap_or_else(|err| panic!("{path}: {err}"))
    });
    let texts: Vec<String> = std::io::stdin()
        .lock()
        .lines()
        .map(|line| {
            let value: Value = serde_json::from_str(&line.expect("stdin is readable")).expect("each line is JSON");
            value["text"].as_str().expect("each line has a text").to_string()
        })
        .collect();
    let kib = texts.iter().map(String::len).sum::<usize>() as f64 / 1024.0;
    let started = Instant::now();
    let rules: Vec<bool> = texts.iter().map(|text| injection_rules_flag(text)).collect();
    let rules_us = started.elapsed().as_secs_f64() * 1e6 / kib;
    let started = Instant::now();
    let scores: Vec<Option<f64>> = texts
        .iter()
        .map(|text| classifier.as_ref().map(|c| c.score(text)))
        .collect();
    let classifier_us = started.elapsed().as_secs_f64() * 1e6 / kib;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (rule, score) in rules.iter().zip(&scores) {
        writeln!(out, "{}", json!({"rules": rule, "classifier": score})).expect("stdout is writable");
    }
    writeln!(
        out,
        "{}",
        json!({"rules_us_per_kib": rules_us, "classifier_us_per_kib": classifier_us})
    )
    .expect("stdout is writable");
}
