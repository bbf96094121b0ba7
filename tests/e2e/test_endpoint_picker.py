"""The endpoint picker through real Envoy, both forms, against three (or four) mock vLLM servers:
picks follow the scraped metrics, saturated and stale endpoints are avoided, sheddable requests
are shed, prompt prefixes stick, LoRA requests go where the adapter is, and the choice reaches
the upstream through ORIGINAL_DST by header, ORIGINAL_DST by metadata (filter state in wasm) and
override_host with a fallback list whose second entry takes the retry when the first is dead.

One Envoy per form serves four listeners, each with its own chain:
  main      ORIGINAL_DST by header (or, with `x-test-cluster: md`, by metadata); subset hints come
            from the `x-subset` request header through header_to_metadata
  fallback  `fallbackEndpoints: 1` and `servedHeader`, override_host cluster with retries
  open      FailOpen, override_host cluster (its round-robin fallback decides when we cannot)
  listhint  a subset hint as a metadata *list* (set_metadata), as the Inference Extension writes it
"""
import json
import tempfile
import time
from pathlib import Path

import pytest
import requests

from harness import processor_filter, read_access_log
from harness.vllm_server import VllmServer

DEST = "x-gateway-destination-endpoint"
SERVED = "x-gateway-destination-endpoint-served"
TIMEOUT = 10
SCRAPE = "20ms"
STALE = "300ms"


def chain(name, endpoints, failure_mode="FailClosed", **extra):
    parameters = {"endpoints": endpoints, "metricsCluster": "pool", "scrapeInterval": SCRAPE, "staleAfter": STALE,
                  "scrapeTimeout": "250ms", **extra}
    processor = {"name": name, "type": "endpoint-picker", "failureMode": failure_mode, "parameters": parameters}
    return json.dumps({"processors": [processor]})


def original_dst(name, **lb):
    return {"name": name, "connect_timeout": "1s", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
            "original_dst_lb_config": lb}


