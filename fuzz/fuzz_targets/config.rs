//! Any text as a chain configuration: never a panic; a config that loads, loads again the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use payload_processor_core::Chain;
use payload_processor_plugins::builtin_registry;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let registry = builtin_registry();
    match Chain::load(text, &registry) {
        Ok(chain) => {
            let again = Chain::load(text, &registry).expect("a config that loaded once loads again");
            assert!(chain.processor_names().eq(again.processor_names()));
        }
        Err(err) => {
            // Errors are path-qualified messages, never empty.
            assert!(!err.to_string().is_empty());
        }
    }
});
