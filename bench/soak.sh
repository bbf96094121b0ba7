#!/usr/bin/env bash
# Soak test (not part of CI): drives >= 1 million requests of mixed sizes and event streams
# through Envoy with each form of the filter, sampling Envoy's RSS (and the wasm VM's memory)
# every 100,000 requests. Writes docs/soak.md. About 15 minutes on 2 cores.
#   bench/soak.sh [--requests N] [--forms dynamic-module,wasm]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q nginx >/dev/null
fi
if [ ! -x target/tools/bin/oha ]; then
  cargo install oha --version 1.16.0 --locked --root target/tools
fi
scripts/build.sh
.venv/bin/python bench/soak.py "$@"
