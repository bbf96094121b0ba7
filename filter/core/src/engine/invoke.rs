//! Running processors: the phase runner, and one invocation with its latency budget, panic
//! containment and failure mode.

use super::stream::*;
use crate::config::FailureMode;
use crate::host::{Direction, Host, ProcessorTrace};
use crate::json::Body;
use crate::plugin::{Context, LocalReply, PhaseNeed, Plugin, PluginError};
use std::borrow::Cow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

impl Stream {
    pub(super) fn reply(&mut self, host: &mut dyn Host, reply: &LocalReply, details: &str) {
        self.replied = true;
        host.send_local_reply(reply.status, &reply.headers, &reply.body, details);
    }

    /// Runs the active processors of `direction` in order (with `headers_stage`, only the
    /// header-only ones), then applies the changes. `parkable`: whether a processor may park
    /// the chain on a callout here (elsewhere a callout is that processor's failure).
    pub(super) fn run(
        &mut self,
        host: &mut dyn Host,
        direction: Direction,
        body: Body,
        headers_stage: bool,
        parkable: bool,
    ) -> RunOutcome {
        let resume = Resume {
            direction,
            headers_stage,
            parkable,
            start: 0,
            request_headers_changed: false,
        };
        self.run_from(host, body, resume)
    }

    /// [`Stream::run`] from processor `resume.start` on (after a callout's answer).
    pub(super) fn run_from(&mut self, host: &mut dyn Host, mut body: Body, resume: Resume) -> RunOutcome {
        let Resume {
            direction,
            headers_stage,
            parkable,
            start,
            mut request_headers_changed,
        } = resume;
        let chain = Arc::clone(&self.chain);
        // After an early release the header-stage processors already ran, and the headers
        // are gone.
        let headers_gone = self.released(direction) && !headers_stage;
        for (index, processor) in chain.processors.iter().enumerate().skip(start) {
            let need = processor.need(direction);
            if !self.mask(direction)[index]
                || need == PhaseNeed::Skip
                || (headers_stage && need != PhaseNeed::Headers)
                || (headers_gone && need == PhaseNeed::Headers)
            {
                continue;
            }
            let verdict = self.invoke(
                host,
                index,
                Scope {
                    direction,
                    body: &mut body,
                    request_headers_changed: Some(&mut request_headers_changed),
                    headers_sent: headers_gone,
                    emitted: None,
                },
                |plugin, ctx| {
                    match direction {
                        Direction::Request => plugin.on_request(ctx),
                        Direction::Response => plugin.on_response(ctx),
                    }
                    .map(Step::from)
                },
            );
            let at = Resume {
                direction,
                headers_stage,
                parkable,
                start: index,
                request_headers_changed,
            };
            if let Some(outcome) = self.settle(host, verdict, &mut body, at) {
                return outcome;
            }
        }
        if let Some(bytes) = body.take_changes() {
            host.replace_body(direction, &bytes);
            if !headers_gone {
                host.set_header(direction, "content-length", &bytes.len().to_string());
            }
        }
        if request_headers_changed && !headers_gone {
            host.clear_route_cache();
        }
        RunOutcome::Done
    }

    /// Acts on the verdict of the processor at `at.start`: `None` to go on with the next one,
    /// or how the run ends (a reply, a reset, or parked on a callout).
    pub(super) fn settle(
        &mut self,
        host: &mut dyn Host,
        verdict: Verdict,
        body: &mut Body,
        at: Resume,
    ) -> Option<RunOutcome> {
        let index = at.start;
        let direction = at.direction;
        let headers_gone = self.released(direction) && !at.headers_stage;
        let verdict = match verdict {
            Verdict::Callout(_) if !at.parkable => {
                let reason = "callouts cannot be made at this point (the headers of a streamed response)";
                self.fail(host, index, direction, Failure::Callout(reason.into())).0
            }
            Verdict::Callout(mut request) => {
                let chain = Arc::clone(&self.chain);
                let processor = &chain.processors[index];
                // The processor's budget bounds the whole wait.
                if let Some(budget) = processor.timeout_nanos {
                    request.timeout = request.timeout.min(std::time::Duration::from_nanos(budget));
                }
                match host.http_callout(&request) {
                    Ok(handle) => {
                        // The wait outlives this callback: keep the bytes, not the host's buffers.
                        if body.is_unread() {
                            body.fill(host.read_body(direction));
                        }
                        log::debug!(
                            "processor {} waits for a callout to cluster {}",
                            processor.name,
                            request.cluster
                        );
                        self.parked = Some(Parked {
                            handle,
                            index,
                            direction,
                            body: std::mem::take(body),
                            headers_stage: at.headers_stage,
                            request_headers_changed: at.request_headers_changed,
                            cluster: request.cluster,
                            stream: None,
                        });
                        return Some(RunOutcome::Waiting);
                    }
                    Err(reason) => {
                        let reason = format!("the callout to cluster {} could not start: {reason}", request.cluster);
                        self.fail(host, index, direction, Failure::Callout(reason)).0
                    }
                }
            }
            other => other,
        };
        match verdict {
            Verdict::Stop(reply, details) => {
                if headers_gone && direction == Direction::Response {
                    // The status went out with the headers: end the exchange instead.
                    log::warn!("{details}: the response headers already went out, resetting the stream");
                    self.replied = true;
                    host.reset_stream();
                    return Some(RunOutcome::Replied);
                }
                self.reply(host, &reply, &details);
                Some(RunOutcome::Replied)
            }
            _ => None,
        }
    }

