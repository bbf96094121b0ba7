"""Body handling through real Envoy: required fields, JSONPath, non-JSON, limits, no buffering."""
import json

import pytest
import requests

from harness import bootstrap, cluster, model_routes, processor_filter


def start(form, upstreams, start_envoy, chain, module="payload_processor"):
    config = bootstrap(
        [processor_filter(form, chain, module=module)],
        model_routes({"model-a": "a", "acme": "b"}, "default"),
        [cluster(name, server.port) for name, server in upstreams.items()],
    )
    return start_envoy(config)


def test_required_model_missing_is_400(form, upstreams, start_envoy):
    envoy = start(form, upstreams, start_envoy, "processors: [{name: r, type: body-field-to-header, parameters: {required: true}}]")
    reply = requests.post(envoy.url(), json={"messages": []}, timeout=10)
    assert reply.status_code == 400
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["error"]["code"] == "missing_field"
    assert requests.post(envoy.url(), json={"model": "model-a"}, timeout=10).json()["backend"] == "a"


def test_nested_jsonpath_field_routes(form, upstreams, start_envoy):
    chain = "processors: [{name: tenant, type: body-field-to-header, parameters: {fieldName: $.metadata.tenant}}]"
    envoy = start(form, upstreams, start_envoy, chain)
    reply = requests.post(envoy.url(), json={"model": "x", "metadata": {"tenant": "acme"}}, timeout=10)
    assert reply.json()["backend"] == "b"


def test_non_json_body_is_400_with_json_error(form, upstreams, start_envoy):
    envoy = start(form, upstreams, start_envoy, "processors: [{name: r, type: body-field-to-header}]")
    # The lazy reader validates the document up to the field it reads (the rest is forwarded
    # unread, byte-for-byte), so malformations before the field, wrong shapes, a missing end
    # when the field is absent, and duplicate keys are all caught here.
    bodies = (b"model=model-a", b'{"messages": [1,, "model": "model-a"}', b'{"messages": [', b"[1,2,3]",
              b'{"model":"a","model":"b"}', b"\xff\xfe{}")
    for body in bodies:
        reply = requests.post(envoy.url(), data=body, headers={"content-type": "application/json"}, timeout=10)
        assert reply.status_code == 400, body
        assert reply.json()["error"]["code"] == "invalid_json", body
    assert envoy.alive()


def test_body_above_limit_is_413(form, upstreams, start_envoy):
    chain = "limits: {maxRequestBodyBytes: 4096}\nprocessors: [{name: r, type: body-field-to-header}]"
    envoy = start(form, upstreams, start_envoy, chain)
    big = json.dumps({"model": "model-a", "pad": "x" * 5000}).encode()
    reply = requests.post(envoy.url(), data=big, headers={"content-type": "application/json"}, timeout=10)
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "request_too_large"
    # Without content-length (chunked) the limit is enforced while buffering.
    pieces = [big[i:i + 1000] for i in range(0, len(big), 1000)]
    reply = requests.post(envoy.url(), data=iter(pieces), timeout=10)
    assert reply.status_code == 413
    assert envoy.stats()["payload_processor.request_body_too_large"] == 2
    small = json.dumps({"model": "model-a", "pad": "x" * 3000}).encode()
    assert requests.post(envoy.url(), data=small, timeout=10).json()["backend"] == "a"


def test_buffer_limit_is_raised_above_envoys_default(form, upstreams, start_envoy):
    # Envoy's default per-stream buffer on HTTP/1 is 1 MiB; our limit is 3 MiB.
    chain = "limits: {maxRequestBodyBytes: 3145728}\nprocessors: [{name: r, type: body-field-to-header}]"
    envoy = start(form, upstreams, start_envoy, chain)
    body = json.dumps({"messages": [{"content": "z" * (2 * 1024 * 1024)}], "model": "model-a"}).encode()
    reply = requests.post(envoy.url(), data=body, timeout=30)
    assert reply.status_code == 200
    assert reply.json()["backend"] == "a"


def test_chain_that_needs_no_body_never_buffers(form, upstreams, start_envoy):
    # A header-only processor with a tiny body limit: a large body still streams through,
    # which it could not if the engine buffered it.
    chain = "limits: {maxRequestBodyBytes: 16}\nprocessors: [{name: f, type: fault-injector}]"
    envoy = start(form, upstreams, start_envoy, chain, module="custom_payload_processor")
    body = b"x" * 200_000
    reply = requests.post(envoy.url(), data=body, timeout=10)
    assert reply.status_code == 200
    assert reply.json()["body_length"] == len(body)
    assert envoy.stats()["payload_processor.request_body_too_large"] == 0


def test_processor_match_limits_where_it_runs(form, upstreams, start_envoy):
    chain = """
processors:
  - name: chat-only
    type: body-field-to-header
    parameters: {required: true}
    match:
      pathPrefixes: [/v1/chat/]
      methods: [POST]
      headers: [{name: x-tenant, present: false}]
"""
    envoy = start(form, upstreams, start_envoy, chain)
    assert requests.post(envoy.url("/v1/chat/completions"), json={}, timeout=10).status_code == 400
    assert requests.post(envoy.url("/v1/embeddings"), json={}, timeout=10).status_code == 200
    assert requests.post(envoy.url("/v1/chat/completions"), json={}, headers={"x-tenant": "t"}, timeout=10).status_code == 200
    assert envoy.stats()["payload_processor.processor.chat-only.invocations"] == 1


def test_mutated_body_arrives_with_correct_content_length(form, upstreams, start_envoy):
    chain = """
processors:
  - name: stamp
    type: stamp-request
    parameters: {path: $.metadata.gateway, value: {stamped: true}}
  - name: route
    type: body-field-to-header
"""
    envoy = start(form, upstreams, start_envoy, chain, module="custom_payload_processor")
    reply = requests.post(envoy.url(), json={"model": "model-a", "messages": []}, timeout=10).json()
    assert reply["backend"] == "a", "the routing processor sees the mutated body"
    received = json.loads(reply["body"])
    assert received == {"model": "model-a", "messages": [], "metadata": {"gateway": {"stamped": True}}}
    assert int(reply["headers"]["content-length"]) == reply["body_length"] == len(reply["body"].encode())
