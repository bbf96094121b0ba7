#!/usr/bin/env python3
"""Side-by-side benchmark: what body-based routing costs in Envoy 1.40 with our filter (both
forms) against what a user would pick instead, measured back to back in one run.

Every variant serves the same route table: requests whose `x-gateway-model-name` is the model go
to nginx (a fixed reply), anything else gets a 404 from Envoy, so a request routed wrongly shows
up as a non-2xx. Envoy runs with `--concurrency 1`. For each variant, body size and `model`
position it measures, over repeats:
  * requests/s at fixed concurrency (wrk, closed loop) and Envoy's CPU per request from
    /proc/<pid>/task/*/schedstat summed over threads (and the ext_proc server's);
  * p50/p99 latency at a fixed open-loop rate (oha with latency correction).
Writes bench/results/latest.{md,json,svg} and prints the table. `bench/bench.sh` installs the
tools and builds what this needs; run it, not this file.
"""
import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
from harness import Envoy, bootstrap, cluster, processor_filter

RESULTS = ROOT / "bench" / "results"
TOOLS = ROOT / "target" / "tools" / "bin"
BENCH_BIN = ROOT / "target" / "bench" / "release"
MODEL = "llama-3-8b"
HEADER = "x-gateway-model-name"
SIZES = {"1KiB": 1024, "16KiB": 16 * 1024, "256KiB": 256 * 1024, "1MiB": 1024 * 1024}
# Open-loop rates per size: well under what the slowest variant sustains on 2 shared cores, so
# latency shows the cost of a request, not queueing.
RATES = {"1KiB": 1000, "16KiB": 1000, "256KiB": 200, "1MiB": 50}
ROUTE_CHAIN = "processors:\n  - {name: route-by-model, type: body-field-to-header}\n"
# The filter loaded with nothing to do on these requests (its one processor matches another
# path): the fixed cost of having the filter at all ("noop_*" variants, client sends the header).
NOOP_CHAIN = ("processors:\n  - {name: route-by-model, type: body-field-to-header, "
              "match: {pathPrefixes: [/never]}}\n")
# The guard chain of the guardrails issue: routing, then pii-guard (all recognizers, masking) and
# prompt-guard (100 keywords, 20 regexes, the prompt-injection set) on the prompt.
GUARD_KEYWORDS = ", ".join(f"'forbidden phrase {i}'" for i in range(100))
GUARD_REGEXES = ", ".join("{name: r%d, regex: '\\bproject[-_ ]?%d[a-z]{2}[0-9]{4}\\b', caseInsensitive: true}" % (i, i)
                          for i in range(20))
# A streamed answer (text/event-stream from nginx, one event per word, usage at the end) read by
# token-usage event by event: the "stream_*" variants, compared with stream_plain.
USAGE_CHAIN = ROUTE_CHAIN + "  - {name: usage, type: token-usage}\n"
STREAM_PATH = "/v1/stream/chat/completions"
STREAM_CHUNK = ('{"id":"c1","object":"chat.completion.chunk","created":1,"model":"llama-3-8b",'
                '"choices":[{"index":0,"delta":{"content":"%s "},"finish_reason":null}]}')
STREAM_REPLY = "".join("data: " + STREAM_CHUNK % word + "\n\n" for word in (
    "The quarterly report shows steady growth across all regions with three notable risks").split()) + (
    'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"llama-3-8b","choices":[],'
    '"usage":{"prompt_tokens":12,"completion_tokens":13,"total_tokens":25}}\n\ndata: [DONE]\n\n')
STREAM_LOCATION = f"location = {STREAM_PATH} {{ default_type text/event-stream; return 200 '{STREAM_REPLY}'; }}"
GUARD_CHAIN = (ROUTE_CHAIN
               + "  - {name: pii, type: pii-guard, parameters: {direction: Request}}\n"
               + "  - {name: prompt, type: prompt-guard, parameters: {builtin: [prompt-injection], deny: ["
               + f"{{name: phrases, keywords: [{GUARD_KEYWORDS}], caseInsensitive: true}}, {GUARD_REGEXES}]}}}}\n")
