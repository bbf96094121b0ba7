"""Our filter in exactly the configuration Envoy Gateway generates (see eg_shape.py), both forms:
disabled at the listener and enabled per route, the policy's config as compact JSON, the module
loaded with do_not_close/load_globally, the wasm served from EG's cache cluster without
allow_on_headers_stop_iteration, an ext_proc filter ahead of ours, a 32 KiB listener buffer.
The EnvoyPatchPolicy of deploy/envoy-gateway/ is applied to that xDS as EG applies it."""
import copy
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml
from jsonpath_ng.ext import parse as jsonpath

from harness import eg_shape
from harness import FORMS, ROOT, Envoy, EnvoyFailed, cluster, model_routes
from harness.mock_server import MockServer

DEPLOY = ROOT / "deploy" / "envoy-gateway"
EXTPROC_BIN = ROOT / "target" / "bench" / "release" / "bench-extproc-server"
ROUTING = {"processors": [{"name": "route-by-model", "type": "body-field-to-header",
                           "parameters": {"fieldName": "model", "headerName": "X-Gateway-Model-Name"}}]}
MASKING = {"processors": [{"name": "no-pii", "type": "pii-guard", "parameters": {"direction": "Request",
                                                                                 "action": "Mask"}}]}


def manifests(name):
    return list(yaml.safe_load_all((DEPLOY / name).read_text()))


def buffer_limit_from_client_traffic_policy():
    """The listener buffer the ClientTrafficPolicy manifest sets, in bytes."""
    quantity = manifests("client-traffic-policy.yaml")[0]["spec"]["connection"]["bufferLimit"]
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", quantity).groups()
    return int(number) * {None: 1, "Ki": 1024, "Mi": 1024 ** 2, "Gi": 1024 ** 3}[unit]


def apply_patch_policy(bootstrap, policy_name):
    """Applies the EnvoyPatchPolicy's JSON patches to our listener, as EG does: the jsonPath
    selects objects in the listener, `path` is a JSON pointer below each (add operations)."""
    [policy] = manifests("envoy-patch-policy.yaml")
    listener = bootstrap["static_resources"]["listeners"][0]
    applied = 0
    for patch in policy["spec"]["jsonPatches"]:
        assert patch["type"] == "type.googleapis.com/envoy.config.listener.v3.Listener"
        operation = patch["operation"]
        assert operation["op"] == "add"
        # The manifest targets the policy named in deploy/; the test's policy is `policy_name`.
        expression = operation["jsonPath"].replace("/payload-processor-wasm/", f"/{policy_name}/")
        for match in jsonpath(expression).find(listener):
            target = match.value
            *parents, last = operation["path"].strip("/").split("/")
            for key in parents:
                target = target.setdefault(key, {})
            target[last] = operation["value"]
            applied += 1
    assert applied == len(policy["spec"]["jsonPatches"]), "every patch found the EG-shaped wasm filter"
    return bootstrap


