"""No spoofing, both forms: every header the filter owns is overwritten or removed when a client
(or, for response headers, the upstream) sends its own value. One row per key."""
import json

import pytest
import requests

from harness import bootstrap, cluster, processor_filter

CHAIN = """
processors:
  - {name: route, type: body-field-to-header, match: {pathPrefixes: [/v1/]}}
  - {name: base, type: base-model-to-header, match: {pathPrefixes: [/v1/]}, parameters: {adapters: {sql-lora: llama}}}
  - name: rewrite
    type: model-rewrite
    match: {pathPrefixes: [/v1/]}
    parameters: {rules: [{model: old-model, targets: [{model: new-model, weight: 1}]}]}
  - {name: mcp, type: mcp-router, match: {pathPrefixes: [/mcp]}}
  - {name: usage, type: token-usage, failureMode: FailOpen, match: {pathPrefixes: [/v1/]},
     parameters: {responseHeaders: x-usage-}}
  - {name: pii, type: pii-guard, match: {pathPrefixes: [/v1/]}, parameters: {direction: Request, reportHeader: x-pii-findings}}
  - {name: epp, type: endpoint-picker, match: {pathPrefixes: [/v1/]},
     parameters: {endpoints: ['127.0.0.1:9'], servedHeader: x-gateway-destination-endpoint-served}}
"""
# The upstream's own address, for the served-endpoint row (the picker reports where the request
# really went: here the route's static cluster, not the pick).
UPSTREAM = "upstream-address"

CHAT = "/v1/chat/completions"
MCP = "/mcp"
TOOL_CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search", "arguments": {}}}
LIST = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}


def chat(model=None, text="hello"):
    body = {"messages": [{"role": "user", "content": text}]}
    if model:
        body["model"] = model
    return body


# (key, path, body, spoofed request headers, where: "upstream" request or "client" response, expected)
ROWS = [
    ("x-gateway-model-name", CHAT, chat("model-a"), {}, "upstream", "model-a"),
    ("x-gateway-model-name", CHAT, chat(), {}, "upstream", None),
    ("x-gateway-base-model-name", CHAT, chat("sql-lora"), {}, "upstream", "llama"),
    ("x-gateway-base-model-name", CHAT, chat(), {}, "upstream", None),
    ("x-gateway-model-target", CHAT, chat("old-model"), {}, "upstream", "new-model"),
    ("x-gateway-model-target", CHAT, chat("model-a"), {}, "upstream", None),
    ("x-mcp-method", MCP, LIST, {}, "upstream", "tools/list"),
    ("x-mcp-tool", MCP, TOOL_CALL, {}, "upstream", "search"),
    ("x-mcp-tool", MCP, LIST, {}, "upstream", None),
    ("x-mcp-session", MCP, LIST, {}, "upstream", None),
    ("x-mcp-session", MCP, LIST, {"mcp-session-id": "s-1"}, "upstream", "s-1"),
    ("x-pii-findings", CHAT, chat("model-a", "mail a@b.io"), {}, "client", "email"),
    ("x-pii-findings", CHAT, chat("model-a"), {}, "client", None),
    ("x-usage-total-tokens", CHAT, chat("model-a"), {}, "client", None),
    ("x-gateway-destination-endpoint", CHAT, chat("model-a"), {}, "upstream", "127.0.0.1:9"),
    ("x-gateway-destination-endpoint-served", CHAT, chat("model-a"), {}, "client", UPSTREAM),
]


@pytest.fixture
def envoy(form, upstreams, start_envoy):
    config = bootstrap([processor_filter(form, CHAIN)], [{"match": {"prefix": "/"}, "route": {"cluster": "default"}}],
                       [cluster("default", upstreams["default"].port)])
    return start_envoy(config)


@pytest.mark.parametrize("key,path,body,extra,where,expected", ROWS,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(ROWS)])
def test_gateway_owned_header_cannot_be_spoofed(envoy, upstreams, key, path, body, extra, where, expected):
    headers = dict(extra)
    if where == "upstream":
        headers[key] = "spoofed"
    else:
        # The upstream is the one lying about a response header the gateway owns.
        headers["x-mock-response-headers"] = json.dumps({key: "spoofed"})
    reply = requests.post(envoy.url(path), json=body, headers=headers, timeout=10)
    assert reply.status_code == 200, reply.text
    if where == "upstream":
        seen = upstreams["default"].requests[-1]["headers"].get(key)
    else:
        values = [v for k, v in reply.raw.headers.items() if k.lower() == key]
        assert len(values) <= 1, values
        seen = values[0] if values else None
    if expected == UPSTREAM:
        expected = f"127.0.0.1:{upstreams['default'].port}"
    assert seen == expected
