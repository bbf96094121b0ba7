"""Routing by meaning through real Envoy: a semantic-router chain with five routes sends the
official openai client's requests for `auto` to the upstream of each route, with the model
rewritten, and everything else to the default. The model is wordllama's, read from the
installed wheel. The .wasm cannot read model files yet: Envoy refuses that configuration with
the reason."""
import json

import openai
import pytest

from harness import ENVOY_VERSION, Envoy, bootstrap, cluster, model_routes, processor_filter, wordllama_files
from harness.mock_server import MockServer
from harness.model_files import ModelFileServer

ROUTES = {
    "math": ["solve this equation for x", "what is the integral of x squared", "compute 15 percent of 240",
             "what is the derivative of a polynomial", "calculate the area of a triangle"],
    "weather": ["what's the weather tomorrow", "will it rain in Paris this weekend", "how hot is it outside today",
                "weather forecast for Boston", "is it going to snow tonight"],
    "code": ["write a python function that sorts a list", "fix this rust compile error",
             "explain this javascript closure", "refactor my SQL query",
             "why does my program crash with a null pointer"],
    "cooking": ["give me a recipe for lasagna", "how long should I bake chicken breast",
                "what can I cook with eggs and spinach", "substitute for butter in cookies", "how to make pizza dough"],
    "travel": ["book me a flight to Denver", "find a hotel in Rome for next week", "is my flight delayed",
               "what documents do I need to travel to Japan", "cheap train tickets to Berlin"],
}
# Prompts that are none of the utterances above.
ASKED = [
    ("Can you differentiate x cubed plus two x?", "math"),
    ("Is it going to be sunny in London on Saturday?", "weather"),
    ("My Java code throws a NullPointerException, can you help debug it?", "code"),
    ("What is a good recipe for chocolate chip cookies?", "cooking"),
    ("I need a hotel and a flight to Tokyo in April", "travel"),
    ("Tell me about the history of the Roman empire", "default"),
]


def chain():
    weights, tokenizer = wordllama_files()
    routes = [{"name": name, "model": f"{name}-model", "utterances": utterances}
              for name, utterances in ROUTES.items()]
    return json.dumps({"processors": [{"name": "router", "type": "semantic-router", "parameters": {
        "embedding": {"weights": str(weights), "tokenizer": str(tokenizer)},
        "defaultModel": "general-model", "threshold": 0.3, "routes": routes}}]})


@pytest.fixture(scope="module")
def servers():
    started = {name: MockServer(name) for name in [*ROUTES, "default"]}
    yield started
    for server in started.values():
        server.stop()


def test_five_routes_answer_the_openai_client_from_the_right_upstream(form, servers, start_envoy):
    config = bootstrap([processor_filter(form, chain())],
                       model_routes({f"{name}-model": name for name in ROUTES}, "default"),
                       [cluster(name, server.port) for name, server in servers.items()])
    if form == "wasm":
        envoy = Envoy(config)
        assert envoy.wait_exit() != 0
        assert "processors[0].parameters.embedding.weights: cannot read" in envoy.log()
        assert "cannot read files" in envoy.log()
        return
    envoy = start_envoy(config)
    client = openai.OpenAI(base_url=envoy.url("/v1"), api_key="test", max_retries=0, timeout=10)
    for prompt, route in ASKED:
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": prompt}],
            extra_headers={"x-semantic-route": "spoofed"})
        answer = raw.http_response.json()
        assert answer["backend"] == route, (prompt, answer["headers"].get("x-semantic-route"))
        upstream_saw = json.loads(answer["body"])
        assert upstream_saw["model"] == ("general-model" if route == "default" else f"{route}-model")
        assert answer["headers"]["x-semantic-route"] == route
        assert upstream_saw["messages"][1]["content"] == prompt, "the rest of the body is untouched"
    # A client naming its model is not re-routed.
    raw = client.chat.completions.with_raw_response.create(
        model="cooking-model", messages=[{"role": "user", "content": "solve this equation for x"}])
    assert raw.http_response.json()["backend"] == "cooking"
    stats = envoy.stats("processor.router")
    assert "(16.4 MB table, shared by every processor naming these files)" in envoy.log(), "memory reported"
    assert stats["payload_processor.processor.router.route.math"] == 1
    assert stats["payload_processor.processor.router.route.default"] == 1
    assert stats["payload_processor.processor.router.not_triggered"] == 1


def test_model_fetched_through_a_cluster_routes_in_both_forms(form, servers, start_envoy):
    """The route for the .wasm (and an option for the .so): the files come through an Envoy
    cluster after the configuration loaded. Until they are in, requests get 503
    `model_loading` (never a wait); then the router routes as with files."""
    import time

    files = ModelFileServer()
    try:
        weights, tokenizer = wordllama_files()
        routes = [{"name": name, "model": f"{name}-model", "utterances": utterances}
                  for name, utterances in ROUTES.items()]
        chain_text = json.dumps({"processors": [{"name": "router", "type": "semantic-router", "parameters": {
            "embedding": {"weights": f"/{weights.name}", "tokenizer": f"/{tokenizer.name}", "cluster": "models"},
            "defaultModel": "general-model", "threshold": 0.3, "routes": routes}}]})
        config = bootstrap([processor_filter(form, chain_text)],
                           model_routes({f"{name}-model": name for name in ROUTES}, "default"),
                           [cluster(name, server.port) for name, server in servers.items()]
                           + [cluster("models", files.port)])
        envoy = start_envoy(config)
        client = openai.OpenAI(base_url=envoy.url("/v1"), api_key="test", max_retries=0, timeout=10)
        deadline = time.monotonic() + 30
        while True:
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model="auto", messages=[{"role": "user", "content": ASKED[3][0]}])
                break
            except openai.APIStatusError as err:
                assert err.status_code == 503 and "model_loading" in err.response.text, err.response.text
                assert time.monotonic() < deadline, "the model never loaded"
                time.sleep(0.2)
        assert raw.http_response.json()["backend"] == "cooking"
        for prompt, route in ASKED:
            raw = client.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": prompt}])
            assert raw.http_response.json()["backend"] == route, prompt
        stats = envoy.stats("processor.router")
        # Envoy 1.38 has no config-level counters: background work counts nothing there
        # (docs/deploy/envoy-gateway.md).
        counted = form == "wasm" or ENVOY_VERSION >= (1, 39, 0)
        assert stats["payload_processor.processor.router.model_loaded"] >= (1 if counted else 0)
        assert stats["payload_processor.processor.router.model_fetch_failed"] == 0
    finally:
        files.stop()
