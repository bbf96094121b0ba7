//! `payload-processor run`: one exchange through the chain on an in-memory host, traced per
//! processor.

use payload_processor_core::testing::FakeHost;
use payload_processor_core::{
    BodyFlow, Chain, Direction, FilterConfig, HeadersFlow, HeadersHold, Host, MetricId, ProcessorTrace, Stream,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// What to send through the chain (the `run` command's options).
#[derive(clap::Args, Debug)]
pub(crate) struct Options {
    /// The request body (JSON) file.
    #[arg(long)]
    request: PathBuf,
    /// The request path.
    #[arg(long, default_value = "/v1/chat/completions")]
    path: String,
    /// The request method.
    #[arg(long, default_value = "POST")]
    method: String,
    /// A request header as `name:value` (repeatable); `content-type: application/json` is
    /// sent unless given.
    #[arg(long = "header", value_name = "NAME:VALUE")]
    headers: Vec<String>,
    /// A buffered JSON response body from the upstream (status 200).
    #[arg(long, conflicts_with = "sse")]
    response: Option<PathBuf>,
    /// A streamed `text/event-stream` response from the upstream, fed event by event.
    #[arg(long)]
    sse: Option<PathBuf>,
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
}

/// What one processor invocation did.
struct Step {
    processor: String,
    plugin_type: String,
    direction: Direction,
    outcome: String,
    elapsed_us: f64,
    headers_set: Vec<(String, String)>,
    headers_removed: Vec<String>,
    body_diff: Option<String>,
    metadata: Vec<(String, String, String)>,
}

/// The in-memory host of the engine's own tests, with a real clock and a trace per invocation.
struct TracingHost {
    inner: FakeHost,
    clock: Instant,
    types: BTreeMap<String, String>,
    steps: Vec<Step>,
    /// Headers and body of each direction as the previous step left them.
    seen_headers: [Vec<(String, String)>; 2],
    seen_body: [Vec<u8>; 2],
    seen_metadata: BTreeMap<(String, String), String>,
}

fn slot(direction: Direction) -> usize {
    match direction {
        Direction::Request => 0,
        Direction::Response => 1,
    }
}

impl TracingHost {
    /// Remembers a direction's state before its phase starts, so the first step's changes are
    /// its own.
    fn mark(&mut self, direction: Direction) {
        let (headers, body) = match direction {
            Direction::Request => (&self.inner.request_headers, &self.inner.request_body),
            Direction::Response => (&self.inner.response_headers, &self.inner.response_body),
        };
        self.seen_headers[slot(direction)] = headers.clone();
        self.seen_body[slot(direction)] = body.clone();
    }
}

impl Host for TracingHost {
    fn http_callout(&mut self, _request: &payload_processor_core::CalloutRequest) -> Result<u64, String> {
        Err("the offline `run` command sends no callouts (the processor's failure mode applies)".into())
    }
    fn header(&self, dir: Direction, name: &str) -> Option<String> {
        self.inner.header(dir, name)
    }
    fn set_header(&mut self, dir: Direction, name: &str, value: &str) {
        self.inner.set_header(dir, name, value)
    }
    fn remove_header(&mut self, dir: Direction, name: &str) {
        self.inner.remove_header(dir, name)
    }
    fn body_len(&self, dir: Direction) -> u64 {
        self.inner.body_len(dir)
    }
    fn read_body(&mut self, dir: Direction) -> Vec<u8> {
        self.inner.read_body(dir)
    }
    fn replace_body(&mut self, dir: Direction, body: &[u8]) {
        self.inner.replace_body(dir, body)
    }
    fn clear_route_cache(&mut self) {
        self.inner.clear_route_cache()
    }
    fn raise_buffer_limit(&mut self, bytes: u64) {
        self.inner.raise_buffer_limit(bytes)
    }
    fn set_metadata(&mut self, namespace: &str, key: &str, value: &str) {
        self.inner.set_metadata(namespace, key, value)
    }
    fn set_metadata_number(&mut self, namespace: &str, key: &str, value: f64) {
        self.inner.set_metadata(namespace, key, &value.to_string())
    }
    fn send_local_reply(&mut self, status: u16, headers: &[(String, String)], body: &[u8], details: &str) {
        self.inner.send_local_reply(status, headers, body, details)
    }
    // Shown as the `.so` on Envoy 1.40 writes them.
    fn set_metadata_struct(&mut self, namespace: &str, fields: &serde_json::Map<String, Value>) -> bool {
        let shown = Value::Object(fields.clone()).to_string();
        self.inner.set_metadata(namespace, "(struct)", &shown);
        true
    }
    fn set_typed_metadata(&mut self, namespace: &str, type_url: &str, message: &[u8]) -> bool {
        let shown = format!("{type_url}, {} bytes", message.len());
        self.inner.set_metadata(namespace, "(typed)", &shown);
        true
    }
    fn now_nanos(&self) -> u64 {
        self.clock.elapsed().as_nanos() as u64
    }
    fn unix_time_nanos(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos() as u64)
    }
    fn increment_counter(&mut self, id: MetricId, by: u64) {
        self.inner.increment_counter(id, by)
    }
    fn record_histogram(&mut self, id: MetricId, value: u64) {
        self.inner.record_histogram(id, value)
    }
    fn set_gauge(&mut self, id: MetricId, value: u64) {
        self.inner.set_gauge(id, value)
    }
    fn metadata_strings(&self, namespace: &str, key: &str) -> Vec<String> {
        self.inner.metadata_strings(namespace, key)
    }
    fn headers_hold(&self) -> HeadersHold {
        HeadersHold::Available
    }
    fn reset_stream(&mut self) {
        self.inner.reset_stream()
    }
    fn upstream_address(&self) -> Option<String> {
        self.inner.upstream_address()
    }
    fn set_original_destination(&mut self, endpoint: &str) {
        self.inner.set_original_destination(endpoint)
    }
    fn tracing(&self) -> bool {
        true
    }
    fn trace(&mut self, trace: &ProcessorTrace<'_>) {
        let at = slot(trace.direction);
        let headers = match trace.direction {
            Direction::Request => &self.inner.request_headers,
            Direction::Response => &self.inner.response_headers,
        };
        let before = &self.seen_headers[at];
        let headers_set = headers
            .iter()
            .filter(|header| !before.contains(header))
            .cloned()
            .collect();
        let headers_removed = before
            .iter()
            .filter(|(name, _)| !headers.iter().any(|(other, _)| other == name))
            .map(|(name, _)| name.clone())
            .collect();
        self.seen_headers[at] = headers.clone();
        // Streamed events carry no body of their own: only buffered bodies are diffed.
        let body_diff = (!trace.body.is_empty() && trace.body != self.seen_body[at].as_slice())
            .then(|| diff(&self.seen_body[at], trace.body));
        if !trace.body.is_empty() {
            self.seen_body[at] = trace.body.to_vec();
        }
        let metadata = self
            .inner
            .metadata
            .iter()
            .filter(|(key, value)| self.seen_metadata.get(*key) != Some(*value))
            .map(|((namespace, key), value)| (namespace.clone(), key.clone(), value.clone()))
            .collect();
        self.seen_metadata = self.inner.metadata.clone();
        self.steps.push(Step {
            processor: trace.processor.to_string(),
            plugin_type: self.types.get(trace.processor).cloned().unwrap_or_default(),
            direction: trace.direction,
            outcome: trace.outcome.to_string(),
            elapsed_us: trace.elapsed_nanos as f64 / 1_000.0,
            headers_set,
            headers_removed,
            body_diff,
            metadata,
        });
    }
}

