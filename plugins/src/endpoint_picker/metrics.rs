//! Reads a model server's Prometheus text (vLLM by default) into the numbers the scheduler
//! uses. Parsing is done by `openmetrics-parser`; this file only picks the metrics out.

use openmetrics_parser::{prometheus::parse_prometheus, MetricNumber, PrometheusValue};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Largest metrics page read; a model server's page is a few tens of KiB.
pub(crate) const MAX_METRICS_BYTES: usize = 4 << 20;

/// Which metric names carry each number. Each entry lists names tried in order (vLLM renamed
/// `gpu_cache_usage_perc` to `kv_cache_usage_perc`); the first present wins.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricNames {
    /// Requests waiting in the server's queue.
    #[serde(default = "default_waiting")]
    pub waiting: Vec<String>,
    /// Requests running.
    #[serde(default = "default_running")]
    pub running: Vec<String>,
    /// KV-cache usage, 0..1.
    #[serde(default = "default_kv_cache_usage")]
    pub kv_cache_usage: Vec<String>,
    /// LoRA adapters info (`running_lora_adapters`, `waiting_lora_adapters`, `max_lora` labels).
    #[serde(default = "default_lora_info")]
    pub lora_info: Vec<String>,
}

fn default_waiting() -> Vec<String> {
    vec!["vllm:num_requests_waiting".into()]
}
fn default_running() -> Vec<String> {
    vec!["vllm:num_requests_running".into()]
}
fn default_kv_cache_usage() -> Vec<String> {
    vec!["vllm:kv_cache_usage_perc".into(), "vllm:gpu_cache_usage_perc".into()]
}
fn default_lora_info() -> Vec<String> {
    vec!["vllm:lora_requests_info".into()]
}

impl Default for MetricNames {
    fn default() -> Self {
        Self {
            waiting: default_waiting(),
            running: default_running(),
            kv_cache_usage: default_kv_cache_usage(),
            lora_info: default_lora_info(),
        }
    }
}

/// What one scrape says about a server.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ServerMetrics {
    /// Queue depth (sum over the page's series).
    pub waiting: f64,
    /// Running requests (sum).
    pub running: f64,
    /// KV-cache usage 0..1 (the largest series).
    pub kv_cache_usage: f64,
    /// Adapters running or waiting, and how many the server can hold; `None` without the
    /// metric (LoRA not enabled).
    pub lora: Option<LoraInfo>,
}

/// The server's LoRA adapters, from the newest `lora_requests_info` series.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LoraInfo {
    /// Adapters running or waiting.
    pub active: Vec<String>,
    /// How many adapters fit at once (`max_lora`), when known.
    pub max: Option<usize>,
}

fn number(value: &PrometheusValue) -> Option<f64> {
    let n: &MetricNumber = match value {
        PrometheusValue::Unknown(n) | PrometheusValue::Gauge(n) => n,
        PrometheusValue::Counter(c) => &c.value,
        _ => return None,
    };
    Some(n.as_f64()).filter(|v| v.is_finite())
}

