#!/usr/bin/env bash
# The scheduling-quality benchmark (see bench/sched_quality.py): builds the filter, then runs
# round robin, random and the endpoint picker (both forms) on the same shared-prefix workload
# against live mock vLLM servers, and writes bench/results/scheduling.md. About a minute.
#   bench/sched_quality.sh [--requests N] [--servers N] [--clients N] [--seed N] ...
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh >/dev/null
exec .venv/bin/python bench/sched_quality.py "$@"