# The endpoint picker (variants "epp_*"): routing, then the picker over four endpoints (nginx on
# four ports, each serving fixed vLLM metrics), scraped every 50 ms through an ORIGINAL_DST
# cluster that then carries the request to the pick. Compare with dynamic_module / wasm
# (routing alone) and ext_proc (the price of one sidecar hop, which GIE's endpoint picker pays).
EPP_PORTS = 4
EPP_METRICS = "vllm:num_requests_waiting 0\\nvllm:num_requests_running 1\\nvllm:kv_cache_usage_perc 0.1\\n"
EPP_LOCATION = f"location = /metrics {{ default_type text/plain; return 200 '{EPP_METRICS}'; }}"
EPP_CHAIN = (ROUTE_CHAIN
             + "  - {name: epp, type: endpoint-picker, parameters: {endpoints: [{{EPP_ENDPOINTS}}], "
             + "metricsCluster: pool, staleAfter: 1s}}\n")
# One moderation callout per request (variants "callout_*"): the openai-moderation processor in
# process (both forms), against the same job done by an ext_proc sidecar that calls the same
# service (bench-extproc-server --moderate). The service is nginx with a fixed "not flagged"
# answer, so what differs is the hop, not the model.
MODERATION_CHAIN = "processors:\n  - {name: moderate, type: openai-moderation, parameters: {cluster: moderation}}\n"
MODERATION_REPLY = ('{"id":"modr-bench","model":"omni-moderation-latest","results":[{"flagged":false,'
                    '"categories":{"harassment":false,"violence":false},'
                    '"category_scores":{"harassment":0.001,"violence":0.001}}]}')
MODERATION_LOCATION = f"location = /v1/moderations {{ default_type application/json; return 200 '{MODERATION_REPLY}'; }}"
NGINX_REPLY = ('{"id":"chatcmpl-bench","object":"chat.completion","model":"llama-3-8b","choices":[{"index":0,'
               '"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
               '"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}')

LUA_ROUTER = """
function envoy_on_request(handle)
  local body = handle:body()
  if body == nil then return end
  local model = string.match(body:getBytes(0, body:length()), '"model"%s*:%s*"([^"]*)"')
  if model ~= nil then
    handle:headers():replace("x-gateway-model-name", model)
    handle:clearRouteCache()
  end
end
"""


# Envoy gets a core of its own; the load generators, nginx and the ext_proc server share the
# other. Without this the scheduler moves them about and the CPU a request costs Envoy (cache
# misses, migrations) swings by more than the differences being measured.
ENVOY_CPU, LOAD_CPU = "1", "0"
PIN = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None


def pin(pid, cpu):
    """Moves every thread of `pid` to `cpu`."""
    if PIN:
        subprocess.run(["taskset", "-a", "-cp", cpu, str(pid)], check=True, stdout=subprocess.DEVNULL)


def on_load_cpu(args):
    return (["taskset", "-c", LOAD_CPU] if PIN else []) + args


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chat_body(size, model_last):
    """An OpenAI chat request of `size` bytes (padded exactly), `model` first or last."""
    def build(pad):
        messages = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "Summarise the report and list the risks. " + "x" * pad}]
        fields = [("messages", messages), ("max_tokens", 256), ("stream", False)]
        fields = fields + [("model", MODEL)] if model_last else [("model", MODEL)] + fields
        return json.dumps(dict(fields), separators=(",", ":")).encode()
    return build(max(0, size - len(build(0))))


