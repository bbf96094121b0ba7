"""Scheduling quality: our endpoint picker against Envoy's round robin and random balancing, on
a shared-prefix workload (several system prompts x many users), through real Envoy.

N mock vLLM servers run in live mode: each runs at most `capacity` requests at once (the rest
queue, and the queue is what /metrics reports), keeps an LRU prefix cache of `cache_blocks`
64-byte blocks (its usage is the reported KV-cache usage), and answers after
`base_ms + ms_per_uncached_block x uncached blocks`, so a prefix hit is faster. Every variant gets
the same seeded request sequence from the same number of concurrent clients (closed loop).

Prints and writes bench/results/scheduling.md: prefix-cache hit rate, mean / p50 / p99 latency
seen by the client, throughput, and how the requests spread over the instances.
  .venv/bin/python bench/sched_quality.py [--requests 1600] [--servers 4] [--clients 8]
"""
import argparse
import json
import random
import statistics
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import requests

from harness import Envoy, bootstrap, processor_filter
from harness.vllm_server import VllmServer

DEST = "x-gateway-destination-endpoint"


def workload(seed, count, prompts, system_bytes):
    rng = random.Random(seed)
    words = "policy order refund shipping account billing escalation privacy warranty product".split()
    systems = []
    for p in range(prompts):
        text = f"System prompt {p}: you are assistant #{p}. " + " ".join(rng.choice(words) for _ in range(system_bytes // 6))
        systems.append(text[:system_bytes])
    requests_ = []
    for n in range(count):
        # A skewed mix: some system prompts are much more popular than others.
        system = systems[min(int(rng.expovariate(1 / (prompts / 3))), prompts - 1)]
        user = f"user-{rng.randrange(10_000)} asks about {rng.choice(words)} #{n}"
        requests_.append({"model": "llama", "messages": [{"role": "system", "content": system},
                                                         {"role": "user", "content": user}]})
    return requests_


def static_cluster(servers, lb_policy):
    return {"name": "pool", "connect_timeout": "1s", "type": "STATIC", "lb_policy": lb_policy,
            "load_assignment": {"cluster_name": "pool", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": s.port}}}}
                for s in servers]}]}}


def picker_config(form, servers):
    chain = json.dumps({"processors": [{"name": "epp", "type": "endpoint-picker", "parameters": {
        "endpoints": [s.address for s in servers], "metricsCluster": "pool", "scrapeInterval": "20ms",
        "staleAfter": "500ms"}}]})
    cluster = {"name": "pool", "connect_timeout": "1s", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
               "original_dst_lb_config": {"use_http_header": True, "http_header_name": DEST}}
    return bootstrap([processor_filter(form, chain)], [{"match": {"prefix": "/"}, "route": {"cluster": "pool", "timeout": "60s"}}],
                     [cluster])


def plain_config(servers, lb_policy):
    return bootstrap([], [{"match": {"prefix": "/"}, "route": {"cluster": "pool", "timeout": "60s"}}],
                     [static_cluster(servers, lb_policy)])


