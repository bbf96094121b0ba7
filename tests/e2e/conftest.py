import os

import pytest

from harness import FORMS, WASM_HOLD_HEADERS, Envoy
from harness.mock_server import MockServer

# Behaviour that needs the request or response headers held until the body is read: re-routing
# after the body, an upstream that never sees a refused request, `content-length` kept on a
# changed body, a new status or headers on a buffered answer. The .wasm has it only with
# allow_on_headers_stop_iteration (docs/deploy/envoy-gateway.md); with WASM_HOLD_HEADERS=0
# (the filter as Envoy Gateway configures it) these tests are skipped for the .wasm.
NEEDS_HEADERS_HOLD = "needs_headers_hold"


def shard_tests(config, items):
    """E2E_SHARD=wasm keeps the .wasm cases of form-parametrized tests; E2E_SHARD=rest keeps
    everything else. scripts/test.sh runs the two shards side by side: together they run every
    test exactly once."""
    shard = os.environ.get("E2E_SHARD")
    if not shard:
        return
    if shard not in ("wasm", "rest"):
        raise pytest.UsageError(f"E2E_SHARD must be wasm or rest, not {shard!r}")

    def is_wasm(item):
        callspec = getattr(item, "callspec", None)
        return bool(callspec) and callspec.params.get("form") == "wasm"

    keep = [item for item in items if is_wasm(item) == (shard == "wasm")]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


def pytest_configure(config):
    config.addinivalue_line("markers", f"{NEEDS_HEADERS_HOLD}: needs the headers held until the body is read")


def pytest_collection_modifyitems(config, items):
    shard_tests(config, items)
    if WASM_HOLD_HEADERS:
        return
    skip = pytest.mark.skip(reason="needs allow_on_headers_stop_iteration, which this run leaves out")
    for item in items:
        form = getattr(item, "callspec", None) and item.callspec.params.get("form")
        if form == "wasm" and item.get_closest_marker(NEEDS_HEADERS_HOLD):
            item.add_marker(skip)


@pytest.fixture(params=FORMS)
def form(request):
    return request.param


@pytest.fixture(scope="module")
def upstreams():
    """Three model servers and a default one."""
    servers = {name: MockServer(name) for name in ("a", "b", "c", "default")}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def start_envoy():
    """Starts Envoy with a bootstrap and stops it after the test."""
    started = []

    def start(config, **kwargs):
        envoy = Envoy(config, **kwargs)
        started.append(envoy)
        return envoy.wait_ready()

    yield start
    for envoy in started:
        envoy.stop()
