//! Background work through the chain: ticks reach every plugin that asked, callout answers go
//! back to the processor (and tag) that sent them, panics are contained, unknown handles ignored.

use payload_processor_core::testing::FakeBackgroundHost;
use payload_processor_core::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Sends one callout per tick tagged with the tick number; records answers; panics on tick 3
/// when told to.
struct Poller {
    interval: Duration,
    panic_on_third: bool,
    ticks: Mutex<u64>,
    answers: Mutex<Vec<(u64, Result<u16, String>)>>,
    sent: Counter,
    level: Gauge,
}

impl Plugin for Poller {
    fn background(&self) -> Option<&dyn Background> {
        Some(self)
    }
}

impl Background for Poller {
    fn tick_interval(&self) -> Duration {
        self.interval
    }
    fn on_tick(&self, ctx: &mut BackgroundContext<'_>) {
        let tick = {
            let mut ticks = self.ticks.lock().unwrap();
            *ticks += 1;
            *ticks
        };
        assert!(!(self.panic_on_third && tick == 3), "a bug in background work");
        let request = CalloutRequest {
            cluster: "c".into(),
            method: "GET".into(),
            path: format!("/{tick}"),
            authority: "a".into(),
            headers: vec![("x-tick".into(), tick.to_string())],
            body: Vec::new(),
            timeout: Duration::from_millis(100),
        };
        if ctx.send(&request, tick).is_ok() {
            ctx.increment(self.sent);
        }
        ctx.set_gauge(self.level, tick * 10);
    }
    fn on_callout_done(
        &self,
        _ctx: &mut BackgroundContext<'_>,
        tag: u64,
        result: Result<CalloutResponse, CalloutError>,
    ) {
        self.answers.lock().unwrap().push((tag, result.map(|r| r.status)));
    }
}

fn chain(pollers: &[(&str, u64, bool)]) -> (Chain, Vec<Arc<Poller>>) {
    let built: Arc<Mutex<Vec<Arc<Poller>>>> = Arc::default();
    let mut registry = Registry::new();
    let sink = Arc::clone(&built);
    registry
        .register(
            "poller",
            move |parameters: &serde_json::Value, ctx: &mut BuildContext| {
                let poller = Arc::new(Poller {
                    interval: Duration::from_millis(parameters["ms"].as_u64().unwrap()),
                    panic_on_third: parameters["panic"].as_bool().unwrap_or(false),
                    ticks: Mutex::new(0),
                    answers: Mutex::default(),
                    sent: ctx.counter("sent"),
                    level: ctx.gauge("level"),
                });
                sink.lock().unwrap().push(Arc::clone(&poller));
                Ok(poller as Arc<dyn Plugin>)
            },
        )
        .unwrap();
    let processors: Vec<String> = pollers
        .iter()
        .map(|(name, ms, panic)| format!("{{name: {name}, type: poller, parameters: {{ms: {ms}, panic: {panic}}}}}"))
        .collect();
    let chain = Chain::load(&format!("processors: [{}]", processors.join(", ")), &registry).unwrap();
    let pollers = built.lock().unwrap().clone();
    (chain, pollers)
}

#[test]
fn the_tick_interval_is_the_shortest_asked_for_and_none_without_background_work() {
    let (chain, _) = chain(&[("slow", 500, false), ("fast", 20, false)]);
    assert_eq!(chain.tick_interval(), Some(Duration::from_millis(20)));
    let plain = Chain::load("processors: []", &Registry::new()).unwrap();
    assert_eq!(plain.tick_interval(), None);
}

#[test]
fn answers_reach_the_processor_and_tag_that_sent_them() {
    let (chain, pollers) = chain(&[("one", 10, false), ("two", 10, false)]);
    let mut host = FakeBackgroundHost::default();
    chain.on_tick(&mut host);
    chain.on_tick(&mut host);
    let sent = host.take_sent();
    assert_eq!(sent.len(), 4);
    // Answer in reverse order; each processor gets exactly its own two answers.
    for (handle, request) in sent.iter().rev() {
        let status = if request.path == "/1" { 200 } else { 503 };
        chain.on_callout_done(
            &mut host,
            *handle,
            Ok(CalloutResponse {
                status,
                ..Default::default()
            }),
        );
    }
    for poller in &pollers {
        let mut answers = poller.answers.lock().unwrap().clone();
        answers.sort_by_key(|(tag, _)| *tag);
        assert_eq!(answers, vec![(1, Ok(200)), (2, Ok(503))]);
    }
    assert_eq!(host.counter(&chain, "processor.one.sent"), 2);
    assert_eq!(host.gauge(&chain, "processor.two.level"), Some(20));
    // A handle answered twice, or never handed out, is ignored.
    chain.on_callout_done(&mut host, sent[0].0, Err("late duplicate".into()));
    chain.on_callout_done(&mut host, 999, Err("unknown".into()));
    assert_eq!(pollers[0].answers.lock().unwrap().len(), 2);
}

#[test]
fn a_panic_in_background_work_is_contained_and_counted() {
    let (chain, pollers) = chain(&[("buggy", 10, true), ("fine", 10, false)]);
    let mut host = FakeBackgroundHost::default();
    for _ in 0..4 {
        chain.on_tick(&mut host);
    }
    assert_eq!(host.counter(&chain, "processor.buggy.panics"), 1);
    assert_eq!(*pollers[0].ticks.lock().unwrap(), 4, "ticks go on after the panic");
    assert_eq!(host.counter(&chain, "processor.fine.sent"), 4);
    assert_eq!(host.counter(&chain, "processor.buggy.sent"), 3);
}

#[test]
fn a_refused_callout_is_an_error_for_the_plugin() {
    let (chain, _) = chain(&[("one", 10, false)]);
    let mut host = FakeBackgroundHost {
        refuse: Some("cluster not found".into()),
        ..FakeBackgroundHost::default()
    };
    chain.on_tick(&mut host);
    assert!(host.take_sent().is_empty());
    assert_eq!(host.counter(&chain, "processor.one.sent"), 0);
}
