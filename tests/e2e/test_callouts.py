"""Service callouts through real Envoy, both forms: moderation (OpenAI's API), Llama Guard,
the real Presidio analyzer, a retriever (RAG) and an authorization service are each one
processor of the chain, with the chain parked while the service answers. Also: a slow
service against the processor's budget in both failure modes, a dead and an unknown cluster,
and a client that goes away while the callout is out."""
import json
import socket
import time

import openai
import pytest
import requests

from harness import WASM_HOLD_HEADERS, bootstrap, cluster, model_routes, processor_filter
from harness.callout_servers import PresidioServer, ServiceMocks
from harness.mock_server import MockServer


@pytest.fixture(scope="module")
def services():
    mocks, upstream, presidio = ServiceMocks(), MockServer("model"), PresidioServer()
    yield {"mocks": mocks, "upstream": upstream, "presidio": presidio}
    for server in (mocks, upstream, presidio):
        server.stop()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(form, start_envoy, services, processors):
    clusters = [cluster("model", services["upstream"].port), cluster("services", services["mocks"].port),
                cluster("presidio", services["presidio"].port), cluster("dead", free_port())]
    config = bootstrap([processor_filter(form, json.dumps({"processors": processors}))],
                       model_routes({}, "model"), clusters)
    return start_envoy(config)


def chat(envoy, content, headers=None, **extra):
    body = {"model": "m", "messages": [{"role": "user", "content": content}], **extra}
    return requests.post(envoy.url(), json=body, headers=headers or {}, timeout=10)


def upstream_body(response):
    return json.loads(response.json()["body"])


def holds(form):
    """Whether the request headers wait for the chain. Not with the .wasm as Envoy Gateway
    configures it (scripts/test_matrix.sh runs that shape): the headers go upstream first, and
    a request the chain refuses is reset there without its body."""
    return form == "dynamic-module" or WASM_HOLD_HEADERS


def no_body_reached(server, since):
    return all(not request["body"] for request in server.requests[since:])


def test_moderation_rejects_a_flagged_prompt_and_the_openai_client_sees_a_proper_error(form, services, start_envoy):
    envoy = start(form, start_envoy, services, [
        {"name": "moderate", "type": "openai-moderation",
         "parameters": {"cluster": "services", "headers": {"authorization": "Bearer sk-test"}}}])
    client = openai.OpenAI(base_url=envoy.url("/v1"), api_key="test", max_retries=0, timeout=10)
    seen = len(services["upstream"].requests)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "you stupid idiot"}])
    assert caught.value.status_code == 400
    assert caught.value.code == "content_flagged"
    assert "(harassment)" in caught.value.message
    assert no_body_reached(services["upstream"], seen), "a flagged prompt never reaches the model"
    call = services["mocks"].requests[-1]
    assert call["path"] == "/v1/moderations" and call["headers"]["authorization"] == "Bearer sk-test"
    assert call["body"] == {"input": "you stupid idiot", "model": "omni-moderation-latest"}
    answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello there"}])
    assert answer.choices[0].message.content == "Hello from model"
    stats = envoy.stats()
    assert stats["payload_processor.processor.moderate.calls"] == 2
    assert stats["payload_processor.processor.moderate.flagged"] == 1


def test_llama_guard_on_prompts_and_on_answers(form, services, start_envoy):
    envoy = start(form, start_envoy, services, [
        {"name": "guard-in", "type": "llama-guard",
         "parameters": {"cluster": "services", "model": "llama-guard-3-1b", "categories": {"S2": "Report"}}},
        {"name": "guard-out", "type": "llama-guard",
         "parameters": {"cluster": "services", "model": "llama-guard-3-1b", "phase": "Response"}}])
    refused = chat(envoy, "how do I build a bomb")
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "content_flagged" and "(S9)" in refused.json()["error"]["message"]
    # S2 only reports: the request goes on; both guards ran (prompt, then answer with its prompt).
    before = len(services["mocks"].requests)
    reported = chat(envoy, "can I steal a glance at the docs")
    assert reported.status_code == 200, reported.text
    calls = services["mocks"].requests[before:]
    assert [c["body"]["messages"][-1]["role"] for c in calls] == ["user", "assistant"]
    assert calls[1]["body"]["messages"][0]["content"] == "can I steal a glance at the docs"
    assert envoy.stats()["payload_processor.processor.guard-in.reported"] == 1


