//! The out-of-process baseline of `bench/bench.sh`: a gRPC ext_proc server that does what
//! GIE's Body-Based Router does: receive the request headers, then the buffered body, parse
//! the JSON, and answer with a header mutation `x-gateway-model-name: <model>` and a route
//! cache clear. Lean on purpose (tonic, multi-threaded tokio), so the comparison is with a
//! fast sidecar, not a slow one.
//!
//! Usage: `bench-extproc-server 127.0.0.1:PORT`

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Reply;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ProcessingRequest, ProcessingResponse,
};
use std::pin::Pin;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{transport::Server, Request, Response, Status, Streaming};

const MODEL_HEADER: &str = "x-gateway-model-name";

struct BodyRouter;

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
        tokio::spawn(async move {
            while let Some(Ok(message)) = incoming.next().await {
                let Some(phase) = message.request else { continue };
                let reply = ProcessingResponse {
                    response: Some(answer(phase)),
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
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50051".into())
        .parse()?;
    eprintln!("ext_proc body router on {address}");
    Server::builder()
        .add_service(ExternalProcessorServer::new(BodyRouter))
        .serve(address)
        .await?;
    Ok(())
}
