#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, cargo fuzz on nightly) for the given seconds each (default 60),
# then adds the executions to the running totals in docs/fuzzing.json and rewrites
# docs/fuzzing.md. A crash stops the run with the target's output; its input is under
# fuzz/artifacts/<target>/ and becomes a regression test. Not part of CI.
#   scripts/fuzz.sh [seconds] [target ...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo +nightly install cargo-fuzz --locked
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cd fuzz && cargo +nightly fuzz list)
fi
mkdir -p target/fuzz-logs
for target in "${targets[@]}"; do
  log="target/fuzz-logs/$target.log"
  echo "fuzzing $target for ${seconds}s"
  status=0
  (cd fuzz && cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -print_final_stats=1) >"$log" 2>&1 \
    || status=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  crashed=0
  [ "$status" -eq 0 ] || crashed=1
  python3 scripts/fuzz_record.py "$target" "${execs:-0}" "$crashed" "$seconds"
  if [ "$crashed" -ne 0 ]; then
    tail -40 "$log"
    exit 1
  fi
done
cat docs/fuzzing.md
