#!/usr/bin/env python3
"""Time to first byte of a streamed (SSE) chat completion through Envoy, per filter form and
chain, against Envoy without our filter measured in the same run.

    .venv/bin/python bench/bench_stream_ttfb.py [--requests 40] [--delay-ms 20]

The mock model server sends one event per word, `--delay-ms` apart. TTFB is the time from
sending the request to receiving the first `data:` bytes. Configurations:
  envoy-only        Envoy with no payload filter (the baseline)
  pass-through      our filter, with a chain that needs no stream plugin
  token-usage       every event parsed and handed to token-usage (no hold-back window)
  hold-back-512     a guard that holds back up to 512 bytes of events
Expect pass-through and token-usage to add well under a millisecond; a hold-back window adds
the time the upstream needs to produce that many bytes (it is what a window is for).
"""
import argparse
import socket
import statistics
import time
from pathlib import Path


from harness import FORMS, Envoy, bootstrap, cluster, processor_filter
from harness.model_server import ModelServer

CHAINS = {
    "pass-through": ("payload_processor", "processors: [{name: route, type: body-field-to-header}]"),
    "token-usage": ("payload_processor", "processors: [{name: usage, type: token-usage}]"),
    "hold-back-512": ("custom_payload_processor",
                      "processors: [{name: guard, type: word-guard, parameters: {word: zzz, holdBackBytes: 512}}]"),
}
BODY = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hello"}]}'


def ttfb(port, delay_ms):
    """Seconds from sending a request to the first event bytes, over a fresh connection."""
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
               b"x-mock-delay-ms: %d\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
               % (delay_ms, len(BODY), BODY))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.perf_counter()
        sock.sendall(request)
        seen = b""
        while b"data:" not in seen:
            piece = sock.recv(65536)
            if not piece:
                raise RuntimeError(f"connection closed before the first event: {seen[:200]!r}")
            seen += piece
        first = time.perf_counter() - started
        while sock.recv(65536):
            pass
    return first


def measure(port, requests, delay_ms):
    for _ in range(3):
        ttfb(port, delay_ms)  # warm-up
    samples = sorted(ttfb(port, delay_ms) * 1000 for _ in range(requests))
    return statistics.median(samples), samples[int(len(samples) * 0.9) - 1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--delay-ms", type=int, default=20)
    args = parser.parse_args()
    model = ModelServer()
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "model", "timeout": "30s"}}]
    rows = []
    envoy = Envoy(bootstrap([], routes, [cluster("model", model.port)])).wait_ready()
    try:
        baseline = measure(envoy.port, args.requests, args.delay_ms)
    finally:
        envoy.stop()
    rows.append(("-", "envoy-only", *baseline))
    for form in FORMS:
        for name, (module, chain) in CHAINS.items():
            config = bootstrap([processor_filter(form, chain, module)], routes, [cluster("model", model.port)])
            envoy = Envoy(config).wait_ready()
            try:
                rows.append((form, name, *measure(envoy.port, args.requests, args.delay_ms)))
            finally:
                envoy.stop()
    model.stop()
    print(f"TTFB of a streamed chat completion, {args.requests} requests each, events {args.delay_ms} ms apart")
    print(f"{'form':<16}{'chain':<16}{'median ms':>10}{'p90 ms':>10}{'added (median) ms':>20}")
    for form, name, median, p90 in rows:
        print(f"{form:<16}{name:<16}{median:>10.2f}{p90:>10.2f}{median - baseline[0]:>20.2f}")


if __name__ == "__main__":
    main()
