"""Plugin faults on every phase, both forms: an error, a panic and a budget overrun at request
headers, request body, response headers, response body and stream events, under FailClosed and
FailOpen. Each gets its documented outcome and stat, and Envoy goes on serving (in the wasm
form the VM is reloaded after a trap)."""
import time

import pytest
import requests

from harness import bootstrap, cluster, processor_filter
from harness.model_server import ModelServer

PHASES = ["request-headers", "request-body", "response-headers", "response-body", "stream-events"]


@pytest.fixture(scope="module")
def model():
    server = ModelServer()
    yield server
    server.stop()


def start(form, start_envoy, model, phase, mode):
    chain = f"""
processors:
  - name: faulty
    type: fault-injector
    failureMode: {mode}
    timeout: 1ms
    parameters: {{status: 503, phase: {phase}}}
"""
    config = bootstrap([processor_filter(form, chain, module="custom_payload_processor")],
                       [{"match": {"prefix": "/"}, "route": {"cluster": "model", "timeout": "30s"}}],
                       [cluster("model", model.port)])
    return start_envoy(config)


def send(envoy, phase, fault=None):
    headers = {"x-fault": fault} if fault else {}
    stream = phase == "stream-events"
    body = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    reply = requests.post(envoy.url(), json=body, headers=headers, timeout=15, stream=stream)
    content = reply.raw.read() if stream else reply.content
    return reply.status_code, content


def serves(envoy, phase):
    """Envoy answers a clean request normally (after a wasm VM reload, within its backoff)."""
    deadline = time.monotonic() + 10
    while True:
        status, content = send(envoy, phase)
        if status == 200:
            assert content.rstrip().endswith(b"[DONE]") if phase == "stream-events" else b"choices" in content
            return
        assert time.monotonic() < deadline, f"not serving again: {status}"
        time.sleep(0.1)


@pytest.mark.parametrize("mode", ["FailClosed", "FailOpen"])
@pytest.mark.parametrize("phase", PHASES)
def test_faults_on_every_phase(form, start_envoy, model, phase, mode):
    envoy = start(form, start_envoy, model, phase, mode)
    stats_key = "payload_processor.processor.faulty."
    # An error: the plugin's status under FailClosed, ignored (and counted) under FailOpen.
    status, content = send(envoy, phase, "error")
    if mode == "FailClosed":
        assert status == 503 and b"injected_fault" in content, (status, content[:200])
    else:
        assert status == 200
    # A budget overrun: 500 under FailClosed, counted and ignored under FailOpen.
    status, content = send(envoy, phase, "slow")
    if mode == "FailClosed":
        assert status == 500 and b"processor_budget_exceeded" in content, (status, content[:200])
    else:
        assert status == 200
    stats = envoy.stats("processor.faulty")
    assert stats[stats_key + "errors"] == 1
    assert stats[stats_key + "budget_overruns"] == 1
    assert stats[stats_key + "fail_open"] == (2 if mode == "FailOpen" else 0)
    # A panic: contained as a 500 with a stat in the .so whatever the mode (a panicking plugin's
    # work is in an unknown state); in wasm the VM traps, the request fails, the VM is reloaded.
    status, content = send(envoy, phase, "panic")
    if form == "dynamic-module":
        assert status == 500 and b"processor_panic" in content, (status, content[:200])
        assert envoy.stats("processor.faulty")[stats_key + "panics"] == 1
    else:
        assert status == 503, status  # Envoy's answer for a trapped VM, at every phase
    serves(envoy, phase)
    assert envoy.alive()
