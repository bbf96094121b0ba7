"""A local upstream for tests and the demo: answers every request with what it received.

The JSON reply names the backend, echoes the request headers, the body's SHA-256 and length
(so tests prove byte-for-byte forwarding), and for chat requests looks like an OpenAI chat
completion. Handles chunked request bodies. Listens on 127.0.0.1 only.
"""
import base64
import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def read_body(handler):
    """The request body, whether sent with content-length or chunked."""
    if handler.headers.get("transfer-encoding", "").lower() == "chunked":
        return _read_chunked(handler.rfile)
    return handler.rfile.read(int(handler.headers.get("content-length") or 0))


def _read_chunked(rfile):
    body = bytearray()
    while True:
        size = int(rfile.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return bytes(body)
        body += rfile.read(size)
        rfile.readline()


class ModelServerHandler(BaseHTTPRequestHandler):
    """Base of the model-server mocks: HTTP/1.1, silent, and each write leaves at once (no Nagle
    delay), as a real model server's streamed events would."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def setup(self):
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _handle(self):
        body = read_body(self)
        server = self.server
        model = None
        try:
            model = json.loads(body).get("model")
        except Exception:
            pass
        reply = {
            "backend": server.name,
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body_length": len(body),
            "body": body[:65536].decode("utf-8", "replace"),
            # Binary bodies (multipart uploads) also come back exactly.
            "body_base64": base64.b64encode(body[:65536]).decode(),
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"Hello from {server.name}"}}],
        }
        payload = json.dumps(reply).encode()
        server.requests.append(reply)  # before replying: a client may look as soon as it has the answer
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.send_header("x-backend", server.name)
        # A misbehaving upstream: `x-mock-response-headers: {"name": "value"}` adds headers.
        for name, value in json.loads(self.headers.get("x-mock-response-headers", "{}")).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = _handle


class LocalServer:
    """An HTTP server on 127.0.0.1, port chosen by the OS, serving `handler` in a thread and
    recording requests in `requests` (the handler appends them)."""

    handler = None

    def __init__(self, name):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        self.httpd.daemon_threads = True
        self.httpd.name = name
        self.httpd.requests = []
        self.name = name
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def requests(self):
        return self.httpd.requests

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class MockServer(LocalServer):
    """Echo upstream."""

    handler = _Handler
