"""Services the callout plugins call, on 127.0.0.1, for the end-to-end tests, the demo and the
benchmark. Mocks only where no real server can run here; each speaks its service's documented
wire format.

- `ServiceMocks`: one server, several services by path:
  - `POST /v1/moderations`: OpenAI's moderation API (`{input, model}` -> `{id, model, results:
    [{flagged, categories, category_scores, category_applied_input_types}]}`); a word list per
    category stands in for the model.
  - `POST /v1/chat/completions`: a Llama Guard model behind an OpenAI-compatible server: the
    completion's content is `safe`, or `unsafe` and a line of category codes (Llama Guard 3's
    S1-S14), judged on the last message.
  - `POST /search`: a retriever for RAG: `{query, k}` -> `{documents: [{id, text}]}`.
  - `/authz/...`: an authorization service for `ext-authz-body`: `Bearer good` and a tenant
    allowed for the model -> 200 with `x-user-id`; otherwise 403 with a JSON reason.
  - `x-mock-delay-ms` on any call (or the server's `delay_ms`) delays the answer.
- `PresidioServer`: the real `presidio-analyzer` engine behind its documented REST call
  (`POST /analyze` with `{text, language, entities?, score_threshold?}` -> a list of
  `{entity_type, start, end, score, ...}`, as Presidio's own REST app answers). The spaCy
  pipeline is blank (no model download here), so Presidio's pattern, checksum and context
  recognizers run (email, phone, credit card, IBAN, IP, URL, ...) and its NER does not.
"""
import json
import time

from harness.mock_server import LocalServer, ModelServerHandler, read_body

CATEGORIES = ["harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
              "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
              "violence/graphic"]
# The mock's "model": words that flag a category.
MODERATION_WORDS = {"harassment": ["idiot", "stupid"], "violence": ["kill", "hurt"], "illicit": ["launder"]}
# Llama Guard 3 codes: S1 violent crimes, S2 non-violent crimes, S9 indiscriminate weapons.
GUARD_WORDS = {"S1": ["murder"], "S2": ["steal", "shoplift"], "S9": ["bomb", "nerve agent"]}
DOCUMENTS = [{"id": "kb-1", "text": "Refunds are processed within 5 business days."},
             {"id": "kb-2", "text": "Premium support: write to help@example.com."}]
TENANT_MODELS = {"t1": ["gpt-4o", "m"], "t2": ["m"]}


def _inputs(value):
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [item if isinstance(item, str) else item.get("text", "") for item in value]
    return []


def moderation(body):
    results = []
    for text in _inputs(body.get("input")):
        lower = text.lower()
        flags = {c: any(w in lower for w in MODERATION_WORDS.get(c, [])) for c in CATEGORIES}
        results.append({
            "flagged": any(flags.values()),
            "categories": flags,
            "category_scores": {c: (0.93 if flags[c] else 0.002) for c in CATEGORIES},
            "category_applied_input_types": {c: ["text"] for c in CATEGORIES},
        })
    return {"id": f"modr-{int(time.time() * 1000)}", "model": body.get("model", "omni-moderation-latest"),
            "results": results}


def llama_guard(body):
    messages = body.get("messages") or [{}]
    text = str(messages[-1].get("content", "")).lower()
    codes = [code for code, words in GUARD_WORDS.items() if any(w in text for w in words)]
    content = "unsafe\n" + ",".join(codes) if codes else "safe"
    return {"id": "chatcmpl-guard", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}}


class _ServicesHandler(ModelServerHandler):

    def _reply(self, status, payload, headers=()):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _handle(self):
        raw = read_body(self)
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.requests.append({"method": self.command, "path": self.path, "headers": headers, "body": body})
        delay = int(headers.get("x-mock-delay-ms", self.server.delay_ms))
        if delay:
            time.sleep(delay / 1000)
        path = self.path.split("?")[0]
        if path == "/v1/moderations":
            return self._reply(200, moderation(body))
        if path == "/v1/chat/completions":
            return self._reply(200, llama_guard(body))
        if path == "/search":
            return self._reply(200, {"documents": DOCUMENTS[: int(body.get("k", 2))]})
        if path.startswith("/authz/"):
            tenant = body.get("metadata.tenant")
            allowed = headers.get("authorization") == "Bearer good" and body.get("model") in TENANT_MODELS.get(tenant, [])
            if allowed:
                return self._reply(200, {}, [("x-user-id", f"user-of-{tenant}"), ("x-envoy-internal", "no")])
            reason = f"tenant {tenant} may not use {body.get('model')}"
            return self._reply(403, {"error": {"message": reason, "code": "forbidden"}})
        return self._reply(404, {"error": f"no service at {path}"})

    do_GET = do_POST = _handle


class ServiceMocks(LocalServer):
    """Moderation, Llama Guard, retriever and authorization services (see the module doc)."""

    handler = _ServicesHandler

    def __init__(self, name="services", delay_ms=0):
        super().__init__(name)
        self.httpd.delay_ms = delay_ms


def _analyzer():
    import spacy
    import tldextract
    # Presidio's email recognizer validates domains with tldextract, which would fetch the
    # public suffix list from the internet: use the snapshot the package ships.
    tldextract.extract = tldextract.TLDExtract(suffix_list_urls=()).__call__
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import SpacyNlpEngine

    engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": "blank"}])
    engine.nlp = {"en": spacy.blank("en")}
    return AnalyzerEngine(nlp_engine=engine, supported_languages=["en"])


class _PresidioHandler(ModelServerHandler):

    def do_POST(self):
        raw = read_body(self)
        self.server.requests.append({"path": self.path, "body": raw})
        if self.path.split("?")[0] != "/analyze":
            return self._send(404, {"error": "not found"})
        try:
            body = json.loads(raw)
            results = self.server.analyzer.analyze(
                text=body["text"], language=body.get("language", "en"), entities=body.get("entities"),
                score_threshold=body.get("score_threshold"))
        except (KeyError, ValueError, TypeError) as err:
            return self._send(400, {"error": str(err)})
        self._send(200, [result.to_dict() for result in results])

    def do_GET(self):
        self._send(200, {"status": "ok"} if self.path == "/health" else {"error": "not found"})

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class PresidioServer(LocalServer):
    """The real Presidio analyzer behind `POST /analyze`."""

    handler = _PresidioHandler

    def __init__(self, name="presidio"):
        analyzer = _analyzer()
        super().__init__(name)
        self.httpd.analyzer = analyzer
