#!/usr/bin/env bash
# The side-by-side benchmark (see bench/bench.py): installs nginx and wrk (Debian) and oha
# (crates.io) when missing, builds the filter and the benchmark's ext_proc server and chart tool,
# then measures every variant and writes bench/results/latest.{md,json,svg}.
#   bench/bench.sh            full run (about 20 minutes)
#   bench/bench.sh --quick    16 KiB, model last, one short repeat, one variant per family (about 2 minutes
#                               once built; what CI runs to prove the harness works)
# Other arguments go to bench.py (--variants, --sizes, --repeats, --seconds, --out).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ] || ! command -v wrk >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q nginx wrk >/dev/null
fi
# oha measures the open-loop latency; --no-latency (CI's quick run) needs no oha, and skips its
# several-minute build on a fresh machine.
if [ ! -x target/tools/bin/oha ] && [[ " $* " != *" --no-latency "* ]]; then
  cargo install oha --version 1.16.0 --locked --root target/tools
fi
scripts/build.sh
CARGO_TARGET_DIR=target/bench cargo build --release --locked --manifest-path bench/Cargo.toml \
  -p bench-extproc-server -p bench-chart
.venv/bin/python bench/bench.py "$@"