/// The text with a `# TYPE <name> untyped` line before each family that has none, and a
/// final newline. The text format allows both omissions (servers other than vLLM use them),
/// but the parser reads consecutive untyped samples as one family and wants every line ended.
fn with_type_lines(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    let mut family = String::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("# TYPE ") {
            family = rest.split_whitespace().next().unwrap_or_default().to_string();
        } else if !trimmed.is_empty() && !trimmed.starts_with('#') {
            let name = trimmed
                .split(|c: char| c == '{' || c.is_whitespace())
                .next()
                .unwrap_or_default();
            // Histogram and summary series belong to the family they extend.
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            if name != family && base != family {
                family = name.to_string();
                out.push_str("# TYPE ");
                out.push_str(name);
                out.push_str(" untyped\n");
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Parses a metrics page. Fails when the text is not Prometheus text or lacks the queue or
/// KV-cache metrics the scheduler needs.
pub fn parse(text: &[u8], names: &MetricNames) -> Result<ServerMetrics, String> {
    if text.len() > MAX_METRICS_BYTES {
        return Err(format!(
            "metrics page of {} bytes is over the {MAX_METRICS_BYTES}-byte limit",
            text.len()
        ));
    }
    let text = std::str::from_utf8(text).map_err(|err| format!("metrics page is not UTF-8: {err}"))?;
    let text = with_type_lines(text);
    let exposition = parse_prometheus(&text).map_err(|err| format!("invalid Prometheus text: {err:?}"))?;
    let find = |candidates: &[String]| candidates.iter().find_map(|name| exposition.families.get(name));
    let values = |candidates: &[String]| -> Option<Vec<f64>> {
        let family = find(candidates)?;
        Some(family.iter_samples().filter_map(|s| number(&s.value)).collect())
    };
    let waiting: f64 = values(&names.waiting)
        .ok_or_else(|| format!("metric {} missing", names.waiting.join(" / ")))?
        .iter()
        .sum();
    let running = values(&names.running).map_or(0.0, |v| v.iter().sum());
    let kv_cache_usage = values(&names.kv_cache_usage)
        .ok_or_else(|| format!("metric {} missing", names.kv_cache_usage.join(" / ")))?
        .into_iter()
        .fold(0.0, f64::max)
        .clamp(0.0, 1.0);
    let lora = find(&names.lora_info).and_then(|family| {
        // Several series may exist; the newest (largest value: a timestamp) is current.
        let newest = family
            .iter_samples()
            .filter_map(|s| Some((number(&s.value)?, s)))
            .max_by(|a, b| a.0.total_cmp(&b.0))?
            .1;
        let labels = newest.get_labelset().ok()?;
        let mut active: Vec<String> = ["running_lora_adapters", "waiting_lora_adapters"]
            .iter()
            .filter_map(|label| labels.get_label_value(label))
            .flat_map(|list| list.split(','))
            .map(|name| name.trim().to_string())
            .filter(|name| !name.is_empty())
            .collect();
        active.sort();
        active.dedup();
        let max = labels.get_label_value("max_lora").and_then(|m| m.trim().parse().ok());
        Some(LoraInfo { active, max })
    });
    Ok(ServerMetrics {
        waiting: waiting.max(0.0),
        running: running.max(0.0),
        kv_cache_usage,
        lora,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = "\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name=\"m\"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name=\"m\"} 7.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name=\"m\"} 0.42
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"sql-lora,chat-lora\",waiting_lora_adapters=\"\"} 1.7e+09
vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"old\",waiting_lora_adapters=\"\"} 1.6e+09
";

    #[test]
    fn reads_vllm_queue_kv_cache_and_adapters() {
        let metrics = parse(VLLM.as_bytes(), &MetricNames::default()).unwrap();
        assert_eq!(metrics.waiting, 7.0);
        assert_eq!(metrics.running, 3.0);
        assert_eq!(metrics.kv_cache_usage, 0.42);
        let lora = metrics.lora.unwrap();
        assert_eq!(lora.active, vec!["chat-lora", "sql-lora"]);
        assert_eq!(lora.max, Some(2));
    }

    #[test]
    fn older_vllm_names_and_missing_final_newline() {
        let text = "vllm:num_requests_waiting 1\nvllm:gpu_cache_usage_perc 0.9";
        let metrics = parse(text.as_bytes(), &MetricNames::default()).unwrap();
        assert_eq!((metrics.waiting, metrics.kv_cache_usage), (1.0, 0.9));
        assert_eq!(metrics.lora, None);
    }

    #[test]
    fn configurable_names_for_other_servers() {
        let names = MetricNames {
            waiting: vec!["sglang:num_queue_reqs".into()],
            kv_cache_usage: vec!["sglang:token_usage".into()],
            ..MetricNames::default()
        };
        let text = "sglang:num_queue_reqs 4\nsglang:token_usage 0.25\n";
        let metrics = parse(text.as_bytes(), &names).unwrap();
        assert_eq!((metrics.waiting, metrics.kv_cache_usage), (4.0, 0.25));
    }

    #[test]
    fn bad_pages_are_errors_not_panics() {
        let names = MetricNames::default();
        for (text, expected) in [
            (
                &b"vllm:kv_cache_usage_perc 0.1\n"[..],
                "vllm:num_requests_waiting missing",
            ),
            (b"vllm:num_requests_waiting 1\n", "kv_cache_usage_perc"),
            (b"<html>not metrics</html>", "invalid Prometheus text"),
            (b"vllm:num_requests_waiting{a=\"1\" 2\n", "invalid Prometheus text"),
            (b"\xff\xfe", "not UTF-8"),
        ] {
            let err = parse(text, &names).unwrap_err();
            assert!(err.contains(expected), "{err}");
        }
        let huge = vec![b'#'; MAX_METRICS_BYTES + 1];
        assert!(parse(&huge, &names).unwrap_err().contains("limit"));
    }

    #[test]
    fn nan_and_out_of_range_values_are_clamped() {
        let text = "vllm:num_requests_waiting NaN\nvllm:kv_cache_usage_perc 7\n";
        let metrics = parse(text.as_bytes(), &MetricNames::default()).unwrap();
        assert_eq!((metrics.waiting, metrics.kv_cache_usage), (0.0, 1.0));
    }
}
