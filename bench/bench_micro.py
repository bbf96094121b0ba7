#!/usr/bin/env python3
"""Prints (and writes to bench/results/micro.md) the criterion results of bench/benches/engine_path.rs:
per body size, each case's median time per request, throughput, the time it adds over the engine
with nothing to run, and how it compares with the floor (a full serde_json parse of the body)."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CRITERION = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "target" / "bench" / "criterion"
OUT = ROOT / "bench" / "results" / "micro.md"


def results():
    """{group: {function: (median ns, bytes per iteration)}} from criterion's output files."""
    table = {}
    for meta_file in CRITERION.glob("**/new/benchmark.json"):
        meta = json.loads(meta_file.read_text())
        estimates = json.loads((meta_file.parent / "estimates.json").read_text())
        throughput = (meta.get("throughput") or {}).get("Bytes")
        table.setdefault(meta["group_id"], {})[meta["function_id"]] = (estimates["median"]["point_estimate"], throughput)
    return table


def size_key(group):
    label = group.rsplit("/", 1)[-1]
    return int(label.rstrip("KiB")) if label.endswith("KiB") else 0


def render(table):
    lines = ["# Engine path micro-benchmarks (criterion, median per request, one core)", ""]
    for group in sorted(table, key=size_key):
        rows = table[group]
        base = rows.get("engine_no_match", (None,))[0]
        floor = rows.get("floor/serde_parse", (None,))[0]
        lines += [f"## {group}", "",
                  "| case | median µs | MB/s | added over engine_no_match µs | × serde parse floor |",
                  "|---|---:|---:|---:|---:|"]
        for name, (ns, size) in sorted(rows.items(), key=lambda item: (not item[0].startswith("floor"), item[1][0])):
            mbps = f"{size / ns * 1e3:.0f}" if size else ""
            added = f"{(ns - base) / 1e3:+.2f}" if base and not name.startswith(("floor", "engine")) else ""
            ratio = f"{ns / floor:.2f}" if floor else ""
            lines.append(f"| {name} | {ns / 1e3:.2f} | {mbps} | {added} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def main():
    table = results()
    if not table:
        sys.exit(f"no criterion results under {CRITERION}; run bench/bench_micro.sh")
    text = render(table)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
