//! Draws the headline chart of `bench/bench.sh`: CPU per request (Envoy plus any sidecar)
//! against body size for each variant, log-log, from the results JSON the harness writes.
//!
//! Usage: `bench-chart results.json chart.svg`

use plotters::prelude::*;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::error::Error;

#[derive(Deserialize)]
struct Results {
    title: String,
    rows: Vec<Row>,
}

#[derive(Deserialize)]
struct Row {
    variant: String,
    size_bytes: u64,
    model: String,
    /// Median CPU µs per request, Envoy plus the sidecar if any.
    total_cpu_us: f64,
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(input), Some(output)) = (args.next(), args.next()) else {
        return Err("usage: bench-chart results.json chart.svg".into());
    };
    let results: Results = serde_json::from_str(&std::fs::read_to_string(&input)?)?;
    // One line per variant, model last (what the official clients send), in first-seen order.
    let mut order = Vec::new();
    let mut lines: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for row in results
        .rows
        .iter()
        .filter(|r| r.model == "last" && r.total_cpu_us > 0.0)
    {
        if !lines.contains_key(&row.variant) {
            order.push(row.variant.clone());
        }
        let kib = row.size_bytes as f64 / 1024.0;
        lines
            .entry(row.variant.clone())
            .or_default()
            .push((kib, row.total_cpu_us));
    }
    if lines.is_empty() {
        return Err("no rows to draw".into());
    }
    let points = lines.values().flatten();
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::MAX, 0.0f64);
    for (x, y) in points {
        x_max = x_max.max(*x);
        y_min = y_min.min(*y);
        y_max = y_max.max(*y);
    }

    let root = SVGBackend::new(&output, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{}: CPU per request", results.title), ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(
            (0.8f64..x_max * 1.25).log_scale(),
            (y_min * 0.7..y_max * 1.4).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("request body (KiB, model last)")
        .y_desc("CPU µs per request (Envoy + sidecar)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    for (index, variant) in order.iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        let mut series = lines[variant].clone();
        series.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))?
            .label(variant.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(series.into_iter().map(|point| Circle::new(point, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
