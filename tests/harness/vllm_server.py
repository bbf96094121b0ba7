"""A mock vLLM model server for the endpoint-picker tests and the scheduling benchmark.

Serves on 127.0.0.1 (port chosen by the OS):
  GET /metrics               Prometheus text with vLLM's names: num_requests_waiting,
                             num_requests_running, kv_cache_usage_perc, lora_requests_info.
                             Values are what the test set (`set_metrics`), or in `live` mode
                             the server's own queue and simulated cache.
  POST /v1/chat/completions  JSON, or SSE when `"stream": true`. Every answer names the
  POST /v1/completions       instance (`x-served-by` header, `served_by` field) and whether the
                             prompt prefix was cached (`x-prefix-hit-blocks`, `x-prompt-blocks`).

A simulated prefix cache: the prompt is cut into 64-byte blocks with chained hashes; blocks
seen before are "cached" (an LRU of `cache_blocks`); each uncached block costs
`ms_per_uncached_block` of latency, so a prefix hit answers faster. A simulated queue: at most
`capacity` requests run at once, the rest wait (and count as `num_requests_waiting`).
`metrics_status` makes /metrics fail (e.g. 500) and `fail_requests` makes completions 500.
"""
import hashlib
import json
import socket
import threading
import time
from collections import OrderedDict

from harness.mock_server import LocalServer, ModelServerHandler, read_body

BLOCK = 64


def prompt_of(body):
    parts = []
    for message in body.get("messages") or []:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"{message.get('role', '')}:{content or ''}\n")
    if isinstance(body.get("prompt"), str):
        parts.append(body["prompt"])
    return "".join(parts).encode()


def block_hashes(model, prompt):
    previous = hashlib.sha256(model.encode()).digest()
    hashes = []
    for start in range(0, len(prompt) - len(prompt) % BLOCK, BLOCK):
        previous = hashlib.sha256(previous + prompt[start:start + BLOCK]).digest()
        hashes.append(previous)
    return hashes


