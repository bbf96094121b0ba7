//! The picker through the engine: a fake host for streams, a fake background host for scrapes.

use crate::builtin_registry;
use payload_processor_core::testing::{run_request_phase, FakeBackgroundHost, FakeHost, SharedData};
use payload_processor_core::{CalloutResponse, Chain, Direction, Stream};
use std::collections::HashMap;
use std::sync::Arc;

const A: &str = "127.0.0.1:8001";
const B: &str = "127.0.0.1:8002";
const C: &str = "127.0.0.1:8003";
const MS: u64 = 1_000_000;

fn chain(parameters: &str, failure_mode: &str) -> Arc<Chain> {
    let config = format!(
        "processors:\n- name: epp\n  type: endpoint-picker\n  failureMode: {failure_mode}\n  parameters: {parameters}\n"
    );
    Arc::new(Chain::load(&config, &builtin_registry()).unwrap_or_else(|err| panic!("{err}")))
}

fn pool(extra: &str) -> Arc<Chain> {
    chain(
        &format!(
            "{{endpoints: ['{A}', '{B}', {{address: '{C}', adapters: [sql-lora]}}], metricsCluster: pool{extra}}}"
        ),
        "FailClosed",
    )
}

fn vllm(waiting: u32, kv: f64) -> String {
    format!("vllm:num_requests_waiting {waiting}\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc {kv}\n")
}

/// One scrape round at `now`: every callout the tick sends is answered from `pages` (by the
/// endpoint in its header); endpoints without a page fail.
fn scrape(chain: &Chain, bg: &mut FakeBackgroundHost, now: u64, pages: &HashMap<&str, String>) {
    bg.now = now;
    chain.on_tick(bg);
    for (handle, request) in bg.take_sent() {
        assert_eq!(request.cluster, "pool");
        assert_eq!(request.path, "/metrics");
        let endpoint = request
            .headers
            .iter()
            .find(|(k, _)| k == "x-gateway-destination-endpoint")
            .map(|(_, v)| v.clone())
            .unwrap();
        assert_eq!(request.authority, endpoint);
        let result = match pages.get(endpoint.as_str()) {
            Some(page) => Ok(CalloutResponse {
                status: 200,
                headers: vec![],
                body: page.clone().into_bytes(),
            }),
            None => Err("connection refused".to_string()),
        };
        chain.on_callout_done(bg, handle, result);
    }
}

fn request(chain: &Arc<Chain>, now: u64, headers: &[(&str, &str)], body: &str) -> (Stream, FakeHost) {
    let mut host = FakeHost::request("/v1/chat/completions", headers, body.as_bytes());
    host.now.set(now);
    let mut stream = Stream::new(Arc::clone(chain));
    run_request_phase(&mut stream, &mut host);
    (stream, host)
}

fn destination(host: &FakeHost) -> Option<String> {
    host.header_values(Direction::Request, "x-gateway-destination-endpoint")
        .first()
        .cloned()
}

fn respond(stream: &mut Stream, host: &mut FakeHost, status: &str, upstream: &str) {
    host.response_headers = vec![(":status".into(), status.into())];
    host.upstream = Some(upstream.into());
    stream.on_response_headers(host, true);
}

fn chat(prompt: &str) -> String {
    serde_json::json!({"model": "llama", "messages": [{"role": "user", "content": prompt}]}).to_string()
}

#[test]
fn picks_follow_the_metrics_and_reach_header_metadata_and_original_destination() {
    let chain = pool("");
    let mut bg = FakeBackgroundHost::default();
    let pages = HashMap::from([(A, vllm(4, 0.5)), (B, vllm(0, 0.1)), (C, vllm(2, 0.3))]);
    scrape(&chain, &mut bg, 10 * MS, &pages);
    let (_, host) = request(
        &chain,
        11 * MS,
        &[("x-gateway-destination-endpoint", "10.9.9.9:1")],
        &chat("hi"),
    );
    assert_eq!(
        destination(&host).as_deref(),
        Some(B),
        "least loaded wins, spoofed value replaced"
    );
    assert_eq!(
        host.header_values(Direction::Request, "x-gateway-destination-endpoint")
            .len(),
        1
    );
    assert_eq!(
        host.metadata
            .get(&("envoy.lb".into(), "x-gateway-destination-endpoint".into()))
            .map(String::as_str),
        Some(B)
    );
    assert_eq!(host.original_destination.as_deref(), Some(B));
    assert_eq!(host.counter(&chain, "processor.epp.endpoint.127_0_0_1_8002.picks"), 1);
}

