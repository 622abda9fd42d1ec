//! The `--compare` chart: hit latency by percentile, one line per backend,
//! as an SVG a browser opens. The x axis spreads the tail the way
//! HdrHistogram's plots do (90%, 99%, 99.9% equally spaced), the y axis is
//! logarithmic so a 0.2 ms and a 5 ms backend both stay readable.

use std::path::Path;
use std::time::Duration;

use hdrhistogram::Histogram;
use plotters::prelude::*;

/// Furthest percentile drawn: 99.99% (x = 4).
const X_MAX: f64 = 4.0;

/// (x, latency ms) with x = log10(1 / (1 - q)): 0 = p0, 1 = p90, 2 = p99, ...
pub fn percentile_points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    (0..=(X_MAX as usize * 50))
        .map(|i| {
            let x = i as f64 / 50.0;
            let q = 1.0 - 10f64.powf(-x);
            (x, h.value_at_quantile(q) as f64 / 1000.0)
        })
        .collect()
}

fn percentile_label(x: &f64) -> String {
    let q = 100.0 * (1.0 - 10f64.powf(-x));
    match x.round() as i32 {
        0 => "p0".into(),
        1 => "p90".into(),
        n => format!("p{q:.*}", (n - 2).max(0) as usize),
    }
}

const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
];

/// Write the chart of each backend's `HIT` latencies (its name and its
/// histogram) to `path` (parent folders are created).
pub fn write_svg(
    path: &Path,
    hits: &[(&str, &Histogram<u64>)],
    upstream_latency: Duration,
) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("chart: {}: {e}", dir.display()))?;
    }
    let series: Vec<(&str, Vec<(f64, f64)>)> = hits
        .iter()
        .map(|&(backend, h)| (backend, percentile_points(h)))
        .collect();
    let values = || series.iter().flat_map(|(_, p)| p.iter().map(|&(_, y)| y));
    let y_min = values().fold(f64::INFINITY, f64::min).max(0.001) * 0.8;
    let y_max = values().fold(0.0, f64::max).max(y_min * 10.0) * 1.25;
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (960, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "cachegate hit latency by backend (upstream {} ms, served from cache)",
                    upstream_latency.as_millis()
                ),
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..X_MAX, (y_min..y_max).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (ms, log scale)")
            .x_labels(X_MAX as usize + 1)
            .x_label_formatter(&percentile_label)
            .y_label_formatter(&|y| format!("{y:.3}"))
            .draw()?;
        for (i, (name, points)) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| format!("chart {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_the_tail_percentiles() {
        let labels: Vec<String> = (0..=4).map(|x| percentile_label(&(x as f64))).collect();
        assert_eq!(labels, ["p0", "p90", "p99", "p99.9", "p99.99"]);
    }

    #[test]
    fn points_follow_the_histogram() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for us in 1..=1000 {
            h.record(us).unwrap();
        }
        let points = percentile_points(&h);
        assert_eq!(points.first().unwrap().0, 0.0);
        assert_eq!(points.last().unwrap().0, X_MAX);
        assert!(points.windows(2).all(|w| w[0].1 <= w[1].1));
        let p90 = points.iter().find(|(x, _)| *x == 1.0).unwrap().1;
        assert!((p90 - 0.9).abs() < 0.01, "p90 {p90}");
    }
}