/// A line diff of two bodies, pretty-printed first when both are JSON.
fn diff(before: &[u8], after: &[u8]) -> String {
    let show = |bytes: &[u8]| match serde_json::from_slice::<Value>(bytes) {
        Ok(value) => serde_json::to_string_pretty(&value).unwrap_or_default(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    };
    let (before, after) = (show(before), show(after));
    similar::TextDiff::from_lines(&before, &after)
        .unified_diff()
        .context_radius(1)
        .header("before", "after")
        .to_string()
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once(':')
        .filter(|(name, _)| !name.trim().is_empty())
        .ok_or_else(|| format!("--header {text:?}: expected NAME:VALUE"))?;
    Ok((name.trim().to_ascii_lowercase(), value.trim().to_string()))
}

/// Splits an SSE stream after each blank line, so the engine sees it as Envoy would deliver
/// it event by event.
fn sse_chunks(stream: &[u8]) -> Vec<&[u8]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < stream.len() {
        let blank = if stream[i..].starts_with(b"\n\n") {
            2
        } else if stream[i..].starts_with(b"\r\n\r\n") {
            4
        } else {
            0
        };
        if blank > 0 {
            chunks.push(&stream[start..i + blank]);
            start = i + blank;
            i = start;
        } else {
            i += 1;
        }
    }
    if start < stream.len() {
        chunks.push(&stream[start..]);
    }
    chunks
}