#[test]
fn stale_endpoints_are_avoided_and_none_fresh_is_503_or_cluster_choice_under_fail_open() {
    let chain = pool("");
    let mut bg = FakeBackgroundHost::default();
    // A answered long ago; B and C answer now.
    scrape(&chain, &mut bg, 10 * MS, &HashMap::from([(A, vllm(0, 0.0))]));
    assert_eq!(
        bg.counter(&chain, "processor.epp.endpoint.127_0_0_1_8002.scrape_failures"),
        1
    );
    scrape(
        &chain,
        &mut bg,
        400 * MS,
        &HashMap::from([(B, vllm(3, 0.5)), (C, vllm(3, 0.5))]),
    );
    for _ in 0..10 {
        let (_, host) = request(&chain, 401 * MS, &[], &chat("x"));
        assert_ne!(destination(&host).as_deref(), Some(A), "A's metrics are 391 ms old");
    }
    assert!(
        bg.gauge(&chain, "processor.epp.endpoint.127_0_0_1_8001.metrics_age_ms")
            .unwrap()
            >= 390
    );
    // Nobody fresh any more.
    let (_, host) = request(&chain, 900 * MS, &[("x-gateway-destination-endpoint", A)], &chat("x"));
    let reply = host.reply.as_ref().expect("503");
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["error"]["code"], "no_endpoint_available");
    // Fail open: no reply, no header (the client's value is still removed), the cluster decides.
    let open = chain_fail_open();
    let (_, host) = request(&open, 900 * MS, &[("x-gateway-destination-endpoint", A)], &chat("x"));
    assert!(host.reply.is_none());
    assert_eq!(destination(&host), None);
}

fn chain_fail_open() -> Arc<Chain> {
    chain(
        &format!("{{endpoints: ['{A}', '{B}'], metricsCluster: pool}}"),
        "FailOpen",
    )
}

#[test]
fn saturated_endpoints_are_avoided_unless_all_are_and_sheddable_requests_get_429() {
    let chain = pool("");
    let mut bg = FakeBackgroundHost::default();
    let pages = HashMap::from([(A, vllm(9, 0.95)), (B, vllm(6, 0.85)), (C, vllm(7, 0.2))]);
    scrape(&chain, &mut bg, 10 * MS, &pages);
    let (_, host) = request(&chain, 11 * MS, &[], &chat("x"));
    assert_eq!(destination(&host).as_deref(), Some(C), "only C is not saturated");

    let all = HashMap::from([(A, vllm(9, 0.95)), (B, vllm(6, 0.85)), (C, vllm(8, 0.9))]);
    scrape(&chain, &mut bg, 100 * MS, &all);
    let (_, host) = request(&chain, 101 * MS, &[], &chat("x"));
    assert_eq!(
        destination(&host).as_deref(),
        Some(B),
        "all saturated: still the best one"
    );
    let (_, host) = request(&chain, 101 * MS, &[("x-gateway-sheddable", "true")], &chat("x"));
    let reply = host.reply.as_ref().expect("429");
    assert_eq!(reply.status, 429);
    assert_eq!(reply.json()["error"]["code"], "endpoints_saturated");
    assert_eq!(host.counter(&chain, "processor.epp.shed"), 1);
}

#[test]
fn a_shared_prompt_prefix_keeps_landing_where_it_was_served() {
    let chain = pool("");
    let mut bg = FakeBackgroundHost::default();
    let even = HashMap::from([(A, vllm(1, 0.3)), (B, vllm(1, 0.3)), (C, vllm(1, 0.3))]);
    scrape(&chain, &mut bg, 10 * MS, &even);
    let system = "You are a careful assistant for the ACME support desk. ".repeat(20);
    let (mut stream, mut host) = request(&chain, 11 * MS, &[], &chat(&format!("{system} question 1")));
    let first = destination(&host).unwrap();
    respond(&mut stream, &mut host, "200", &first);
    assert_eq!(
        host.metadata
            .get(&("envoy.lb".into(), "x-gateway-destination-endpoint-served".into()))
            .map(String::as_str),
        Some(first.as_str())
    );
    for n in 2..12 {
        let (_, host) = request(&chain, 12 * MS, &[], &chat(&format!("{system} question {n}")));
        assert_eq!(destination(&host), Some(first.clone()), "request {n}");
    }
    // Once that endpoint is saturated, affinity gives way.
    let mut busy = even.clone();
    busy.insert(first.as_str(), vllm(8, 0.9));
    scrape(&chain, &mut bg, 100 * MS, &busy);
    let (_, host) = request(&chain, 101 * MS, &[], &chat(&format!("{system} question 99")));
    assert_ne!(destination(&host), Some(first));
}