    /// Runs one processor callback with its budget, metrics, panic guard and failure mode, and
    /// traces it for hosts that ask.
    pub(super) fn invoke(
        &mut self,
        host: &mut dyn Host,
        index: usize,
        scope: Scope<'_>,
        call: impl FnOnce(&dyn Plugin, &mut Context<'_>) -> Result<Step, PluginError>,
    ) -> Verdict {
        if !host.tracing() {
            return self.invoke_untraced(host, index, scope, call).0;
        }
        let Scope {
            direction,
            body,
            request_headers_changed,
            headers_sent,
            emitted,
        } = scope;
        if body.is_unread() {
            // A trace shows the body after each processor.
            body.fill(host.read_body(direction));
        }
        let started = host.now_nanos();
        let inner = Scope {
            direction,
            body: &mut *body,
            request_headers_changed,
            headers_sent,
            emitted,
        };
        let (verdict, outcome) = self.invoke_untraced(host, index, inner, call);
        let elapsed_nanos = host.now_nanos().saturating_sub(started);
        let chain = Arc::clone(&self.chain);
        let current = body.current();
        host.trace(&ProcessorTrace {
            processor: &chain.processors[index].name,
            direction,
            outcome: &outcome,
            elapsed_nanos,
            body: &current,
        });
        verdict
    }

    fn invoke_untraced(
        &mut self,
        host: &mut dyn Host,
        index: usize,
        scope: Scope<'_>,
        call: impl FnOnce(&dyn Plugin, &mut Context<'_>) -> Result<Step, PluginError>,
    ) -> (Verdict, Cow<'static, str>) {
        let Scope {
            direction,
            body,
            request_headers_changed: changed_headers,
            headers_sent,
            emitted,
        } = scope;
        let mut request_headers_changed = false;
        let chain = Arc::clone(&self.chain);
        let processor = &chain.processors[index];
        let metrics = processor.metrics;
        let started = host.now_nanos();
        let deadline_nanos = processor.timeout_nanos.map(|budget| started.saturating_add(budget));
        let started_nanos = self.started_nanos;
        // A slot of its own for this call; kept in `states` only once a processor keeps state.
        let mut state = self.states.get_mut(index).and_then(Option::take);
        let derived = &mut self.derived;
        let response_redacted = &mut self.response_redacted;
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let mut ctx = Context {
                host: &mut *host,
                direction,
                body,
                request_headers_changed: &mut request_headers_changed,
                deadline_nanos,
                counters: &processor.counters,
                gauges: &processor.gauges,
                state: &mut state,
                derived,
                response_redacted,
                started_nanos,
                headers_sent,
                emitted,
            };
            call(processor.plugin.as_ref(), &mut ctx)
        }));
        if state.is_some() {
            if self.states.len() <= index {
                self.states.resize_with(chain.processors.len(), || None);
            }
            self.states[index] = state;
        }
        if let Some(changed) = changed_headers {
            *changed |= request_headers_changed;
        }
        let elapsed = host.now_nanos().saturating_sub(started);
        host.increment_counter(metrics.invocations, 1);
        host.record_histogram(metrics.latency_us, elapsed / 1_000);
        let overran = processor.timeout_nanos.is_some_and(|budget| elapsed > budget);
        if overran {
            host.increment_counter(metrics.budget_overruns, 1);
        }
        let failure = match outcome {
            Ok(Ok(Step::Continue | Step::Drop | Step::Callout(_) | Step::Hold | Step::Release)) if overran => {
                Failure::Overrun
            }
            Ok(Ok(Step::Hold)) => return (Verdict::Hold, Cow::Borrowed("hold")),
            Ok(Ok(Step::Release)) => return (Verdict::Release, Cow::Borrowed("release")),
            Ok(Ok(Step::Callout(request))) => {
                let outcome = format!("callout to {}", request.cluster);
                return (Verdict::Callout(request), outcome.into());
            }
            Ok(Ok(Step::Continue)) => return (Verdict::Continue, Cow::Borrowed("continue")),
            Ok(Ok(Step::Drop)) => return (Verdict::Drop, Cow::Borrowed("drop")),
            Ok(Ok(Step::Reject(reply))) => {
                host.increment_counter(metrics.rejections, 1);
                log::debug!(
                    "processor {} rejected the {} with {}",
                    processor.name,
                    direction.as_str(),
                    reply.status
                );
                let outcome = format!("reject {}", reply.status);
                return (
                    Verdict::Stop(reply, format!("payload_processor.{}.rejected", processor.name)),
                    outcome.into(),
                );
            }
            Ok(Ok(Step::Respond(reply))) => {
                let outcome = format!("respond {}", reply.status);
                return (
                    Verdict::Stop(reply, format!("payload_processor.{}.answered", processor.name)),
                    outcome.into(),
                );
            }
            Ok(Err(error)) => Failure::Error(error),
            Err(_) => Failure::Panic,
        };
        self.fail_after(host, index, direction, failure, elapsed)
    }

    /// Applies the processor's failure mode to a failure outside a plugin call (a callout
    /// that could not start or got no answer).
    pub(super) fn fail(
        &mut self,
        host: &mut dyn Host,
        index: usize,
        direction: Direction,
        failure: Failure,
    ) -> (Verdict, Cow<'static, str>) {
        self.fail_after(host, index, direction, failure, 0)
    }

    fn fail_after(
        &mut self,
        host: &mut dyn Host,
        index: usize,
        direction: Direction,
        failure: Failure,
        elapsed: u64,
    ) -> (Verdict, Cow<'static, str>) {
        let chain = Arc::clone(&self.chain);
        let processor = &chain.processors[index];
        let metrics = processor.metrics;
        let (reply, reason) = match &failure {
            Failure::Error(error) => {
                host.increment_counter(metrics.errors, 1);
                (
                    LocalReply::json_error(error.status.unwrap_or(500), &error.code, &error.message),
                    error.message.clone(),
                )
            }
            Failure::Callout(reason) => {
                host.increment_counter(metrics.errors, 1);
                (
                    LocalReply::json_error(
                        503,
                        "callout_failed",
                        &format!("processor {}: {reason}", processor.name),
                    ),
                    reason.clone(),
                )
            }
            Failure::Overrun => (
                LocalReply::json_error(
                    500,
                    "processor_budget_exceeded",
                    &format!("processor {} exceeded its latency budget", processor.name),
                ),
                format!("latency budget exceeded ({elapsed} ns)"),
            ),
            Failure::Panic => {
                host.increment_counter(metrics.panics, 1);
                (
                    LocalReply::json_error(
                        500,
                        "processor_panic",
                        &format!("processor {} failed internally", processor.name),
                    ),
                    "panicked".to_string(),
                )
            }
        };
        // A panic leaves the plugin's work in an unknown state: always fail closed.
        if processor.failure_mode == FailureMode::FailOpen && !matches!(failure, Failure::Panic) {
            host.increment_counter(metrics.fail_open, 1);
            log::warn!(
                "processor {} failed open on the {}: {reason}",
                processor.name,
                direction.as_str()
            );
            return (Verdict::Continue, format!("failed open: {reason}").into());
        }
        log::warn!(
            "processor {} failed closed on the {}: {reason}",
            processor.name,
            direction.as_str()
        );
        (
            Verdict::Stop(reply, format!("payload_processor.{}.failed", processor.name)),
            format!("failed closed: {reason}").into(),
        )
    }
}