def test_presidio_masks_with_the_real_analyzer_next_to_pii_guard(form, services, start_envoy):
    envoy = start(form, start_envoy, services, [
        {"name": "cards", "type": "pii-guard", "parameters": {"entities": ["CreditCard"], "action": "Mask"}},
        {"name": "presidio", "type": "presidio",
         "parameters": {"cluster": "presidio", "entities": ["EMAIL_ADDRESS", "PHONE_NUMBER"], "action": "Mask"}}])
    response = chat(envoy, "Mail jörg.müller@example.com or call 212-555-0123; card 4111 1111 1111 1111.")
    assert response.status_code == 200, response.text
    sent = upstream_body(response)["messages"][0]["content"]
    assert sent == "Mail [EMAIL_ADDRESS] or call [PHONE_NUMBER]; card [CREDIT_CARD].", sent
    analyzed = json.loads(services["presidio"].requests[-1]["body"])
    assert analyzed["language"] == "en" and "[CREDIT_CARD]" in analyzed["text"], "pii-guard ran first"


def test_presidio_rejects_when_asked(form, services, start_envoy):
    envoy = start(form, start_envoy, services, [
        {"name": "presidio", "type": "presidio", "parameters": {"cluster": "presidio", "action": "Reject"}}])
    refused = chat(envoy, "my email is ana@example.org")
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "pii_detected"
    assert "EMAIL_ADDRESS" in refused.json()["error"]["message"]
    assert chat(envoy, "nothing personal here").status_code == 200


def test_rag_context_is_inserted(form, services, start_envoy):
    # The guard after the callout runs on the resumed request: it masks the address one of
    # the retrieved documents holds. Headers from the answer need the request headers held.
    retrieve = {"cluster": "services", "path": "/search",
                "body": {"query": "{{ $.messages[-1].content }}", "k": 2},
                "setBodyFields": [{"path": "$.messages", "action": "Prepend",
                                   "value": {"role": "system", "content": "Answer from:\n{{ $.documents[*].text }}"}}]}
    if holds(form):
        retrieve["setHeaders"] = {"x-rag-sources": "{{ $.documents[*].id }}"}
    envoy = start(form, start_envoy, services, [
        {"name": "retrieve", "type": "http-callout", "parameters": retrieve},
        {"name": "emails", "type": "pii-guard", "parameters": {"entities": ["Email"], "action": "Mask"}}])
    response = chat(envoy, "how long do refunds take?")
    assert response.status_code == 200, response.text
    messages = upstream_body(response)["messages"]
    assert messages[0] == {"role": "system", "content": "Answer from:\nRefunds are processed within 5 business days."
                                                        "\nPremium support: write to [EMAIL]."}, messages[0]
    assert messages[1]["content"] == "how long do refunds take?"
    headers = response.json()["headers"]
    if holds(form):
        assert headers["x-rag-sources"] == "kb-1,kb-2"
        assert int(headers["content-length"]) == response.json()["body_length"]


def test_a_callout_that_sets_headers_says_when_the_headers_cannot_wait(form, services, start_envoy):
    if holds(form):
        pytest.skip("only with the .wasm as Envoy Gateway configures it")
    envoy = start(form, start_envoy, services, [
        {"name": "authz", "type": "ext-authz-body",
         "parameters": {"cluster": "services", "path": "/authz", "bodyFields": ["model"]}}])
    response = chat(envoy, "hi", headers={"authorization": "Bearer good"})
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "headers_hold_unavailable"
    assert "processor authz" in response.json()["error"]["message"]


def test_ext_authz_body_allows_and_denies(form, services, start_envoy):
    # Without the hold, the service only allows or denies (`upstreamHeaders: []`).
    parameters = {"cluster": "services", "path": "/authz", "bodyFields": ["model", "$.metadata.tenant"]}
    if not holds(form):
        parameters["upstreamHeaders"] = []
    envoy = start(form, start_envoy, services, [{"name": "authz", "type": "ext-authz-body", "parameters": parameters}])
    allowed = chat(envoy, "hi", headers={"authorization": "Bearer good"}, metadata={"tenant": "t1"})
    assert allowed.status_code == 200, allowed.text
    if holds(form):
        assert allowed.json()["headers"]["x-user-id"] == "user-of-t1"
    call = services["mocks"].requests[-1]
    assert call["path"] == "/authz/v1/chat/completions" and call["method"] == "POST"
    assert call["body"] == {"model": "m", "metadata.tenant": "t1"}
    denied = chat(envoy, "hi", headers={"authorization": "Bearer good"}, metadata={"tenant": "t3"})
    assert denied.status_code == 403
    assert denied.json() == {"error": {"message": "tenant t3 may not use m", "code": "forbidden"}}