#[test]
fn failed_answers_teach_nothing_and_the_served_endpoint_is_what_answered() {
    let chain = chain(
        &format!("{{endpoints: ['{A}', '{B}'], fallbackEndpoints: 1, servedHeader: x-served-by}}"),
        "FailClosed",
    );
    let prompt = chat(&"long shared prefix ".repeat(30));
    let (mut stream, mut host) = request(&chain, 1, &[], &prompt);
    let header = destination(&host).unwrap();
    let (first, second) = header.split_once(',').expect("a fallback list");
    assert_ne!(first, second);
    // The first endpoint failed, the retry went to the second.
    respond(&mut stream, &mut host, "200", second);
    assert_eq!(
        host.header_values(Direction::Response, "x-served-by"),
        vec![second.to_string()]
    );
    assert_eq!(host.counter(&chain, "processor.epp.served_other_than_picked"), 1);
    for _ in 0..5 {
        let (_, host) = request(&chain, 2, &[], &prompt);
        assert!(
            destination(&host).unwrap().starts_with(second),
            "the prefix lives where it was served"
        );
    }
    // A 500 from the other endpoint does not move the prefix there.
    let (mut stream, mut host) = request(&chain, 3, &[], &chat(&"another prefix ".repeat(30)));
    let picked = destination(&host).unwrap();
    let picked_first = picked.split(',').next().unwrap().to_string();
    respond(&mut stream, &mut host, "500", &picked_first);
    let hits: Vec<String> = (0..20)
        .map(|_| request(&chain, 4, &[], &chat(&"another prefix ".repeat(30))).1)
        .map(|host| destination(&host).unwrap().split(',').next().unwrap().to_string())
        .collect();
    assert!(
        hits.iter().any(|h| h != &picked_first),
        "no affinity learnt from a 500: {hits:?}"
    );
}

#[test]
fn lora_requests_prefer_endpoints_serving_the_adapter() {
    let chain = pool("");
    let mut bg = FakeBackgroundHost::default();
    let mut pages = HashMap::from([(A, vllm(1, 0.3)), (B, vllm(1, 0.3)), (C, vllm(1, 0.3))]);
    pages.insert(
        B,
        format!(
            "{}vllm:lora_requests_info{{max_lora=\"1\",running_lora_adapters=\"chat-lora\",waiting_lora_adapters=\"\"}} 1.7e9\n",
            vllm(1, 0.3)
        ),
    );
    scrape(&chain, &mut bg, 10 * MS, &pages);
    let lora = |model: &str| {
        let body = serde_json::json!({"model": model, "prompt": "hi"}).to_string();
        destination(&request(&chain, 11 * MS, &[], &body).1).unwrap()
    };
    for _ in 0..10 {
        assert_eq!(lora("sql-lora"), C, "configured adapter");
        assert_eq!(lora("chat-lora"), B, "adapter reported by the metrics");
    }
    let others: std::collections::HashSet<String> = (0..40).map(|_| lora("llama")).collect();
    assert_eq!(others.len(), 3, "a base model has no LoRA preference: {others:?}");
}

#[test]
fn the_subset_hint_restricts_the_pool_and_an_empty_subset_is_503() {
    let chain = pool("");
    let mut bg = FakeBackgroundHost::default();
    let pages = HashMap::from([(A, vllm(0, 0.0)), (B, vllm(5, 0.5)), (C, vllm(5, 0.5))]);
    scrape(&chain, &mut bg, 10 * MS, &pages);
    let hinted = |hint: &str| {
        let mut host = FakeHost::request("/v1/chat/completions", &[], chat("x").as_bytes());
        host.now.set(11 * MS);
        host.metadata.insert(
            (
                "envoy.lb.subset_hint".into(),
                "x-gateway-destination-endpoint-subset".into(),
            ),
            hint.into(),
        );
        let mut stream = Stream::new(Arc::clone(&chain));
        run_request_phase(&mut stream, &mut host);
        host
    };
    for _ in 0..10 {
        let dest = destination(&hinted(&format!("{B},{C}"))).unwrap();
        assert!(dest == B || dest == C, "{dest}");
    }
    let host = hinted("10.0.0.1:80");
    assert_eq!(host.reply.as_ref().map(|r| r.status), Some(503));
    assert!(host.reply.unwrap().json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("subset"));
}

