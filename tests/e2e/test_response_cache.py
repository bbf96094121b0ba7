"""The response cache through real Envoy, both forms: the official openai client gets hits on a
repeat, a paraphrase and a stream, and misses on a negation, a number change, another tenant,
`cache-control: no-store` and an answer a guard masked. The embedding model (wordllama's, from
the installed wheel) comes through an Envoy cluster, the route both forms share. A second test
shows what is shared between two workers: one cache in the .so, one per worker VM in the .wasm."""
import http.client
import json
import time
from urllib.parse import quote

import openai
import pytest

from harness import WASM_HOLD_HEADERS, bootstrap, cluster, model_routes, processor_filter, wordllama_files
from harness.model_server import ModelServer
from harness.model_files import ModelFileServer


@pytest.fixture(scope="module")
def upstream():
    server = ModelServer("model")
    files = ModelFileServer()
    yield server, files
    server.stop()
    files.stop()


def semantic_chain():
    weights, tokenizer = wordllama_files()
    return json.dumps({"processors": [
        {"name": "pii", "type": "pii-guard", "parameters": {"entities": ["Email"], "action": "Mask"}},
        {"name": "cache", "type": "response-cache", "parameters": {
            "mode": "Semantic", "similarityThreshold": 0.85, "partitionBy": ["x-tenant"], "ttl": "10m",
            "embedding": {"weights": f"/{weights.name}", "tokenizer": f"/{tokenizer.name}", "cluster": "models"}}},
    ]})


def reply_header(text):
    return {"x-mock-reply": quote(text)}


def test_hits_and_misses_through_envoy(form, upstream, start_envoy):
    """Also run with the .wasm as Envoy Gateway configures it (scripts/test_matrix.sh): hits and
    misses alike, but a miss's answer carries no x-cache header there (its headers go before
    the cache sees the body)."""
    server, files = upstream
    holds = form == "dynamic-module" or WASM_HOLD_HEADERS
    miss = "miss" if holds else None
    config = bootstrap([processor_filter(form, semantic_chain())], model_routes({}, "model"),
                       [cluster("model", server.port), cluster("models", files.port)])
    envoy = start_envoy(config)
    client = openai.OpenAI(base_url=envoy.url("/v1"), api_key="test", max_retries=0, timeout=10)

    def ask(prompt, headers=None, answer=None):
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": prompt}],
            extra_headers={**(headers or {}), **reply_header(answer or f"answer to {prompt}")})
        return raw.http_response.headers.get("x-cache"), raw.parse().choices[0].message.content

    # The model arrives through the cluster; until then the cache stands aside (no header, and
    # nothing kept: the second of two asks is a hit once the model is there).
    deadline = time.monotonic() + 30
    attempt = 0
    while True:
        attempt += 1
        ask(f"warm up {attempt}")
        if ask(f"warm up {attempt}")[0] == "hit":
            break
        assert time.monotonic() < deadline, "the embedding model never loaded"
        time.sleep(0.2)

    assert ask("How do I reset my password?") == (miss, "answer to How do I reset my password?")
    seen = len(server.requests)
    # A repeat and a paraphrase are served from the cache: the upstream sees neither.
    assert ask("How do I reset my password?") == ("hit", "answer to How do I reset my password?")
    assert ask("how can I reset my password") == ("hit", "answer to How do I reset my password?")
    # Without the hold, the request's headers went upstream before the cache answered: that
    # upstream request is reset, with no body.
    assert len(server.requests) == seen if holds else all(not r["body"] for r in server.requests[seen:])
    # Order-, number- and negation-blind similarity is not trusted: each of these is a miss.
    for first, second in [("I want onions on my pizza", "I don't want onions on my pizza"),
                          ("Book 2 tickets for the concert", "Book 3 tickets for the concert"),
                          ("Flights from London to Paris", "flights from Paris to London")]:
        assert ask(first)[0] == miss
        assert ask(second) == (miss, f"answer to {second}"), second
        assert ask(second)[0] == "hit"
    # Another tenant has its own answers; no-store neither reads nor writes the cache.
    assert ask("How do I reset my password?", {"x-tenant": "b"}) == (miss, "answer to How do I reset my password?")
    assert ask("How do I reset my password?", {"cache-control": "no-store"}, "fresh")[1] == "fresh"
    assert ask("What is the capital of France?", {"cache-control": "no-store"})[0] is None
    assert ask("What is the capital of France?")[0] == miss
    # An answer the guard masked is not kept.
    masked = ask("who do I write to?", answer="write to help@example.com")
    assert masked[0] == miss and "help@example.com" not in masked[1]
    assert ask("who do I write to?", answer="write to help@example.com")[0] == miss

    # A stream is recorded and replayed with the same events; a buffered answer is not
    # replayed to a streaming client.
    def stream(prompt):
        raw = client.chat.completions.with_raw_response.create(
            model="m", stream=True, messages=[{"role": "user", "content": prompt}],
            extra_headers=reply_header("one two three"))
        text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
        return raw.http_response.headers.get("x-cache"), text

    assert ask("count to three")[0] == miss
    # Kept at its terminal event ([DONE]), before the client has it: the next one hits.
    assert stream("count to three") == (miss, "one two three")
    seen = len(server.requests)
    assert stream("count to three") == ("hit", "one two three")
    assert stream("please count to three") == ("hit", "one two three")
    assert len(server.requests) == seen if holds else all(not r["body"] for r in server.requests[seen:])

    stats = envoy.stats("processor.cache")
    prefix = "payload_processor.processor.cache."
    assert stats[prefix + "hits"] == 7 + 1, "and the warm-up's"
    assert stats[prefix + "not_stored"] >= 1
    assert stats[prefix + "stores"] >= 10
    assert stats[prefix + "entries"] >= 1 and stats[prefix + "bytes"] > 0


def test_what_two_workers_share(form, upstream, start_envoy):
    """The .so keeps one cache for every worker; the .wasm one per worker VM. Two connections
    held open on a listener that balances exactly land on different workers."""
    server, _ = upstream
    chain = json.dumps({"processors": [{"name": "cache", "type": "response-cache", "parameters": {}}]})
    config = bootstrap([processor_filter(form, chain)], model_routes({}, "model"), [cluster("model", server.port)])
    listener = config["static_resources"]["listeners"][0]
    listener["connection_balance_config"] = {"exact_balance": {}}
    listener["enable_reuse_port"] = False
    envoy = start_envoy(config, concurrency=2)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "shared?"}]})

    def ask(connection):
        connection.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.getheader("x-cache")

    miss = "miss" if form == "dynamic-module" or WASM_HOLD_HEADERS else None
    first = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=10)
    second = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=10)
    try:
        assert ask(first) == miss
        assert ask(first) == "hit", "the same worker"
        assert ask(second) == ("hit" if form == "dynamic-module" else miss), "the other worker"
        assert ask(second) == "hit"
    finally:
        first.close()
        second.close()
