//! Guard speed: MB/s of each PII recognizer on its own, and requests through the engine with
//! `pii-guard` (all recognizers), `prompt-guard` (100 keywords, 20 regexes, the injection set)
//! and both, on 1, 16 and 256 KiB prompts. The target: both guards on a 16 KiB prompt in under
//! 50 µs on one core. `bench/bench_micro.sh` prints the table.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use payload_processor_bench::{guard_chat_body, guard_prompt_text, prompt_guard_target_parameters, Case, SIZES};
use payload_processor_plugins::pii::{Entity, Text};
use std::hint::black_box;
use std::time::Duration;

const JSON: (&str, &str) = ("content-type", "application/json");

fn guards(c: &mut Criterion) {
    let prompt_guard = format!(
        "  - name: prompt\n    type: prompt-guard\n    parameters: {}\n",
        prompt_guard_target_parameters()
    );
    let pii_guard = "  - name: pii\n    type: pii-guard\n    parameters: {action: Mask}\n";
    let part = |parameters: &str| {
        format!("processors:\n  - name: part\n    type: prompt-guard\n    parameters: {parameters}\n")
    };
    let keywords: Vec<String> = (0..100).map(|i| format!("'forbidden phrase {i}'")).collect();
    let chains = [
        ("prompt_guard_part/injection_set", part("{builtin: [prompt-injection]}")),
        (
            "prompt_guard_part/100_keywords",
            part(&format!(
                "{{deny: [{{name: k, keywords: [{}], caseInsensitive: true}}]}}",
                keywords.join(", ")
            )),
        ),
        (
            "prompt_guard_part/20_regexes",
            part(&format!(
                "{{deny: [{}]}}",
                (0..20)
                    .map(|i| format!(
                        "{{name: r{i}, regex: '\\bproject[-_ ]?{i}[a-z]{{2}}[0-9]{{4}}\\b', caseInsensitive: true}}"
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        ),
        ("pii_guard", format!("processors:\n{pii_guard}")),
        ("prompt_guard", format!("processors:\n{prompt_guard}")),
        (
            "pii_and_prompt_guard",
            format!("processors:\n{pii_guard}{prompt_guard}"),
        ),
    ];
    for (label, size) in SIZES {
        let mut group = c.benchmark_group(format!("guards/{label}"));
        group.throughput(Throughput::Bytes(size as u64));
        let text = guard_prompt_text(size, true);
        for entity in Entity::ALL {
            let recognizer = entity.recognizer();
            let mut found = Vec::new();
            group.bench_function(format!("recognizer/{}", entity.name()), |b| {
                b.iter(|| {
                    found.clear();
                    recognizer.find(&Text::new(black_box(&text)), &mut found);
                    found.len()
                })
            });
        }
        for (name, yaml) in &chains {
            for (variant, pii) in [("clean", false), ("with_pii", true)] {
                let case = Case::new(yaml, "/v1/chat/completions", &[JSON], guard_chat_body(size, pii));
                case.check();
                group.bench_function(format!("{name}/{variant}"), |b| {
                    b.iter_batched_ref(|| case.host(), |host| case.run(host), BatchSize::SmallInput)
                });
            }
        }
        // The exact chain and body `bench/bench.sh` sends through Envoy (variant
        // guards_dynamic_module): what the guards cost in Envoy is compared with this.
        let chain = format!(
            "processors:\n  - name: route-by-model\n    type: body-field-to-header\n  - name: pii\n    type: pii-guard\n    \
             parameters: {{direction: Request}}\n{prompt_guard}"
        );
        let case = Case::new(&chain, "/v1/chat/completions", &[JSON], side_by_side_body(size));
        case.check();
        group.bench_function("side_by_side_chain", |b| {
            b.iter_batched_ref(|| case.host(), |host| case.run(host), BatchSize::SmallInput)
        });
        group.finish();
    }
}

/// `bench.chat_body(size, model_last=True)` of `bench/bench.py`: a short system prompt, a user
/// prompt padded with one repeated letter, `model` last.
fn side_by_side_body(size: usize) -> Vec<u8> {
    let build = |pad: usize| {
        format!(
            r#"{{"messages":[{{"role":"system","content":"You are a helpful assistant."}},{{"role":"user","content":"Summarise the report and list the risks. {}"}}],"max_tokens":256,"stream":false,"model":"llama-3-8b"}}"#,
            "x".repeat(pad)
        )
    };
    build(size.saturating_sub(build(0).len())).into_bytes()
}

/// A weights file of the trained shape (2^16 int8 buckets); the cost of scoring does not
/// depend on the weights' values.
fn injection_weights_file() -> std::path::PathBuf {
    let buckets = 1usize << 16;
    let header = format!(
        r#"{{"weights":{{"dtype":"I8","shape":[{buckets}],"data_offsets":[0,{buckets}]}},"scale":{{"dtype":"F32","shape":[1],"data_offsets":[{buckets},{a}]}},"bias":{{"dtype":"F32","shape":[1],"data_offsets":[{a},{b}]}},"__metadata__":{{"format":"payload-processor-injection-v1","buckets":"{buckets}","window":"128","stride":"96","threshold":"0.99"}}}}"#,
        a = buckets + 4,
        b = buckets + 8
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend((0..buckets).map(|i| (i % 7) as u8));
    bytes.extend(0.01f32.to_le_bytes());
    bytes.extend((-5.0f32).to_le_bytes());
    let path = std::env::temp_dir().join("bench-injection-v1.safetensors");
    std::fs::write(&path, bytes).expect("temp dir is writable");
    path
}

/// Injection detection on a 4 KiB prompt: the rules alone, then with the classifier (the
/// issue's target: at most 20 µs added in the engine).
fn injection(c: &mut Criterion) {
    payload_processor_core::set_file_reader(|path| std::fs::read(path).map_err(|err| err.to_string()));
    let weights = injection_weights_file();
    let mut group = c.benchmark_group("injection/4KiB");
    group.throughput(Throughput::Bytes(4096));
    let rules = "processors:\n  - name: guard\n    type: prompt-guard\n    parameters: {builtin: [prompt-injection]}\n";
    let with_classifier = format!(
        "processors:\n  - name: guard\n    type: prompt-guard\n    parameters: {{builtin: [prompt-injection], \
         injection: {{classifier: {{weights: '{}'}}}}}}\n",
        weights.display()
    );
    for (name, yaml) in [("rules", rules.to_string()), ("rules_and_classifier", with_classifier)] {
        let case = Case::new(&yaml, "/v1/chat/completions", &[JSON], guard_chat_body(4096, false));
        case.check();
        group.bench_function(name, |b| {
            b.iter_batched_ref(|| case.host(), |host| case.run(host), BatchSize::SmallInput)
        });
    }
    let classifier = payload_processor_plugins::injection_classifier::InjectionClassifier::from_safetensors(
        &std::fs::read(&weights).expect("written above"),
    )
    .expect("loads");
    let text = guard_prompt_text(4096, false);
    group.bench_function("classifier_alone", |b| b.iter(|| classifier.score(black_box(&text))));
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    targets = guards, injection
}
criterion_main!(benches);
