"""Envoy configuration in exactly the shape Envoy Gateway's translator emits (EG v1.9).

What EG generates for an `EnvoyExtensionPolicy` (internal/xds/translator: dynamicmodule.go,
wasm.go and their golden files):
- one HTTP filter per policy entry, named `envoy.filters.http.dynamic_modules/envoyextensionpolicy/
  <ns>/<policy>/dynamic-module/<i>` or `envoy.filters.http.wasm/envoyextensionpolicy/<ns>/<policy>/
  wasm/<i>`, with `disabled: true` on the listener;
- each targeted route enables it with `typed_per_filter_config: {<name>: FilterConfig{config: {}}}`;
- the policy's `config` as compact JSON in a StringValue (`filter_config` / `configuration`);
- dynamic modules: `do_not_close: true, load_globally: true`, `module.local.filename`;
- wasm: `name`, `root_id` (if set), `vm_config {runtime: v8, vm_id: <filter suffix>, code: remote
  from EG's own cache (cluster wasm_cluster)}`, `configuration`, `fail_open` only when true. Never
  `allow_on_headers_stop_iteration` nor `failure_policy`;
- listeners with `per_connection_buffer_limit_bytes: 32768`;
- HTTP filters in EG's default order: ext_proc, then wasm, then dynamic modules, then the router.
"""
import copy
import hashlib
import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

from harness import DIST, cluster

NAMESPACE = "default"
POLICY = "payload-processor"
EG_BUFFER_LIMIT = 32768


def filter_name(form, index=0):
    if form == "wasm":
        return f"envoy.filters.http.wasm/envoyextensionpolicy/{NAMESPACE}/{POLICY}/wasm/{index}"
    return f"envoy.filters.http.dynamic_modules/envoyextensionpolicy/{NAMESPACE}/{POLICY}/dynamic-module/{index}"


def compact_json(config):
    """The policy's `config` object as EG serializes it into the StringValue."""
    return json.dumps(config, separators=(",", ":"))


class WasmCodeServer:
    """Serves the .wasm over HTTP, as EG's control plane serves cached modules to Envoy."""

    def __init__(self, path=DIST / "payload_processor.wasm"):
        self.bytes = path.read_bytes()
        self.sha256 = hashlib.sha256(self.bytes).hexdigest()
        handler = partial(SimpleHTTPRequestHandler, directory=str(path.parent))
        handler.log_message = lambda *a: None
        self.name = path.name
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def processor_filter(form, config, code_server=None):
    """Our filter exactly as EG's translator writes it (disabled, enabled per route)."""
    name = filter_name(form)
    if form == "wasm":
        return {
            "name": name,
            "disabled": True,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {
                    "name": "payload-processor",
                    "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                      "value": compact_json(config)},
                    "vm_config": {
                        "runtime": "envoy.wasm.runtime.v8",
                        "vm_id": name.split("/", 1)[1],
                        "code": {"remote": {
                            "http_uri": {"uri": f"http://127.0.0.1:{code_server.port}/{code_server.name}",
                                         "cluster": "wasm_cluster", "timeout": "10s"},
                            "sha256": code_server.sha256,
                        }},
                    },
                },
            },
        }
    return {
        "name": name,
        "disabled": True,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
            "dynamic_module_config": {
                "do_not_close": True,
                "load_globally": True,
                "module": {"local": {"filename": str(DIST / "libpayload_processor.so")}},
            },
            "filter_name": "payload-processor",
            "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": compact_json(config)},
        },
    }


def ext_proc_filter(cluster_name):
    """An ext_proc filter ahead of ours, as EG places one for an EnvoyExtensionPolicy.extProc."""
    return {
        "name": f"envoy.filters.http.ext_proc/envoyextensionpolicy/{NAMESPACE}/ext-proc/extproc/0",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": cluster_name}, "timeout": "5s"},
            "processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SKIP",
                                "request_body_mode": "NONE", "response_body_mode": "NONE"},
        },
    }


def enable(form):
    """The per-route entry that turns our filter on for that route."""
    return {filter_name(form): {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {}}}


def bootstrap(form, config, routes, clusters, code_server=None, ext_proc_cluster=None,
              buffer_limit=EG_BUFFER_LIMIT, access_log=None):
    """A bootstrap with EG's listener, filter chain and route shape. `routes` are plain route
    entries; each with `"enable": True` gets our filter turned on (the key is removed)."""
    filters = []
    if ext_proc_cluster:
        filters.append(ext_proc_filter(ext_proc_cluster))
    filters.append(processor_filter(form, config, code_server))
    filters.append({"name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                                     "suppress_envoy_headers": True}})
    rendered = []
    for route in routes:
        route = copy.deepcopy(route)
        if route.pop("enable", False):
            route["typed_per_filter_config"] = enable(form)
        rendered.append(route)
    clusters = list(clusters)
    if code_server:
        clusters.append(cluster("wasm_cluster", code_server.port))
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "http-10080",
        "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
        "http2_protocol_options": {"initial_connection_window_size": 1048576, "initial_stream_window_size": 65536,
                                   "max_concurrent_streams": 100},
        "use_remote_address": True,
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
        "server_header_transformation": "PASS_THROUGH",
        "route_config": {"name": "default/eg/http", "ignore_port_in_host_matching": True,
                         "virtual_hosts": [{"name": "default/eg/http/all", "domains": ["*"], "routes": rendered}]},
        "http_filters": filters,
    }
    if access_log:
        hcm["access_log"] = access_log
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "default/eg/http",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "per_connection_buffer_limit_bytes": buffer_limit,
                "default_filter_chain": {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                      "typed_config": hcm}]},
            }],
            "clusters": clusters,
        },
    }
