//! Masking never leaves a recognized value in the output: arbitrary text in a chat request
//! through pii-guard (all entities, Mask); whatever reaches the upstream, rescanned, holds no
//! finding.
#![no_main]
use libfuzzer_sys::fuzz_target;
use payload_processor_core::testing::{run_request_phase, FakeHost};
use payload_processor_core::{Chain, Stream};
use payload_processor_plugins::builtin_registry;
use payload_processor_plugins::pii::{Entity, Recognizer, Text};
use std::sync::{Arc, OnceLock};

fn chain() -> Arc<Chain> {
    static CHAIN_ONCE: OnceLock<Arc<Chain>> = OnceLock::new();
    CHAIN_ONCE
        .get_or_init(|| {
            let yaml = "processors: [{name: pii, type: pii-guard, parameters: {action: Mask}}]";
            Arc::new(Chain::load(yaml, &builtin_registry()).expect("fuzz chain loads"))
        })
        .clone()
}

/// Built once: the secret recognizer compiles an automaton and regexes.
fn recognizers() -> &'static [Box<dyn Recognizer>] {
    static ALL: OnceLock<Vec<Box<dyn Recognizer>>> = OnceLock::new();
    ALL.get_or_init(|| Entity::ALL.iter().map(|entity| entity.recognizer()).collect())
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let body = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": text}]});
    let body = serde_json::to_vec(&body).expect("serializes");
    let mut host = FakeHost::request("/v1/chat/completions", &[], &body);
    run_request_phase(&mut Stream::new(chain()), &mut host);
    assert!(
        host.reply.is_none(),
        "a JSON chat request is never refused in Mask mode"
    );
    let sent: serde_json::Value = serde_json::from_slice(&host.request_body).expect("JSON went on");
    let masked = sent["messages"][0]["content"].as_str().expect("content stays a string");
    let scan = Text::new(masked);
    for recognizer in recognizers() {
        let mut found = Vec::new();
        recognizer.find(&scan, &mut found);
        assert!(
            found.is_empty(),
            "{:?} left in {masked:?}: {found:?}",
            recognizer.entity()
        );
    }
});