class _Handler(ModelServerHandler):

    def _send(self, status, content_type, payload, extra=()):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(payload)))
        self.send_header("x-served-by", self.server.name)
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _dead(self):
        """A killed instance drops even the connections it already had (no answer at all)."""
        if not self.server.model.dead:
            return False
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return True

    def do_GET(self):
        if self._dead():
            return
        model = self.server.model
        model.scrapes += 1
        if self.path.split("?")[0] != "/metrics":
            return self._send(404, "text/plain", b"not found")
        if model.metrics_status != 200:
            return self._send(model.metrics_status, "text/plain", b"metrics unavailable")
        self._send(200, "text/plain; version=0.0.4", model.metrics_text().encode())

    def do_POST(self):
        if self._dead():
            return
        model = self.server.model
        raw = read_body(self)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return self._send(400, "application/json", b'{"error":{"message":"bad json"}}')
        record = {
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body,
        }
        if model.fail_requests:
            model.record(record)
            return self._send(500, "application/json", b'{"error":{"message":"mock failure"}}')
        hashes = block_hashes(body.get("model", ""), prompt_of(body))
        hit_blocks, latency = model.run(hashes)
        record.update(hit_blocks=hit_blocks, blocks=len(hashes), latency_ms=latency)
        model.record(record)
        extra = [("x-prefix-hit-blocks", str(hit_blocks)), ("x-prompt-blocks", str(len(hashes))),
                 ("x-simulated-latency-ms", f"{latency:.1f}")]
        text = f"Answer from {self.server.name}."
        if body.get("stream"):
            events = [
                {"id": "c1", "object": "chat.completion.chunk", "model": body.get("model", ""), "served_by": self.server.name,
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}]},
                {"id": "c1", "object": "chat.completion.chunk", "model": body.get("model", ""),
                 "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            ]
            payload = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
            return self._send(200, "text/event-stream", payload, extra)
        reply = {"id": "c1", "object": "chat.completion", "model": body.get("model", ""), "served_by": self.server.name,
                 "prefix_hit_blocks": hit_blocks, "prompt_blocks": len(hashes),
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": len(hashes), "completion_tokens": 4, "total_tokens": len(hashes) + 4}}
        self._send(200, "application/json", json.dumps(reply).encode(), extra)


class _Model:
    """The simulated engine: a bounded batch, a queue, an LRU prefix cache."""

    def __init__(self, capacity, cache_blocks, ms_per_uncached_block, base_ms):
        self.lock = threading.Condition()
        self.capacity = capacity
        self.cache_blocks = cache_blocks
        self.ms_per_uncached_block = ms_per_uncached_block
        self.base_ms = base_ms
        self.cache = OrderedDict()
        self.running = 0
        self.waiting = 0
        self.live = False
        self.fixed = {"waiting": 0, "running": 0, "kv": 0.0}
        self.adapters = []
        self.max_lora = None
        self.metrics_status = 200
        self.fail_requests = False
        self.dead = False
        self.requests = []
        self.scrapes = 0

    def record(self, record):
        with self.lock:
            self.requests.append(record)

    def run(self, hashes):
        with self.lock:
            self.waiting += 1
            while self.running >= self.capacity:
                self.lock.wait()
            self.waiting -= 1
            self.running += 1
            hit = 0
            for h in hashes:
                if h not in self.cache:
                    break
                hit += 1
            for h in hashes:
                self.cache[h] = True
                self.cache.move_to_end(h)
            while len(self.cache) > self.cache_blocks:
                self.cache.popitem(last=False)
        latency = self.base_ms + self.ms_per_uncached_block * (len(hashes) - hit)
        time.sleep(latency / 1000)
        with self.lock:
            self.running -= 1
            self.lock.notify()
        return hit, latency

    def metrics_text(self):
        with self.lock:
            if self.live:
                waiting, running = self.waiting, self.running
                kv = min(1.0, len(self.cache) / self.cache_blocks) if self.cache_blocks else 0.0
            else:
                waiting, running, kv = self.fixed["waiting"], self.fixed["running"], self.fixed["kv"]
            lines = [
                "# HELP vllm:num_requests_running Number of requests in model execution batches.",
                "# TYPE vllm:num_requests_running gauge",
                f'vllm:num_requests_running{{model_name="mock"}} {running}',
                "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
                "# TYPE vllm:num_requests_waiting gauge",
                f'vllm:num_requests_waiting{{model_name="mock"}} {waiting}',
                "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
                "# TYPE vllm:kv_cache_usage_perc gauge",
                f'vllm:kv_cache_usage_perc{{model_name="mock"}} {kv}',
            ]
            if self.max_lora is not None:
                lines += [
                    "# HELP vllm:lora_requests_info Running stats on lora requests.",
                    "# TYPE vllm:lora_requests_info gauge",
                    f'vllm:lora_requests_info{{max_lora="{self.max_lora}",running_lora_adapters="{",".join(self.adapters)}",'
                    f'waiting_lora_adapters=""}} {time.time()}',
                ]
        return "\n".join(lines) + "\n"


class VllmServer(LocalServer):
    """One mock vLLM instance; `name` is what it reports as `x-served-by`."""

    handler = _Handler

    def __init__(self, name, capacity=4, cache_blocks=4096, ms_per_uncached_block=0.0, base_ms=0.0):
        super().__init__(name)
        self.model = _Model(capacity, cache_blocks, ms_per_uncached_block, base_ms)
        self.httpd.model = self.model

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def set_metrics(self, waiting=0, running=0, kv=0.0, adapters=None, max_lora=None, status=200):
        with self.model.lock:
            self.model.fixed = {"waiting": waiting, "running": running, "kv": kv}
            self.model.adapters = list(adapters or [])
            self.model.max_lora = max_lora if max_lora is not None else (len(self.model.adapters) or None)
            self.model.metrics_status = status

    def reset(self):
        """Forgets the cache and the recorded requests (between benchmark variants)."""
        with self.model.lock:
            self.model.cache.clear()
            self.model.requests.clear()

    def kill(self):
        """Stops the instance: new connections are refused, open ones dropped unanswered."""
        self.model.dead = True
        self.stop()

    def set_live(self, live=True):
        self.model.live = live

    @property
    def completions(self):
        return list(self.model.requests)
