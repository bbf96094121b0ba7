#!/usr/bin/env bash
# Criterion micro-benchmarks of the engine path per built-in plugin next to the physical floor,
# then a table (printed and written to bench/results/micro.md). Takes a few minutes.
# Extra arguments go to criterion, e.g. `bench/bench_micro.sh 16KiB` to run one size.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$PWD/target/bench"
cargo bench --manifest-path bench/Cargo.toml --locked --bench engine_path --bench guards -- "$@"
python3 bench/bench_micro.py "$CARGO_TARGET_DIR/criterion"
