"""Request transforms through real Envoy, both forms, against an upstream that echoes what it
received: a chain of transforms in order with the official openai client, a sticky weighted
model split, validation errors, multipart built from JSON, MCP routing."""
import base64
import json
from email.parser import BytesParser
from email.policy import default as email_policy

import openai
import pytest
import requests

from harness import bootstrap, cluster, processor_filter

CHAIN = """
processors:
  - name: validate
    type: request-validator
    parameters: {maxTokens: 1000, allowedModels: [gpt-4o]}
  - name: split
    type: model-rewrite
    parameters:
      stickyHeader: x-user
      rules: [{model: gpt-4o, targets: [{model: gpt-4o-new, weight: 1}, {model: gpt-4o-old, weight: 1}]}]
  - name: house-rules
    type: prompt-decorator
    parameters: {prepend: [{role: system, content: "Be brief."}]}
  - name: shape
    type: body-mutation
    parameters:
      operations:
        - {op: setDefault, path: temperature, value: 0.2}
        - {op: clamp, path: max_tokens, max: 500}
      headers:
        - {op: setFromBody, name: x-gateway-target, path: model}
"""


def start(start_envoy, form, chain, upstreams, routes=None):
    routes = routes or [{"match": {"prefix": "/"}, "route": {"cluster": "default", "timeout": "10s"}}]
    clusters = [cluster(name, server.port) for name, server in upstreams.items()]
    return start_envoy(bootstrap([processor_filter(form, chain)], routes, clusters))


@pytest.mark.needs_headers_hold
def test_a_chain_of_transforms_runs_in_order_with_the_openai_client(start_envoy, form, upstreams):
    envoy = start(start_envoy, form, CHAIN, upstreams)
    client = openai.OpenAI(base_url=envoy.url("/v1"), api_key="k", max_retries=0, timeout=10)
    upstream = upstreams["default"]
    targets = []
    for _ in range(200):
        client.chat.completions.create(model="gpt-4o", max_tokens=900,
                                       messages=[{"role": "user", "content": "hi"}])
        sent = json.loads(upstream.requests[-1]["body"])
        targets.append(sent["model"])
        # The validator saw the client's 900 (under 1000); the clamp, later in the chain, cut it.
        assert sent["max_tokens"] == 500 and sent["temperature"] == 0.2
        assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
        # body-mutation ran after model-rewrite, so it saw the rewritten model.
        assert upstream.requests[-1]["headers"]["x-gateway-target"] == sent["model"]
    share = targets.count("gpt-4o-new") / len(targets)
    assert 0.38 < share < 0.62, share
    sticky = set()
    for _ in range(30):
        client.chat.completions.create(model="gpt-4o", messages=[], extra_headers={"x-user": "alice"})
        sticky.add(json.loads(upstream.requests[-1]["body"])["model"])
    assert len(sticky) == 1, "a sticky key stays on one target"

    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="gpt-4o", max_tokens=5000, messages=[])
    assert raised.value.body["code"] == "max_tokens_too_large"
    assert raised.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="gpt-5", messages=[])
    assert raised.value.body["code"] == "model_not_allowed"


@pytest.mark.needs_headers_hold
def test_json_becomes_multipart_that_a_real_parser_reads(start_envoy, form, upstreams):
    chain = """
processors:
  - name: form
    type: json-to-multipart
    match: {pathPrefixes: [/v1/audio/]}
    parameters: {fileFields: [{field: file, filename: speech.wav}]}
"""
    envoy = start(start_envoy, form, chain, upstreams)
    audio = b"RIFF fake wav bytes"
    body = {"model": "whisper-1", "file": "data:audio/wav;base64," + base64.b64encode(audio).decode(),
            "language": "en", "timestamp_granularities": ["word", "segment"]}
    reply = requests.post(envoy.url("/v1/audio/transcriptions"), json=body, timeout=10).json()
    content_type = reply["headers"]["content-type"]
    assert content_type.startswith("multipart/form-data; boundary=")
    assert int(reply["headers"]["content-length"]) == reply["body_length"]
    message = BytesParser(policy=email_policy).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + reply["body"].encode())
    parts = {(p.get_param("name", header="content-disposition"), p.get_filename()): p for p in message.iter_parts()}
    assert parts[("file", "speech.wav")].get_content_type() == "audio/wav"
    assert parts[("file", "speech.wav")].get_payload(decode=True) == audio
    assert parts[("model", None)].get_content().strip() == "whisper-1"
    repeated = [p.get_content().strip() for p in message.iter_parts()
                if p.get_param("name", header="content-disposition") == "timestamp_granularities[]"]
    assert repeated == ["word", "segment"]
    # A request the transform does not handle goes through byte-for-byte.
    plain = json.dumps({"model": "whisper-1", "url": "https://example.com/a.wav"})
    reply = requests.post(envoy.url("/v1/audio/transcriptions"), data=plain,
                          headers={"content-type": "application/json"}, timeout=10).json()
    assert reply["body"] == plain


@pytest.mark.needs_headers_hold
def test_mcp_calls_are_routed_by_method_and_tool(start_envoy, form, upstreams):
    chain = "processors: [{name: mcp, type: mcp-router, parameters: {denyTools: [drop_tables]}}]"
    routes = [
        {"match": {"prefix": "/mcp", "headers": [{"name": "x-mcp-tool", "string_match": {"exact": "search"}}]},
         "route": {"cluster": "c", "timeout": "10s"}},
        {"match": {"prefix": "/mcp", "headers": [{"name": "x-mcp-method", "string_match": {"exact": "initialize"}}]},
         "route": {"cluster": "a", "timeout": "10s"}},
        {"match": {"prefix": "/mcp", "headers": [{"name": "x-mcp-method", "string_match": {"exact": "tools/list"}}]},
         "route": {"cluster": "b", "timeout": "10s"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "default", "timeout": "10s"}},
    ]
    envoy = start(start_envoy, form, chain, upstreams, routes)

    def call(method, params=None, **headers):
        body = {"jsonrpc": "2.0", "id": 7, "method": method, "params": params or {}}
        return requests.post(envoy.url("/mcp"), json=body, timeout=10,
                             headers={"accept": "application/json, text/event-stream", **headers})

    assert call("initialize", {"protocolVersion": "2025-06-18"}).json()["backend"] == "a"
    listed = call("tools/list", **{"mcp-session-id": "sess-1"}).json()
    assert listed["backend"] == "b" and listed["headers"]["x-mcp-session"] == "sess-1"
    searched = call("tools/call", {"name": "search", "arguments": {"q": "x"}}).json()
    assert searched["backend"] == "c" and searched["headers"]["x-mcp-tool"] == "search"
    denied = call("tools/call", {"name": "drop_tables"})
    assert denied.status_code == 200
    assert denied.json() == {"jsonrpc": "2.0", "id": 7,
                             "error": {"code": -32601, "message": "tool drop_tables is not allowed"}}
