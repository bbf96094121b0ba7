//! The chain runner, one file per part: the chain compiled from a configuration, a stream's
//! state and shared steps, the request phase, the response phase, streamed events, and the
//! invocation of one processor with its budget and panic containment.

mod callout;
mod chain;
mod events;
mod invoke;
mod request;
mod response;
mod stream;

pub use chain::{Chain, MetricDef, MetricKind};
pub use stream::{BodyFlow, CalloutFlow, HeadersFlow, Stream};
