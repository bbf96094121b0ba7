"""A local mock model server speaking the OpenAI (chat completions, completions, responses API)
and Anthropic (messages) wire formats, buffered JSON or streamed SSE. Listens on 127.0.0.1.

Request headers steer it, so tests and clients (via extra headers) choose per request:
  x-mock-reply: the text to generate (one streamed event per word), percent-encoded UTF-8
  x-mock-token-chars: N streams N characters per event instead of a word (with
                x-mock-token-offset: K the first event carries K characters), so a value in the
                reply can be split across events at any position
  x-mock-split: `every-byte` writes the stream one byte per chunk (splitting events, `data:`,
                CRLF pairs and UTF-8 characters); a number N writes chunks of N bytes
  x-mock-delay-ms: pause before each streamed event
  x-mock-abort-after: N drops the connection after N streamed events (an upstream reset)
  x-mock-gzip: `force` compresses even when the client did not accept gzip
  x-mock-content-type: overrides the content type of a JSON reply
Without x-mock-gzip, replies are gzip-compressed when the request accepts gzip.
Every request is recorded (path, headers, JSON body, the usage it reported, the raw bytes sent).
"""
import gzip
import json
import re
import socket
import time
import zlib
from urllib.parse import unquote

from harness.mock_server import LocalServer, ModelServerHandler, read_body

DEFAULT_REPLY = "Hello there, caf\u00e9 \u00fcber \u2603 \U0001f600 how can I help?"


def tokens(text):
    return re.findall(r"\S+\s*|\s+", text) or [""]


def prompt_tokens(body):
    """A deterministic stand-in for a tokenizer: words in the prompt fields."""
    parts = [body.get("messages"), body.get("prompt"), body.get("input"), body.get("system")]
    return max(1, len(json.dumps([p for p in parts if p is not None]).split()))


def sse(data, event=None):
    head = f"event: {event}\n" if event else ""
    return (head + "data: " + (data if isinstance(data, str) else json.dumps(data)) + "\n\n").encode()


