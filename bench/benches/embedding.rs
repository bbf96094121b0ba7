//! Static embeddings (`plugins/src/embedding`): one prompt embedded by the engine's model, next to
//! the physical floor of the same work (summing the rows of already-known token ids), for a
//! 100-character message and a 4 KiB prompt. The model comes from the `wordllama` wheel that
//! `scripts/setup.sh` installs (`WORDLLAMA_DIR`, else found through `.venv`).

use criterion::{criterion_group, criterion_main, Criterion};
use payload_processor_plugins::embedding::{StaticModel, Tokenizer};
use std::hint::black_box;
use std::path::PathBuf;

fn wordllama_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("WORDLLAMA_DIR") {
        return dir.into();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new(root.join(".venv/bin/python"))
        .args(["-c", "import wordllama, os; print(os.path.dirname(wordllama.__file__))"])
        .output()
        .expect("the .venv of scripts/setup.sh, with wordllama");
    String::from_utf8(out.stdout).expect("a path").trim().into()
}

const MESSAGE: &str = "What is the weather like in Boston tomorrow morning? I need to plan my commute and outfit.!";

/// 4 KiB of varied English: the first CLINC150 test queries (found as the tests find them),
/// else this file's own text.
fn prompt_4k() -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let candidates = [
        root.join("../shared/datasets/clinc150/data_full.json"),
        "/work/shared/datasets/clinc150/data_full.json".into(),
    ];
    let text = candidates
        .iter()
        .find_map(|path| std::fs::read(path).ok())
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .map(|data| {
            data["test"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|pair| pair[0].as_str())
                .collect::<Vec<_>>()
                .join(". ")
        })
        .unwrap_or_else(|| include_str!("embedding.rs").to_string());
    let mut end = 4096.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

fn bench(c: &mut Criterion) {
    let dir = wordllama_dir();
    let model = StaticModel::load(
        &std::fs::read(dir.join("weights/l2_supercat_256.safetensors")).unwrap(),
        &std::fs::read(dir.join("tokenizers/l2_supercat_tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    println!(
        "table: {} rows x {} dims, {:.1} MB as f16",
        model.table_bytes() / 2 / model.dim(),
        model.dim(),
        model.table_bytes() as f64 / 1e6
    );
    let long = prompt_4k();
    println!(
        "tokens: 100B {}, 4KiB {}",
        model.tokenize(MESSAGE).len(),
        model.tokenize(&long).len()
    );
    for (name, text) in [("100B", MESSAGE), ("4KiB", long.as_str())] {
        let mut group = c.benchmark_group(format!("embedding/{name}"));
        // Warm: the per-thread word cache holds the text's words (steady traffic).
        group.bench_function("embed", |b| b.iter(|| model.embed(black_box(text))));
        group.bench_function("tokenize", |b| b.iter(|| model.tokenize(black_box(text))));
        // Cold: every word through BPE.
        group.bench_function("embed_cold", |b| {
            b.iter(|| {
                Tokenizer::clear_cache();
                model.embed(black_box(text))
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
