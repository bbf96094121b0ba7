"""The main job: Envoy with the payload processor on the bundled demo config and three local
mock model servers; sends sample requests and shows which pool answered and which headers the
filter set. With --serve it keeps running for your own curl."""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))

import requests  # noqa: E402

from harness import ROOT, Envoy  # noqa: E402
from mock_server import MockServer  # noqa: E402
from render import render  # noqa: E402

SAMPLES = [
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "model": "llama-3-8b"}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "model": "mistral-7b"}),
    ("POST", "/v1/completions", {"prompt": "SELECT", "model": "sql-lora"}),
    ("POST", "/v1/chat/completions", {"model": "legal-lora", "messages": []}),
    ("POST", "/v1/chat/completions", {"messages": [], "model": "qwen-2-7b"}),
    ("POST", "/v1/chat/completions", {"messages": [], "model": "gpt-unknown"}),
    ("POST", "/v1/chat/completions", "this is not json"),
    ("GET", "/v1/models", None),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", action="store_true", help="keep Envoy running after the samples")
    parser.add_argument("--port", type=int, default=10000, help="listener port with --serve (0: any)")
    parser.add_argument("--wasm", action="store_true", help="run the proxy-wasm form instead of the dynamic module")
    args = parser.parse_args()

    pools = {key: MockServer(name) for key, name in (("A", "pool-llama"), ("B", "pool-mistral"), ("C", "pool-qwen"))}
    values = {f"UPSTREAM_{key}_PORT": server.port for key, server in pools.items()}
    values.update(LISTEN_PORT=args.port if args.serve else 0, ADMIN_PORT=0,
                  WASM_PATH=ROOT / "dist" / "payload_processor.wasm")
    form = "wasm" if args.wasm else "dynamic-module"
    artifact = "payload_processor.wasm" if args.wasm else "libpayload_processor.so"
    envoy = Envoy(render(ROOT / "envoy" / f"demo-{form}.yaml", values))
    try:
        envoy.wait_ready()
        print(f"Envoy 1.40 with {artifact} is up on 127.0.0.1:{envoy.port} "
              f"(started in {envoy.startup_seconds:.2f}s, admin on {envoy.admin})\n")
        print(f"{'request':<64} {'status':>6}  {'answered by':<13} headers set by the filter")
        for method, path, body in SAMPLES:
            data = json.dumps(body) if isinstance(body, dict) else body
            reply = requests.request(method, envoy.url(path), data=data, timeout=10,
                                     headers={"content-type": "application/json"})
            shown = f"{method} {path} " + (data if data and len(data) < 40 else (data[:37] + "..." if data else ""))
            try:
                payload = reply.json()
            except ValueError:
                payload = {}
            backend = payload.get("backend", "-")
            headers = payload.get("headers", {})
            set_by_filter = {k: v for k, v in headers.items() if k.startswith("x-gateway-")}
            detail = set_by_filter or payload.get("error", {}).get("code", "")
            print(f"{shown:<64} {reply.status_code:>6}  {backend:<13} {detail}")
        stats = {k: v for k, v in envoy.stats().items() if v and "latency" not in k}
        print("\nfilter stats:", json.dumps(stats, indent=1))
        if args.serve:
            print(f"\nServing. Try:\n  curl -s 127.0.0.1:{envoy.port}/v1/chat/completions "
                  "-d '{\"model\":\"mistral-7b\",\"messages\":[]}'\nCtrl-C to stop.")
            while envoy.alive():
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        envoy.stop()
        for server in pools.values():
            server.stop()


if __name__ == "__main__":
    main()
