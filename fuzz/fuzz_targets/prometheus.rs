//! The endpoint picker's metrics reader on arbitrary pages: an answer or an error, never a
//! panic; any answer is within range (queue >= 0, KV usage in 0..=1, finite numbers).
#![no_main]
use libfuzzer_sys::fuzz_target;
use payload_processor_plugins::endpoint_picker::{parse_metrics, MetricNames};

fuzz_target!(|data: &[u8]| {
    if let Ok(metrics) = parse_metrics(data, &MetricNames::default()) {
        assert!(metrics.waiting.is_finite() && metrics.waiting >= 0.0);
        assert!(metrics.running.is_finite() && metrics.running >= 0.0);
        assert!((0.0..=1.0).contains(&metrics.kv_cache_usage));
    }
});
