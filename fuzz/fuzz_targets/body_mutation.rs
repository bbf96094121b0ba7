//! Request transforms on arbitrary bodies through the engine: never a panic; a body that went on
//! changed is valid JSON with a matching content-length.
#![no_main]
use libfuzzer_sys::fuzz_target;
use payload_processor_core::testing::{run_request_phase, FakeHost};
use payload_processor_core::{Chain, Direction, Stream};
use payload_processor_plugins::builtin_registry;
use std::sync::{Arc, OnceLock};

const CHAIN: &str = r#"processors:
- name: mutate
  type: body-mutation
  parameters:
    operations:
      - {op: setDefault, path: top_p, value: 0.9}
      - {op: clamp, path: max_tokens, max: 256}
      - {op: set, path: '$.metadata.user', from: 'header:x-user'}
      - {op: rename, path: user, to: '$.metadata.end_user'}
      - {op: remove, path: '$.messages[0].name'}
- name: decorate
  type: prompt-decorator
  parameters: {prepend: [{role: system, content: "Be brief."}]}
- name: rewrite
  type: model-rewrite
  parameters: {rules: [{modelRegex: '^(.+)-latest$', targets: [{model: '$1-v2', weight: 1}]}]}
"#;

fn chain() -> Arc<Chain> {
    static CHAIN_ONCE: OnceLock<Arc<Chain>> = OnceLock::new();
    CHAIN_ONCE
        .get_or_init(|| Arc::new(Chain::load(CHAIN, &builtin_registry()).expect("fuzz chain loads")))
        .clone()
}

fuzz_target!(|data: &[u8]| {
    let mut host = FakeHost::request("/v1/chat/completions", &[("x-user", "u1")], data);
    run_request_phase(&mut Stream::new(chain()), &mut host);
    if host.reply.is_none() && host.request_body != data {
        serde_json::from_slice::<serde_json::Value>(&host.request_body).expect("a changed body is JSON");
        assert_eq!(
            host.header_values(Direction::Request, "content-length"),
            vec![host.request_body.len().to_string()]
        );
    }
});
