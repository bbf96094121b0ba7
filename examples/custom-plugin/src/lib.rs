//! An example third-party filter: every built-in plugin plus four of our own, built into
//! `libcustom_payload_processor.so` (native) and `custom_payload_processor.wasm`
//! (wasm32-wasip1) from the same code.
//!
//! The end-to-end tests use it: `fault-injector` fails, panics or overruns its budget when a
//! request header asks it to, proving FailClosed/FailOpen through Envoy; `stamp-request`
//! and `stamp-response` change JSON bodies, proving re-serialization and content-length;
//! `word-guard` blocks buffered and streamed responses, proving protocol-correct rejections.
#![deny(unsafe_code)]

mod fault_injector;
mod stamp;
mod word_guard;

use payload_processor_core::Registry;

/// The built-ins plus this crate's plugin types.
pub fn registry() -> Registry {
    let mut registry = payload_processor_plugins::builtin_registry();
    registry
        .register(fault_injector::TYPE_NAME, fault_injector::build)
        .expect("unique type name");
    registry
        .register(stamp::REQUEST_TYPE_NAME, stamp::build_request)
        .expect("unique type name");
    registry
        .register(stamp::RESPONSE_TYPE_NAME, stamp::build_response)
        .expect("unique type name");
    registry
        .register(word_guard::TYPE_NAME, word_guard::build)
        .expect("unique type name");
    registry
}

#[cfg(not(target_arch = "wasm32"))]
payload_processor::export_envoy_dynamic_module!(registry);

#[cfg(target_arch = "wasm32")]
payload_processor_wasm::export_proxy_wasm!(registry);

#[cfg(test)]
mod tests {
    #[test]
    fn registers_next_to_the_builtins() {
        let names: Vec<String> = super::registry().type_names().map(String::from).collect();
        for expected in [
            "body-field-to-header",
            "base-model-to-header",
            "fault-injector",
            "stamp-request",
            "stamp-response",
            "word-guard",
            "token-usage",
        ] {
            assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
        }
        let mut registry = super::registry();
        assert!(registry
            .register("fault-injector", super::fault_injector::build)
            .is_err());
    }
}