def override_host_cluster(name, servers):
    return {
        "name": name, "connect_timeout": "1s", "type": "STATIC",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": s.port}}}}
            for s in servers]}]},
        "load_balancing_policy": {"policies": [{"typed_extension_config": {
            "name": "envoy.load_balancing_policies.override_host",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
                # Metadata first (the dynamic module writes it), then the header (wasm cannot
                # write metadata; the header carries the same list).
                "override_host_sources": [{"metadata": {"key": "envoy.lb", "path": [{"key": DEST}]}},
                                          {"header": DEST}],
                "fallback_policy": {"policies": [{"typed_extension_config": {
                    "name": "envoy.load_balancing_policies.round_robin",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin"}}}]},
            }}}]},
    }


def hcm(name, filters, routes, access_log=None):
    config = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name, "codec_type": "AUTO",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
        "http_filters": filters + [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    if access_log:
        config["access_log"] = access_log
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "per_connection_buffer_limit_bytes": 8 * 1024 * 1024,
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": config}]}]}


def route(cluster, retries=False, **match):
    action = {"cluster": cluster, "timeout": "10s"}
    if retries:
        action["retry_policy"] = {"retry_on": "connect-failure,refused-stream,reset,5xx", "num_retries": 2}
    return {"match": {"prefix": "/", **match}, "route": action}


class Gateway:
    def __init__(self, envoy, servers, log):
        self.envoy, self.servers, self.log = envoy, servers, log
        self.sent = 0
        listeners = json.loads(envoy.admin_get("/listeners?format=json"))["listener_statuses"]
        self.ports = {l["name"]: l["local_address"]["socket_address"]["port_value"] for l in listeners}

    def url(self, listener="main", path="/v1/chat/completions"):
        return f"http://127.0.0.1:{self.ports[listener]}{path}"

    def chat(self, text="Hello", listener="main", model="llama", headers=None, stream=False, system=None):
        # A unique system prompt unless the test shares one: load tests must not be steered by
        # prefix affinity to earlier requests.
        self.sent += 1
        system = system if system is not None else f"Request {self.sent} {time.monotonic_ns()}: be terse."
        body = {"model": model, "messages": [{"role": "system", "content": system},
                                             {"role": "user", "content": text}], "stream": stream}
        return requests.post(self.url(listener), json=body, headers=headers or {}, timeout=TIMEOUT)

    def served_by(self, response):
        assert response.status_code == 200, response.text
        return response.headers["x-served-by"]

    def stats(self):
        return self.envoy.stats("epp")


def settle():
    """Long enough for a few scrapes (20 ms interval) to land."""
    time.sleep(0.25)


@pytest.fixture(scope="module")
def servers():
    started = {name: VllmServer(name) for name in ("a", "b", "c", "d")}
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture
def gateway(form, servers, start_envoy):
    return start_gateway(form, servers, start_envoy)


def start_gateway(form, servers, start_envoy, log_level="info"):
    a, b, c, d = (servers[n] for n in "abcd")
    for server in (a, b, c, d):
        server.set_metrics(waiting=1, kv=0.2)
    log = Path(tempfile.mkdtemp(prefix="epp-")) / "access.log"
    if form == "wasm":
        fields = {"dest": f"%FILTER_STATE(wasm.envoy.lb.{DEST}:PLAIN)%", "served": f"%FILTER_STATE(wasm.envoy.lb.{SERVED}:PLAIN)%"}
    else:
        fields = {"dest": f"%DYNAMIC_METADATA(envoy.lb:{DEST})%", "served": f"%DYNAMIC_METADATA(envoy.lb:{SERVED})%"}
    fields["upstream"] = "%UPSTREAM_HOST%"
    access_log = [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": str(log), "log_format": {"json_format": fields}}}]
    three = [a.address, b.address, {"address": c.address, "adapters": ["sql-lora"]}]
    subset_from_header = {"name": "envoy.filters.http.header_to_metadata", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config",
        "request_rules": [{"header": "x-subset", "remove": True, "on_header_present": {
            "metadata_namespace": "envoy.lb.subset_hint", "key": "x-gateway-destination-endpoint-subset", "type": "STRING"}}]}}
    subset_list = {"name": "envoy.filters.http.set_metadata", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
        "metadata": [{"metadata_namespace": "envoy.lb.subset_hint",
                      "value": {"x-gateway-destination-endpoint-subset": [b.address, c.address]}}]}}
    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                hcm("main", [subset_from_header, processor_filter(form, chain("epp", three))],
                    [route("pool_md", headers=[{"name": "x-test-cluster", "string_match": {"exact": "md"}}]),
                     route("pool")], access_log),
                hcm("fallback", [processor_filter(form, chain("epp_fallback", [a.address, b.address, d.address],
                                                              fallbackEndpoints=1, servedHeader=SERVED))],
                    [route("pool_static", retries=True)]),
                hcm("open", [processor_filter(form, chain("epp_open", [a.address, b.address], failure_mode="FailOpen"))],
                    [route("pool_static")]),
                hcm("listhint", [subset_list, processor_filter(form, chain("epp_list", three))], [route("pool")]),
            ],
            "clusters": [
                original_dst("pool", use_http_header=True, http_header_name=DEST),
                original_dst("pool_md", metadata_key={"key": "envoy.lb", "path": [{"key": DEST}]}),
                override_host_cluster("pool_static", [a, b, d]),
            ],
        },
    }
    envoy = start_envoy(config, log_level=log_level)
    settle()
    return Gateway(envoy, servers, log)


def test_picks_follow_the_metrics(gateway, servers):
    servers["a"].set_metrics(waiting=4, kv=0.5)
    servers["b"].set_metrics(waiting=0, kv=0.1)
    servers["c"].set_metrics(waiting=2, kv=0.3)
    settle()
    assert {gateway.served_by(gateway.chat()) for _ in range(10)} == {"b"}
    # b fills up: c is now the least loaded.
    servers["b"].set_metrics(waiting=9, kv=0.95)
    settle()
    assert {gateway.served_by(gateway.chat()) for _ in range(10)} == {"c"}
    stats = gateway.stats()
    picks = {k: v for k, v in stats.items() if k.endswith(".picks") and "processor.epp.endpoint" in k}
    assert picks[f"payload_processor.processor.epp.endpoint.127_0_0_1_{servers['b'].port}.picks"] >= 10
    assert picks[f"payload_processor.processor.epp.endpoint.127_0_0_1_{servers['c'].port}.picks"] >= 10
    assert stats[f"payload_processor.processor.epp.endpoint.127_0_0_1_{servers['a'].port}.metrics_age_ms"] < 300


def test_saturated_endpoints_are_avoided_and_sheddable_requests_shed_when_all_are(gateway, servers):
    servers["a"].set_metrics(waiting=7, kv=0.9)
    servers["b"].set_metrics(waiting=9, kv=0.85)
    servers["c"].set_metrics(waiting=12, kv=0.2)  # long queue but KV headroom: not saturated
    settle()
    assert {gateway.served_by(gateway.chat()) for _ in range(6)} == {"c"}
    servers["c"].set_metrics(waiting=12, kv=0.99)
    settle()
    shed = gateway.chat(headers={"x-gateway-sheddable": "true"})
    assert shed.status_code == 429
    assert shed.json()["error"]["code"] == "endpoints_saturated"
    # Not sheddable: still served, by the least bad one (a: shortest queue).
    assert gateway.served_by(gateway.chat()) == "a"
    assert gateway.stats()["payload_processor.processor.epp.shed"] == 1


