//! `astra-sim plot-measured`: real runs against the simulator's predictions of them. Every
//! `NAME.json` runtime summary (`astra-eval distributed --json`, its `median_ms`) with a
//! `NAME.ab.csv` beside it (`astra-sim sweep` on that run's measured trace: the predicted
//! `latency_ms` of its method) is one point: predicted on x, measured on y, log-log, with the
//! diagonal and a ±5% band — what `scripts/bench/distributed-real.sh` leaves in its folder.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::error::{Result, SimError};
use crate::plot_style::{
    self, decade_label, draw_paper, grid_bold, grid_light, side_legend, Entry,
};

/// One real run and its prediction.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub name: String,
    pub method: String,
    pub predicted_ms: f64,
    pub measured_ms: f64,
}

/// The points of every summary in `dir` that has a prediction beside it, by name.
pub fn collect(dir: &Path) -> Result<Vec<Point>> {
    let mut points = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(SimError::io(dir))?;
    let mut summaries: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json")
                && !p.to_string_lossy().ends_with(".trace.json")
        })
        .collect();
    summaries.sort();
    for s in summaries {
        let csv = s.with_extension("ab.csv");
        if !csv.exists() {
            continue;
        }
        let name = s
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let (method, predicted_ms) = predicted(&csv)?;
        points.push(Point {
            name,
            method,
            predicted_ms,
            measured_ms: measured(&s)?,
        });
    }
    if points.is_empty() {
        return Err(SimError::invalid(
            "dir",
            format!(
                "{} holds no NAME.json with a NAME.ab.csv beside it",
                dir.display()
            ),
        ));
    }
    Ok(points)
}

fn measured(path: &Path) -> Result<f64> {
    let text = std::fs::read_to_string(path).map_err(SimError::io(path))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| SimError::File {
        path: path.into(),
        reason: format!("not JSON: {e}"),
    })?;
    v["median_ms"]
        .as_f64()
        .filter(|m| *m > 0.0 && m.is_finite())
        .ok_or_else(|| SimError::File {
            path: path.into(),
            reason: "has no positive median_ms (not an astra-eval distributed summary)".into(),
        })
}

/// (method, latency_ms) of the first row of a sweep CSV.
fn predicted(path: &Path) -> Result<(String, f64)> {
    let text = std::fs::read_to_string(path).map_err(SimError::io(path))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let bad = |reason: &str| SimError::File {
        path: path.into(),
        reason: reason.into(),
    };
    let (m, l) = col("method")
        .zip(col("latency_ms"))
        .ok_or_else(|| bad("lacks the method and latency_ms columns of an astra-sim sweep"))?;
    let row: Vec<&str> = lines
        .next()
        .ok_or_else(|| bad("has no rows"))?
        .split(',')
        .collect();
    let latency = row
        .get(l)
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| *v > 0.0 && v.is_finite())
        .ok_or_else(|| bad("latency_ms is not a positive number"))?;
    Ok((row.get(m).unwrap_or(&"?").to_string(), latency))
}

/// Draws `points` to `out` (a PNG, written atomically).
pub fn plot(points: &[Point], title: &str, out: &Path) -> Result<()> {
    let e = crate::plots::perr(out);
    crate::plots::render_to(out, (1400, 800), |root, _| {
        let mut methods: Vec<String> = points.iter().map(|p| p.method.clone()).collect();
        methods.sort();
        methods.dedup();
        let (plot, side) = root.split_horizontally(1400 - 190);
        let mut entries: Vec<Entry> = methods
            .iter()
            .map(|m| Entry {
                hollow: true,
                ..Entry::method(m)
            })
            .collect();
        entries.push(Entry {
            label: "±5%".into(),
            color: plot_style::GREY,
            family: plot_style::Family::Astra,
            hollow: false,
        });
        side_legend(&side, &entries).map_err(&e)?;
        let (lo, hi) = plot_style::log_range(
            points.iter().flat_map(|p| [p.predicted_ms, p.measured_ms]),
            1.3,
        );
        let mut chart = ChartBuilder::on(&plot)
            .caption(title, ("sans-serif", 22))
            .margin(14)
            .x_label_area_size(48)
            .y_label_area_size(80)
            .build_cartesian_2d((lo..hi).log_scale(), (lo..hi).log_scale())
            .map_err(&e)?;
        chart
            .configure_mesh()
            .x_desc("predicted by astra-sim (ms, log scale)")
            .y_desc("measured (ms, log scale)")
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 18))
            .bold_line_style(grid_bold())
            .light_line_style(grid_light())
            .x_label_formatter(&decade_label)
            .y_label_formatter(&decade_label)
            .draw()
            .map_err(&e)?;
        // The ±5% band, then the diagonal.
        let steps: Vec<f64> = (0..=100)
            .map(|i| lo * (hi / lo).powf(i as f64 / 100.0))
            .collect();
        let band: Vec<(f64, f64)> = steps
            .iter()
            .map(|&x| (x, x * 1.05))
            .chain(steps.iter().rev().map(|&x| (x, x * 0.95)))
            .collect();
        chart
            .draw_series(std::iter::once(Polygon::new(
                band,
                plot_style::GREY.mix(0.25).filled(),
            )))
            .map_err(&e)?;
        chart
            .draw_series(LineSeries::new(
                [(lo, lo), (hi, hi)],
                plot_style::GREY.stroke_width(1),
            ))
            .map_err(&e)?;
        for m in &methods {
            let pts: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| &p.method == m)
                .map(|p| (p.predicted_ms, p.measured_ms))
                .collect();
            draw_paper(&mut chart, m, &pts).map_err(&e)?;
        }
        Ok(())
    })
}

/// Relative error of the prediction, |predicted − measured| / measured.
pub fn error(p: &Point) -> f64 {
    (p.predicted_ms - p.measured_ms).abs() / p.measured_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_summaries_with_their_predictions_and_plots_them() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let header = "method,devices,tokens,mbps,network,alpha_ms,algorithm,overlap,loss,compute_ms,comm_ms,latency_ms,speedup,dropped_fraction";
        for (name, method, pred, meas) in
            [("a", "astra-g1", 100.0, 104.0), ("b", "sp", 900.0, 880.0)]
        {
            std::fs::write(
                d.join(format!("{name}.json")),
                format!("{{\"median_ms\": {meas}}}"),
            )
            .unwrap();
            std::fs::write(
                d.join(format!("{name}.ab.csv")),
                format!(
                    "{header}\n{method},2,1024,9.36,alpha-beta,0.05,direct,true,0,1,1,{pred},,0\n"
                ),
            )
            .unwrap();
        }
        // A summary without a prediction, and a trace, are not points.
        std::fs::write(d.join("c.json"), "{\"median_ms\": 5}").unwrap();
        std::fs::write(d.join("a.trace.json"), "{}").unwrap();
        let pts = collect(d).unwrap();
        assert_eq!(pts.len(), 2);
        assert_eq!(
            (
                pts[0].method.as_str(),
                pts[0].predicted_ms,
                pts[0].measured_ms
            ),
            ("astra-g1", 100.0, 104.0)
        );
        assert!((error(&pts[0]) - 4.0 / 104.0).abs() < 1e-12);
        let png = d.join("fig.png");
        plot(&pts, "test", &png).unwrap();
        assert_eq!(crate::plots::png_size(&png), (1400, 800));
        // Bad inputs name the file.
        std::fs::write(d.join("b.json"), "{\"latency\": 3}").unwrap();
        let e = collect(d).unwrap_err().to_string();
        assert!(e.contains("b.json") && e.contains("median_ms"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        assert!(collect(empty.path()).is_err());
    }
}
