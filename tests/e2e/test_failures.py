"""Failure modes through real Envoy: errors, panics and budget overruns, FailClosed vs FailOpen."""
import time

import pytest
import requests

from harness import bootstrap, cluster, model_routes, processor_filter


def chain(failure_mode, timeout=None, needs_body=False):
    timeout_line = f"\n    timeout: {timeout}" if timeout else ""
    return f"""
processors:
  - name: faulty
    type: fault-injector
    failureMode: {failure_mode}{timeout_line}
    parameters: {{status: 503, needsBody: {str(needs_body).lower()}}}
  - name: route
    type: body-field-to-header
"""


def start(form, upstreams, start_envoy, text):
    config = bootstrap(
        [processor_filter(form, text, module="custom_payload_processor")],
        model_routes({"model-a": "a"}, "default"),
        [cluster(name, server.port) for name, server in upstreams.items()],
    )
    return start_envoy(config)


def post(envoy, fault=None):
    headers = {"x-fault": fault} if fault else {}
    return requests.post(envoy.url(), json={"model": "model-a"}, headers=headers, timeout=10)


@pytest.mark.parametrize("needs_body", [False, True], ids=["at-headers", "at-body"])
def test_fail_closed_error_becomes_the_plugins_status(form, upstreams, start_envoy, needs_body):
    envoy = start(form, upstreams, start_envoy, chain("FailClosed", needs_body=needs_body))
    reply = post(envoy, "error")
    assert reply.status_code == 503
    assert reply.json()["error"]["code"] == "injected_fault"
    assert post(envoy).json()["backend"] == "a"
    stats = envoy.stats()
    assert stats["payload_processor.processor.faulty.errors"] == 1
    assert stats["payload_processor.processor.faulty.fail_open"] == 0


@pytest.mark.parametrize("needs_body", [False, True], ids=["at-headers", "at-body"])
def test_fail_open_error_is_counted_and_skipped(form, upstreams, start_envoy, needs_body):
    envoy = start(form, upstreams, start_envoy, chain("FailOpen", needs_body=needs_body))
    reply = post(envoy, "error")
    assert reply.status_code == 200
    assert reply.json()["backend"] == "a", "later processors still run"
    stats = envoy.stats()
    assert stats["payload_processor.processor.faulty.errors"] == 1
    assert stats["payload_processor.processor.faulty.fail_open"] == 1


@pytest.mark.parametrize("mode", ["FailClosed", "FailOpen"])
@pytest.mark.parametrize("needs_body", [False, True], ids=["at-headers", "at-body"])
def test_panic_is_contained_as_500_and_envoy_keeps_serving(form, upstreams, start_envoy, mode, needs_body):
    envoy = start(form, upstreams, start_envoy, chain(mode, needs_body=needs_body))
    reply = post(envoy, "panic")
    if form == "dynamic-module":
        # Caught by the engine: a JSON error and a stat.
        assert reply.status_code == 500
        assert reply.json()["error"]["code"] == "processor_panic"
        assert envoy.stats()["payload_processor.processor.faulty.panics"] == 1
    else:
        # In wasm a panic aborts (a trap); with failure_policy FAIL_RELOAD Envoy answers 503
        # until it has reloaded the VM after its backoff (1 s by default), then serves again.
        assert reply.status_code == 503
        deadline = time.monotonic() + 10
        while post(envoy).status_code != 200:
            assert time.monotonic() < deadline, "the VM was not reloaded"
            time.sleep(0.1)
    for _ in range(3):
        assert post(envoy).json()["backend"] == "a"
    assert envoy.alive()


def test_budget_overrun_fail_closed_is_500(form, upstreams, start_envoy):
    envoy = start(form, upstreams, start_envoy, chain("FailClosed", timeout="1ms"))
    reply = post(envoy, "slow")
    assert reply.status_code == 500
    assert reply.json()["error"]["code"] == "processor_budget_exceeded"
    assert post(envoy).status_code == 200
    assert envoy.stats()["payload_processor.processor.faulty.budget_overruns"] == 1


def test_budget_overrun_fail_open_continues(form, upstreams, start_envoy):
    envoy = start(form, upstreams, start_envoy, chain("FailOpen", timeout="1ms"))
    reply = post(envoy, "slow")
    assert reply.status_code == 200
    assert reply.json()["backend"] == "a"
    stats = envoy.stats()
    assert stats["payload_processor.processor.faulty.budget_overruns"] == 1
    assert stats["payload_processor.processor.faulty.fail_open"] == 1


def test_latency_histogram_is_on_admin_stats(form, upstreams, start_envoy):
    envoy = start(form, upstreams, start_envoy, chain("FailClosed"))
    post(envoy)
    text = envoy.admin_get("/stats?filter=latency_us")
    assert "payload_processor.processor.faulty.latency_us" in text
    assert "payload_processor.processor.route.latency_us" in text
