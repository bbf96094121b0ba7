//! The host-agnostic engine of envoy-payload-processor.
//!
//! An ordered chain of payload plugins runs inside the proxy, on the request and on the
//! response, with no sidecar hop. This crate knows nothing of Envoy or proxy-wasm: adapters
//! implement [`Host`] per stream and feed callbacks to a [`Stream`].
//!
//! # Chain semantics
//! - **Configuration** ([`FilterConfig`]) is parsed and compiled once per load ([`Chain::load`]).
//!   Unknown plugin types, unknown fields, duplicate names and invalid parameters are refused
//!   with a path-qualified [`ConfigError`].
//! - **Matching**: each processor's `match` is evaluated once, at request headers. A processor
//!   that does not match takes part in neither direction.
//! - **Buffering**: if any matching processor needs the body of a direction
//!   ([`PhaseNeed::Body`]), the engine holds the headers, buffers the body up to the configured
//!   limit (413 for requests above it) and runs the whole chain of that direction, in order, at
//!   the end of the body. Otherwise the chain runs at headers and no byte is buffered. A
//!   request with no body runs body-needing processors on an empty body.
//! - **Order and short-circuit**: processors run in configuration order. The first
//!   [`Decision::Reject`] sends its reply; later processors do not run.
//! - **Failures**: a [`PluginError`], or a latency budget overrun, is handled by the processor's
//!   failure mode: `FailClosed` (default) answers with an OpenAI-shaped JSON error (the
//!   error's status, else 500); `FailOpen` logs, counts `fail_open` and continues. A panic is
//!   caught, counted and always fails closed (500); it never reaches the proxy.
//! - **Mutations** go through [`Context`]: headers set by a plugin replace any value the client
//!   sent; body edits parse the JSON once and re-serialize only if it changed (unchanged bodies
//!   are forwarded byte-for-byte), with `content-length` fixed; after any request header change
//!   the route cache is cleared so routes can match the new headers.
//! - **Responses**: body readers only get JSON responses (others are skipped and counted); a
//!   `text/event-stream` response goes event by event ([`sse`]) to plugins with a
//!   [`StreamNeed`], behind an optional hold-back window, and a rejection after the first byte
//!   ends the stream with the terminal event the provider's SDK understands. When a processor
//!   reads responses the upstream is asked for `accept-encoding: identity`.
//! - **Metrics** ([`Chain::metrics`]): per processor `invocations`, `rejections`, `errors`,
//!   `fail_open`, `budget_overruns`, `panics`, a `latency_us` histogram, and the plugin's own
//!   counters, all under `processor.<name>.`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod background;
pub mod config;
mod engine;
pub mod error;
mod event_stream;
pub mod host;
pub mod json;
mod matcher;
mod metrics;
mod plugin;
mod registry;
pub mod sse;
pub mod testing;
pub mod vocabulary;

pub use background::{Background, BackgroundContext, BackgroundHost, CalloutError, CalloutRequest, CalloutResponse};
pub use config::{FailureMode, FilterConfig, Limits};
pub use engine::{BodyFlow, CalloutFlow, Chain, HeadersFlow, MetricDef, MetricKind, Stream};
pub use error::ConfigError;
pub use event_stream::Api;
pub use host::{Direction, HeadersHold, Host, MetricId, ProcessorTrace};
pub use json::{Body, FieldPath, JsonError, SelectPath, Step, WritePath};
pub use metrics::{Counter, Gauge};
pub use plugin::{
    Context, Decision, EventDecision, LocalReply, PhaseNeed, Plugin, PluginError, RequestEdits, StreamNeed,
};
pub use registry::{set_file_reader, BuildContext, BuildFn, FileReader, PluginFactory, Registry, RegistryError};
pub use sse::SseEvent;
