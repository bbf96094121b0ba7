#!/usr/bin/env bash
# The main job: build the filter, start Envoy on the bundled demo config with local mock model
# servers, and show body-based routing at work. `scripts/demo.sh --serve` keeps it running.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
scripts/build.sh >/dev/null
exec .venv/bin/python scripts/demo.py "$@"
