#!/usr/bin/env bash
# Instruction counts (callgrind) of each PII recognizer on 48 KiB of digit-heavy prose, for this
# tree and a baseline commit built side by side, with the ratio: a speed check that machine
# noise cannot move. Usage: bench/pii_instructions.sh [BASELINE_COMMIT] (default 9599f99,
# before issue 18). Needs valgrind. Prints a markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
baseline=${1:-9599f99}
work=$(mktemp -d)
trap 'git worktree remove --force "$work/baseline" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git worktree add --detach "$work/baseline" "$baseline" >/dev/null 2>&1
# The same harness for both trees: this tree's pii_scan, minus what the baseline lacks.
sed -e 's/use payload_processor_plugins::pii::{drop_overlapped, Entity, Text};/use payload_processor_plugins::pii::{Entity, Text};/' \
    -e '/drop_overlapped(&mut found/d' plugins/examples/pii_scan.rs > "$work/baseline/plugins/examples/pii_scan.rs"
export CARGO_PROFILE_RELEASE_DEBUG=true CARGO_PROFILE_RELEASE_STRIP=false
(cd "$work/baseline" && CARGO_TARGET_DIR="$work/target-baseline" cargo build --release --quiet --example pii_scan -p payload-processor-plugins)
CARGO_TARGET_DIR="$work/target-current" cargo build --release --quiet --example pii_scan -p payload-processor-plugins
python3 - "$work/prose.jsonl" <<'PY'
import json, sys
clean = ("In Q3 2024 revenue grew 12.5% to 4,210,000 USD; release v2.14.3 shipped on 2024-09-30 at 10:22 and "
         "order 58213377 is still open. Please summarise the quarterly report, list the three largest risks and "
         "suggest next steps. ")
pii = "Contact jane.doe@example.com or (415) 555-0100, card 4111 1111 1111 1111. "
text = ""
while len(text) < 16384:
    if len(text) % 4096 < len(clean) and text:
        text += pii
    text += clean
open(sys.argv[1], "w").write("\n".join(json.dumps({"text": text[:16384]}) for _ in range(3)) + "\n")
PY
count() {
  valgrind --tool=callgrind --callgrind-out-file="$work/cg.$1.$2" "--toggle-collect=*pii::*::$2 as *Recognizer*::find*" \
    "$work/target-$1/release/examples/pii_scan" < "$work/prose.jsonl" > /dev/null 2>&1
  callgrind_annotate "$work/cg.$1.$2" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'
}
echo "| recognizer | $baseline instructions | current instructions | ratio |"
echo "|---|---:|---:|---:|"
for recognizer in Email Phone CreditCard UsSsn Iban IpAddress Secret; do
  before=$(count baseline "$recognizer")
  after=$(count current "$recognizer")
  python3 -c "print(f'| $recognizer | {$before:,} | {$after:,} | {$after / $before:.2f} |')"
done