class ExtProcServer:
    """The ext_proc body router of the benchmark, here only sent request headers (it continues):
    an ext_proc filter ahead of ours, as EG orders them by default."""

    def __init__(self):
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.proc = subprocess.Popen([str(EXTPROC_BIN), f"127.0.0.1:{self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as conn:
                if conn.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("ext_proc server did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=5)


@pytest.fixture(scope="module")
def servers():
    ups = {name: MockServer(name) for name in ("a", "b", "default", "untouched")}
    code = eg_shape.WasmCodeServer()
    extproc = ExtProcServer() if EXTPROC_BIN.exists() else None
    yield ups, code, extproc
    for server in ups.values():
        server.stop()
    code.stop()
    if extproc:
        extproc.stop()


def test_ext_proc_server_is_built():
    # scripts/test.sh builds it; without it the EG-shaped chain would run without ext_proc.
    assert EXTPROC_BIN.exists(), "build bench-extproc-server (scripts/test.sh does)"


def eg_bootstrap(form, config, servers, patched=False, buffer_limit=eg_shape.EG_BUFFER_LIMIT):
    ups, code, extproc = servers
    routes = [{"match": {"prefix": "/untouched"}, "route": {"cluster": "untouched", "timeout": "10s"}}]
    routes += [dict(route, enable=True) for route in model_routes({"m-a": "a", "m-b": "b"}, "default")]
    clusters = [cluster(name, server.port) for name, server in ups.items()]
    if extproc:
        grpc = cluster("extproc", extproc.port)
        grpc["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
        clusters.append(grpc)
    bootstrap = eg_shape.bootstrap(form, config, routes, clusters, code_server=code if form == "wasm" else None,
                                   ext_proc_cluster="extproc" if extproc else None, buffer_limit=buffer_limit)
    if patched:
        bootstrap = apply_patch_policy(bootstrap, eg_shape.POLICY)
    return bootstrap


def post(envoy, body, path="/v1/chat/completions", timeout=10):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(envoy.url(path), data=data, headers={"content-type": "application/json"}, timeout=timeout)


def wait_for_log(envoy, needle, timeout=5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in envoy.log():
            return envoy.log()
        time.sleep(0.05)
    return envoy.log()


def test_routing(form, servers, start_envoy):
    """The .so routes in EG's shape as it is; the .wasm once the EnvoyPatchPolicy is applied."""
    envoy = start_envoy(eg_bootstrap(form, ROUTING, servers, patched=form == "wasm"))
    for model, backend in [("m-a", "a"), ("m-b", "b"), ("other", "default")]:
        response = post(envoy, {"model": model, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 200, response.text
        assert response.json()["backend"] == backend
        assert response.json()["headers"]["x-gateway-model-name"] == model


def test_wasm_routing_without_the_patch_fails_closed_with_the_fix_logged_once(servers, start_envoy):
    envoy = start_envoy(eg_bootstrap("wasm", ROUTING, servers), concurrency=2)
    for _ in range(6):
        started = time.monotonic()
        response = post(envoy, {"model": "m-a", "messages": []}, timeout=5)
        assert time.monotonic() - started < 2, "answered, never held"
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["code"] == "headers_hold_unavailable"
        assert "allow_on_headers_stop_iteration: true" in error["message"]
        assert "route-by-model" in error["message"]
    log = wait_for_log(envoy, "was loaded without allow_on_headers_stop_iteration")
    assert log.count("was loaded without allow_on_headers_stop_iteration") == 1, "once, not per request or VM"
    assert "EnvoyPatchPolicy" in log
    assert envoy.stats("processor.route-by-model")["payload_processor.processor.route-by-model.errors"] == 6


def test_wasm_routing_without_the_patch_fails_open_unrouted_and_counted(servers, start_envoy):
    config = copy.deepcopy(ROUTING)
    config["processors"][0]["failureMode"] = "FailOpen"
    envoy = start_envoy(eg_bootstrap("wasm", config, servers))
    for _ in range(4):
        response = post(envoy, {"model": "m-a", "messages": []}, timeout=5)
        assert response.status_code == 200
        assert response.json()["backend"] == "default", "unrouted"
        assert "x-gateway-model-name" not in response.json()["headers"]
    stats = envoy.stats("processor.route-by-model")
    assert stats["payload_processor.processor.route-by-model.fail_open"] == 4


def test_a_route_that_does_not_enable_the_filter_is_untouched(form, servers, start_envoy):
    envoy = start_envoy(eg_bootstrap(form, MASKING, servers, patched=form == "wasm"))
    body = b'{"model": "m-a", "note": "mail me at jane.doe@example.com", broken'
    response = post(envoy, body, path="/untouched/v1/chat/completions")
    assert response.status_code == 200
    record = response.json()
    assert record["backend"] == "untouched"
    assert record["body"] == body.decode(), "byte for byte, not even parsed"
    stats = envoy.stats("processor.no-pii")
    assert stats.get("payload_processor.processor.no-pii.invocations", 0) == 0


@pytest.mark.parametrize("patched", [False, True], ids=["eg-as-generated", "patched"])
def test_masking(form, servers, start_envoy, patched):
    if form != "wasm" and patched:
        pytest.skip("the patch is for the wasm filter")
    envoy = start_envoy(eg_bootstrap(form, MASKING, servers, patched=patched))
    prompt = "I am jane.doe@example.com, call me tomorrow"
    for _ in range(3):
        response = post(envoy, {"model": "m-a", "messages": [{"role": "user", "content": prompt}]})
        assert response.status_code == 200, response.text
        record = response.json()
        sent = json.loads(record["body"])
        assert sent["messages"][0]["content"] == "I am [EMAIL], call me tomorrow"
        assert record["body_length"] == len(record["body"].encode())
        if "content-length" in record["headers"]:
            assert int(record["headers"]["content-length"]) == record["body_length"]
    assert envoy.stats("processor.no-pii")["payload_processor.processor.no-pii.masked"] == 3


@pytest.mark.parametrize("chain", ["routing", "masking"])
def test_64_kib_prompt_gets_a_clear_answer(form, servers, start_envoy, chain):
    """With the manifests' buffer limit (ClientTrafficPolicy) the prompt is served in both forms."""
    config = ROUTING if chain == "routing" else MASKING
    envoy = start_envoy(eg_bootstrap(form, config, servers, patched=form == "wasm",
                                     buffer_limit=buffer_limit_from_client_traffic_policy()))
    prompt = "lorem ipsum " * (64 * 1024 // 12)
    response = post(envoy, {"model": "m-b", "messages": [{"role": "user", "content": prompt}]}, timeout=10)
    assert response.status_code == 200, response.text[:300]
    if chain == "routing":
        assert response.json()["backend"] == "b"


@pytest.mark.parametrize("chain", ["routing", "masking"])
def test_64_kib_prompt_on_eg_default_buffer(form, servers, start_envoy, chain):
    """On EG's default 32 KiB listener buffer the .so raises its own limit and serves the
    prompt; the .wasm cannot raise it, and Envoy answers 413 at once, never a hang (even with
    ext_proc ahead of us holding the headers while the body arrives)."""
    config = ROUTING if chain == "routing" else MASKING
    envoy = start_envoy(eg_bootstrap(form, config, servers, patched=form == "wasm"))
    prompt = "lorem ipsum " * (64 * 1024 // 12)
    started = time.monotonic()
    response = post(envoy, {"model": "m-b", "messages": [{"role": "user", "content": prompt}]}, timeout=10)
    assert time.monotonic() - started < 5
    if form == "wasm":
        assert response.status_code == 413
    else:
        assert response.status_code == 200
        assert response.json()["backend"] == ("b" if chain == "routing" else "default")
        assert response.json()["body_length"] > 64 * 1024


def test_a_bad_chain_in_the_policy_is_refused_at_load(form, servers, start_envoy):
    """Refused with the path of the bad value in Envoy's log, and never run fail-open. The .so
    fails the config load (here: Envoy refuses to start). The .wasm, which EG serves as remote
    code loaded after start-up, fails its VM configuration: the filter is fail-closed (EG's
    failOpen defaults to false), so every request on its routes gets 503."""
    bad = {"processors": [{"name": "route", "type": "body-field-to-header", "parameters": {"feildName": "model"}}]}
    message = "processors[0].parameters.feildName: unknown field"
    if form == "dynamic-module":
        envoy = Envoy(eg_bootstrap(form, bad, servers))
        try:
            with pytest.raises(EnvoyFailed) as failed:
                envoy.wait_ready(timeout=20)
            assert message in failed.value.log
        finally:
            envoy.stop()
        return
    envoy = start_envoy(eg_bootstrap(form, bad, servers))
    assert message in wait_for_log(envoy, message)
    for _ in range(3):
        response = post(envoy, {"model": "m-a", "messages": []})
        assert response.status_code == 503, "fail closed, not passed through unfiltered"
    assert post(envoy, {"model": "m-a"}, path="/untouched/x").status_code == 200, "other routes serve"


def test_a_missing_local_module_is_never_skipped(servers):
    """A Local module path that does not exist fails the config load (EG: the listener update is
    NACKed): traffic is never served without the filter."""
    if "dynamic-module" not in FORMS:
        pytest.skip("the .so needs Envoy 1.38 or later")
    bootstrap = eg_bootstrap("dynamic-module", MASKING, servers)
    module = bootstrap["static_resources"]["listeners"][0]["default_filter_chain"]["filters"][0]["typed_config"]
    for entry in module["http_filters"]:
        if entry["name"] == eg_shape.filter_name("dynamic-module"):
            entry["typed_config"]["dynamic_module_config"]["module"]["local"]["filename"] = "/nonexistent/lib.so"
    envoy = Envoy(bootstrap)
    try:
        with pytest.raises(EnvoyFailed) as failed:
            envoy.wait_ready(timeout=20)
        assert "Failed to load dynamic module" in failed.value.log
    finally:
        envoy.stop()


@pytest.mark.parametrize("manifest", sorted(p.name for p in DEPLOY.glob("*.yaml")))
def test_every_policy_config_in_the_manifests_loads_in_envoy(manifest, form, servers, start_envoy):
    """Each EnvoyExtensionPolicy's `config`, serialized as EG serializes it, loads in real Envoy."""
    configs = []
    for doc in manifests(manifest):
        if doc and doc.get("kind") == "EnvoyExtensionPolicy":
            spec = doc["spec"]
            configs += [entry["config"] for entry in spec.get("dynamicModule", []) + spec.get("wasm", [])]
    if not configs:
        pytest.skip("no policy config in this manifest")
    for config in configs:
        start_envoy(eg_bootstrap(form, config, servers))


def test_patch_policy_targets_the_filter_eg_names():
    [policy] = manifests("envoy-patch-policy.yaml")
    [wasm_policy] = manifests("extension-policy-wasm-http.yaml")
    name = f"envoy.filters.http.wasm/envoyextensionpolicy/{wasm_policy['metadata']['namespace']}/" \
           f"{wasm_policy['metadata']['name']}/wasm/0"
    for patch in policy["spec"]["jsonPatches"]:
        assert name in patch["operation"]["jsonPath"]
    listener = policy["spec"]["jsonPatches"][0]["name"]
    assert listener == f"{policy['metadata']['namespace']}/{policy['spec']['targetRef']['name']}/http"


def test_envoy_gateway_is_generated_shape_exactly():
    """The helper's filter entries carry what EG's translator writes, nothing more."""
    code = type("Code", (), {"port": 1, "name": "x.wasm", "sha256": "0" * 64})()
    wasm = eg_shape.processor_filter("wasm", {"processors": []}, code)
    assert wasm["disabled"] is True
    assert set(wasm["typed_config"]["config"]) == {"name", "configuration", "vm_config"}
    assert wasm["typed_config"]["config"]["configuration"]["value"] == '{"processors":[]}'
    module = eg_shape.processor_filter("dynamic-module", {"processors": []})
    config = module["typed_config"]["dynamic_module_config"]
    assert config["do_not_close"] is True and config["load_globally"] is True
    assert set(config) == {"do_not_close", "load_globally", "module"}
