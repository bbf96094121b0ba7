#!/usr/bin/env bash
# Builds the release artifacts into dist/:
#   dist/libpayload_processor.so          the Envoy dynamic module with the built-in plugins
#   dist/payload_processor.wasm           the proxy-wasm filter with the built-in plugins
#   dist/libcustom_payload_processor.so   the third-party example (built-ins + its own plugins)
#   dist/custom_payload_processor.wasm    the same example as proxy-wasm
#   dist/payload-processor                the offline CLI: validate, run, schema
# The example has its own target directory: it depends on the adapters with their exports
# turned off, and sharing one would overwrite the uplifted adapter cdylibs with that variant.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p dist
wasm=(--profile wasm-release --target wasm32-wasip1)
example=(--manifest-path examples/custom-plugin/Cargo.toml --target-dir target/example --locked)

# Built apart: together, cargo would unify the CLI's `schema` feature into the module.
cargo build --release --locked -p payload-processor-dynamic-module
cp target/release/libpayload_processor.so dist/
# The CLI is built optimised; scripts/test.sh and CI take the debug build `cargo test` already
# made (PAYLOAD_PROCESSOR_CLI_PROFILE=dev) instead of a second long optimised link.
cli_profile=${PAYLOAD_PROCESSOR_CLI_PROFILE:-release}
cargo build --profile "$cli_profile" --locked -p payload-processor-cli
cp "target/$([ "$cli_profile" = dev ] && echo debug || echo "$cli_profile")/payload-processor" dist/
cargo build "${wasm[@]}" --locked -p payload-processor-proxy-wasm
cp target/wasm32-wasip1/wasm-release/payload_processor_wasm.wasm dist/payload_processor.wasm
# The example's .so: optimised by default; scripts/test.sh (CI) takes a debug build that reuses
# the dependencies its unit tests compiled (PAYLOAD_PROCESSOR_EXAMPLE_PROFILE=dev).
example_profile=${PAYLOAD_PROCESSOR_EXAMPLE_PROFILE:-release}
cargo build --profile "$example_profile" "${example[@]}"
cp "target/example/$([ "$example_profile" = dev ] && echo debug || echo "$example_profile")/libcustom_payload_processor.so" dist/
cargo build "${wasm[@]}" "${example[@]}"
cp target/example/wasm32-wasip1/wasm-release/custom_payload_processor.wasm dist/
ls -l dist/