enum Upstream {
    None,
    Json(Vec<u8>),
    Sse(Vec<u8>),
}

impl Options {
    pub(crate) fn run(self, chain: Chain, chain_path: &Path) -> Result<(), String> {
        let config = FilterConfig::parse(&crate::read_text(chain_path)?).map_err(|err| err.to_string())?;
        let types = config
            .processors
            .iter()
            .map(|processor| (processor.name.clone(), processor.plugin_type.clone()))
            .collect();
        let body =
            std::fs::read(&self.request).map_err(|err| format!("cannot read {}: {err}", self.request.display()))?;
        let upstream = match (&self.response, &self.sse) {
            (Some(path), _) => {
                Upstream::Json(std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))?)
            }
            (_, Some(path)) => {
                Upstream::Sse(std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))?)
            }
            _ => Upstream::None,
        };
        let mut headers = vec![
            (":method".to_string(), self.method.to_ascii_uppercase()),
            (":path".to_string(), self.path.clone()),
        ];
        let mut extra = Vec::new();
        for text in &self.headers {
            extra.push(parse_header(text)?);
        }
        if !extra.iter().any(|(name, _)| name == "content-type") {
            headers.push(("content-type".into(), "application/json".into()));
        }
        headers.extend(extra);
        headers.push(("content-length".into(), body.len().to_string()));
        let inner = FakeHost {
            request_headers: headers,
            request_body: body,
            ..FakeHost::default()
        };
        let mut host = TracingHost {
            inner,
            clock: Instant::now(),
            types,
            steps: Vec::new(),
            seen_headers: Default::default(),
            seen_body: Default::default(),
            seen_metadata: BTreeMap::new(),
        };
        let mut stream = Stream::new(Arc::new(chain));

        host.mark(Direction::Request);
        let no_body = host.inner.request_body.is_empty();
        let mut forwarded = match stream.on_request_headers(&mut host, no_body) {
            HeadersFlow::Stop => false,
            HeadersFlow::Continue => true,
            HeadersFlow::WaitForBody => stream.on_request_body(&mut host, true) == BodyFlow::Continue,
            // Never: this host refuses callouts, so a processor that calls out fails.
            HeadersFlow::WaitForCallout => false,
        };
        forwarded &= host.inner.reply.is_none();
        let request = json!({
            "headers": pairs(&host.inner.request_headers),
            "body": body_value(&host.inner.request_body),
        });

        let mut client_body = None;
        if forwarded {
            client_body = respond(&mut stream, &mut host, upstream);
        }
        let reply = host.inner.reply.as_ref().map(|reply| {
            json!({
                "status": reply.status,
                "headers": pairs(&reply.headers),
                "body": body_value(&reply.body),
                "details": reply.details,
            })
        });
        let response = client_body.map(|body| {
            json!({
                "headers": pairs(&host.inner.response_headers),
                "body": body_value(&body),
            })
        });

        if self.json {
            let steps: Vec<Value> = host.steps.iter().map(step_json).collect();
            let document = json!({
                "processors": steps,
                "request": if forwarded { request } else { Value::Null },
                "response": response,
                "localReply": reply,
                "streamReset": host.inner.reset,
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&document).map_err(|err| err.to_string())?
            );
            return Ok(());
        }
        for step in &host.steps {
            print_step(step);
        }
        if forwarded {
            println!("== request sent upstream");
            print_message(&request);
        }
        if let Some(reply) = &reply {
            println!(
                "== local reply {} ({})",
                reply["status"],
                reply["details"].as_str().unwrap_or("")
            );
            print_message(reply);
        }
        if host.inner.reset {
            println!("== stream reset (the response headers had already gone out)");
        }
        if let Some(response) = &response {
            println!("== response to the client");
            print_message(response);
        }
        Ok(())
    }
}

