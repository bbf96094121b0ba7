//! Work a plugin does off the request path: a periodic tick and HTTP calls through the proxy's
//! own clusters (the endpoint picker scrapes model-server metrics this way).
//!
//! The adapter drives it: the dynamic module from a config-level scheduler on Envoy's main
//! thread (one plugin instance for every worker), proxy-wasm from each VM's root-context tick
//! (one instance per worker VM; they can coordinate through shared data). Plugins only see
//! [`BackgroundContext`].

use crate::host::MetricId;
use crate::metrics::{Counter, Gauge};
use std::time::Duration;

/// An HTTP request sent from the background through a proxy cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalloutRequest {
    /// The proxy's cluster to send it to.
    pub cluster: String,
    /// `:method`.
    pub method: String,
    /// `:path`.
    pub path: String,
    /// `:authority` (`host`).
    pub authority: String,
    /// Further headers.
    pub headers: Vec<(String, String)>,
    /// Request body (empty for none).
    pub body: Vec<u8>,
    /// How long the proxy waits for the whole answer.
    pub timeout: Duration,
}

impl CalloutRequest {
    /// All request headers as the proxy wants them: the pseudo-headers first, then the rest.
    pub fn header_pairs(&self) -> Vec<(&str, &str)> {
        let mut headers = vec![
            (":method", self.method.as_str()),
            (":path", self.path.as_str()),
            (":authority", self.authority.as_str()),
        ];
        headers.extend(self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        headers
    }
}

/// The answer to a [`CalloutRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CalloutResponse {
    /// HTTP status (0 when the proxy gave none).
    pub status: u16,
    /// Response headers.
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: Vec<u8>,
}

/// Why a callout produced no answer (connection failure, timeout, reset, unknown cluster).
pub type CalloutError = String;

/// What the adapter offers background work.
pub trait BackgroundHost {
    /// Monotonic clock in nanoseconds, the same clock streams see.
    fn now_nanos(&self) -> u64;
    /// Starts an HTTP call; returns the adapter's handle for it. The answer must come back
    /// through [`crate::Chain::on_callout_done`] with that handle.
    fn http_callout(&mut self, request: &CalloutRequest) -> Result<u64, CalloutError>;
    /// Adds to a counter declared by the chain.
    fn increment_counter(&mut self, id: MetricId, by: u64);
    /// Sets a gauge declared by the chain.
    fn set_gauge(&mut self, id: MetricId, value: u64);
    /// Whether other copies of this configuration run elsewhere in the proxy and can be reached
    /// through shared data (proxy-wasm: one VM per worker). False (the default) where every
    /// thread already uses the same plugin instance (the dynamic module).
    fn has_shared_data(&self) -> bool {
        false
    }
    /// A shared value and its version, if set.
    fn shared_data_get(&self, _key: &str) -> Option<(Vec<u8>, u32)> {
        None
    }
    /// Stores a shared value if its version is still `version` (0: whatever it is); false when
    /// another copy changed it first or the host has no shared data.
    fn shared_data_set(&mut self, _key: &str, _value: &[u8], _version: u32) -> bool {
        false
    }
}

/// Background work of a plugin; a plugin opts in through [`crate::Plugin::background`].
pub trait Background: Send + Sync {
    /// How often [`Background::on_tick`] runs.
    fn tick_interval(&self) -> Duration;
    /// Runs on every tick.
    fn on_tick(&self, ctx: &mut BackgroundContext<'_>);
    /// The answer (or failure) of a callout sent with [`BackgroundContext::send`] and `tag`.
    fn on_callout_done(&self, ctx: &mut BackgroundContext<'_>, tag: u64, result: Result<CalloutResponse, CalloutError>);
}

/// A plugin's view of the host while it does background work.
pub struct BackgroundContext<'a> {
    pub(crate) host: &'a mut dyn BackgroundHost,
    pub(crate) counters: &'a [MetricId],
    pub(crate) gauges: &'a [MetricId],
    /// Callouts this plugin started during this call: (host handle, plugin tag).
    pub(crate) started: Vec<(u64, u64)>,
}

impl BackgroundContext<'_> {
    /// The host's monotonic clock, in nanoseconds.
    pub fn now_nanos(&self) -> u64 {
        self.host.now_nanos()
    }

    /// Sends an HTTP request; its answer comes to [`Background::on_callout_done`] with `tag`.
    pub fn send(&mut self, request: &CalloutRequest, tag: u64) -> Result<(), CalloutError> {
        let handle = self.host.http_callout(request)?;
        self.started.push((handle, tag));
        Ok(())
    }

    /// Whether copies of this configuration elsewhere in the proxy share data with this one
    /// (see [`BackgroundHost::has_shared_data`]).
    pub fn has_shared_data(&self) -> bool {
        self.host.has_shared_data()
    }

    /// A value shared with the other copies, and its version.
    pub fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.host.shared_data_get(key)
    }

    /// Stores a shared value if it is still at `version` (0: unconditionally); true when stored.
    pub fn shared_set(&mut self, key: &str, value: &[u8], version: u32) -> bool {
        self.host.shared_data_set(key, value, version)
    }

    /// Adds one to a counter declared by this processor.
    pub fn increment(&mut self, counter: Counter) {
        if let Some(id) = self.counters.get(counter.0) {
            self.host.increment_counter(*id, 1);
        }
    }

    /// Sets a gauge declared by this processor.
    pub fn set_gauge(&mut self, gauge: Gauge, value: u64) {
        if let Some(id) = self.gauges.get(gauge.0) {
            self.host.set_gauge(*id, value);
        }
    }
}
