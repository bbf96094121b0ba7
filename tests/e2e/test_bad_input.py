"""The bad-input matrix through real Envoy, both forms: one table of hostile or broken requests,
each with the status it must get and a clear JSON error, Envoy serving the next request after
every row, no header injection ever reaching the upstream, and nothing a guard hides in Envoy's
log (which runs at debug level here)."""
import asyncio
import json
import socket
import time

import httpx
import pytest
import requests

from harness import bootstrap, cluster, model_routes, processor_filter
from harness.model_server import ModelServer

LIMIT = 256 * 1024  # room for the 10,000-key row
SECRET_EMAIL = "matrix.secret@example.com"
CHAIN = f"""
limits: {{maxRequestBodyBytes: {LIMIT}}}
processors:
  - name: route-by-model
    type: body-field-to-header
  - name: pii
    type: pii-guard
    parameters: {{direction: Request}}
"""


@pytest.fixture
def envoy(form, upstreams, start_envoy):
    config = bootstrap(
        [processor_filter(form, CHAIN)],
        model_routes({"model-a": "a"}, "default"),
        [cluster(name, server.port) for name, server in upstreams.items()],
    )
    return start_envoy(config, log_level="debug")


def request(body, content_type="application/json", length=None, extra=""):
    body = body if isinstance(body, bytes) else body.encode()
    length = len(body) if length is None else length
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n")
    return head.encode() + body


class Conn:
    """A client connection that reads whole HTTP/1.1 responses (content-length framed)."""

    def __init__(self, envoy):
        self.sock = socket.create_connection(("127.0.0.1", envoy.port), timeout=10)
        self.buffered = b""

    def _more(self):
        chunk = self.sock.recv(65536)
        self.buffered += chunk
        return bool(chunk)

    def response(self):
        """(status, headers, body), or None when the connection closed first."""
        while b"\r\n\r\n" not in self.buffered:
            if not self._more():
                return None
        head, _, self.buffered = self.buffered.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", 0))
        while len(self.buffered) < length and self._more():
            pass
        body, self.buffered = self.buffered[:length], self.buffered[length:]
        return status, headers, body

    def close(self):
        self.sock.close()


def exchange(envoy, payload, pause=0.0, close_after_send=False):
    """Sends raw bytes (one byte per `pause` seconds when set) and reads one response."""
    conn = Conn(envoy)
    try:
        if pause:
            for i in range(len(payload)):
                conn.sock.sendall(payload[i:i + 1])
                time.sleep(pause)
        else:
            conn.sock.sendall(payload)
        if close_after_send:
            return None
        try:
            return conn.response()
        except (ConnectionResetError, socket.timeout):
            return None
    finally:
        conn.close()


def chat(model_json='"model-a"', content="hello"):
    return '{"messages": [{"role": "user", "content": %s}], "model": %s}' % (json.dumps(content), model_json)


