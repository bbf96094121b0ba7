#!/usr/bin/env bash
# LeakSanitizer over the engine's and plugins' unit tests (nightly toolchain; not part of CI).
# Any leak fails the run with LeakSanitizer's report.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
RUSTFLAGS="-Zsanitizer=leak" cargo +nightly test --target x86_64-unknown-linux-gnu --target-dir target/lsan \
  -p payload-processor-core -p payload-processor-plugins
echo "LeakSanitizer: no leaks in the engine and plugin tests"
