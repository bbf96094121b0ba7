"""Body-based routing through real Envoy: models to clusters over HTTP/1.1 and h2c."""
import hashlib
import json
import subprocess

import pytest
import requests

from harness import bootstrap, cluster, model_routes, processor_filter

CHAIN = """
processors:
  - name: route-by-model
    type: body-field-to-header
  - name: base-model
    type: base-model-to-header
    parameters:
      adapters: { sql-lora: model-c }
"""


@pytest.fixture
def envoy(form, upstreams, start_envoy):
    config = bootstrap(
        [processor_filter(form, CHAIN)],
        model_routes({"model-a": "a", "model-b": "b", "model-c": "c"}, "default"),
        [cluster(name, server.port) for name, server in upstreams.items()],
    )
    return start_envoy(config)


def chat(model, **extra):
    body = {"messages": [{"role": "user", "content": "hello"}], "model": model}
    body.update(extra)
    return body


def curl_h2c(url, body, headers=()):
    """POST over HTTP/2 cleartext (prior knowledge) with curl; returns (status, json)."""
    args = ["curl", "-sS", "--http2-prior-knowledge", "-o", "-", "-w", "\n%{http_code} %{http_version}",
            "-H", "content-type: application/json", "--data-binary", "@-", url]
    for header in headers:
        args[1:1] = ["-H", header]
    out = subprocess.run(args, input=body, capture_output=True, check=True, timeout=30).stdout.decode()
    payload, _, status_line = out.rpartition("\n")
    status, version = status_line.split()
    assert version == "2", f"expected HTTP/2, got {version}"
    return int(status), json.loads(payload)


@pytest.mark.parametrize("model,backend", [("model-a", "a"), ("model-b", "b"), ("model-c", "c")])
def test_three_models_route_to_three_clusters_over_http1(envoy, model, backend):
    reply = requests.post(envoy.url(), json=chat(model), timeout=10)
    assert reply.status_code == 200
    assert reply.json()["backend"] == backend
    assert reply.json()["headers"]["x-gateway-model-name"] == model


@pytest.mark.parametrize("model,backend", [("model-a", "a"), ("model-b", "b"), ("model-c", "c")])
def test_three_models_route_to_three_clusters_over_h2c(envoy, model, backend):
    # A small body: HTTP/2 delivers it in a single DATA frame with END_STREAM.
    status, reply = curl_h2c(envoy.url(), json.dumps(chat(model)).encode())
    assert status == 200
    assert reply["backend"] == backend


def test_large_h2c_body_spanning_many_frames(envoy):
    body = json.dumps(chat("model-b", padding="x" * 300_000)).encode()
    status, reply = curl_h2c(envoy.url(), body)
    assert (status, reply["backend"]) == (200, "b")
    assert reply["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_chunked_http1_body_is_routed_and_forwarded_intact(envoy):
    body = json.dumps(chat("model-c")).encode()
    pieces = [body[i:i + 7] for i in range(0, len(body), 7)]
    reply = requests.post(envoy.url(), data=iter(pieces), headers={"content-type": "application/json"}, timeout=10)
    assert reply.status_code == 200
    assert reply.json()["backend"] == "c"
    assert reply.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_one_mib_body_with_model_last_is_routed(envoy):
    # The official openai client sends `model` after `messages`.
    body = json.dumps({"messages": [{"role": "user", "content": "y" * (1024 * 1024)}], "model": "model-a"}).encode()
    assert len(body) > 1024 * 1024
    reply = requests.post(envoy.url(), data=body, headers={"content-type": "application/json"}, timeout=30)
    assert reply.status_code == 200
    assert reply.json()["backend"] == "a"
    assert reply.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_unchanged_body_reaches_upstream_byte_for_byte(envoy):
    # Odd spacing, key order and number forms that any re-serialization would change.
    body = b'{ "messages" : [ {"role":"user", "content":"caf\\u00e9 \xe2\x98\x95"} ],\n\t"temperature": 1.0e0, "model":"model-b" }'
    reply = requests.post(envoy.url(), data=body, headers={"content-type": "application/json"}, timeout=10)
    assert reply.json()["backend"] == "b"
    assert reply.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert reply.json()["body_length"] == len(body)


def test_client_sent_model_header_is_overwritten(envoy):
    reply = requests.post(envoy.url(), json=chat("model-b"), headers={"X-Gateway-Model-Name": "model-a"}, timeout=10)
    assert reply.json()["backend"] == "b"
    assert reply.json()["headers"]["x-gateway-model-name"] == "model-b"


def test_missing_model_is_skipped_and_spoofed_header_removed(envoy):
    reply = requests.post(envoy.url(), json={"messages": []}, headers={"x-gateway-model-name": "model-a"}, timeout=10)
    assert reply.status_code == 200
    assert reply.json()["backend"] == "default"
    assert "x-gateway-model-name" not in reply.json()["headers"]
    assert envoy.stats()["payload_processor.processor.route-by-model.missing_field"] == 1


def test_numeric_model_is_written_as_json_text(envoy):
    reply = requests.post(envoy.url(), json=chat(42), timeout=10)
    assert reply.json()["headers"]["x-gateway-model-name"] == "42"


def test_lora_adapter_maps_to_base_model_header(envoy):
    reply = requests.post(envoy.url(), json=chat("sql-lora"), timeout=10).json()
    assert reply["headers"]["x-gateway-base-model-name"] == "model-c"
    assert reply["headers"]["x-gateway-model-name"] == "sql-lora"
    reply = requests.post(envoy.url(), json=chat("model-a"), timeout=10).json()
    assert reply["headers"]["x-gateway-base-model-name"] == "model-a"


def test_get_without_body_passes_untouched(envoy):
    reply = requests.get(envoy.url("/v1/models"), timeout=10)
    assert reply.status_code == 200
    assert reply.json()["backend"] == "default"
    assert reply.json()["method"] == "GET"


def test_stats_count_invocations(envoy):
    for model in ("model-a", "model-b"):
        requests.post(envoy.url(), json=chat(model), timeout=10)
    stats = envoy.stats()
    assert stats["payload_processor.processor.route-by-model.invocations"] == 2
    assert stats["payload_processor.processor.base-model.invocations"] == 2