DEEP = 10_000
# (row id, raw request, expected status or None (no answer), error code or upstream check)
MATRIX = [
    ("malformed-json", request('{"model": "model-a",'), 400, "invalid_json"),
    ("not-json-text", request("hello there"), 400, "invalid_json"),
    ("length-lies-short", request(chat(), length=10), 400, "invalid_json"),
    ("empty-json-body", request(b""), 200, {"backend": "default"}),
    ("bom", request("\ufeff" + chat()), 400, "invalid_json"),
    ("duplicate-model", request('{"model": "model-a", "model": "model-b"}'), 400, "invalid_json"),
    ("model-number", request(chat("42")), 200, {"x-gateway-model-name": "42"}),
    ("model-bool", request(chat("true")), 200, {"x-gateway-model-name": "true"}),
    ("model-null", request(chat("null")), 200, {"x-gateway-model-name": None}),
    ("model-object", request(chat('{"a": 1}')), 400, "invalid_field"),
    ("model-array", request(chat('["model-a"]')), 400, "invalid_field"),
    ("deep-nesting", request('{"a": ' + "[" * DEEP + "]" * DEEP + ', "model": "model-a"}'), 400, "invalid_json"),
    ("deep-nesting-after-model", request('{"model": "model-a", "a": ' + "[" * DEEP + "]" * DEEP + "}"), 400,
     "invalid_json"),
    ("many-keys", request("{" + ",".join(f'"k{i}":{i}' for i in range(10_000)) + ',"model":"model-a"}'), 200,
     {"backend": "a"}),
    ("invalid-utf8", request(b'{"model": "model-a", "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
     400, "invalid_json"),
    ("overlong-utf8", request(b'{"model": "model-\xc0\xaf"}'), 400, "invalid_json"),
    ("nul-in-model", request(chat('"model\\u0000a"')), 400, "invalid_header_value"),
    ("crlf-in-model", request(chat('"model-a\\r\\nx-evil: 1"')), 400, "invalid_header_value"),
    ("lf-in-model", request(chat('"model-a\\nx-evil: 1"')), 400, "invalid_header_value"),
    # UTF-8 bytes go on unchanged (the echo server reads header bytes as latin-1).
    ("non-ascii-model", request(chat('"mod\\u00e8le"')), 200,
     {"x-gateway-model-name": "modèle".encode().decode("latin-1")}),
    ("gzip-encoded", request(b"\x1f\x8b\x08\x00", extra="Content-Encoding: gzip\r\n"), 415,
     "unsupported_content_encoding"),
    ("form-urlencoded", request("model=model-a", content_type="application/x-www-form-urlencoded"), 400,
     "invalid_json"),
    ("multipart", request('--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nmodel-a\r\n--b--\r\n',
                          content_type="multipart/form-data; boundary=b"), 400, "invalid_json"),
    ("at-the-limit", request(chat(content="x" * (LIMIT - len(chat(content=""))))), 200, {"backend": "a"}),
    ("one-over-the-limit", request(chat(content="x" * (LIMIT + 1 - len(chat(content=""))))), 413,
     "request_too_large"),
    ("pii-masked-not-logged", request(chat(content=f"mail {SECRET_EMAIL}")), 200, {"backend": "a"}),
]


def check_row(envoy, upstreams, row):
    name, payload, status, expect = row
    answer = exchange(envoy, payload)
    assert answer is not None, f"{name}: no answer"
    got, headers, body = answer
    assert got == status, f"{name}: {got} {body[:300]!r}"
    if status >= 400 and isinstance(expect, str):
        error = json.loads(body)["error"]
        assert error["code"] == expect, f"{name}: {error}"
        assert error["message"], name
    if status == 200 and isinstance(expect, dict):
        echoed = json.loads(body)
        for key, value in expect.items():
            seen = echoed.get(key) if key == "backend" else echoed["headers"].get(key)
            assert seen == value, f"{name}: {key} = {seen!r}"
        assert "x-evil" not in echoed["headers"], name


def assert_serving(envoy):
    answer = exchange(envoy, request(chat()))
    assert answer and answer[0] == 200, "Envoy must serve the next request"


def test_bad_input_matrix(envoy, upstreams):
    for row in MATRIX:
        check_row(envoy, upstreams, row)
        assert_serving(envoy)
    # Connection-level abuse.
    body = chat().encode()
    slow = exchange(envoy, request(body), pause=0.002)  # slowloris: one byte every 2 ms
    assert slow and slow[0] == 200
    exchange(envoy, request(body)[: len(request(body)) - 20], close_after_send=True)  # abort mid-body
    assert_serving(envoy)
    truncated = exchange(envoy, request(body[:20], length=len(body)) + b"", close_after_send=True)
    assert truncated is None
    assert_serving(envoy)
    # Pipelining: two requests in one write, answered in order, each routed on its own body.
    conn = Conn(envoy)
    conn.sock.sendall(request(chat('"model-a"')) + request(chat('"model-z"')))
    first, second = conn.response(), conn.response()
    conn.close()
    assert first[0] == 200 and json.loads(first[2])["backend"] == "a"
    assert second[0] == 200 and json.loads(second[2])["backend"] == "default"
    # Nothing a guard hides reaches Envoy's log, even at debug level.
    assert SECRET_EMAIL not in envoy.log()
    assert "x-evil" not in "".join(r["headers"].get("x-evil", "") for s in upstreams.values() for r in s.requests)


def test_many_concurrent_h2_streams(envoy):
    """100 streams at once on one HTTP/2 (prior knowledge) connection, each routed on its body."""

    async def run():
        async with httpx.AsyncClient(http1=False, http2=True, timeout=30) as client:
            models = [("model-a" if i % 2 else "model-z") for i in range(100)]
            replies = await asyncio.gather(*(client.post(envoy.url(), content=chat(json.dumps(m))) for m in models))
            return models, replies

    models, replies = asyncio.run(run())
    assert {reply.http_version for reply in replies} == {"HTTP/2"}
    for model, reply in zip(models, replies):
        assert reply.status_code == 200
        assert reply.json()["backend"] == ("a" if model == "model-a" else "default")
    assert_serving(envoy)


STREAM_CHAIN = """
processors:
  - {name: usage, type: token-usage, failureMode: FailOpen}
  - {name: pii, type: pii-guard, parameters: {direction: Response, streamHoldBackBytes: 32}}
"""


@pytest.fixture
def stream_gateway(form, start_envoy):
    model = ModelServer()
    config = bootstrap([processor_filter(form, STREAM_CHAIN)],
                       [{"match": {"prefix": "/"}, "route": {"cluster": "model", "timeout": "30s"}}],
                       [cluster("model", model.port)])
    yield start_envoy(config)
    model.stop()


def stream_request(envoy, headers):
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    return requests.post(envoy.url(), json=body, headers=headers, stream=True, timeout=10)


def test_aborts_and_resets_mid_stream_leave_envoy_serving(stream_gateway):
    envoy = stream_gateway
    reply = {"x-mock-reply": "one two three four five six seven eight nine ten", "x-mock-delay-ms": "20"}
    # The client goes away after the first bytes.
    response = stream_request(envoy, reply)
    next(response.iter_content(16))
    response.close()
    # The upstream drops the connection after three events: the client sees the stream break,
    # not a hang, and nothing it should not.
    response = stream_request(envoy, reply | {"x-mock-abort-after": "3"})
    with pytest.raises(requests.exceptions.RequestException):
        b"".join(response.iter_content(None))
    # Envoy goes on serving streams.
    whole = stream_request(envoy, reply)
    text = b"".join(whole.iter_content(None))
    assert whole.status_code == 200 and text.endswith(b"data: [DONE]\n\n")
