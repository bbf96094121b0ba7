"""The response path through real Envoy, both forms: token usage from the official openai and
anthropic clients, streams split at every byte, mid-stream rejections the SDKs understand,
buffered response edits and limits, compression, and pass-through without added delay."""
import gzip
import json
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import anthropic
import openai
import pytest
import requests

from harness import bootstrap, cluster, metadata_access_log, processor_filter, read_access_log
from harness.model_server import DEFAULT_REPLY, ModelServer

NS = "io.envoy.ai_gateway"
KEYS = ["input_tokens", "output_tokens", "total_tokens", "cached_input_tokens", "model", "ttft_ms", "itl_ms"]
CLIENT_TIMEOUT = 10
# Events 20 ms apart reach Envoy one by one (unpaced, several arrive in one read, and a
# rejection then happens before any byte went out).
PACED = {"x-mock-delay-ms": "20"}


@pytest.fixture(scope="module")
def model():
    server = ModelServer()
    yield server
    server.stop()


@pytest.fixture
def gateway(start_envoy, form, model):
    """Starts Envoy on `chain` in front of the mock model server, with a metadata access log."""

    def start(chain, module="payload_processor"):
        log = Path(tempfile.mkdtemp(prefix="access-")) / "access.log"
        config = bootstrap(
            [processor_filter(form, chain, module)],
            [{"match": {"prefix": "/"}, "route": {"cluster": "model", "timeout": "30s"}}],
            [cluster("model", model.port)],
            access_log=metadata_access_log(form, log, NS, KEYS),
        )
        envoy = start_envoy(config)
        envoy.access_log = log
        return envoy

    return start


