#!/usr/bin/env bash
# Precision/recall of the pii-guard recognizers on a faker-generated labelled corpus, next to
# presidio-analyzer on the same texts, and the speed of both. Not part of CI (presidio and
# spaCy are a large install). Writes bench/results/guard_eval.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x target/eval-venv/bin/python ]; then
  python3 -m venv target/eval-venv
fi
if ! target/eval-venv/bin/python -c "import faker, presidio_analyzer" 2>/dev/null; then
  target/eval-venv/bin/pip install --quiet --disable-pip-version-check faker presidio-analyzer
fi
cargo build --release --locked --example pii_scan -p payload-processor-plugins
target/eval-venv/bin/python bench/guard_eval.py
