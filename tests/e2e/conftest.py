import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import FORMS, Envoy  # noqa: E402
from mock_server import MockServer  # noqa: E402


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