def cpu_ns(pid):
    """CPU time of every thread of `pid`, in nanoseconds (first field of schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended between listing and reading
    return total


class Nginx:
    """nginx from Debian answering every request with a fixed chat completion (`locations`:
    more nginx location blocks, e.g. a fixed event stream)."""

    def __init__(self, locations="", extra_ports=0):
        self.dir = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
        self.port = free_port()
        self.ports = [self.port] + [free_port() for _ in range(extra_ports)]
        listens = " ".join(f"listen 127.0.0.1:{port};" for port in self.ports)
        temp = self.dir / "tmp"
        temp.mkdir()
        (self.dir / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {temp}/body; proxy_temp_path {temp}/proxy; fastcgi_temp_path {temp}/fcgi;
  uwsgi_temp_path {temp}/uwsgi; scgi_temp_path {temp}/scgi;
  client_max_body_size 8m;
  client_body_buffer_size 2m;
  keepalive_requests 10000000;
  server {{
    {listens}
    location / {{ default_type application/json; return 200 '{NGINX_REPLY}'; }}
    {locations}
  }}
}}
""")
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen(on_load_cpu([nginx, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")]),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc, "nginx")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


class ExtProcServer:
    """The gRPC ext_proc server (bench/extproc-server): the body router, or with `extra` args
    (`--moderate URL`) the moderation sidecar."""

    def __init__(self, extra=()):
        self.port = free_port()
        self.proc = subprocess.Popen(on_load_cpu([str(BENCH_BIN / "bench-extproc-server"), f"127.0.0.1:{self.port}",
                                                  *extra]),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc, "ext_proc server")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def wait_port(port, proc, what, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port}")


def routes(extra_first=()):
    return list(extra_first) + [
        {"match": {"prefix": "/", "headers": [{"name": HEADER, "string_match": {"exact": MODEL}}]},
         "route": {"cluster": "upstream", "timeout": "30s"}},
        {"match": {"prefix": "/"}, "direct_response": {"status": 404, "body": {"inline_string": "misrouted"}}},
    ]


def variants():
    """name -> (http filters, extra routes, whether the client itself sends the model header[, path])."""
    ext_proc = {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "extproc"}, "timeout": "5s"},
            "message_timeout": "5s",
            "processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SKIP",
                                "request_body_mode": "BUFFERED", "response_body_mode": "NONE",
                                "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"},
        },
    }
    json_to_metadata = {
        "name": "envoy.filters.http.json_to_metadata",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
            "request_rules": {"rules": [{"selectors": [{"key": "model"}],
                                         "on_present": {"metadata_namespace": "bench", "key": "model"}}]},
        },
    }
    metadata_route = {"match": {"prefix": "/", "dynamic_metadata": [{
        "filter": "bench", "path": [{"key": "model"}], "value": {"string_match": {"exact": MODEL}}}]},
        "route": {"cluster": "upstream", "timeout": "30s"}}
    pool_route = {"match": {"prefix": "/", "headers": [{"name": HEADER, "string_match": {"exact": MODEL}}]},
                  "route": {"cluster": "pool", "timeout": "30s"}}
    return {
        "plain": ([], [], True),
        "buffer": ([{"name": "envoy.filters.http.buffer", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
            "max_request_bytes": 8 * 1024 * 1024}}], [], True),
        "json_to_metadata": ([json_to_metadata], [metadata_route], False),
        "lua": ([{"name": "envoy.filters.http.lua", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": LUA_ROUTER}}}], [], False),
        "ext_proc": ([ext_proc], [], False),
        "wasm": ([processor_filter("wasm", ROUTE_CHAIN)], [], False),
        "dynamic_module": ([processor_filter("dynamic-module", ROUTE_CHAIN)], [], False),
        "noop_wasm": ([processor_filter("wasm", NOOP_CHAIN)], [], True),
        "noop_dynamic_module": ([processor_filter("dynamic-module", NOOP_CHAIN)], [], True),
        "guards_wasm": ([processor_filter("wasm", GUARD_CHAIN)], [], False),
        "guards_dynamic_module": ([processor_filter("dynamic-module", GUARD_CHAIN)], [], False),
        "stream_plain": ([], [], True, STREAM_PATH),
        "stream_usage_wasm": ([processor_filter("wasm", USAGE_CHAIN)], [], False, STREAM_PATH),
        "stream_usage_dynamic_module": ([processor_filter("dynamic-module", USAGE_CHAIN)], [], False, STREAM_PATH),
        "epp_wasm": ([processor_filter("wasm", EPP_CHAIN)], [pool_route], False),
        "epp_dynamic_module": ([processor_filter("dynamic-module", EPP_CHAIN)], [pool_route], False),
        "callout_dynamic_module": ([processor_filter("dynamic-module", MODERATION_CHAIN)], [], True),
        "callout_wasm": ([processor_filter("wasm", MODERATION_CHAIN)], [], True),
        "callout_ext_proc": ([ext_proc], [], True),
    }


def envoy_config(filters, extra_routes, nginx_port, extproc_port):
    clusters = [cluster("upstream", nginx_port), cluster("moderation", nginx_port), {
        "name": "pool", "connect_timeout": "2s", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
        "original_dst_lb_config": {"use_http_header": True, "http_header_name": "x-gateway-destination-endpoint"}}]
    if extproc_port:
        grpc = cluster("extproc", extproc_port)
        grpc["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
        clusters.append(grpc)
    config = bootstrap(filters, routes(extra_routes), clusters)
    # Every variant may buffer a 1 MiB body: the same, ample per-connection limit for all.
    config["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] = 8 * 1024 * 1024
    return config


WRK_SCRIPT = """
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local header = os.getenv("BENCH_MODEL_HEADER")
if header ~= nil and header ~= "" then wrk.headers["X-Gateway-Model-Name"] = header end
"""


def run_wrk(url, body_path, send_header, seconds, connections, script):
    env = dict(os.environ, BENCH_BODY=str(body_path), BENCH_MODEL_HEADER=MODEL if send_header else "")
    out = subprocess.run(on_load_cpu(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url]),
                         capture_output=True, text=True, env=env, timeout=seconds + 60).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return requests, rps, non_2xx, errors


def run_oha(url, body_path, send_header, seconds, rate):
    """p50 and p99 in ms at a fixed rate, and the count of non-2xx answers."""
    args = [str(TOOLS / "oha"), "-z", f"{seconds}s", "-q", str(rate), "-c", "16", "--latency-correction",
            "--no-tui", "--output-format", "json", "-m", "POST", "-D", str(body_path),
            "-H", "content-type: application/json"]
    if send_header:
        args += ["-H", f"{HEADER}: {MODEL}"]
    out = subprocess.run(on_load_cpu(args + [url]), capture_output=True, text=True, timeout=seconds + 60)
    report = json.loads(out.stdout)
    percentiles = report["latencyPercentiles"]
    codes = report.get("statusCodeDistribution", {})
    non_2xx = sum(count for code, count in codes.items() if not str(code).startswith("2"))
    return percentiles["p50"] * 1e3, percentiles["p99"] * 1e3, non_2xx


def spread(values):
    if not values:  # not measured (--no-latency)
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


class Variant:
    """One variant's Envoy (and ext_proc server), started once and kept up for the whole run."""

    def __init__(self, name, spec, nginx):
        filters, extra_routes, self.send_header = spec[:3]
        path = spec[3] if len(spec) > 3 else "/v1/chat/completions"
        self.name = name
        if name == "ext_proc":
            self.extproc = ExtProcServer()
        elif name == "callout_ext_proc":
            self.extproc = ExtProcServer(["--moderate", f"http://127.0.0.1:{nginx.port}/v1/moderations"])
        else:
            self.extproc = None
        config = json.dumps(envoy_config(filters, extra_routes, nginx.port,
                                         self.extproc.port if self.extproc else None))
        config = config.replace("{{EPP_ENDPOINTS}}", ", ".join(f"'127.0.0.1:{port}'" for port in nginx.ports))
        self.envoy = Envoy(config, log_level="warning").wait_ready()
        pin(self.envoy.proc.pid, ENVOY_CPU)
        self.url = self.envoy.url(path)

    def stop(self):
        self.envoy.stop()
        if self.extproc:
            self.extproc.stop()


def measure(chosen, all_variants, args, nginx, bodies, work):
    """Every variant's Envoy runs side by side (idle ones cost nothing); for each body, every
    repeat visits each variant in turn, in a rotated order, so drift of this shared machine
    lands on all variants alike instead of on whichever was measured last."""
    running = []
    rows = []
    try:
        for name in chosen:
            running.append(Variant(name, all_variants[name], nginx))
        for size_label, model_position, body_path in bodies:
            samples = {v.name: {"rps": [], "envoy_cpu_us": [], "sidecar_cpu_us": [], "p50_ms": [], "p99_ms": [],
                                "non_2xx": 0, "errors": 0, "requests": 0} for v in running}
            for variant in running:
                # Warm-up: connections, the wasm VM, allocator pools.
                run_wrk(variant.url, body_path, variant.send_header, 1, args.connections, work / "post.lua")
            for repeat in range(args.repeats):
                shift = repeat % len(running)
                for variant in running[shift:] + running[:shift]:
                    sample = samples[variant.name]
                    envoy_before = cpu_ns(variant.envoy.proc.pid)
                    sidecar_before = cpu_ns(variant.extproc.proc.pid) if variant.extproc else 0
                    requests, rps, bad, errs = run_wrk(variant.url, body_path, variant.send_header, args.seconds,
                                                       args.connections, work / "post.lua")
                    envoy_cpu = cpu_ns(variant.envoy.proc.pid) - envoy_before
                    sidecar_cpu = (cpu_ns(variant.extproc.proc.pid) - sidecar_before) if variant.extproc else 0
                    sample["rps"].append(rps)
                    sample["envoy_cpu_us"].append(envoy_cpu / 1e3 / max(requests, 1))
                    sample["sidecar_cpu_us"].append(sidecar_cpu / 1e3 / max(requests, 1))
                    if not args.no_latency:
                        p50, p99, bad_open = run_oha(variant.url, body_path, variant.send_header, args.seconds,
                                                     RATES[size_label])
                        sample["p50_ms"].append(p50)
                        sample["p99_ms"].append(p99)
                        bad += bad_open
                    sample["non_2xx"] += bad
                    sample["errors"] += errs
                    sample["requests"] += requests
            for variant in running:
                sample = samples[variant.name]
                if args.profile:
                    profile(variant.envoy.proc.pid, variant.url, body_path, variant.send_header, args, work,
                            f"{variant.name}-{size_label}-{model_position}")
                row = {"variant": variant.name, "size": size_label, "size_bytes": SIZES[size_label],
                       "model": model_position, "requests": sample["requests"], "non_2xx": sample["non_2xx"],
                       "socket_errors": sample["errors"],
                       **{key: spread(sample[key])
                          for key in ("rps", "envoy_cpu_us", "sidecar_cpu_us", "p50_ms", "p99_ms")}}
                row["total_cpu_us"] = row["envoy_cpu_us"]["median"] + row["sidecar_cpu_us"]["median"]
                rows.append(row)
                print(f"  {variant.name:28} {size_label:>6} model {model_position:5} {row['rps']['median']:9.0f} req/s  "
                      f"envoy {row['envoy_cpu_us']['median']:8.1f} µs  sidecar {row['sidecar_cpu_us']['median']:7.1f} µs  "
                      f"p50 {fmt_median(row['p50_ms'])} ms  p99 {fmt_median(row['p99_ms'])} ms  "
                      f"non-2xx {sample['non_2xx']}", flush=True)
    finally:
        for variant in running:
            variant.stop()
    # Rows grouped by variant, in the order chosen, as the table reads.
    order = {name: i for i, name in enumerate(chosen)}
    return sorted(rows, key=lambda r: order[r["variant"]])


def profile(pid, url, body_path, send_header, args, work, label):
    """perf (software CPU clock, call graphs) on Envoy during one more wrk run; prints the hottest
    symbols (Envoy's binary is stripped, so its own code shows as addresses) and keeps the data
    under target/profiles/."""
    out_dir = ROOT / "target" / "profiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / f"{label}.perf.data"
    perf = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "4999", "-g", "-o", str(data),
                             "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    run_wrk(url, body_path, send_header, args.seconds, args.connections, work / "post.lua")
    perf.send_signal(2)
    perf.wait(timeout=60)
    report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,symbol",
                             "--stdio", "-g", "none", "--percent-limit", "0.7"], capture_output=True, text=True).stdout
    (out_dir / f"{label}.txt").write_text(report)
    print("\n".join(line for line in report.splitlines() if line and not line.startswith("#")), flush=True)


def fmt_median(s):
    return "–" if s["median"] is None else f"{s['median']:6.2f}"


def fmt_spread(s, digits=1):
    if s["median"] is None:
        return "–"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def render(meta, rows):
    plain = {(r["size"], r["model"]): r for r in rows if r["variant"] == "plain"}
    # Streamed variants compare with the same stream proxied plainly.
    stream_plain = {(r["size"], r["model"]): r for r in rows if r["variant"] == "stream_plain"}
    buffered = {(r["size"], r["model"]): r for r in rows if r["variant"] == "buffer"}
    lines = [f"# {meta['title']}", "",
             f"{meta['date']} · {meta['machine']} · Envoy {meta['envoy']} `--concurrency 1` · nginx fixed reply · "
             f"wrk 1 thread, {meta['connections']} connections, {meta['seconds']} s × {meta['repeats']} repeats · "
             "open-loop latency: oha with latency correction at the rate shown · medians (min–max) · every "
             "variant's Envoy up side by side, visited in rotated order each repeat, pinned to its own core "
             "(load generators and upstreams on the other)", "",
             "Every body filter has to buffer, and buffering changes how Envoy reads and writes large bodies "
             "(at 256 KiB buffering alone is cheaper than streaming here), so CPU is also shown over **buffer**. "
             "The `stream_*` variants get a streamed answer (14 events, usage last) and compare with "
             "**stream_plain** instead of plain.", "",
             "| variant | body | model | req/s | × plain | Envoy CPU µs/req | + over plain | sidecar CPU µs/req | "
             "total + over plain | total + over buffer | p50 ms | p99 ms | rate/s | non-2xx |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        bases = stream_plain if r["variant"].startswith("stream") else plain
        base = bases.get((r["size"], r["model"])) or bases.get((r["size"], "last"))
        ratio = r["rps"]["median"] / base["rps"]["median"] if base else float("nan")
        added = r["envoy_cpu_us"]["median"] - base["envoy_cpu_us"]["median"] if base else float("nan")
        total_added = r["total_cpu_us"] - base["total_cpu_us"] if base else float("nan")
        buffer_row = buffered.get((r["size"], r["model"]))
        over_buffer = r["total_cpu_us"] - buffer_row["total_cpu_us"] if buffer_row else float("nan")
        lines.append(
            f"| {r['variant']} | {r['size']} | {r['model']} | {fmt_spread(r['rps'], 0)} | {ratio:.2f} | "
            f"{fmt_spread(r['envoy_cpu_us'])} | {added:+.1f} | "
            f"{fmt_spread(r['sidecar_cpu_us']) if r['sidecar_cpu_us']['max'] else '–'} | {total_added:+.1f} | "
            f"{over_buffer:+.1f} | "
            f"{fmt_spread(r['p50_ms'], 2)} | {fmt_spread(r['p99_ms'], 2)} | {RATES[r['size']]} | {r['non_2xx']} |")
    return "\n".join(lines) + "\n"


def write_outputs(out, meta, rows):
    """The table (.md, also printed), the raw results (.json) and the chart (.svg)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    table = render(meta, rows)
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    chart = subprocess.run([str(BENCH_BIN / "bench-chart"), str(out.with_suffix(".json")), str(out.with_suffix(".svg"))],
                           capture_output=True, text=True)
    if chart.returncode != 0:
        sys.exit(f"chart failed: {chart.stderr}")
    print()
    print(table)


# The quick mode proves the harness end to end on one variant of each family (the baselines, the
# ext_proc sidecar, both forms routing, guards, a stream, the endpoint picker); the full run
# measures them all.
QUICK_VARIANTS = ["plain", "buffer", "ext_proc", "dynamic_module", "wasm", "guards_dynamic_module",
                  "stream_plain", "stream_usage_dynamic_module", "epp_dynamic_module", "callout_dynamic_module",
                  "callout_ext_proc"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="16 KiB, model last, 1 repeat of 1 s, one variant of each family "
                             "(QUICK_VARIANTS) unless --variants says otherwise")
    parser.add_argument("--variants", help="comma list (default: all)")
    parser.add_argument("--sizes", help="comma list of " + ", ".join(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--out", default=str(RESULTS / "latest"), help="path prefix of .md/.json/.svg")
    parser.add_argument("--no-latency", action="store_true",
                        help="skip the open-loop latency runs (CPU and req/s only; faster)")
    parser.add_argument("--profile", action="store_true",
                        help="also record a perf profile of Envoy per variant and body (target/profiles/)")
    parser.add_argument("--title", default="Body-based routing in Envoy 1.40", help="the table's title")
    parser.add_argument("--render", metavar="JSON", help="only re-render the table and chart from a results JSON")
    args = parser.parse_args()
    if args.render:
        results = json.loads(Path(args.render).read_text())
        write_outputs(Path(args.out), results, results.pop("rows"))
        return
    sizes = list(SIZES)
    positions = ["first", "last"]
    if args.quick:
        sizes, positions, args.repeats, args.seconds = ["16KiB"], ["last"], 1, 1
    if args.sizes:
        sizes = args.sizes.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    (work / "post.lua").write_text(WRK_SCRIPT)
    bodies = []
    for size in sizes:
        for position in positions:
            path = work / f"{size}-{position}.json"
            path.write_bytes(chat_body(SIZES[size], position == "last"))
            bodies.append((size, position, path))
    nginx = Nginx(STREAM_LOCATION + EPP_LOCATION + MODERATION_LOCATION, extra_ports=EPP_PORTS - 1)
    all_variants = variants()
    if args.variants:
        chosen = args.variants.split(",")
    elif args.quick:
        chosen = [name for name in QUICK_VARIANTS if name in all_variants]
    else:
        chosen = list(all_variants)
    try:
        rows = measure(chosen, all_variants, args, nginx, bodies, work)
    finally:
        nginx.stop()
    version_text = subprocess.run([str(ROOT / ".venv" / "bin" / "envoy"), "--version"], capture_output=True,
                                  text=True).stdout
    envoy_version = m.group(1) if (m := re.search(r"/(\d+\.\d+\.\d+)/", version_text)) else "?"
    meta = {"title": args.title,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "envoy": envoy_version, "connections": args.connections, "seconds": args.seconds,
            "repeats": args.repeats, "quick": args.quick}
    write_outputs(Path(args.out), meta, rows)
    bad = [r for r in rows if r["non_2xx"] or r["socket_errors"]]
    if bad:
        sys.exit("some requests were misrouted or failed: "
                 + ", ".join(f"{r['variant']} {r['size']} {r['model']}" for r in bad))


if __name__ == "__main__":
    main()
