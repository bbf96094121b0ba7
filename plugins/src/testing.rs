//! Helpers for the plugins' unit tests: run a chain over one request against the fake host.

use payload_processor_core::testing::{run_request_phase, FakeHost};
use payload_processor_core::{Chain, Stream};
use serde_json::Value;
use std::sync::Arc;

/// Runs the request phase of `chain_yaml` on a POST to `/v1/chat/completions`.
pub(crate) fn run_request(chain_yaml: &str, headers: &[(&str, &str)], body: &Value) -> (FakeHost, Arc<Chain>) {
    run_request_at(
        "/v1/chat/completions",
        chain_yaml,
        headers,
        &serde_json::to_vec(body).unwrap(),
    )
}

/// Runs the request phase of `chain_yaml` on a POST to `path` with raw `body` bytes.
pub(crate) fn run_request_at(
    path: &str,
    chain_yaml: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (FakeHost, Arc<Chain>) {
    let chain = Arc::new(Chain::load(chain_yaml, &crate::builtin_registry()).expect("test chain loads"));
    let mut host = FakeHost::request(path, headers, body);
    run_request_phase(&mut Stream::new(chain.clone()), &mut host);
    (host, chain)
}