/// Feeds the upstream's answer through the response phase; returns what the client receives
/// (None when a local reply replaced it).
fn respond(stream: &mut Stream, host: &mut TracingHost, upstream: Upstream) -> Option<Vec<u8>> {
    let (content_type, body) = match upstream {
        Upstream::None => return None,
        Upstream::Json(body) => ("application/json", body),
        Upstream::Sse(body) => ("text/event-stream", body),
    };
    let streamed = content_type == "text/event-stream";
    host.inner.response_headers = vec![
        (":status".into(), "200".into()),
        ("content-type".into(), content_type.into()),
    ];
    if !streamed {
        host.inner
            .response_headers
            .push(("content-length".into(), body.len().to_string()));
    }
    host.inner.response_body = body.clone();
    host.mark(Direction::Response);
    let flow = stream.on_response_headers(host, body.is_empty());
    if flow == HeadersFlow::Stop || host.inner.reply.is_some() {
        return None;
    }
    if !streamed {
        if flow == HeadersFlow::WaitForBody && stream.on_response_body(host, true) != BodyFlow::Continue {
            return None;
        }
        return (host.inner.reply.is_none() && !host.inner.reset).then(|| host.inner.response_body.clone());
    }
    let mut client = Vec::new();
    let chunks = sse_chunks(&body);
    for (i, chunk) in chunks.iter().enumerate() {
        host.inner.response_body = chunk.to_vec();
        match stream.on_response_body(host, i + 1 == chunks.len()) {
            BodyFlow::Continue => client.extend_from_slice(&host.inner.response_body),
            BodyFlow::Stop => break,
            BodyFlow::Buffer | BodyFlow::Hold | BodyFlow::WaitForCallout => {}
        }
    }
    (host.inner.reply.is_none()).then_some(client)
}

fn pairs(headers: &[(String, String)]) -> Value {
    headers.iter().map(|(name, value)| json!([name, value])).collect()
}

fn body_value(body: &[u8]) -> Value {
    match serde_json::from_slice::<Value>(body) {
        Ok(value) => value,
        Err(_) => Value::String(String::from_utf8_lossy(body).into_owned()),
    }
}

fn step_json(step: &Step) -> Value {
    json!({
        "processor": step.processor,
        "type": step.plugin_type,
        "direction": step.direction.as_str(),
        "outcome": step.outcome,
        "elapsedMicros": step.elapsed_us,
        "headersSet": pairs(&step.headers_set),
        "headersRemoved": step.headers_removed,
        "bodyDiff": step.body_diff,
        "metadata": step.metadata.iter().map(|(namespace, key, value)| json!({"namespace": namespace, "key": key, "value": value})).collect::<Vec<_>>(),
    })
}

fn print_step(step: &Step) {
    println!(
        "[{}] {} ({}): {} in {:.1} µs",
        step.direction.as_str(),
        step.processor,
        step.plugin_type,
        step.outcome,
        step.elapsed_us
    );
    for (name, value) in &step.headers_set {
        println!("    set header    {name}: {value}");
    }
    for name in &step.headers_removed {
        println!("    removed header {name}");
    }
    for (namespace, key, value) in &step.metadata {
        println!("    metadata      {namespace} {key} = {value}");
    }
    if let Some(diff) = &step.body_diff {
        println!("    body:");
        for line in diff.lines() {
            println!("      {line}");
        }
    }
}

fn print_message(message: &Value) {
    for pair in message["headers"].as_array().into_iter().flatten() {
        println!("{}: {}", pair[0].as_str().unwrap_or(""), pair[1].as_str().unwrap_or(""));
    }
    println!();
    match &message["body"] {
        Value::String(text) => println!("{text}"),
        body => println!("{}", serde_json::to_string_pretty(body).unwrap_or_default()),
    }
}
