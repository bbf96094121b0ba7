//! Whether Envoy holds request headers for this filter while the body arrives.
//!
//! A proxy-wasm filter that pauses at request headers only gets the body when its Envoy config
//! has `allow_on_headers_stop_iteration: true`; without it Envoy turns the pause into
//! `StopAllIterationAndWatermark` and calls the filter for nothing more, so the request would
//! wait forever. Envoy Gateway never sets the field, and the filter cannot read its own filter
//! config, so it finds out from the first request whose body the chain reads:
//!
//! - the body callback arrives: the hold works, and every later request uses it;
//! - the root context's tick sees that Envoy holds body bytes of the paused request
//!   (`request.total_size` above the headers' size) while no body callback came: the setting
//!   is missing. The
//!   tick then logs the fix once, and finishes the paused requests as the engine says
//!   ([`Stream::on_request_headers_hold_failed`]: a clear error, or resumed without the
//!   processors that needed the hold).
//!
//! The answer is shared with the other VMs of the same filter through Envoy's shared data, so
//! each learns it at most once. A request whose client sends no body bytes at all waits for the
//! client, as any proxy would (Envoy's stream idle timeout ends it), never for us.

use crate::host::{HeaderSnapshot, WasmHost};
use payload_processor_core::{Direction, HeadersFlow, HeadersHold, Stream};
use proxy_wasm::hostcalls;
use proxy_wasm::types::MapType;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

/// How to make the hold available; logged once and put in the error a fail-closed processor
/// answers with.
pub(crate) const FIX: &str = "set allow_on_headers_stop_iteration: true (and failure_policy: FAIL_RELOAD) in the \
     Wasm filter's config; with Envoy Gateway apply the EnvoyPatchPolicy in deploy/envoy-gateway/";

/// How often the root context looks at paused requests while the answer is unknown.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    Unknown,
    Works,
    Missing,
}

impl Known {
    fn encode(self) -> &'static [u8] {
        match self {
            Known::Unknown => b"",
            Known::Works => b"works",
            Known::Missing => b"missing",
        }
    }

    fn decode(bytes: &[u8]) -> Known {
        match bytes {
            b"works" => Known::Works,
            b"missing" => Known::Missing,
            _ => Known::Unknown,
        }
    }
}

/// A request paused at its headers while the answer is unknown.
struct Probe {
    context_id: u32,
    stream: Rc<RefCell<Stream>>,
    /// Where the request's headers are copied when they are let go.
    headers: Rc<RefCell<Option<HeaderSnapshot>>>,
}

/// Per root context (one filter config in one VM).
pub(crate) struct HeadersHoldTracker {
    known: Cell<Known>,
    probes: RefCell<Vec<Probe>>,
    /// Shared-data key of this filter config, so the VMs of one filter share the answer.
    shared_key: String,
    /// Whether the chain reads request bodies at all (otherwise it never holds headers).
    needed: bool,
}

impl HeadersHoldTracker {
    pub(crate) fn new(plugin_name: &str, needed: bool) -> Self {
        Self {
            known: Cell::new(Known::Unknown),
            probes: RefCell::new(Vec::new()),
            shared_key: format!("payload_processor.headers_hold.{plugin_name}"),
            needed,
        }
    }

    /// Whether the root context must tick for probes.
    pub(crate) fn probing(&self) -> bool {
        self.needed && self.known.get() == Known::Unknown
    }

    /// What the engine is told for a new request.
    pub(crate) fn hold(&self) -> HeadersHold {
        if self.probing() {
            // Another VM of this filter may know already (one host call, only while unknown).
            if let Ok((Some(bytes), _)) = hostcalls::get_shared_data(&self.shared_key) {
                self.known.set(Known::decode(&bytes));
            }
        }
        match self.known.get() {
            Known::Works => HeadersHold::Available,
            Known::Missing => HeadersHold::Unavailable(FIX),
            Known::Unknown => HeadersHold::Unknown,
        }
    }

    /// What the engine is told for a response. Requests with a body learn the answer; until
    /// one did, responses do not hold their headers (never a hang, at the cost of resetting
    /// rather than re-statusing a buffered answer a processor rejects).
    pub(crate) fn hold_for_response(&self) -> HeadersHold {
        match self.known.get() {
            Known::Works => HeadersHold::Available,
            _ => HeadersHold::Unavailable(FIX),
        }
    }

