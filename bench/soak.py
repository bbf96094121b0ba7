#!/usr/bin/env python3
"""Soak: >= 1 million requests through Envoy (--concurrency 1) with each form of the filter on a
chain that exercises everything per request (routing, pii-guard on requests and responses,
prompt-guard, token usage on buffered and streamed answers), in batches of 100,000 rotating
through 1 KiB, 16 KiB and 64 KiB chat requests and 1 KiB requests answered with an event
stream. After each batch: Envoy's RSS (/proc/<pid>/status) and, for wasm, the VM's linear
memory (gauge payload_processor.wasm_memory_bytes). Every request must succeed. Writes
docs/soak.md. Run bench/soak.sh, not this file."""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
from bench import TOOLS, Nginx, chat_body
from harness import Envoy, bootstrap, cluster, processor_filter

BATCH = 100_000
CHAIN = """
limits: {maxRequestBodyBytes: 1048576, maxResponseBodyBytes: 1048576}
processors:
  - {name: route, type: body-field-to-header}
  - {name: pii, type: pii-guard, parameters: {action: Mask, direction: Both}}
  - {name: prompt, type: prompt-guard, parameters: {builtin: [prompt-injection], deny: [{name: words, keywords: [bluebird]}]}}
  - {name: usage, type: token-usage, failureMode: FailOpen}
"""
CHUNK = ('{"id":"c1","object":"chat.completion.chunk","created":1,"model":"llama-3-8b",'
         '"choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}]}')
STREAM = "".join(f"data: {CHUNK % word}\n\n" for word in
                 "Hello there , write to jane@example.com or call 415 555 0100 please ".split()) + \
    'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"llama-3-8b","choices":[],' \
    '"usage":{"prompt_tokens":5,"completion_tokens":9,"total_tokens":14}}\n\ndata: [DONE]\n\n'
LOCATIONS = f"location = /v1/stream/chat/completions {{ default_type text/event-stream; return 200 '{STREAM}'; }}"
PLAN = [("1KiB chat", 1024, "/v1/chat/completions"), ("16KiB chat", 16 * 1024, "/v1/chat/completions"),
        ("64KiB chat", 64 * 1024, "/v1/chat/completions"), ("1KiB stream", 1024, "/v1/stream/chat/completions")]


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run_batch(url, body_path, count):
    out = subprocess.run([str(TOOLS / "oha"), "-n", str(count), "-c", "16", "--no-tui", "--output-format", "json",
                          "-m", "POST", "-D", str(body_path), "-H", "content-type: application/json", url],
                         capture_output=True, text=True, timeout=3600)
    report = json.loads(out.stdout)
    codes = report.get("statusCodeDistribution", {})
    return sum(codes.values()), codes, report["summary"]["requestsPerSec"]


def soak(form, total, batch_size, nginx, work):
    config = bootstrap([processor_filter(form, CHAIN)],
                       [{"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": "30s"}}],
                       [cluster("upstream", nginx.port)])
    config["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] = 2 * 1024 * 1024
    envoy = Envoy(config, log_level="warning").wait_ready()
    rows = []
    try:
        done = 0
        batch = 0
        while done < total:
            label, size, path = PLAN[batch % len(PLAN)]
            body = work / f"{size}.json"
            body.write_bytes(chat_body(size, True))
            count, codes, rps = run_batch(envoy.url(path), body, min(batch_size, total - done))
            bad = {code: n for code, n in codes.items() if not str(code).startswith("2")}
            if bad or count == 0:
                sys.exit(f"{form}: batch {batch} ({label}) had failures: {codes}")
            done += count
            stats = envoy.stats("wasm_memory_bytes") if form == "wasm" else {}
            vm = next(iter(stats.values()), None)
            rows.append({"requests": done, "batch": label, "rps": round(rps), "rss_kib": rss_kib(envoy.proc.pid),
                         "wasm_memory_bytes": vm})
            print(f"{form}: {done:>9,} requests ({label}, {rps:,.0f}/s)  Envoy RSS {rows[-1]['rss_kib'] / 1024:.1f} MiB"
                  + (f"  VM memory {vm / 1048576:.1f} MiB" if vm else ""), flush=True)
            batch += 1
    finally:
        envoy.stop()
    return rows


def verdict(rows):
    """Drift of RSS after warm-up (the first round of the plan): max over the first sample after it."""
    warm = rows[len(PLAN):] or rows
    base = warm[0]["rss_kib"]
    drift = (max(r["rss_kib"] for r in warm) - base) / base * 100
    return base, drift


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1_200_000)
    parser.add_argument("--forms", default="dynamic-module,wasm")
    parser.add_argument("--batch", type=int, default=BATCH, help="requests between samples")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    nginx = Nginx(LOCATIONS)
    results = {}
    try:
        for form in args.forms.split(","):
            results[form] = soak(form, args.requests, args.batch, nginx, work)
    finally:
        nginx.stop()
    lines = ["# Soak", "",
             f"{datetime.now(timezone.utc):%Y-%m-%d} · `bench/soak.sh` · Envoy 1.40.0 `--concurrency 1` · nginx upstream "
             "· oha, 16 connections · chain: routing, pii-guard (Mask, both directions), prompt-guard (injection set + "
             "keywords), token-usage · batches of 100,000 rotating 1 KiB / 16 KiB / 64 KiB chat requests and 1 KiB "
             "requests answered with an event stream · every request answered 200.", ""]
    for form, rows in results.items():
        base, drift = verdict(rows)
        lines += [f"## {form}", "",
                  f"RSS after warm-up {base / 1024:.1f} MiB; largest growth after it {drift:+.1f}% (target: within 5%).",
                  "", "| requests | batch | req/s | Envoy RSS MiB | wasm VM memory MiB |", "|---:|---|---:|---:|---:|"]
        for r in rows:
            vm = f"{r['wasm_memory_bytes'] / 1048576:.1f}" if r["wasm_memory_bytes"] else "–"
            lines.append(f"| {r['requests']:,} | {r['batch']} | {r['rps']:,} | {r['rss_kib'] / 1024:.1f} | {vm} |")
        lines.append("")
    text = "\n".join(lines)
    if args.requests >= 1_000_000:  # only full runs are the record
        (ROOT / "docs").mkdir(exist_ok=True)
        (ROOT / "docs" / "soak.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
