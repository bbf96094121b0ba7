#!/usr/bin/env bash
# Builds the release artifacts into dist/:
#   dist/libpayload_processor.so         the Envoy dynamic module with the built-in plugins
#   dist/libcustom_payload_processor.so  the third-party example (built-ins + its own plugins)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p dist
cargo build --release --locked -p payload-processor-dynamic-module
cargo build --release --manifest-path examples/custom-plugin/Cargo.toml --target-dir target
cp target/release/libpayload_processor.so target/release/libcustom_payload_processor.so dist/
ls -l dist/