    /// The engine paused a request's headers while the answer is unknown: watch it.
    pub(crate) fn watch(
        &self,
        context_id: u32,
        stream: &Rc<RefCell<Stream>>,
        headers: &Rc<RefCell<Option<HeaderSnapshot>>>,
    ) {
        self.probes.borrow_mut().push(Probe {
            context_id,
            stream: Rc::clone(stream),
            headers: Rc::clone(headers),
        });
    }

    /// A body callback arrived for a watched request: the hold works.
    pub(crate) fn body_arrived(&self, context_id: u32) {
        let was_watched = {
            let mut probes = self.probes.borrow_mut();
            let before = probes.len();
            probes.retain(|probe| probe.context_id != context_id);
            probes.len() != before
        };
        if was_watched && self.known.get() == Known::Unknown {
            self.learn(Known::Works);
            log::info!(
                "payload-processor: Envoy holds request headers for this filter (allow_on_headers_stop_iteration)"
            );
        }
    }

    /// The request ended (or its context went away): stop watching it.
    pub(crate) fn forget(&self, context_id: u32) {
        self.probes.borrow_mut().retain(|probe| probe.context_id != context_id);
    }

    /// Called on the root context's tick: looks at each paused request, and when Envoy holds
    /// body bytes for one that never reached us, finishes every paused request.
    pub(crate) fn check(&self, steering: &str, metric_ids: &[Option<u32>]) {
        if self.probes.borrow().is_empty() {
            // Nothing paused here: adopt what another VM of this filter learned, if anything.
            let _ = self.hold();
            return;
        }
        if self.known.get() == Known::Unknown {
            let stuck = self.probes.borrow().iter().any(|probe| {
                hostcalls::set_effective_context(probe.context_id).is_ok()
                    && body_bytes_in_envoy().is_some_and(|n| n > 0)
            });
            if stuck {
                self.learn(Known::Missing);
                if steering.is_empty() {
                    log::warn!(
                        "payload-processor: this Wasm filter was loaded without allow_on_headers_stop_iteration, so \
                         Envoy cannot hold request headers while the body is read. No processor of this chain \
                         re-routes, so it runs with the headers sent first and only the body held. To hold them: \
                         {FIX}."
                    );
                } else {
                    log::error!(
                        "payload-processor: this Wasm filter was loaded without allow_on_headers_stop_iteration, so \
                         Envoy cannot hold request headers while the body is read. Processors that change routing \
                         after the body ({steering}) cannot run: fail-closed ones answer 500 \
                         headers_hold_unavailable, fail-open ones are skipped and counted in fail_open. Fix: {FIX}."
                    );
                }
            }
        }
        if self.known.get() != Known::Missing {
            return;
        }
        let probes = std::mem::take(&mut *self.probes.borrow_mut());
        for probe in probes {
            if hostcalls::set_effective_context(probe.context_id).is_err() {
                continue;
            }
            let mut host = WasmHost::new(metric_ids, 0, Direction::Request).with_hold(HeadersHold::Unavailable(FIX));
            let flow = probe.stream.borrow_mut().on_request_headers_hold_failed(&mut host, FIX);
            if flow == HeadersFlow::Continue {
                // Still held here; read from the copy once they went.
                *probe.headers.borrow_mut() = Some(HeaderSnapshot::take(Direction::Request));
                let _ = hostcalls::resume_http_request();
            }
        }
    }

    fn learn(&self, known: Known) {
        self.known.set(known);
        let _ = hostcalls::set_shared_data(&self.shared_key, Some(known.encode()), None);
    }
}

/// Body bytes Envoy received for the current (paused) request: `request.total_size` counts
/// the bytes received plus the headers' size, which is the sum of their names and values. Body
/// bytes may have arrived before our headers callback (a filter ahead of us held the headers),
/// so this is measured, not compared with an earlier reading.
fn body_bytes_in_envoy() -> Option<i64> {
    let bytes = hostcalls::get_property(vec!["request", "total_size"]).ok().flatten()?;
    let total = i64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let headers = hostcalls::get_map_bytes(MapType::HttpRequestHeaders).ok()?;
    let header_bytes: usize = headers.iter().map(|(name, value)| name.len() + value.len()).sum();
    Some(total - i64::try_from(header_bytes).ok()?)
}