def usage_of(envoy, count):
    """Metadata lines of the first `count` requests; numbers as floats (the wasm form writes
    filter state strings, the dynamic module numbers)."""
    lines = read_access_log(envoy.access_log, count)
    assert len(lines) >= count, lines

    def value(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return v
    return [{k: value(v) for k, v in line.items()} for line in lines]


def expected_usage(record, anthropic_shape=False):
    u = record["usage"]
    return {"input_tokens": u["input"], "output_tokens": u["output"], "total_tokens": u["input"] + u["output"],
            "cached_input_tokens": u["cached"]}


def openai_client(envoy, **headers):
    return openai.OpenAI(base_url=envoy.url("/v1"), api_key="test", max_retries=0, timeout=CLIENT_TIMEOUT,
                         default_headers=headers or None)


def anthropic_client(envoy, **headers):
    return anthropic.Anthropic(base_url=envoy.url(""), api_key="test", max_retries=0, timeout=CLIENT_TIMEOUT,
                               default_headers=headers or None)


MESSAGES = [{"role": "user", "content": "Say hello to the gateway please"}]


def test_openai_chat_usage_buffered_and_streamed_reaches_metadata(gateway, model):
    envoy = gateway("processors: [{name: usage, type: token-usage, failureMode: FailOpen}]")
    client = openai_client(envoy)
    completion = client.chat.completions.create(model="m-1", messages=MESSAGES)
    assert completion.choices[0].message.content == DEFAULT_REPLY
    buffered = model.requests[-1]
    assert buffered["headers"]["accept-encoding"] == "identity"
    chunks = list(client.chat.completions.create(model="m-1", messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = model.requests[-1]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == DEFAULT_REPLY
    assert chunks[-1].usage.total_tokens == streamed["usage"]["input"] + streamed["usage"]["output"]
    first, second = usage_of(envoy, 2)
    for line, record in ((first, buffered), (second, streamed)):
        assert {k: line[k] for k in expected_usage(record)} == expected_usage(record)
        assert line["model"] == "m-1"
    assert second["ttft_ms"] > 0 and second["itl_ms"] >= 0
    assert first["ttft_ms"] is None, "no time to first token for a buffered response"


def test_force_include_usage_records_usage_and_hides_the_extra_chunk(gateway, model):
    envoy = gateway("processors: [{name: usage, type: token-usage, parameters: {forceIncludeUsage: true}}]")
    chunks = list(openai_client(envoy).chat.completions.create(model="m-2", messages=MESSAGES, stream=True))
    record = model.requests[-1]
    assert record["body"]["stream_options"] == {"include_usage": True}, "the upstream was asked for usage"
    assert all(c.usage is None for c in chunks), "the client did not ask, so it sees no usage"
    assert all(c.choices for c in chunks), "the usage-only chunk was removed"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == DEFAULT_REPLY
    (line,) = usage_of(envoy, 1)
    assert {k: line[k] for k in expected_usage(record)} == expected_usage(record)
    stats = envoy.stats("processor.usage")
    assert stats["payload_processor.processor.usage.usage_chunk_stripped"] == 1


def test_anthropic_usage_buffered_and_streamed(gateway, model):
    envoy = gateway("processors: [{name: usage, type: token-usage}]")
    client = anthropic_client(envoy)
    message = client.messages.create(model="claude-x", max_tokens=50, messages=MESSAGES)
    assert message.content[0].text == DEFAULT_REPLY
    buffered = model.requests[-1]
    with client.messages.stream(model="claude-x", max_tokens=50, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == DEFAULT_REPLY
    assert final.usage.output_tokens == model.requests[-1]["usage"]["output"]
    streamed = model.requests[-1]
    for line, record in zip(usage_of(envoy, 2), (buffered, streamed)):
        assert {k: line[k] for k in expected_usage(record)} == expected_usage(record)
        assert line["model"] == "claude-x"


def test_responses_api_and_completions_usage(gateway, model):
    envoy = gateway("processors: [{name: usage, type: token-usage}]")
    client = openai_client(envoy)
    events = list(client.responses.create(model="r-1", input="hello there", stream=True))
    assert events[-1].type == "response.completed"
    responses = model.requests[-1]
    completion = client.completions.create(model="c-1", prompt="hello there")
    assert completion.choices[0].text == DEFAULT_REPLY
    completions = model.requests[-1]
    for line, record, name in zip(usage_of(envoy, 2), (responses, completions), ("r-1", "c-1")):
        expected = expected_usage(record)
        if name == "c-1":
            expected.pop("cached_input_tokens")  # the legacy completions API reports none
        assert {k: line[k] for k in expected} == expected
        assert line["model"] == name


def test_a_stream_split_at_every_byte_reaches_the_client_unchanged(gateway, model):
    chain = """
processors:
  - {name: usage, type: token-usage}
  - {name: guard, type: word-guard, parameters: {word: never-said, holdBackBytes: 64}}
"""
    envoy = gateway(chain, module="custom_payload_processor")
    response = requests.post(envoy.url(), json={"model": "m-3", "messages": MESSAGES, "stream": True,
                                                "stream_options": {"include_usage": True}},
                             headers={"x-mock-split": "every-byte", "x-mock-reply": quote("caf\u00e9 \u2603 \U0001f600!")},
                             stream=True, timeout=CLIENT_TIMEOUT)
    received = b"".join(response.iter_content(None))
    record = model.requests[-1]
    assert response.status_code == 200
    assert received == record["sent"], "every byte, split inside data:, CRLF and UTF-8, arrives unchanged"
    (line,) = usage_of(envoy, 1)
    assert {k: line[k] for k in expected_usage(record)} == expected_usage(record)

    # The official client over the same byte-split stream.
    chunks = list(openai_client(envoy, **{"x-mock-split": "every-byte"}).chat.completions.create(
        model="m-3", messages=MESSAGES, stream=True, extra_headers={"x-mock-reply": quote("\u00fcber \u2603")}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "\u00fcber \u2603"


def test_a_rejected_openai_stream_ends_with_content_filter(gateway, model):
    chain = "processors: [{name: guard, type: word-guard, parameters: {word: secret}}]"
    envoy = gateway(chain, module="custom_payload_processor")
    reply = "The plan is secret and must stay hidden"
    started = time.monotonic()
    chunks = list(openai_client(envoy).chat.completions.create(
        model="m-4", messages=MESSAGES, stream=True, extra_headers={"x-mock-reply": reply, **PACED}))
    assert time.monotonic() - started < CLIENT_TIMEOUT, "no hang"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The plan is ", "what came before the word, never the word"
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert chunks[-1].id == "chatcmpl-mock", "the terminal chunk belongs to the same completion"
    assert envoy.stats("processor.guard")["payload_processor.processor.guard.rejections"] == 1


def test_a_rejected_anthropic_stream_raises_in_the_client(gateway, model):
    chain = "processors: [{name: guard, type: word-guard, parameters: {word: secret}}]"
    envoy = gateway(chain, module="custom_payload_processor")
    client = anthropic_client(envoy, **{"x-mock-reply": "The plan is secret and must stay hidden", **PACED})
    text = []
    started = time.monotonic()
    with pytest.raises(anthropic.APIError) as raised:
        with client.messages.stream(model="claude-x", max_tokens=50, messages=MESSAGES) as stream:
            for piece in stream.text_stream:
                text.append(piece)
    assert time.monotonic() - started < CLIENT_TIMEOUT
    assert "blocked word" in str(raised.value)
    assert "".join(text) == "The plan is "


@pytest.mark.needs_headers_hold
def test_a_rejection_before_the_first_byte_is_a_normal_error_response(gateway, model):
    # The window holds the whole short reply, so nothing reached the client when the word shows.
    chain = "processors: [{name: guard, type: word-guard, parameters: {word: plan, holdBackBytes: 8192}}]"
    envoy = gateway(chain, module="custom_payload_processor")
    with pytest.raises(openai.PermissionDeniedError) as raised:
        list(openai_client(envoy).chat.completions.create(
            model="m-5", messages=MESSAGES, stream=True, extra_headers={"x-mock-reply": "The plan is secret"}))
    assert raised.value.status_code == 403
    assert raised.value.body["code"] == "word_blocked"


def test_a_window_keeps_a_word_split_over_events_from_the_client(gateway, model):
    # "stay hidden" spans two streamed words. Without a window, "stay " already went out when
    # "hidden" arrives; a window of a few events keeps it back and discards it.
    chain = "processors: [{name: guard, type: word-guard, parameters: {word: stay hidden, holdBackBytes: %d}}]"
    reply = "The plan must stay hidden from all"
    for window, leaked in ((0, True), (400, False)):
        envoy = gateway(chain % window, module="custom_payload_processor")
        chunks = list(openai_client(envoy).chat.completions.create(
            model="m", messages=MESSAGES, stream=True, extra_headers={"x-mock-reply": reply, **PACED}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert ("stay" in text) == leaked, (window, text)
        assert text.startswith("The ") and chunks[-1].choices[0].finish_reason == "content_filter"
        envoy.stop()


@pytest.mark.needs_headers_hold
def test_buffered_responses_are_changed_with_a_correct_length_or_forwarded_byte_for_byte(gateway, model):
    chain = """
processors:
  - {name: usage, type: token-usage, parameters: {responseHeaders: x-usage-}}
  - {name: stamp, type: stamp-response, match: {headers: [{name: x-stamp, present: true}]}, parameters: {value: 7}}
"""
    envoy = gateway(chain, module="custom_payload_processor")
    body = {"model": "m-6", "messages": MESSAGES}
    plain = requests.post(envoy.url(), json=body, timeout=CLIENT_TIMEOUT)
    assert plain.content == model.requests[-1]["sent"], "unchanged: byte-for-byte"
    record = model.requests[-1]
    assert plain.headers["x-usage-total-tokens"] == str(record["usage"]["input"] + record["usage"]["output"])
    stamped = requests.post(envoy.url(), json=body, headers={"x-stamp": "1"}, timeout=CLIENT_TIMEOUT)
    assert stamped.json()["gateway_stamp"] == 7
    assert stamped.headers["x-stamped"] == "true"
    assert int(stamped.headers["content-length"]) == len(stamped.content)
    assert stamped.json()["choices"] == plain.json()["choices"]


@pytest.mark.needs_headers_hold
def test_a_buffered_response_can_be_rejected(gateway, model):
    chain = "processors: [{name: guard, type: word-guard, parameters: {word: secret, status: 451}}]"
    envoy = gateway(chain, module="custom_payload_processor")
    with pytest.raises(openai.APIStatusError) as raised:
        openai_client(envoy).chat.completions.create(model="m", messages=MESSAGES,
                                                     extra_headers={"x-mock-reply": "a secret"})
    assert raised.value.status_code == 451
    assert raised.value.body["code"] == "word_blocked"


@pytest.mark.parametrize("mode", ["FailClosed", "FailOpen"])
def test_a_response_over_the_limit_fails_closed_or_skips_open(gateway, model, mode):
    chain = f"""
limits: {{maxResponseBodyBytes: 200}}
processors: [{{name: stamp, type: stamp-response, failureMode: {mode}, parameters: {{value: 1}}}}]
"""
    envoy = gateway(chain, module="custom_payload_processor")
    response = requests.post(envoy.url(), json={"model": "m", "messages": MESSAGES}, timeout=CLIENT_TIMEOUT)
    if mode == "FailClosed":
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "response_too_large"
    else:
        assert response.status_code == 200
        assert response.content == model.requests[-1]["sent"]
        assert envoy.stats("processor.stamp")["payload_processor.processor.stamp.fail_open"] == 1
    assert envoy.stats("response_body_too_large")["payload_processor.response_body_too_large"] == 1


def test_non_json_responses_skip_json_plugins(gateway, model):
    envoy = gateway("processors: [{name: stamp, type: stamp-response, parameters: {value: 1}}]",
                    module="custom_payload_processor")
    response = requests.post(envoy.url(), json={"model": "m", "messages": MESSAGES},
                             headers={"x-mock-content-type": "text/plain"}, timeout=CLIENT_TIMEOUT)
    assert response.status_code == 200 and "x-stamped" not in response.headers
    assert response.content == model.requests[-1]["sent"]
    assert envoy.stats("processor.stamp")["payload_processor.processor.stamp.skipped_non_json"] == 1


@pytest.mark.needs_headers_hold
def test_compression_the_upstream_is_asked_for_plain_text_when_a_plugin_reads_the_response(gateway, model):
    # requests accepts gzip. With a response reader the upstream is asked for identity.
    envoy = gateway("processors: [{name: usage, type: token-usage}]")
    response = requests.post(envoy.url(), json={"model": "m-7", "messages": MESSAGES}, timeout=CLIENT_TIMEOUT)
    assert model.requests[-1]["headers"]["accept-encoding"] == "identity"
    assert "content-encoding" not in response.headers and response.json()["model"] == "m-7"
    streamed = requests.post(envoy.url(), json={"model": "m-7", "messages": MESSAGES, "stream": True,
                                                "stream_options": {"include_usage": True}}, timeout=CLIENT_TIMEOUT)
    assert model.requests[-1]["headers"]["accept-encoding"] == "identity"
    assert streamed.content.endswith(b"data: [DONE]\n\n")
    for line in usage_of(envoy, 2):
        assert line["total_tokens"] > 0
    envoy.stop()

    # With no response reader the client's gzip goes through untouched.
    envoy = gateway("processors: [{name: route, type: body-field-to-header}]")
    response = requests.post(envoy.url(), json={"model": "m-7", "messages": MESSAGES}, timeout=CLIENT_TIMEOUT)
    assert "gzip" in model.requests[-1]["headers"]["accept-encoding"]
    assert response.headers["content-encoding"] == "gzip" and response.json()["model"] == "m-7"


@pytest.mark.parametrize("mode", ["FailClosed", "FailOpen"])
def test_compression_an_upstream_that_compresses_anyway(gateway, model, mode):
    envoy = gateway(f"processors: [{{name: usage, type: token-usage, failureMode: {mode}}}]")
    response = requests.post(envoy.url(), json={"model": "m", "messages": MESSAGES},
                             headers={"x-mock-gzip": "force"}, stream=True, timeout=CLIENT_TIMEOUT)
    if mode == "FailClosed":
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "response_encoded"
    else:
        # Forwarded exactly as the upstream sent it, still compressed; only counted.
        assert response.status_code == 200 and response.headers["content-encoding"] == "gzip"
        raw = response.raw.read(decode_content=False)
        assert gzip.decompress(raw) == model.requests[-1]["sent"]
        assert envoy.stats("processor.usage")["payload_processor.processor.usage.skipped_encoded"] == 1


@pytest.mark.parametrize("chain", [
    pytest.param("processors: [{name: route, type: body-field-to-header}]", marks=pytest.mark.needs_headers_hold),
    "processors: [{name: usage, type: token-usage}]",
], ids=["no-stream-plugin", "token-usage"])
def test_streams_pass_through_without_waiting_for_the_upstream(gateway, model, chain):
    envoy = gateway(chain)
    started = time.monotonic()
    response = requests.post(envoy.url(), json={"model": "m", "messages": MESSAGES, "stream": True},
                             headers={"x-mock-delay-ms": "150", "x-mock-reply": "one two three four five six"},
                             stream=True, timeout=CLIENT_TIMEOUT)
    first_event_at = None
    for piece in response.iter_content(None):
        if first_event_at is None and b"data:" in piece:
            first_event_at = time.monotonic()
    finished_at = model.requests[-1]["finished_at"]
    # Eight events 150 ms apart: the first reaches the client about a second before the last
    # leaves the upstream. A buffering gateway would deliver it after `finished_at`.
    assert first_event_at is not None and first_event_at < finished_at - 0.5, (
        first_event_at - started, finished_at - started)


def envoy_ai_access_log(form, path):
    """An access log of Envoy's own AI record (typed, read with CEL, and its Struct projection)
    and of token-usage's keys under their OpenTelemetry names."""
    otel = ["gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "gen_ai.response.model"]
    if form == "wasm":
        fields = {k: f"%FILTER_STATE(wasm.{NS}.{k}:PLAIN)%" for k in otel}
    else:
        fields = {k: f"%DYNAMIC_METADATA({NS}:{k})%" for k in otel}
    fields["struct"] = "%DYNAMIC_METADATA(envoy.ai.token_usage)%"
    fields["typed_input_tokens"] = "%CEL(metadata.typed_filter_metadata['envoy.ai.token_usage'].input_tokens)%"
    fields["typed"] = "%CEL(metadata.typed_filter_metadata['envoy.ai.token_usage'])%"
    return [{
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(path),
            "log_format": {"json_format": fields, "formatters": [{
                "name": "envoy.formatter.cel",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.formatter.cel.v3.Cel"}}]},
        },
    }]


def test_envoys_ai_token_usage_record_and_opentelemetry_keys(start_envoy, form, model):
    """Envoy 1.40's AI filters publish token usage as typed metadata `envoy.ai.token_usage`
    (`envoy.data.ai.v3.TokenUsage`) plus its Struct projection; the .so on 1.40 writes both,
    read back here through an access log (CEL decodes the typed record). The .wasm cannot write
    metadata at all: it keeps the filter-state strings, under the OpenTelemetry names here."""
    from harness import ENVOY_VERSION

    log = Path(tempfile.mkdtemp(prefix="access-")) / "access.log"
    chain = "processors: [{name: usage, type: token-usage, parameters: {metadataKeys: OpenTelemetry}}]"
    config = bootstrap([processor_filter(form, chain)],
                       [{"match": {"prefix": "/"}, "route": {"cluster": "model", "timeout": "30s"}}],
                       [cluster("model", model.port)], access_log=envoy_ai_access_log(form, log))
    envoy = start_envoy(config)
    client = openai_client(envoy)
    client.chat.completions.create(model="m-1", messages=MESSAGES)
    buffered = model.requests[-1]["usage"]
    list(client.chat.completions.create(model="m-1", messages=MESSAGES, stream=True,
                                        stream_options={"include_usage": True}))
    streamed = model.requests[-1]["usage"]
    lines = read_access_log(log, 2)
    for kind, line, usage in zip(("buffered", "streamed"), lines, (buffered, streamed)):
        assert float(line["gen_ai.usage.input_tokens"]) == usage["input"], line
        assert float(line["gen_ai.usage.output_tokens"]) == usage["output"], line
        assert line["gen_ai.response.model"] == "m-1", line
        writes_envoy_record = form == "dynamic-module" and ENVOY_VERSION >= (1, 40, 0)
        if not writes_envoy_record:
            assert line["struct"] in (None, "-", {}), line
            continue
        assert line["struct"] == {
            "llm_protocol": "OPENAI_CHAT_COMPLETIONS", "model": "m-1",
            "input_tokens": usage["input"], "output_tokens": usage["output"],
            "total_tokens": usage["input"] + usage["output"],
            "provider_total_tokens": usage["input"] + usage["output"],
            "input_token_details": {"cached_tokens": usage["cached"]},
            "extraction_status": "COMPLETE"}, (kind, line, envoy.log()[-2000:])
        assert str(line["typed_input_tokens"]) == str(usage["input"]), line
        assert 'llm_protocol: OPENAI_CHAT_COMPLETIONS' in line["typed"], line
        assert f'output_tokens {{ value: {usage["output"]} }}' in line["typed"], line
    stats = envoy.stats("processor.usage")
    expected = 2 if form == "dynamic-module" and ENVOY_VERSION >= (1, 40, 0) else 0
    assert stats.get("payload_processor.processor.usage.envoy_ai_record", 0) == expected, stats