def test_stale_endpoints_are_avoided_failures_counted_and_recovery_noticed(gateway, servers):
    servers["a"].set_metrics(waiting=0, kv=0.0, status=500)
    servers["b"].set_metrics(waiting=3, kv=0.5)
    servers["c"].set_metrics(waiting=3, kv=0.5)
    time.sleep(0.5)  # a's last good metrics are now older than staleAfter
    assert "a" not in {gateway.served_by(gateway.chat()) for _ in range(12)}
    stats = gateway.stats()
    assert stats[f"payload_processor.processor.epp.endpoint.127_0_0_1_{servers['a'].port}.scrape_failures"] >= 5
    assert stats[f"payload_processor.processor.epp.endpoint.127_0_0_1_{servers['a'].port}.stale_skips"] >= 12
    servers["a"].set_metrics(waiting=0, kv=0.0)
    settle()
    assert {gateway.served_by(gateway.chat()) for _ in range(6)} == {"a"}


def test_no_fresh_endpoint_is_503_and_fail_open_lets_the_cluster_choose(gateway, servers):
    for name in "abcd":
        servers[name].set_metrics(status=500)
    time.sleep(0.5)
    response = gateway.chat(headers={DEST: servers["a"].address})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_endpoint_available"
    # FailOpen: the override_host cluster's round robin serves it, whatever the client asked.
    served = {gateway.served_by(gateway.chat("fail open", listener="open", headers={DEST: servers["d"].address}))
              for _ in range(6)}
    assert served <= {"a", "b", "d"} and len(served) >= 2
    assert gateway.stats()["payload_processor.processor.epp_open.fail_open"] >= 6


def test_a_long_shared_prefix_keeps_landing_on_the_same_instance(gateway, servers):
    settle()
    system = "You are the support assistant of ACME Corp. Follow the policy below exactly. " * 30
    landed = []
    for user in range(12):
        response = gateway.chat(f"User {user}: where is my order?", system=system)
        landed.append(gateway.served_by(response))
    assert len(set(landed)) == 1, landed
    hits = [r["hit_blocks"] for r in servers[landed[0]].completions[-11:]]
    assert all(h >= 30 for h in hits), hits
    # A different system prompt is free to go elsewhere; with equal load it spreads.
    others = {gateway.served_by(gateway.chat(f"Prompt family {n}: " + "x" * 200)) for n in range(30)}
    assert len(others) >= 2


def test_lora_requests_prefer_instances_serving_the_adapter(gateway, servers):
    servers["b"].set_metrics(waiting=1, kv=0.2, adapters=["chat-lora"], max_lora=1)
    settle()
    assert {gateway.served_by(gateway.chat(model="sql-lora")) for _ in range(8)} == {"c"}  # configured
    assert {gateway.served_by(gateway.chat(model="chat-lora")) for _ in range(8)} == {"b"}  # from metrics


def test_client_supplied_destination_is_overwritten(gateway, servers):
    servers["a"].set_metrics(waiting=0, kv=0.0)
    servers["b"].set_metrics(waiting=5, kv=0.5)
    servers["c"].set_metrics(waiting=5, kv=0.5)
    settle()
    for spoofed in (servers["c"].address, "10.255.255.1:80", "garbage"):
        assert gateway.served_by(gateway.chat(headers={DEST: spoofed})) == "a"
    upstream_headers = servers["a"].completions[-1]["headers"]
    assert upstream_headers[DEST] == servers["a"].address


def test_original_dst_by_metadata(gateway, servers, form):
    servers["a"].set_metrics(waiting=5, kv=0.5)
    servers["b"].set_metrics(waiting=5, kv=0.5)
    servers["c"].set_metrics(waiting=0, kv=0.0)
    settle()
    for _ in range(5):
        assert gateway.served_by(gateway.chat(headers={"x-test-cluster": "md"})) == "c"
    entries = read_access_log(gateway.log, 5)
    assert entries[-1]["dest"] == servers["c"].address
    assert entries[-1]["upstream"] == servers["c"].address
    assert entries[-1]["served"] == servers["c"].address


