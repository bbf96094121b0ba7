#!/usr/bin/env python3
"""Instructions Envoy executes per request, per variant and body, counted by valgrind's
callgrind: a deterministic companion to bench/bench.py, whose CPU-time figures swing by
several µs on a shared machine. Each variant's Envoy runs under callgrind with collection off;
after a warm-up, collection is switched on for N sequential requests on one keep-alive
connection, then the counts are dumped and divided by N. Only the worker thread is counted
(`--separate-threads`), so the main thread's timers (the endpoint picker's scrapes, stats) do
not blur a request's count. Prints a table (instructions per request and added over plain) and
the heaviest functions of our module (named when --module-dir holds a build with symbols:
`cargo build --profile profiling`).

  bench/bench_instructions.sh [--variants plain,noop_dynamic_module,dynamic_module]
                                [--sizes 1KiB,16KiB] [--requests 400]
  bench/bench_instructions.sh --short      # CI: one body size, our module against the baseline

`--short` counts the routing chain, the guard chain and the endpoint picker at 16 KiB with
`model` last and fails when our module's instructions per request exceed the committed
baseline (bench/results/instructions.json) by more than 10%.
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


# Where Envoy finds libpayload_processor.so: dist/, or a build with symbols (--module-dir).
MODULE_DIR = DIST


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


def annotate(dump):
    """callgrind_annotate's per-function lines of one dump."""
    return subprocess.run(["callgrind_annotate", "--auto=no", "--threshold=100", str(dump)], capture_output=True,
                          text=True).stdout


def self_cost_by_object(dump):
    """Instructions executed in each object file (self cost), read from the dump itself:
    callgrind_annotate names the object only on some lines of inlined functions."""
    names, costs, current, skip_next = {}, {}, None, False
    with open(dump) as lines:
        for line in lines:
            if skip_next:  # the line after `calls=` carries the call's inclusive cost
                skip_next = False
                continue
            if line.startswith(("ob=", "cob=")):  # the two share one table of compressed names
                ref = re.match(r"c?ob=(\((\d+)\))?\s*(.*)", line.strip())
                if ref.group(2) and ref.group(3):
                    names[ref.group(2)] = ref.group(3)
                if line.startswith("ob="):
                    current = names.get(ref.group(2), ref.group(3)) if ref.group(2) else ref.group(3)
            elif line.startswith("calls="):
                skip_next = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                parts = line.split()
                if len(parts) >= 2 and current is not None:
                    costs[current] = costs.get(current, 0) + int(parts[1])
    return {Path(name).name: cost for name, cost in costs.items()}


def count(name, spec, nginx, bodies, requests, work):
    filters, extra_routes, send_header = spec[:3]
    config = bench.envoy_config(filters, extra_routes, nginx.port, None)
    listener_port = bench.free_port()
    config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = listener_port
    config_path = work / f"{name}.json"
    text = json.dumps(config).replace("{{EPP_ENDPOINTS}}", ", ".join(f"'127.0.0.1:{port}'" for port in nginx.ports))
    wasm = MODULE_DIR / "payload_processor.wasm"
    if wasm.exists():  # the .wasm next to the .so of --module-dir
        text = text.replace(str(DIST / "payload_processor.wasm"), str(wasm))
    config_path.write_text(text)
    out = work / f"{name}.callgrind"
    env = {"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(MODULE_DIR), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
         f"--callgrind-out-file={out}.%p", envoy_binary(), "-c", str(config_path), "--concurrency", "1",
         "-l", "warning", "--disable-hot-restart", "--base-id", str(listener_port)],
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
            before = set(work.glob(f"{name}.callgrind.{proc.pid}*"))
            # callgrind_control waits for the dump, which happens when Envoy next runs: give it a
            # request (not counted) meanwhile.
            dumping = subprocess.Popen(["callgrind_control", "--dump", str(proc.pid)], stdout=subprocess.DEVNULL)
            while dumping.poll() is None:
                post(conn, body, send_header)
                time.sleep(0.2)
            fresh = set(work.glob(f"{name}.callgrind.{proc.pid}*")) - before
            # One file per thread: the worker is the one that ran the requests.
            by_thread = [(self_cost_by_object(dump), dump) for dump in fresh]
            by_object, dump = max(by_thread, key=lambda found: sum(found[0].values()))
            total = sum(by_object.values())
            text = annotate(dump)
            ours = [line for line in text.splitlines() if "payload_processor" in line]
            results[label] = (total / requests, ours[:15], {k: v / requests for k, v in by_object.items()})
            dump.rename(work / f"{name}-{label}.callgrind")
            for other in fresh - {dump}:
                other.unlink()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return results


def split(per_request, objects):
    """Envoy's own code, our module, libc and the rest, per request."""
    module = sum(v for k, v in objects.items() if "payload_processor" in k)
    libc = sum(v for k, v in objects.items() if k.startswith("libc"))
    envoy = objects.get("envoy", 0)
    return envoy, module, libc, per_request - envoy - module - libc


SHORT_VARIANTS = "dynamic_module,guards_dynamic_module,epp_dynamic_module"
SHORT_BODY = "16KiB-last"
BASELINE = bench.RESULTS / "instructions.json"
TOLERANCE = 1.10