#[test]
fn scrapes_are_paced_failures_counted_and_recovery_noticed() {
    let chain = pool("");
    let mut bg = FakeBackgroundHost {
        now: 10 * MS,
        ..FakeBackgroundHost::default()
    };
    chain.on_tick(&mut bg);
    let sent = bg.take_sent();
    assert_eq!(sent.len(), 3);
    // Still in flight: the next ticks send nothing for these endpoints.
    bg.now = 100 * MS;
    chain.on_tick(&mut bg);
    assert!(bg.take_sent().is_empty());
    for (handle, _) in &sent {
        chain.on_callout_done(
            &mut bg,
            *handle,
            Ok(CalloutResponse {
                status: 503,
                headers: vec![],
                body: vec![],
            }),
        );
    }
    assert_eq!(
        bg.counter(&chain, "processor.epp.endpoint.127_0_0_1_8001.scrape_failures"),
        1
    );
    let (_, host) = request(&chain, 101 * MS, &[], &chat("x"));
    assert_eq!(host.reply.as_ref().map(|r| r.status), Some(503), "no metrics yet");
    // Recovery.
    let pages = HashMap::from([(A, vllm(0, 0.0)), (B, vllm(0, 0.0)), (C, vllm(0, 0.0))]);
    scrape(&chain, &mut bg, 200 * MS, &pages);
    let (_, host) = request(&chain, 201 * MS, &[], &chat("x"));
    assert!(host.reply.is_none());
    assert!(destination(&host).is_some());
    // Garbage and refused callouts count as failures too.
    bg.refuse = Some("cluster not found".into());
    bg.now = 300 * MS;
    chain.on_tick(&mut bg);
    assert_eq!(
        bg.counter(&chain, "processor.epp.endpoint.127_0_0_1_8003.scrape_failures"),
        2
    );
}

#[test]
fn bad_bodies_and_bodiless_requests() {
    let chain = chain(&format!("{{endpoints: ['{A}']}}"), "FailClosed");
    let (_, host) = request(&chain, 1, &[], "{not json");
    assert_eq!(host.reply.as_ref().map(|r| r.status), Some(400));
    let (_, host) = request(&chain, 1, &[], "");
    assert_eq!(destination(&host).as_deref(), Some(A));
    // Header-only when no scorer needs the body.
    let headers_only = chain_with(&format!(
        "{{endpoints: ['{A}'], scorers: {{prefixCache: 0, loraAffinity: 0}}}}"
    ));
    let (_, host) = request(&headers_only, 1, &[], "{not json");
    assert_eq!(destination(&host).as_deref(), Some(A));
}

fn chain_with(parameters: &str) -> Arc<Chain> {
    chain(parameters, "FailClosed")
}

#[test]
fn bad_configs_are_refused_with_paths() {
    for (parameters, path) in [
        ("{endpoints: []}", "processors[0].parameters.endpoints:"),
        ("{endpoints: ['nope']}", "processors[0].parameters.endpoints[0]:"),
        (
            "{endpoints: ['1.2.3.4:80', {address: '1.2.3.4:80'}]}",
            "processors[0].parameters.endpoints[1].address:",
        ),
        (
            "{endpoints: [{address: '1.2.3.4:80', adapters: ['']}]}",
            "processors[0].parameters.endpoints[0].adapters[0]:",
        ),
        (
            "{endpoints: ['1.2.3.4:80'], scorers: {queue: -1}}",
            "processors[0].parameters.scorers.queue:",
        ),
        (
            "{endpoints: ['1.2.3.4:80'], scorers: {bogus: 1}}",
            "processors[0].parameters.scorers.bogus:",
        ),
        (
            "{endpoints: ['1.2.3.4:80'], fallbackEndpoints: 1}",
            "processors[0].parameters.fallbackEndpoints:",
        ),
        (
            "{endpoints: ['1.2.3.4:80'], scrapeInterval: 0s}",
            "processors[0].parameters.scrapeInterval:",
        ),
        (
            "{endpoints: ['1.2.3.4:80'], saturation: {kvCacheUsage: 2}}",
            "processors[0].parameters.saturation.kvCacheUsage:",
        ),
        (
            "{endpoints: ['1.2.3.4:80'], metricsPath: metrics}",
            "processors[0].parameters.metricsPath:",
        ),
        (
            "{endpoints: ['1.2.3.4:80'], sheddableHeader: 'bad header'}",
            "processors[0].parameters.sheddableHeader:",
        ),
    ] {
        let config = format!("processors:\n- name: epp\n  type: endpoint-picker\n  parameters: {parameters}\n");
        let err = Chain::load(&config, &builtin_registry()).unwrap_err().to_string();
        assert!(err.starts_with(path), "{parameters}: {err}");
    }
}

