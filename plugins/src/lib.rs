//! Built-in payload plugins of envoy-payload-processor, one file (or family folder) each, the
//! helpers several of them share ([`common`]), and the one function that registers them all.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod base_model_to_header;
pub mod body_field_to_header;
pub mod body_mutation;
pub mod callout;
mod common;
pub mod embedding;
pub mod endpoint_picker;
pub mod guard;
pub mod json_to_multipart;
pub mod mcp_router;
pub mod model_rewrite;
pub mod prompt_decorator;
pub mod request_validator;
pub mod response_cache;
pub mod semantic_router;
pub mod token_usage;

// The guard family's public parts keep their paths.
pub use callout::{ext_authz_body, http_callout, llama_guard, openai_moderation, presidio};
pub use guard::{injection_classifier, pii, pii_guard, prompt_guard};

#[cfg(test)]
mod testing;

use payload_processor_core::{BuildFn, Registry};

/// Registers every built-in plugin type.
pub fn register_builtins(registry: &mut Registry) {
    // With the `schema` feature (the CLI), each type comes with the config its parameters
    // deserialize into, for the chain's JSON Schema. The filters leave it off: a registered
    // schema keeps its generator code in the binary.
    macro_rules! builtin {
        ($($module:ident),+ $(,)?) => {$(
            #[cfg(feature = "schema")]
            registry
                .register_typed::<$module::Config>($module::TYPE_NAME, $module::build as BuildFn)
                .expect("built-in plugin types are unique kebab-case names");
            #[cfg(not(feature = "schema"))]
            registry
                .register($module::TYPE_NAME, $module::build as BuildFn)
                .expect("built-in plugin types are unique kebab-case names");
        )+};
    }
    builtin!(
        body_field_to_header,
        base_model_to_header,
        token_usage,
        body_mutation,
        model_rewrite,
        prompt_decorator,
        request_validator,
        json_to_multipart,
        mcp_router,
        pii_guard,
        prompt_guard,
        endpoint_picker,
        semantic_router,
        response_cache,
        http_callout,
        openai_moderation,
        llama_guard,
        presidio,
        ext_authz_body,
    );
}

/// A registry holding the built-in plugin types.
pub fn builtin_registry() -> Registry {
    let mut registry = Registry::new();
    register_builtins(&mut registry);
    registry
}