class _Handler(ModelServerHandler):

    def do_GET(self):
        self.server.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                     "body": None})
        if self.path.split("?")[0].rstrip("/").endswith("/models"):
            return self._send_json(200, {"object": "list", "data": [{"id": "mock-model", "object": "model"}]})
        return self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})

    def do_POST(self):
        raw = read_body(self)
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        path = self.path.split("?")[0].rstrip("/")
        record = {"path": path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
        self.server.requests.append(record)
        reply = unquote(self.headers.get("x-mock-reply", "")) or DEFAULT_REPLY
        words = tokens(reply)
        if self.headers.get("x-mock-token-chars"):
            size = int(self.headers["x-mock-token-chars"])
            first = int(self.headers.get("x-mock-token-offset", size)) or size
            words = [reply[:first]] + [reply[i:i + size] for i in range(first, len(reply), size)]
        model = body.get("model") or "mock-model"
        stream = body.get("stream") is True
        prompt = prompt_tokens(body)
        if path.endswith("/chat/completions"):
            kind = "chat"
        elif path.endswith("/completions"):
            kind = "completions"
        elif path.endswith("/responses"):
            kind = "responses"
        elif path.endswith("/messages"):
            kind = "anthropic"
        else:
            return self._send_json(404, {"error": {"message": f"no route {path}", "type": "invalid_request_error"}})
        usage = {"input": prompt, "output": len(words), "cached": 2 if prompt > 2 else 0}
        record["usage"] = usage
        if not stream:
            return self._send_json(200, self._full(kind, model, reply, usage))
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True
        self._send_stream(record, self._events(kind, model, words, usage, include_usage))

    # --- bodies -------------------------------------------------------------------------
    def _full(self, kind, model, text, usage):
        if kind == "chat":
            return {"id": "chatcmpl-mock", "object": "chat.completion", "created": 1, "model": model,
                    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": usage["input"], "completion_tokens": usage["output"],
                              "total_tokens": usage["input"] + usage["output"],
                              "prompt_tokens_details": {"cached_tokens": usage["cached"]}}}
        if kind == "completions":
            return {"id": "cmpl-mock", "object": "text_completion", "created": 1, "model": model,
                    "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                    "usage": {"prompt_tokens": usage["input"], "completion_tokens": usage["output"],
                              "total_tokens": usage["input"] + usage["output"]}}
        if kind == "responses":
            return self._response_object(model, text, usage, "completed")
        return {"id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": usage["input"] - usage["cached"], "output_tokens": usage["output"],
                          "cache_read_input_tokens": usage["cached"], "cache_creation_input_tokens": 0}}

    @staticmethod
    def _response_object(model, text, usage, status):
        output = [] if text is None else [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                                           "content": [{"type": "output_text", "text": text, "annotations": []}]}]
        obj = {"id": "resp_mock", "object": "response", "created_at": 1, "status": status, "model": model,
               "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}
        if usage is not None:
            obj["usage"] = {"input_tokens": usage["input"], "output_tokens": usage["output"],
                            "total_tokens": usage["input"] + usage["output"],
                            "input_tokens_details": {"cached_tokens": usage["cached"]},
                            "output_tokens_details": {"reasoning_tokens": 0}}
        return obj

    def _events(self, kind, model, words, usage, include_usage):
        """Yields the encoded events of one streamed reply."""
        if kind in ("chat", "completions"):
            def chunk(choices, with_usage=None):
                obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
                c = {"id": "chatcmpl-mock", "object": obj, "created": 1, "model": model, "choices": choices}
                if include_usage:
                    c["usage"] = with_usage
                return sse(c)
            if kind == "chat":
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                for word in words:
                    yield chunk([{"index": 0, "delta": {"content": word}, "finish_reason": None}])
                yield chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
            else:
                for word in words:
                    yield chunk([{"index": 0, "text": word, "finish_reason": None, "logprobs": None}])
                yield chunk([{"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}])
            if include_usage:
                yield chunk([], {"prompt_tokens": usage["input"], "completion_tokens": usage["output"],
                                 "total_tokens": usage["input"] + usage["output"],
                                 "prompt_tokens_details": {"cached_tokens": usage["cached"]}})
            yield b"data: [DONE]\n\n"
        elif kind == "responses":
            seq = iter(range(1_000_000))
            yield sse({"type": "response.created", "sequence_number": next(seq),
                       "response": self._response_object(model, None, None, "in_progress")}, "response.created")
            for word in words:
                yield sse({"type": "response.output_text.delta", "sequence_number": next(seq), "item_id": "msg_1",
                           "output_index": 0, "content_index": 0, "delta": word, "logprobs": []},
                          "response.output_text.delta")
            yield sse({"type": "response.completed", "sequence_number": next(seq),
                       "response": self._response_object(model, "".join(words), usage, "completed")},
                      "response.completed")
        else:
            yield sse({"type": "message_start", "message": {
                "id": "msg_mock", "type": "message", "role": "assistant", "content": [], "model": model,
                "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": usage["input"] - usage["cached"], "output_tokens": 1,
                          "cache_read_input_tokens": usage["cached"], "cache_creation_input_tokens": 0}}},
                "message_start")
            yield sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                      "content_block_start")
            yield sse({"type": "ping"}, "ping")
            for word in words:
                yield sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}},
                          "content_block_delta")
            yield sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
            yield sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                       "usage": {"output_tokens": usage["output"]}}, "message_delta")
            yield sse({"type": "message_stop"}, "message_stop")

    # --- wire ---------------------------------------------------------------------------
    def _wants_gzip(self):
        if self.headers.get("x-mock-gzip") == "force":
            return True
        accepted = self.headers.get("accept-encoding", "")
        return any(part.split(";")[0].strip() == "gzip" for part in accepted.split(","))

    def _send_json(self, status, obj):
        payload = json.dumps(obj).encode()
        self.server.requests[-1]["sent"] = payload
        content_type = self.headers.get("x-mock-content-type", "application/json")
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("x-backend", self.server.name)
        if self._wants_gzip():
            payload = gzip.compress(payload)
            self.send_header("content-encoding", "gzip")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _send_stream(self, record, events):
        split = self.headers.get("x-mock-split")
        delay = float(self.headers.get("x-mock-delay-ms", "0")) / 1000
        compressor = zlib.compressobj(wbits=31) if self._wants_gzip() else None
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("x-backend", self.server.name)
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        if compressor:
            self.send_header("content-encoding", "gzip")
        self.end_headers()
        sent = bytearray()

        def write(data):
            if compressor:
                data = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
            if data:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

        abort_after = int(self.headers.get("x-mock-abort-after", "-1"))
        for index, event in enumerate(events):
            if index == abort_after:
                self.wfile.flush()
                self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                self.request.close()
                self.close_connection = True
                return
            if delay:
                time.sleep(delay)
            sent += event
            if split == "every-byte":
                for i in range(len(event)):
                    write(event[i:i + 1])
                    time.sleep(0.0005)
            elif split and split.isdigit():
                n = int(split)
                for i in range(0, len(event), n):
                    write(event[i:i + n])
                    time.sleep(0.0005)
            else:
                write(event)
        if compressor:
            tail = compressor.flush()
            if tail:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(tail), tail))
        # Recorded before the last chunk: the client may look as soon as the stream ends.
        record["sent"] = bytes(sent)
        record["finished_at"] = time.monotonic()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class ModelServer(LocalServer):
    """The mock model server."""

    handler = _Handler

    def __init__(self, name="model"):
        super().__init__(name)
