//! Resuming a chain parked on a callout: the answer goes to the processor that asked, then
//! the chain goes on in order from the next processor.

use super::stream::*;
use crate::background::{CalloutError, CalloutResponse};
use crate::host::{Direction, Host};
use std::sync::Arc;

impl Stream {
    /// The answer (or failure) of the callout the chain waits for, with the handle
    /// [`Host::http_callout`] returned. Answers for other handles, or after the stream
    /// replied, are ignored, so nothing is answered twice. A stream dropped while parked
    /// frees everything; its callout's answer never comes here.
    pub fn on_callout_done(
        &mut self,
        host: &mut dyn Host,
        handle: u64,
        result: Result<CalloutResponse, CalloutError>,
    ) -> CalloutFlow {
        if !self.parked.as_ref().is_some_and(|parked| parked.handle == handle) {
            return CalloutFlow::Ignored;
        }
        let Some(parked) = self.parked.take() else {
            return CalloutFlow::Ignored;
        };
        if self.replied {
            return CalloutFlow::Ignored;
        }
        if let Some(at) = parked.stream {
            return self.resume_stream(host, at, &parked.cluster, result);
        }
        let Parked {
            index,
            direction,
            mut body,
            headers_stage,
            mut request_headers_changed,
            cluster,
            ..
        } = parked;
        let headers_gone = self.released(direction) && !headers_stage;
        let verdict = match result {
            Ok(response) => self.invoke(
                host,
                index,
                Scope {
                    direction,
                    body: &mut body,
                    request_headers_changed: Some(&mut request_headers_changed),
                    headers_sent: headers_gone,
                    emitted: None,
                },
                |plugin, ctx| plugin.on_callout_done(ctx, response).map(Step::from),
            ),
            Err(reason) => {
                let chain = Arc::clone(&self.chain);
                log::debug!(
                    "processor {}: the callout to cluster {cluster} failed: {reason}",
                    chain.processors[index].name
                );
                let reason = format!("the callout to cluster {cluster} failed: {reason}");
                self.fail(host, index, direction, Failure::Callout(reason)).0
            }
        };
        let at = Resume {
            direction,
            headers_stage,
            parkable: true,
            start: index,
            request_headers_changed,
        };
        let outcome = match self.settle(host, verdict, &mut body, at) {
            Some(outcome) => outcome,
            None => self.run_from(host, body, Resume { start: index + 1, ..at }),
        };
        match outcome {
            RunOutcome::Done => CalloutFlow::Resume(direction),
            RunOutcome::Replied => CalloutFlow::Replied,
            RunOutcome::Waiting => CalloutFlow::Waiting,
        }
    }

    /// The direction held while the chain waits for a callout's answer, if it waits.
    pub fn waiting_for_callout(&self) -> Option<Direction> {
        self.parked.as_ref().map(|parked| parked.direction)
    }
}