@pytest.mark.parametrize("mode", ["FailClosed", "FailOpen"])
def test_a_slow_service_is_bounded_by_the_processor_budget(form, services, start_envoy, mode):
    envoy = start(form, start_envoy, services, [
        {"name": "moderate", "type": "openai-moderation", "timeout": "300ms", "failureMode": mode,
         "parameters": {"cluster": "services", "headers": {"x-mock-delay-ms": "3000"}}}])
    started = time.monotonic()
    response = chat(envoy, "hello")
    elapsed = time.monotonic() - started
    assert elapsed < 2.5, f"the budget did not bound the wait ({elapsed:.2f} s)"
    if mode == "FailClosed":
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "callout_failed" and "processor moderate" in error["message"], error
    else:
        assert response.status_code == 200
        assert envoy.stats()["payload_processor.processor.moderate.fail_open"] == 1


@pytest.mark.parametrize("target", ["dead", "missing"])
def test_a_dead_or_unknown_cluster_fails_closed(form, services, start_envoy, target):
    envoy = start(form, start_envoy, services, [
        {"name": "moderate", "type": "openai-moderation", "timeout": "2s", "parameters": {"cluster": target}}])
    response = chat(envoy, "hello")
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "callout_failed"
    assert f"cluster {target}" in response.json()["error"]["message"]
    assert chat(envoy, "again").status_code == 503, "and every request after it"


def test_a_client_gone_during_the_callout_leaves_nothing_behind(form, services, start_envoy):
    envoy = start(form, start_envoy, services, [
        {"name": "moderate", "type": "openai-moderation", "timeout": "5s",
         "parameters": {"cluster": "services", "headers": {"x-mock-delay-ms": "700"}}}])
    seen = len(services["upstream"].requests)
    for _ in range(3):
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}).encode()
        with socket.create_connection(("127.0.0.1", envoy.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         + f"content-length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(0.2)  # the callout is out now
    time.sleep(1.0)  # the service answers after the clients left
    assert envoy.alive()
    assert no_body_reached(services["upstream"], seen), "an abandoned request never goes upstream"
    assert chat(envoy, "hello").status_code == 200


def test_a_streamed_answer_is_stopped_by_a_moderation_verdict_mid_stream(form, services, start_envoy):
    """The answer streams from a model server; moderation approves it window by window. The
    window with the flagged words never reaches the client, and the official client sees the
    stream end with `finish_reason: content_filter`."""
    from harness.model_server import ModelServer
    from urllib.parse import quote

    model = ModelServer("streaming-model")
    try:
        clusters = [cluster("model", model.port), cluster("services", services["mocks"].port)]
        chain = {"processors": [{"name": "moderate-answer", "type": "openai-moderation",
                                 "parameters": {"cluster": "services", "phase": "Response", "streamWindowBytes": 40}}]}
        envoy = start_envoy(bootstrap([processor_filter(form, json.dumps(chain))], model_routes({}, "model"), clusters))
        client = openai.OpenAI(base_url=envoy.url("/v1"), api_key="test", max_retries=0, timeout=10)

        def stream(reply):
            events = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "tell me"}], stream=True,
                extra_headers={"x-mock-reply": quote(reply)})
            text, finish = "", None
            for event in events:
                for choice in event.choices:
                    text += choice.delta.content or ""
                    finish = choice.finish_reason or finish
            return text, finish

        clean = "The weather is calm today and the sea is quiet along the whole coast, all week long."
        assert stream(clean) == (clean, "stop")
        calls = [r for r in services["mocks"].requests if r["path"] == "/v1/moderations"]
        assert len(calls) >= 2, "approved window by window"
        flagged = ("The first part of this answer is harmless and long enough to pass. "
                   "Then it says the word kill somewhere in the middle. And more text follows it.")
        text, finish = stream(flagged)
        assert finish == "content_filter"
        assert "kill" not in text
        assert text and flagged.startswith(text), "what went out is an approved prefix of the answer"
    finally:
        model.stop()
