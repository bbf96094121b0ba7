//! The engine path per built-in plugin: config → chain → one request through the fake host,
//! next to the physical floor for the same body (a `memchr` search for `"model"`, a full
//! `serde_json` parse) and the engine with nothing to run, so reports show how far each plugin
//! is from the limit and what it adds. `bench/bench_micro.sh` prints the table.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use payload_processor_bench::{chat_body, full_parse_model, mcp_call_body, transcription_body, Case, SIZES};
use std::hint::black_box;
use std::time::Duration;

const JSON: (&str, &str) = ("content-type", "application/json");

/// One processor of `kind` with `parameters`, as users write it.
fn chain(kind: &str, parameters: &str) -> String {
    format!("processors:\n  - name: p\n    type: {kind}\n    parameters: {parameters}\n")
}

/// (benchmark name, case) for every built-in request plugin on a body of `size` bytes.
fn cases(size: usize) -> Vec<(&'static str, Case)> {
    let chat = "/v1/chat/completions";
    let model_last = chat_body(size, true);
    let model_first = chat_body(size, false);
    vec![
        // The engine and a processor whose match excludes the request: what the filter costs
        // when nothing runs.
        (
            "engine_no_match",
            Case::new(
                "processors:\n  - {name: p, type: body-field-to-header, match: {pathPrefixes: [/none]}}\n",
                chat,
                &[JSON],
                model_last.clone(),
            ),
        ),
        (
            "body_field_to_header/model_first",
            Case::new(&chain("body-field-to-header", "{}"), chat, &[JSON], model_first),
        ),
        (
            "body_field_to_header/model_last",
            Case::new(&chain("body-field-to-header", "{}"), chat, &[JSON], model_last.clone()),
        ),
        (
            "base_model_to_header",
            Case::new(
                &chain("base-model-to-header", "{adapters: {llama-3-8b: meta-llama/Llama-3.1-8B}}"),
                chat,
                &[JSON],
                model_last.clone(),
            ),
        ),
        (
            "body_mutation",
            Case::new(
                &chain(
                    "body-mutation",
                    "{operations: [{op: setDefault, path: top_p, value: 0.9}, {op: clamp, path: max_tokens, max: 256}, \
                     {op: set, path: $.metadata.user, from: 'header:x-user'}], \
                     headers: [{op: setFromBody, name: x-gateway-model, path: model}]}",
                ),
                chat,
                &[JSON, ("x-user", "u-42")],
                model_last.clone(),
            ),
        ),
        (
            "model_rewrite",
            Case::new(
                &chain(
                    "model-rewrite",
                    "{rules: [{modelRegex: '^llama-3-(.+)$', targets: [{model: 'llama-3.1-$1', weight: 9}, {model: canary, weight: 1}]}]}",
                ),
                chat,
                &[JSON, ("x-request-id", "3f1c2a")],
                model_last.clone(),
            ),
        ),
        (
            "prompt_decorator",
            Case::new(
                &chain("prompt-decorator", "{prepend: [{role: system, content: 'Be brief.'}]}"),
                chat,
                &[JSON],
                model_last.clone(),
            ),
        ),
        (
            "request_validator",
            Case::new(
                &chain(
                    "request-validator",
                    "{requiredFields: [model, messages], allowedModels: [llama-3-8b], maxMessages: 256, \
                     maxPromptChars: 1000000, maxTokens: 4096, allowStream: true}",
                ),
                chat,
                &[JSON],
                model_last,
            ),
        ),
        (
            "json_to_multipart",
            Case::new(
                &chain("json-to-multipart", "{fileFields: [{field: file, filename: audio.wav}]}"),
                "/v1/audio/transcriptions",
                &[JSON],
                transcription_body(size),
            ),
        ),
        (
            "mcp_router",
            Case::new(&chain("mcp-router", "{denyTools: [drop_tables]}"), "/mcp", &[JSON], mcp_call_body(size)),
        ),
        (
            // Four endpoints, no scraping (metrics are the background's business): filters,
            // the one-pass prompt read, block hashes, prefix lookups and scores per request.
            "endpoint_picker",
            Case::new(
                &chain(
                    "endpoint-picker",
                    "{endpoints: ['10.0.0.1:8000', '10.0.0.2:8000', '10.0.0.3:8000', '10.0.0.4:8000']}",
                ),
                "/v1/chat/completions",
                &[JSON],
                chat_body(size, true),
            ),
        ),
    ]
}

fn engine_path(c: &mut Criterion) {
    for (label, size) in SIZES {
        let mut group = c.benchmark_group(format!("request/{label}"));
        group.throughput(Throughput::Bytes(size as u64));
        let floor = chat_body(size, true);
        group.bench_function("floor/memchr_model", |b| {
            b.iter(|| memchr::memmem::find(black_box(&floor), b"\"model\""))
        });
        group.bench_function("floor/serde_parse", |b| b.iter(|| full_parse_model(black_box(&floor))));
        // What every body reader pays before it looks: the copy out of the proxy's buffer.
        group.bench_function("floor/copy", |b| b.iter(|| black_box(&floor).to_vec()));
        // The lazy reader alone (the structural pass plus the value), model last.
        group.bench_function("reader/find_model", |b| {
            b.iter(|| payload_processor_core::json::find_member(black_box(&floor), "model").map(|raw| raw.is_some()))
        });
        for (name, case) in cases(size) {
            case.check();
            // The host is built outside the measurement: Envoy already holds the request.
            group.bench_function(name, |b| {
                b.iter_batched_ref(|| case.host(), |host| case.run(host), BatchSize::SmallInput)
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = engine_path
}
criterion_main!(benches);
