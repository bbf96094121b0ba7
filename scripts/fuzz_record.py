#!/usr/bin/env python3
"""Adds one fuzz run to docs/fuzzing.json (running totals per target) and rewrites docs/fuzzing.md.
Usage: fuzz_record.py TARGET EXECUTIONS CRASHED(0/1) SECONDS"""
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "docs" / "fuzzing.json"
TABLE = ROOT / "docs" / "fuzzing.md"
WHAT = {
    "config": "chain config (YAML and JSON) parsing and building; a config that loads loads again the same",
    "lazy_json": "the lazy field reader agrees with a full serde_json parse on valid objects",
    "body_mutation": "body-mutation, prompt-decorator, model-rewrite through the engine; a changed body is JSON with its length",
    "sse_split": "SSE parsing gives the same events however the bytes are split",
    "prometheus": "endpoint-picker metrics reader: an answer in range or an error on any page",
    "recognizers": "each PII recognizer: ordered, non-overlapping, in-bounds spans on char boundaries",
    "pii_mask": "pii-guard Mask through the engine: no recognized value left in what goes upstream",
    "multipart": "json-to-multipart: well-formed multipart (no stray boundary), matching length",
}


def main():
    target, execs, crashed, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
    data = json.loads(DATA.read_text()) if DATA.exists() else {}
    row = data.setdefault(target, {"executions": 0, "seconds": 0, "runs": 0, "crashes": 0, "fixed": []})
    row["executions"] += execs
    row["seconds"] += seconds
    row["runs"] += 1
    row["crashes"] += int(crashed)
    row["last_run"] = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    DATA.parent.mkdir(parents=True, exist_ok=True)
    DATA.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    lines = ["# Fuzzing", "",
             "`scripts/fuzz.sh [seconds] [target ...]` runs the targets in `fuzz/` (cargo fuzz, libFuzzer) and adds "
             "to these totals. Every target checks properties, not only the absence of panics. A crash becomes a "
             "regression test and is listed under *found and fixed*.", "",
             "| target | checks | executions (total) | fuzzing time | crashes found | found and fixed |",
             "|---|---|---:|---:|---:|---|"]
    for name in sorted(data):
        r = data[name]
        lines.append(f"| `{name}` | {WHAT.get(name, '')} | {r['executions']:,} | {r['seconds'] / 60:.0f} min | "
                     f"{r['crashes']} | {'; '.join(r['fixed']) or '–'} |")
    TABLE.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