def run_variant(name, config, servers, work, clients, rate=None):
    for server in servers:
        server.reset()
    envoy = Envoy(config).wait_ready()
    try:
        time.sleep(0.3)  # first scrapes
        url = envoy.url()
        results = [None] * len(work)
        next_index = iter(range(len(work)))
        lock = threading.Lock()

        begin = time.perf_counter()

        def client():
            session = requests.Session()
            while True:
                with lock:
                    index = next(next_index, None)
                if index is None:
                    return
                if rate:
                    # Open loop: request i is due at i / rate; latency counts from then, so a
                    # client that fell behind still charges the wait to the variant.
                    due = begin + index / rate
                    time.sleep(max(0.0, due - time.perf_counter()))
                    started = due
                else:
                    started = time.perf_counter()
                response = session.post(url, json=work[index], timeout=60)
                elapsed = (time.perf_counter() - started) * 1000
                response.raise_for_status()
                results[index] = (elapsed, response.headers["x-served-by"], int(response.headers["x-prefix-hit-blocks"]),
                                  int(response.headers["x-prompt-blocks"]))

        started = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients if not rate else max(clients, 64))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
    finally:
        envoy.stop()
    latencies = sorted(r[0] for r in results)
    hits = sum(r[2] for r in results)
    blocks = sum(r[3] for r in results)
    spread = {s.name: 0 for s in servers}
    for r in results:
        spread[r[1]] += 1
    return {
        "variant": name,
        "hit_rate": hits / blocks if blocks else 0.0,
        "mean_ms": statistics.fmean(latencies),
        "p50_ms": latencies[len(latencies) // 2],
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "rps": len(work) / wall,
        "spread": spread,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1600)
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=12, help="distinct system prompts")
    parser.add_argument("--system-bytes", type=int, default=2048)
    parser.add_argument("--cache-blocks", type=int, default=200, help="prefix-cache blocks per server")
    parser.add_argument("--base-ms", type=float, default=10.0, help="simulated latency of every request")
    parser.add_argument("--ms-per-block", type=float, default=2.0, help="simulated latency per uncached block")
    parser.add_argument("--rate", type=float, default=150.0,
                        help="open-loop arrival rate (req/s) for the equal-throughput table; 0: skip it")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--forms", default="dynamic-module,wasm")
    args = parser.parse_args()

    servers = [VllmServer(f"s{i}", capacity=2, cache_blocks=args.cache_blocks, ms_per_uncached_block=args.ms_per_block,
                          base_ms=args.base_ms)
               for i in range(args.servers)]
    for server in servers:
        server.set_live(True)
    work = workload(args.seed, args.requests, args.prompts, args.system_bytes)
    variants = [("round robin", plain_config(servers, "ROUND_ROBIN")), ("random", plain_config(servers, "RANDOM"))]
    for form in [f for f in args.forms.split(",") if f]:
        variants.append((f"endpoint-picker ({form})", picker_config(form, servers)))
    rows, open_rows = [], []
    try:
        for name, config in variants:
            row = run_variant(name, config, servers, work, args.clients)
            rows.append(row)
            print(f"{name}: hit rate {row['hit_rate']:.1%}, mean {row['mean_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, "
                  f"{row['rps']:.0f} req/s, spread {row['spread']}", flush=True)
            if args.rate:
                row = run_variant(name, config, servers, work, args.clients, rate=args.rate)
                open_rows.append(row)
                print(f"{name} at {args.rate:g} req/s: hit rate {row['hit_rate']:.1%}, mean {row['mean_ms']:.1f} ms, "
                      f"p99 {row['p99_ms']:.1f} ms", flush=True)
    finally:
        for server in servers:
            server.stop()

    lines = [
        "# Scheduling quality: endpoint picker vs round robin and random",
        "",
        f"`bench/sched_quality.sh` — {args.servers} mock vLLM servers (live queue and KV-cache metrics; 2 requests at "
        f"a time each; LRU prefix cache of {args.cache_blocks} 64-byte blocks; latency {args.base_ms:g} ms + {args.ms_per_block:g} ms "
        f"per uncached block), "
        f"{args.requests} chat requests from {args.clients} concurrent clients, {args.prompts} system prompts of "
        f"{args.system_bytes} bytes (skewed popularity) x random users, seed {args.seed}. Same request sequence for "
        "every variant, through real Envoy 1.40.",
        "",
    ]

    def table(title, table_rows):
        lines.extend(["", title, "",
                      "| variant | prefix-cache hit rate | mean latency | p50 | p99 | throughput | requests per instance |",
                      "|---|---:|---:|---:|---:|---:|---|"])
        for row in table_rows:
            spread = " / ".join(str(v) for v in row["spread"].values())
            lines.append(f"| {row['variant']} | {row['hit_rate']:.1%} | {row['mean_ms']:.1f} ms | {row['p50_ms']:.1f} ms | "
                         f"{row['p99_ms']:.1f} ms | {row['rps']:.0f} req/s | {spread} |")

    table(f"Closed loop ({args.clients} clients, each sending its next request when the last answered):", rows)
    if open_rows:
        table(f"Open loop at {args.rate:g} req/s for every variant (equal throughput; latency from the scheduled send "
              "time):", open_rows)
    out = ROOT / "bench" / "results" / "scheduling.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
