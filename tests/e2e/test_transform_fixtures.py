"""Golden in/out fixtures for each request transform, through real Envoy in both forms.

Each file in fixtures/transforms/ holds one chain and its cases: the request a client sends and
what must come out: the exact body and headers the upstream received (the echo server reports
them), or the local reply when the chain refuses (and then the upstream must see nothing).
`upstream_body` compares JSON with key order; `upstream_body_text` compares bytes;
`response_body` is a subset match, `response_body_exact` an exact one; a case that expects a
response body expects a local reply.
"""
import base64
import json
from email.parser import BytesParser
from email.policy import default as email_policy
from pathlib import Path

import pytest
import requests

from harness import bootstrap, cluster, processor_filter

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "transforms").glob("*.json"))


def ordered(value):
    """JSON with objects as lists of pairs, so comparisons see key order too."""
    return json.loads(json.dumps(value), object_pairs_hook=list)


def is_subset(expected, actual):
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and is_subset(v, actual[k]) for k, v in expected.items())
    return expected == actual


def multipart_parts(headers, body):
    message = BytesParser(policy=email_policy).parsebytes(
        f"Content-Type: {headers['content-type']}\r\n\r\n".encode() + body)
    assert message.is_multipart(), headers["content-type"]
    parts = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if part.get_filename():
            parts.append({"name": name, "filename": part.get_filename(), "content_type": part.get_content_type(),
                          "base64": base64.b64encode(part.get_payload(decode=True)).decode()})
        else:
            parts.append({"name": name, "value": part.get_payload(decode=True).decode()})
    return parts


def send(envoy, request):
    headers = dict(request.get("headers", {}))
    if "body_text" in request:
        data = request["body_text"].encode()
    else:
        data = json.dumps(request["body"]).encode()
    headers.setdefault("content-type", "application/json")
    return requests.request(request.get("method", "POST"), envoy.url(request["path"]), data=data,
                            headers=headers, timeout=10)


def check_case(envoy, upstream, case):
    expect = case["expect"]
    before = len(upstream.requests)
    reply = send(envoy, case["request"])
    assert reply.status_code == expect.get("status", 200), reply.text
    for name, value in expect.get("response_headers", {}).items():
        assert reply.headers.get(name) == value, name
    if "response_body" in expect:
        assert is_subset(expect["response_body"], reply.json()), reply.text
    if "response_body_exact" in expect:
        assert reply.json() == expect["response_body_exact"], reply.text
    # A local reply (an error status, or a JSON-RPC error under 200) never reaches the upstream.
    if reply.status_code != 200 or "response_body" in expect or "response_body_exact" in expect:
        assert len(upstream.requests) == before, "a refused request must not reach the upstream"
        return
    received = upstream.requests[-1]
    assert len(upstream.requests) == before + 1
    # The length the upstream was told is the length it got, whatever the transform did.
    assert int(received["headers"].get("content-length", received["body_length"])) == received["body_length"]
    if "upstream_body" in expect:
        assert ordered(json.loads(received["body"])) == ordered(expect["upstream_body"]), received["body"]
    if "upstream_body_text" in expect:
        assert received["body"] == expect["upstream_body_text"]
    if "upstream_multipart" in expect:
        body = base64.b64decode(received["body_base64"])
        assert multipart_parts(received["headers"], body) == expect["upstream_multipart"]
    for name, value in expect.get("upstream_headers", {}).items():
        assert received["headers"].get(name) == value, name


# Every fixture but the prompt decorator's re-routes, sets request headers or counts refused
# requests at the upstream: all need the request headers held.
HOLD_FREE_FIXTURES = {"prompt-decorator"}


@pytest.mark.parametrize("fixture", [
    path if path.stem in HOLD_FREE_FIXTURES else pytest.param(path, marks=pytest.mark.needs_headers_hold)
    for path in FIXTURES
], ids=lambda path: path.stem)
def test_golden_fixture(start_envoy, form, upstreams, fixture):
    spec = json.loads(fixture.read_text())
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "default", "timeout": "10s"}}]
    envoy = start_envoy(bootstrap([processor_filter(form, json.dumps(spec["chain"]))], routes,
                                  [cluster("default", upstreams["default"].port)]))
    failures = []
    for case in spec["cases"]:
        try:
            check_case(envoy, upstreams["default"], case)
        except AssertionError as error:
            failures.append(f"{case['name']}: {error}")
    assert not failures, "\n".join(failures)