#[test]
fn ipv6_endpoints_are_written_as_envoy_writes_them() {
    let chain = chain("{endpoints: ['[::1]:8000']}", "FailClosed");
    let (_, host) = request(&chain, 1, &[], "");
    assert_eq!(destination(&host).as_deref(), Some("[::1]:8000"));
}

#[test]
fn bodies_edited_by_an_earlier_processor_are_read_as_edited() {
    let config = format!(
        "processors:\n- {{name: deco, type: prompt-decorator, parameters: {{prepend: [{{role: system, content: '{}'}}]}}}}\n- {{name: epp, type: endpoint-picker, parameters: {{endpoints: ['{A}', '{B}', '{C}'], modelField: model}}}}\n",
        "Shared policy text. ".repeat(40)
    );
    let chain = Arc::new(Chain::load(&config, &builtin_registry()).unwrap());
    let (mut stream, mut host) = request(&chain, 1, &[], &chat("first"));
    let first = destination(&host).unwrap();
    respond(&mut stream, &mut host, "200", &first);
    for n in 0..8 {
        let (_, host) = request(&chain, 2, &[], &chat(&format!("question {n}")));
        assert!(host.reply.is_none());
        assert_eq!(
            destination(&host),
            Some(first.clone()),
            "the decorated prefix is shared"
        );
    }
}

#[test]
fn a_reply_envoy_made_itself_reports_no_served_endpoint_and_teaches_nothing() {
    let chain = chain(
        &format!("{{endpoints: ['{A}', '{B}'], servedHeader: x-served-by}}"),
        "FailClosed",
    );
    let prompt = chat(&"a prefix nobody served ".repeat(20));
    let (mut stream, mut host) = request(&chain, 1, &[], &prompt);
    host.response_headers = vec![(":status".into(), "200".into())];
    host.upstream = None;
    stream.on_response_headers(&mut host, true);
    assert!(host.header_values(Direction::Response, "x-served-by").is_empty());
    assert!(!host
        .metadata
        .contains_key(&("envoy.lb".into(), "x-gateway-destination-endpoint-served".into())));
    let picks: std::collections::HashSet<String> = (0..30)
        .map(|_| destination(&request(&chain, 2, &[], &prompt).1).unwrap())
        .collect();
    assert_eq!(picks.len(), 2, "no affinity was learnt");
}

#[test]
fn copies_with_shared_data_scrape_once_and_share_the_view_and_take_over_when_one_goes() {
    // Two copies of one configuration, as two wasm VMs would hold them.
    let first = pool("");
    let second = pool("");
    let shared = SharedData::default();
    let mut host_one = FakeBackgroundHost {
        shared: Some(std::rc::Rc::clone(&shared)),
        ..FakeBackgroundHost::default()
    };
    let mut host_two = FakeBackgroundHost {
        shared: Some(std::rc::Rc::clone(&shared)),
        ..FakeBackgroundHost::default()
    };
    let pages = HashMap::from([(A, vllm(4, 0.5)), (B, vllm(0, 0.1)), (C, vllm(2, 0.3))]);
    scrape(&first, &mut host_one, 10 * MS, &pages);
    host_two.now = 11 * MS;
    second.on_tick(&mut host_two);
    assert!(
        host_two.take_sent().is_empty(),
        "the second copy does not scrape while the first holds the lease"
    );
    let (_, host) = request(&second, 12 * MS, &[], &chat("x"));
    assert_eq!(
        destination(&host).as_deref(),
        Some(B),
        "the second copy sees the first one's metrics"
    );
    // The first copy goes away; once its lease lapses the second scrapes.
    host_two.now = 200 * MS;
    second.on_tick(&mut host_two);
    assert_eq!(host_two.take_sent().len(), 3);
    // A different pool never reads this one's data.
    let other = chain(&format!("{{endpoints: ['{A}'], metricsCluster: other}}"), "FailClosed");
    let mut host_three = FakeBackgroundHost {
        shared: Some(shared),
        now: 201 * MS,
        ..FakeBackgroundHost::default()
    };
    other.on_tick(&mut host_three);
    assert_eq!(host_three.take_sent().len(), 1);
}
