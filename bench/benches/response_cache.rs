//! The response cache's semantic lookup (`plugins/src/response_cache/store.rs`) at 10,000
//! entries, all in one bucket (the worst case: the same model, system prompt and guard words
//! for every entry), next to an exact scan of every vector, the baseline it replaces. Entries
//! and queries are real prompts (CLINC150 train and test utterances) embedded with wordllama's
//! model. Also printed: how often the bit-ranked lookup finds the same entry as the exact scan.

use criterion::{criterion_group, criterion_main, Criterion};
use payload_processor_plugins::embedding::{normalize, StaticModel};
use payload_processor_plugins::response_cache::store::{Answer, Churn, Query, Store};
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

fn utterances(split: &str) -> Vec<String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let bytes = std::fs::read(root.join("../shared/datasets/clinc150/data_full.json"))
        .or_else(|_| std::fs::read("/work/shared/datasets/clinc150/data_full.json"))
        .expect("CLINC150 in ../shared/datasets");
    let data: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    data[split]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|pair| pair[0].as_str().map(str::to_string))
        .collect()
}

const ENTRIES: usize = 10_000;
const THRESHOLD: f32 = 0.9;

fn bench(c: &mut Criterion) {
    let dir = wordllama_dir();
    let model = StaticModel::load(
        &std::fs::read(dir.join("weights/l2_supercat_256.safetensors")).unwrap(),
        &std::fs::read(dir.join("tokenizers/l2_supercat_tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    let embed = |text: &str| {
        let mut v = model.embed(text);
        normalize(&mut v);
        v
    };
    let mut store = Store::new(ENTRIES, usize::MAX, u64::MAX / 2, model.mean_row());
    let bucket = [7u8; 32];
    let mut vectors = Vec::new();
    let mut churn = Churn::default();
    for (i, text) in utterances("train").iter().take(ENTRIES).enumerate() {
        let v = embed(text);
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let answer = Answer {
            body: text.as_bytes().into(),
            content_type: "application/json".into(),
            streamed: false,
            stored_nanos: 0,
        };
        store.insert(key, answer, Some((&bucket, &v)), 0, &mut churn);
        vectors.push((key, v));
    }
    assert_eq!(store.entries(), ENTRIES);
    let queries: Vec<Vec<f32>> = utterances("test").iter().take(500).map(|t| embed(t)).collect();
    // The exact scan: every vector's cosine (vectors in one flat array, eight sums per dot
    // product so it vectorizes), the best at or above the threshold.
    let flat: Vec<f32> = vectors.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    let dim = model.dim();
    let scan = |query: &[f32]| {
        let mut best: Option<([u8; 32], f32)> = None;
        for (row, (key, _)) in flat.chunks_exact(dim).zip(&vectors) {
            let mut sums = [0f32; 8];
            for (x, y) in row.chunks_exact(8).zip(query.chunks_exact(8)) {
                for lane in 0..8 {
                    sums[lane] += x[lane] * y[lane];
                }
            }
            let score: f32 = sums.iter().sum();
            if score >= THRESHOLD && !best.is_some_and(|(_, s)| score <= s) {
                best = Some((*key, score));
            }
        }
        best.map(|(key, _)| key)
    };
    let mut lookup = |store: &mut Store, query: &[f32]| {
        let code = store.code(query);
        let q = Query {
            bucket: &bucket,
            vector: query,
            code: &code,
            threshold: THRESHOLD,
        };
        store.nearest(&q, 1, &mut churn).map(|(key, _)| key)
    };
    let (mut found, mut agree) = (0, 0);
    for query in &queries {
        let exact = scan(query);
        found += usize::from(exact.is_some());
        agree += usize::from(exact.is_some() && lookup(&mut store, query) == exact);
    }
    println!(
        "response_cache: {} of {} test queries have an entry at cosine >= {THRESHOLD}; the bit-ranked lookup finds the \
         same entry for {agree} of them",
        found,
        queries.len()
    );
    let mut group = c.benchmark_group("response_cache");
    let mut i = 0;
    group.bench_function("lookup_10k_one_bucket", |b| {
        b.iter(|| {
            i = (i + 1) % queries.len();
            black_box(lookup(&mut store, &queries[i]))
        })
    });
    group.bench_function("exact_scan_10k_baseline", |b| {
        b.iter(|| {
            i = (i + 1) % queries.len();
            black_box(scan(&queries[i]))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
