#!/usr/bin/env python3
"""Instructions Envoy executes per request, per variant and body, counted by valgrind's
callgrind: a deterministic companion to bench/bench.py, whose CPU-time figures swing by
several µs on a shared machine. Each variant's Envoy runs under callgrind with collection off;
after a warm-up, collection is switched on for N sequential requests on one keep-alive
connection, then the counts are dumped and divided by N. Prints a table (instructions per
request and added over plain) and the heaviest functions of our module.

  bench/bench_instructions.sh [--variants plain,noop_dynamic_module,dynamic_module]
                                [--sizes 1KiB,16KiB] [--requests 400]

Slow (Envoy runs about 50× slower under valgrind) and not part of CI.
"""
import argparse
import http.client
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench
from harness import DIST, ENVOY


def envoy_binary():
    """The real binary: the pip package's `envoy` is a Python launcher, which valgrind would
    trace instead."""
    found = sorted(Path(ENVOY).resolve().parent.parent.glob("lib/python3*/site-packages/envoy/_bin/envoy"))
    return str(found[0]) if found else ENVOY


def post(conn, body, send_header):
    headers = {"content-type": "application/json"}
    if send_header:
        headers[bench.HEADER] = bench.MODEL
    conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        sys.exit(f"request answered {response.status}: misrouted")


def count(name, spec, nginx, bodies, requests, work):
    filters, extra_routes, send_header = spec[:3]
    config = bench.envoy_config(filters, extra_routes, nginx.port, None)
    listener_port = bench.free_port()
    config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = listener_port
    config_path = work / f"{name}.json"
    config_path.write_text(json.dumps(config))
    out = work / f"{name}.callgrind"
    env = {"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(DIST), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p",
         envoy_binary(), "-c", str(config_path), "--concurrency", "1", "-l", "warning", "--disable-hot-restart",
         "--base-id", str(listener_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=work)
    results = {}
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", listener_port, timeout=120)
                post(conn, bodies[0][1], send_header)
                break
            except (ConnectionError, OSError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    sys.exit(f"{name}: Envoy under valgrind did not come up")
                time.sleep(1)
        for label, body in bodies:
            for _ in range(max(20, requests // 10)):
                post(conn, body, send_header)
            subprocess.run(["callgrind_control", "--zero", str(proc.pid)], check=True, capture_output=True)
            subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
            for _ in range(requests):
                post(conn, body, send_header)
            subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True)
            before = set(work.glob(f"{name}.callgrind.{proc.pid}.*"))
            # callgrind_control waits for the dump, which happens when Envoy next runs: give it a
            # request (not counted) meanwhile.
            dumping = subprocess.Popen(["callgrind_control", "--dump", str(proc.pid)], stdout=subprocess.DEVNULL)
            while dumping.poll() is None:
                post(conn, body, send_header)
                time.sleep(0.2)
            fresh = set(work.glob(f"{name}.callgrind.{proc.pid}.*")) - before
            dump = max(fresh, key=lambda p: p.stat().st_mtime)
            annotate = subprocess.run(["callgrind_annotate", "--auto=no", "--threshold=100", str(dump)], capture_output=True,
                                      text=True).stdout
            total = int(re.search(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", annotate).group(1).replace(",", ""))
            by_object = {}
            for m in re.finditer(r"^\s*([\d,]+) \([^)]*\)\s+\S.*\[(.+)\]\s*$", annotate, re.M):
                obj = Path(m.group(2)).name
                by_object[obj] = by_object.get(obj, 0) + int(m.group(1).replace(",", ""))
            ours = [line for line in annotate.splitlines() if "payload_processor" in line]
            results[label] = (total / requests, ours[:12], {k: v / requests for k, v in by_object.items()})
            dump.rename(work / f"{name}-{label}.callgrind")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="plain,buffer,noop_dynamic_module,dynamic_module")
    parser.add_argument("--sizes", default="1KiB,16KiB,256KiB")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--out", default=str(bench.RESULTS / "instructions.md"), help="the table ('' for none)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-instructions-"))
    bodies = [(f"{size}-{pos}", bench.chat_body(bench.SIZES[size], pos == "last"))
              for size in args.sizes.split(",") for pos in ("first", "last")]
    nginx = bench.Nginx()
    all_variants = bench.variants()
    table = {}
    try:
        for name in args.variants.split(","):
            print(f"{name} ...", flush=True)
            table[name] = count(name, all_variants[name], nginx, bodies, args.requests, work)
    finally:
        nginx.stop()
    plain = table.get("plain")
    lines = ["# Instructions per request (callgrind)", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · Envoy 1.40.0 `--concurrency 1` under valgrind "
             f"callgrind · {args.requests} sequential requests per body on one connection after a warm-up · "
             "`bench/bench_instructions.py`. Instruction counts are deterministic (CPU time on this shared "
             "machine is not); valgrind counts a `rep movsb` copy once per byte, so copies weigh more here "
             "than on the CPU. *Envoy* is Envoy's own code, *libc* mostly copies and allocation, *unattributed* "
             "code without symbols outside Envoy's binary plus our module's inlined lines.", "",
             "| variant | body | instructions per request | + over plain | Envoy | our module | libc | unattributed |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, results in table.items():
        for label, (per_request, _, objects) in results.items():
            added = f"{per_request - plain[label][0]:+,.0f}" if plain else "–"
            module = sum(v for k, v in objects.items() if "payload_processor" in k)
            libc = sum(v for k, v in objects.items() if k.startswith("libc"))
            envoy = objects.get("envoy", 0)
            rest = per_request - envoy - module - libc
            lines.append(f"| {name} | {label} | {per_request:,.0f} | {added} | {envoy:,.0f} | {module:,.0f} | "
                         f"{libc:,.0f} | {rest:,.0f} |")
    table_text = "\n".join(lines) + "\n"
    print("\n" + table_text)
    if args.out:
        Path(args.out).write_text(table_text)
    for name, results in table.items():
        for label, (_, ours, _) in results.items():
            if ours:
                print(f"\n{name} {label}: our module's heaviest functions (instructions over {args.requests} requests)")
                print("\n".join(ours))
    print(f"\ncallgrind files: {work}")


if __name__ == "__main__":
    main()
