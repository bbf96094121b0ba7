#!/usr/bin/env bash
# Instructions Envoy executes per request, per variant and body, under valgrind's callgrind
# (see bench/bench_instructions.py): the deterministic companion of bench/bench.sh.
# Writes bench/results/instructions.md and instructions.json (the baseline of the CI gate).
# About 20 minutes. `--short` (CI, a few minutes): our module's count for routing, the guard
# chain and the endpoint picker at 16 KiB, failing above 1.10x the committed baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if ! command -v valgrind >/dev/null || ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q valgrind nginx >/dev/null
fi
scripts/build.sh >/dev/null
.venv/bin/python bench/bench_instructions.py "$@"
