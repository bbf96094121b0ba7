//! Built-in payload plugins of envoy-payload-processor, one file (or family folder) each, the
//! helpers several of them share ([`common`]), and the one function that registers them all.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod base_model_to_header;
pub mod body_field_to_header;
pub mod body_mutation;
mod common;
pub mod endpoint_picker;
pub mod guard;
pub mod json_to_multipart;
pub mod mcp_router;
pub mod model_rewrite;
pub mod prompt_decorator;
pub mod request_validator;
pub mod token_usage;

// The guard family's public parts keep their paths.
pub use guard::{injection_classifier, pii, pii_guard, prompt_guard};

#[cfg(test)]
mod testing;

use payload_processor_core::{BuildFn, Registry};

/// Registers every built-in plugin type.
pub fn register_builtins(registry: &mut Registry) {
    let mut register = |name: &str, build: BuildFn| {
        registry
            .register(name, build)
            .expect("built-in plugin types are unique kebab-case names");
    };
    register(body_field_to_header::TYPE_NAME, body_field_to_header::build);
    register(base_model_to_header::TYPE_NAME, base_model_to_header::build);
    register(token_usage::TYPE_NAME, token_usage::build);
    register(body_mutation::TYPE_NAME, body_mutation::build);
    register(model_rewrite::TYPE_NAME, model_rewrite::build);
    register(prompt_decorator::TYPE_NAME, prompt_decorator::build);
    register(request_validator::TYPE_NAME, request_validator::build);
    register(json_to_multipart::TYPE_NAME, json_to_multipart::build);
    register(mcp_router::TYPE_NAME, mcp_router::build);
    register(pii_guard::TYPE_NAME, pii_guard::build);
    register(prompt_guard::TYPE_NAME, prompt_guard::build);
    register(endpoint_picker::TYPE_NAME, endpoint_picker::build);
}

/// A registry holding the built-in plugin types.
pub fn builtin_registry() -> Registry {
    let mut registry = Registry::new();
    register_builtins(&mut registry);
    registry
}