def test_override_host_fallback_list_takes_the_retry_when_the_first_endpoint_is_dead(gateway, servers):
    a, b, d = servers["a"], servers["b"], servers["d"]
    a.set_metrics(waiting=0, kv=0.0)
    b.set_metrics(waiting=1, kv=0.1)
    d.set_metrics(waiting=6, kv=0.5)
    settle()
    response = gateway.chat(listener="fallback")
    assert gateway.served_by(response) == "a"
    assert response.headers[SERVED] == a.address
    upstream = a.completions[-1]["headers"]
    assert upstream[DEST] == f"{a.address},{b.address}"
    # The first choice dies between two scrapes: its connection is refused, the retry goes to
    # the second entry of the list, and the served endpoint is reported as that one.
    a.kill()
    try:
        response = gateway.chat("after a died", listener="fallback")
        assert gateway.served_by(response) == "b"
        assert response.headers[SERVED] == b.address
        assert gateway.envoy.stats("pool_static")["cluster.pool_static.upstream_rq_retry"] >= 1
        assert gateway.stats()["payload_processor.processor.epp_fallback.served_other_than_picked"] >= 1
    finally:
        servers["a"] = VllmServer("a")  # a fresh instance (new port) for the tests after this one


def test_subset_hints_restrict_the_pool(gateway, servers):
    a, b, c = servers["a"], servers["b"], servers["c"]
    a.set_metrics(waiting=0, kv=0.0)
    b.set_metrics(waiting=2, kv=0.2)
    c.set_metrics(waiting=3, kv=0.3)
    settle()
    served = {gateway.served_by(gateway.chat(headers={"x-subset": f"{b.address},{c.address}"})) for _ in range(6)}
    assert served == {"b"}, "a is the least loaded but outside the subset"
    empty = gateway.chat(headers={"x-subset": "10.1.2.3:8000"})
    assert empty.status_code == 503
    assert "subset" in empty.json()["error"]["message"]
    # The Inference Extension writes the hint as a list: same result.
    assert {gateway.served_by(gateway.chat(listener="listhint")) for _ in range(6)} == {"b"}


def test_streamed_answers_are_routed_and_served_endpoint_recorded(gateway, servers):
    servers["a"].set_metrics(waiting=5, kv=0.5)
    servers["b"].set_metrics(waiting=0, kv=0.1)
    servers["c"].set_metrics(waiting=5, kv=0.5)
    settle()
    response = gateway.chat(stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert '"served_by": "b"' in response.text and response.text.rstrip().endswith("data: [DONE]")
    entry = read_access_log(gateway.log, 1)[-1]
    assert entry["served"] == servers["b"].address


def test_the_pick_and_its_scores_are_in_the_debug_log(form, servers, start_envoy):
    gateway = start_gateway(form, servers, start_envoy, log_level="debug")
    servers["a"].set_metrics(waiting=5, kv=0.5)
    servers["b"].set_metrics(waiting=0, kv=0.1)
    servers["c"].set_metrics(waiting=5, kv=0.5)
    settle()
    assert gateway.served_by(gateway.chat()) == "b"
    b = servers["b"].address
    deadline = time.monotonic() + 5
    while f"endpoint-picker epp: picked {b}; scores: {b} total=" not in gateway.envoy.log():
        assert time.monotonic() < deadline, gateway.envoy.log()[-3000:]
        time.sleep(0.1)
    assert "queue=1.00 kv=0.90" in gateway.envoy.log()


def test_two_workers_share_one_view_and_scrape_once(form, servers, start_envoy):
    """With two worker threads the .so shares one picker; the .wasm has one VM per worker, and
    they elect one scraper through shared data and share its metrics."""
    from harness import bootstrap

    a, b, c = servers["a"], servers["b"], servers["c"]
    a.set_metrics(waiting=5, kv=0.5)
    b.set_metrics(waiting=0, kv=0.1)
    c.set_metrics(waiting=5, kv=0.5)
    chain_text = json.dumps({"processors": [{"name": "epp", "type": "endpoint-picker", "parameters": {
        "endpoints": [a.address, b.address, c.address], "metricsCluster": "pool", "scrapeInterval": "50ms"}}]})
    config = bootstrap([processor_filter(form, chain_text)], [route("pool")],
                       [original_dst("pool", use_http_header=True, http_header_name=DEST)])
    envoy = start_envoy(config, concurrency=2)
    time.sleep(0.5)
    before = b.model.scrapes
    time.sleep(2.0)
    scrapes = b.model.scrapes - before
    # One scraper at 20 per second: about 40 (each worker scraping on its own would be 80+).
    assert 25 <= scrapes <= 60, scrapes
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    served = set()
    for _ in range(20):
        # A new connection each time, so both workers serve some.
        response = requests.post(envoy.url(), json=body, headers={"connection": "close"}, timeout=TIMEOUT)
        served.add(response.headers.get("x-served-by"))
    assert served == {"b"}
