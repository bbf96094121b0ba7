//! Keeping endpoint metrics fresh: the background scrape through the host's HTTP callouts.

use super::picker::*;
use super::*;
use payload_processor_core::{Background, BackgroundContext, CalloutError, CalloutRequest, CalloutResponse};
use serde::{Deserialize, Serialize};
use std::time::Duration;

impl Background for EndpointPicker {
    fn tick_interval(&self) -> Duration {
        // Tick a little faster than the scrape interval so scrapes are not late by a whole tick.
        (self.scrape_interval / 2).max(Duration::from_millis(1))
    }

    fn on_tick(&self, ctx: &mut BackgroundContext<'_>) {
        let Some(cluster) = &self.metrics_cluster else { return };
        let now = ctx.now_nanos();
        if ctx.has_shared_data() && !self.hold_scrape_lease(ctx, now) {
            // Another copy (wasm VM) scrapes for everybody: take its results.
            self.load_shared_metrics(ctx, now);
            return;
        }
        let interval = u64::try_from(self.scrape_interval.as_nanos()).unwrap_or(u64::MAX);
        let timeout = u64::try_from(self.scrape_timeout.as_nanos()).unwrap_or(u64::MAX);
        let mut due = Vec::new();
        {
            let mut states = self.state.write().unwrap_or_else(|poisoned| poisoned.into_inner());
            for (index, state) in states.iter_mut().enumerate() {
                self.report_age(ctx, index, state, now);
                // A scrape still in flight blocks the next one, unless the proxy lost it.
                let busy = state
                    .scrape_started
                    .is_some_and(|started| now.saturating_sub(started) < timeout.saturating_mul(2));
                if busy || now < state.next_scrape {
                    continue;
                }
                state.scrape_started = Some(now);
                state.next_scrape = now.saturating_add(interval);
                due.push(index);
            }
        }
        for index in due {
            let address = &self.endpoints[index].address;
            let request = CalloutRequest {
                cluster: cluster.clone(),
                method: "GET".into(),
                path: self.metrics_path.clone(),
                authority: address.clone(),
                headers: vec![(DESTINATION.into(), address.clone())],
                body: Vec::new(),
                timeout: self.scrape_timeout,
            };
            if let Err(reason) = ctx.send(&request, index as u64) {
                log::debug!("endpoint-picker {}: cannot scrape {address}: {reason}", self.name);
                ctx.increment(self.endpoints[index].scrape_failures);
                let mut states = self.state.write().unwrap_or_else(|poisoned| poisoned.into_inner());
                states[index].scrape_started = None;
            }
        }
    }

    fn on_callout_done(
        &self,
        ctx: &mut BackgroundContext<'_>,
        tag: u64,
        result: Result<CalloutResponse, CalloutError>,
    ) {
        let Some(endpoint) = usize::try_from(tag).ok().and_then(|i| self.endpoints.get(i)) else {
            return;
        };
        let parsed = result.and_then(|response| {
            if response.status != 200 {
                return Err(format!("metrics answered with status {}", response.status));
            }
            parse_metrics(&response.body, &self.metric_names)
        });
        let now = ctx.now_nanos();
        let mut states = self.state.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        let state = &mut states[tag as usize];
        state.scrape_started = None;
        match parsed {
            Ok(metrics) => {
                state.metrics = metrics;
                state.scraped_at = Some(now);
                if ctx.has_shared_data() {
                    let snapshot: Vec<SharedEndpoint> = states
                        .iter()
                        .map(|s| SharedEndpoint {
                            metrics: s.metrics.clone(),
                            scraped_at: s.scraped_at,
                        })
                        .collect();
                    drop(states);
                    if let Ok(bytes) = serde_json::to_vec(&snapshot) {
                        ctx.shared_set(&format!("{}/metrics", self.shared_key), &bytes, 0);
                    }
                }
            }
            Err(reason) => {
                drop(states);
                log::debug!(
                    "endpoint-picker {}: scrape of {} failed: {reason}",
                    self.name,
                    endpoint.address
                );
                ctx.increment(endpoint.scrape_failures);
            }
        }
    }
}

/// One endpoint in the metrics snapshot the scraping copy shares with the others.
#[derive(Serialize, Deserialize)]
struct SharedEndpoint {
    metrics: ServerMetrics,
    scraped_at: Option<u64>,
}

impl EndpointPicker {
    fn report_age(&self, ctx: &mut BackgroundContext<'_>, index: usize, state: &EndpointState, now: u64) {
        let age_ms = state
            .scraped_at
            .map_or(u64::MAX, |at| now.saturating_sub(at) / 1_000_000);
        ctx.set_gauge(self.endpoints[index].metrics_age_ms, age_ms.min(i64::MAX as u64));
    }

    /// Where copies of the configuration run side by side (wasm VMs), one of them scrapes: the
    /// holder of a lease in shared data, renewed every tick and taken over when it lapses
    /// (its VM went away). True when this copy holds it now.
    fn hold_scrape_lease(&self, ctx: &mut BackgroundContext<'_>, now: u64) -> bool {
        let key = format!("{}/lease", self.shared_key);
        let lapse = u64::try_from(self.tick_interval().as_nanos().saturating_mul(4)).unwrap_or(u64::MAX);
        let (holder, expiry, version) = match ctx.shared_get(&key) {
            Some((value, version)) => {
                let text = String::from_utf8_lossy(&value).into_owned();
                let mut parts = text.split(':').map(|part| part.parse::<u64>().unwrap_or(0));
                (parts.next().unwrap_or(0), parts.next().unwrap_or(0), version)
            }
            None => (0, 0, 0),
        };
        if holder != self.instance && now < expiry {
            return false;
        }
        let lease = format!("{}:{}", self.instance, now.saturating_add(lapse));
        ctx.shared_set(&key, lease.as_bytes(), version)
    }

    /// Takes the scraping copy's newer metrics into this copy's view.
    fn load_shared_metrics(&self, ctx: &mut BackgroundContext<'_>, now: u64) {
        let snapshot = ctx
            .shared_get(&format!("{}/metrics", self.shared_key))
            .and_then(|(bytes, _)| serde_json::from_slice::<Vec<SharedEndpoint>>(&bytes).ok())
            .unwrap_or_default();
        let mut states = self.state.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (index, state) in states.iter_mut().enumerate() {
            if let Some(shared) = snapshot
                .get(index)
                .filter(|shared| shared.scraped_at > state.scraped_at)
            {
                state.metrics = shared.metrics.clone();
                state.scraped_at = shared.scraped_at;
            }
            self.report_age(ctx, index, state, now);
        }
    }
}
