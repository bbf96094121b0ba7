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
    """E2E_SHARD=1/2 or 2/2 keeps one of two halves of the tests; scripts/test.sh runs the two
    side by side, and together they run every test exactly once. The halves are balanced by
    an estimate (a .wasm case costs about three .so cases: each starts a V8 VM), assigning
    whole groups (a test file's .wasm cases, or its other cases) so module fixtures start
    once per half."""
    shard = os.environ.get("E2E_SHARD")
    if not shard:
        return
    if shard not in ("1/2", "2/2"):
        raise pytest.UsageError(f"E2E_SHARD must be 1/2 or 2/2, not {shard!r}")

    def is_wasm(item):
        callspec = getattr(item, "callspec", None)
        return bool(callspec) and callspec.params.get("form") == "wasm"

    groups = {}
    for item in items:
        groups.setdefault((item.nodeid.split("::")[0], is_wasm(item)), []).append(item)
    cost = {key: len(members) * (3 if key[1] else 1) for key, members in groups.items()}
    halves, load = ([], []), [0, 0]
    # Longest first, each to the lighter half: deterministic for one collection.
    for key in sorted(groups, key=lambda key: (-cost[key], key)):
        lighter = 0 if load[0] <= load[1] else 1
        halves[lighter].append(key)
        load[lighter] += cost[key]
    chosen = set(halves[int(shard[0]) - 1])
    keep = [item for item in items if (item.nodeid.split("::")[0], is_wasm(item)) in chosen]
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