def vector_extensions():
    """The CPU's vector extensions that change which code memchr and friends run (and so the
    counts): a baseline only gates a machine that has the same."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return sorted(flags & {"sse4_2", "avx", "avx2", "avx512f", "avx512bw", "bmi2"})


def check(table, baseline_path):
    """Fails (exit 1) when our module's count in any variant rose more than 10% above the
    committed baseline; prints the ratios either way."""
    baseline = json.loads(Path(baseline_path).read_text())
    comparable = baseline.get("cpu", {}).get("vector_extensions") == vector_extensions()
    failed = []
    print(f"\nour module's instructions per request against {baseline_path} (gate: {TOLERANCE:.2f}x)")
    if not comparable:
        print(f"  the baseline was counted on a CPU with vector extensions {baseline.get('cpu')}, this one has "
              f"{vector_extensions()}: other code paths run, so the ratios are shown, not gated")
    for name, results in table.items():
        for label, (per_request, _, objects) in results.items():
            module = split(per_request, objects)[1]
            known = baseline.get(name, {}).get(label)
            if known is None:
                print(f"  {name} {label}: {module:,.0f} (no baseline)")
                continue
            ratio = module / known["module"] if known["module"] else float("inf")
            verdict = "ok" if ratio <= TOLERANCE else "REGRESSION"
            print(f"  {name} {label}: {module:,.0f} vs {known['module']:,.0f} = {ratio:.2f}x {verdict}")
            if ratio > TOLERANCE:
                failed.append(f"{name} {label}")
    if failed and comparable:
        sys.exit("instruction count regression over 10%: " + ", ".join(failed))


def main():
    global MODULE_DIR
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="plain,buffer,noop_dynamic_module,dynamic_module,"
                        "guards_dynamic_module,epp_dynamic_module")
    parser.add_argument("--sizes", default="1KiB,16KiB,256KiB")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--module-dir", default=str(DIST), help="where libpayload_processor.so is")
    parser.add_argument("--out", default=str(bench.RESULTS / "instructions.md"), help="the table ('' for none)")
    parser.add_argument("--json", default=str(BASELINE), help="per-request counts as JSON ('' for none)")
    parser.add_argument("--short", action="store_true",
                        help=f"{SHORT_VARIANTS} at {SHORT_BODY}, checked against the baseline; writes nothing")
    parser.add_argument("--check", default="", help="a baseline JSON to gate against (--short: the committed one)")
    args = parser.parse_args()
    MODULE_DIR = Path(args.module_dir).resolve()
    if args.short:
        args.variants, args.out, args.json = SHORT_VARIANTS, "", ""
        args.requests = min(args.requests, 60)
        args.check = args.check or str(BASELINE)
    work = Path(tempfile.mkdtemp(prefix="bench-instructions-"))
    bodies = [(f"{size}-{pos}", bench.chat_body(bench.SIZES[size], pos == "last"))
              for size in args.sizes.split(",") for pos in ("first", "last")]
    if args.short:
        bodies = [(label, body) for label, body in bodies if label == SHORT_BODY] or [
            (SHORT_BODY, bench.chat_body(bench.SIZES["16KiB"], True))]
    nginx = bench.Nginx(bench.EPP_LOCATION, extra_ports=bench.EPP_PORTS - 1)
    all_variants = bench.variants()
    table = {}
    try:
        for name in args.variants.split(","):
            print(f"{name} ...", flush=True)
            try:
                table[name] = count(name, all_variants[name], nginx, bodies, args.requests, work)
            except SystemExit as failure:
                if args.short:
                    raise
                print(f"{name}: left out ({failure})", flush=True)
    finally:
        nginx.stop()
    plain = table.get("plain")
    lines = ["# Instructions per request (callgrind)", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · Envoy 1.40.0 `--concurrency 1` under valgrind "
             f"callgrind · {args.requests} sequential requests per body on one connection after a warm-up, the "
             "worker thread only · `bench/bench_instructions.py`. Instruction counts are deterministic (CPU time "
             "on this shared machine is not); valgrind counts a `rep movsb` copy once per byte, so copies weigh "
             "more here than on the CPU. *Envoy* is Envoy's own code, *libc* mostly copies and allocation, "
             "*unattributed* code without symbols outside Envoy's binary plus our module's inlined lines.", "",
             "| variant | body | instructions per request | + over plain | Envoy | our module | libc | unattributed |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    counts = {"cpu": {"vector_extensions": vector_extensions()}}
    for name, results in table.items():
        for label, (per_request, _, objects) in results.items():
            added = f"{per_request - plain[label][0]:+,.0f}" if plain else "–"
            envoy, module, libc, rest = split(per_request, objects)
            counts.setdefault(name, {})[label] = {"total": round(per_request), "module": round(module),
                                                  "libc": round(libc), "envoy": round(envoy)}
            lines.append(f"| {name} | {label} | {per_request:,.0f} | {added} | {envoy:,.0f} | {module:,.0f} | "
                         f"{libc:,.0f} | {rest:,.0f} |")
    table_text = "\n".join(lines) + "\n"
    print("\n" + table_text)
    if args.out:
        Path(args.out).write_text(table_text)
    if args.json:
        Path(args.json).write_text(json.dumps(counts, indent=1, sort_keys=True) + "\n")
    for name, results in table.items():
        for label, (_, ours, _) in results.items():
            if ours:
                print(f"\n{name} {label}: our module's heaviest functions (instructions over {args.requests} requests)")
                print("\n".join(ours))
    print(f"\ncallgrind files: {work}")
    if args.check:
        check(table, args.check)


if __name__ == "__main__":
    main()
