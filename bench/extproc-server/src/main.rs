//! The out-of-process baseline of `bench/bench.sh`: a gRPC ext_proc server that does what
//! GIE's Body-Based Router does: receive the request headers, then the buffered body, parse
//! the JSON, and answer with a header mutation `x-gateway-model-name: <model>` and a route
//! cache clear. Lean on purpose (tonic, multi-threaded tokio), so the comparison is with a
//! fast sidecar, not a slow one.
//!
//! With `--moderate URL` it is instead the sidecar of a guardrail: for each request body it
//! posts the prompt to an OpenAI-compatible moderation endpoint (`{input, model}`) and answers
//! with an immediate 400 `content_flagged` when the service flags it, else "continue": the
//! job the `openai-moderation` processor does in process (`bench/callout_bench.py`).
//!
//! Usage: `bench-extproc-server 127.0.0.1:PORT [--moderate http://127.0.0.1:PORT/v1/moderations]`

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::r#type::v3::{HttpStatus, StatusCode};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Reply;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse, ProcessingRequest,
    ProcessingResponse,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::pin::Pin;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{transport::Server, Request, Response, Status, Streaming};

const MODEL_HEADER: &str = "x-gateway-model-name";

/// What the server does with each request body.
#[derive(Clone)]
enum Job {
    /// Body-based routing.
    Route,
    /// Moderation through an HTTP service (a pooled keep-alive client).
    Moderate(Box<Moderation>),
}

/// Where the moderation sidecar asks, and its client.
#[derive(Clone)]
struct Moderation {
    url: hyper::Uri,
    client: Client<HttpConnector, Full<Bytes>>,
}

struct BodyRouter {
    job: Job,
}

/// The prompt text of a chat request: every message's string content, one per line.
fn prompt(body: &[u8]) -> String {
    let doc: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let messages = doc
        .get("messages")
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default();
    messages
        .iter()
        .filter_map(|m| m.get("content").and_then(|c| c.as_str()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asks the moderation service; `Some(reply)` when it flags the prompt, or when it fails
/// (fail closed, as the in-process processor does by default).
async fn moderate(client: &Client<HttpConnector, Full<Bytes>>, url: &hyper::Uri, body: &[u8]) -> Option<Reply> {
    let request = serde_json::json!({"input": prompt(body), "model": "omni-moderation-latest"});
    let call = hyper::Request::post(url.clone())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(&request).ok()?)))
        .ok()?;
    let verdict = async {
        let response = client.request(call).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let bytes = response.into_body().collect().await.ok()?.to_bytes();
        let doc: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        let flagged = doc
            .get("results")?
            .as_array()?
            .iter()
            .any(|r| r.get("flagged") == Some(&serde_json::Value::Bool(true)));
        Some(flagged)
    }
    .await;
    match verdict {
        Some(false) => None,
        Some(true) => Some(immediate(
            400,
            "content_flagged",
            "the content was flagged by moderation",
        )),
        None => Some(immediate(503, "callout_failed", "the moderation service failed")),
    }
}

fn immediate(status: i32, code: &str, message: &str) -> Reply {
    let body = serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "code": code}});
    Reply::ImmediateResponse(ImmediateResponse {
        status: Some(HttpStatus {
            code: StatusCode::try_from(status).map(i32::from).unwrap_or(status),
        }),
        body: serde_json::to_vec(&body).unwrap_or_default(),
        ..Default::default()
    })
}

/// The reply to one phase of a request.
fn answer(phase: Phase) -> Reply {
    match phase {
        // Envoy 1.40 drops header mutations sent with a body reply unless the server also
        // received the headers, so headers come here and are answered with "continue".
        Phase::RequestHeaders(_) => Reply::RequestHeaders(HeadersResponse::default()),
        Phase::RequestBody(body) => {
            let model = serde_json::from_slice::<serde_json::Value>(&body.body)
                .ok()
                .and_then(|doc| doc.get("model").and_then(|m| m.as_str()).map(str::to_owned));
            let header_mutation = model.map(|model| HeaderMutation {
                set_headers: vec![HeaderValueOption {
                    header: Some(HeaderValue {
                        key: MODEL_HEADER.into(),
                        raw_value: model.into_bytes(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            });
            Reply::RequestBody(BodyResponse {
                response: Some(CommonResponse {
                    header_mutation,
                    clear_route_cache: true,
                    ..Default::default()
                }),
            })
        }
        // The filter is configured to send nothing else; answer "continue" if it does.
        Phase::ResponseHeaders(_) => Reply::ResponseHeaders(HeadersResponse::default()),
        Phase::ResponseBody(_) => Reply::ResponseBody(BodyResponse::default()),
        Phase::RequestTrailers(_) => Reply::RequestTrailers(Default::default()),
        Phase::ResponseTrailers(_) => Reply::ResponseTrailers(Default::default()),
    }
}

#[tonic::async_trait]
impl ExternalProcessor for BodyRouter {
    type ProcessStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut incoming = request.into_inner();
        let (sender, receiver) = mpsc::channel(4);
        let job = self.job.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = incoming.next().await {
                let Some(phase) = message.request else { continue };
                let response = match (&job, phase) {
                    (Job::Moderate(moderation), Phase::RequestBody(body)) => Some(
                        moderate(&moderation.client, &moderation.url, &body.body)
                            .await
                            .unwrap_or_else(|| Reply::RequestBody(BodyResponse::default())),
                    ),
                    (_, phase) => Some(answer(phase)),
                };
                let reply = ProcessingResponse {
                    response,
                    ..Default::default()
                };
                if sender.send(Ok(reply)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let address = args.get(1).map_or("127.0.0.1:50051", String::as_str).parse()?;
    let job = match args.iter().position(|a| a == "--moderate") {
        Some(at) => Job::Moderate(Box::new(Moderation {
            url: args.get(at + 1).ok_or("--moderate needs a URL")?.parse()?,
            client: Client::builder(TokioExecutor::new()).build_http(),
        })),
        None => Job::Route,
    };
    let what = if matches!(job, Job::Route) {
        "body router"
    } else {
        "moderation sidecar"
    };
    eprintln!("ext_proc {what} on {address}");
    Server::builder()
        .add_service(ExternalProcessorServer::new(BodyRouter { job }))
        .serve(address)
        .await?;
    Ok(())
}
