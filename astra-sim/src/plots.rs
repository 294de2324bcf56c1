//! PNG figures of `reproduce` (plotters, with an embedded DejaVu Sans so no system fonts are needed).

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Result, SimError};
use crate::method::Method;
use crate::paper;
use crate::reproduce::{find, Reproduction};

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            include_bytes!("../assets/DejaVuSans.ttf"),
        );
    });
}

fn perr<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> SimError + '_ {
    move |e| SimError::File {
        path: path.into(),
        reason: format!("plot: {e}"),
    }
}

/// The house legend: `size`-point labels on a translucent white box with a black border.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    size: u32,
    at: SeriesLabelPosition,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .label_font(("sans-serif", size))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(at)
        .draw()
}

const W: u32 = 1400;
const H: u32 = 800;

struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

/// What a panel shows on its axes; x is (from, to, log scale).
struct Axes<'a> {
    title: &'a str,
    x_desc: &'a str,
    y_desc: &'a str,
    x: (f64, f64, bool),
    x_fmt: &'a dyn Fn(&f64) -> String,
}

/// One panel: lines with markers, log-scale y, optional log-scale x.
fn panel(
    area: &DrawingArea<BitMapBackend, Shift>,
    path: &Path,
    axes: Axes,
    series: &[Series],
) -> Result<()> {
    let Axes {
        title,
        x_desc,
        y_desc,
        x,
        x_fmt,
    } = axes;
    let e = perr(path);
    let ys = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|v| *v > 0.0);
    let (lo, hi) = ys.fold((f64::INFINITY, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
    // Room below the lowest curve for the legend (lower right), so it covers no data.
    let (lo, hi) = (lo / 30.0, hi * 1.6);
    let mut b = ChartBuilder::on(area);
    b.caption(title, ("sans-serif", 24))
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(72);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .label_style(("sans-serif", 16))
                .axis_desc_style(("sans-serif", 18))
                .y_label_formatter(&|v| {
                    if *v >= 1.0 {
                        format!("{v:.0}")
                    } else {
                        let digits = (-v.log10()).ceil().max(0.0) as usize;
                        format!("{v:.digits$}")
                    }
                })
                .x_label_formatter(x_fmt)
                .draw()
                .map_err(&e)?;
            for (i, s) in series.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(
                        s.points.iter().cloned(),
                        color.stroke_width(3),
                    ))
                    .map_err(&e)?
                    .label(s.name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                    });
                chart
                    .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(&e)?;
            }
            legend(&mut chart, 16, SeriesLabelPosition::LowerRight).map_err(&e)?;
        }};
    }
    if x.2 {
        draw!(b
            .build_cartesian_2d((x.0..x.1).log_scale(), (lo..hi).log_scale())
            .map_err(&e)?);
    } else {
        draw!(b
            .build_cartesian_2d(x.0..x.1, (lo..hi).log_scale())
            .map_err(&e)?);
    }
    Ok(())
}

fn render(
    out: &Path,
    name: &str,
    size: (u32, u32),
    f: impl FnOnce(&DrawingArea<BitMapBackend, Shift>, &Path) -> Result<()>,
) -> Result<String> {
    register_font();
    let final_path = out.join(name);
    let sim = |e: std::io::Error| SimError::io(&final_path)(e);
    // Rendered beside the target and renamed, so a reader never sees half a PNG.
    let drawn = astra_quant::atomic::write_via(&final_path, |tmp| -> std::io::Result<()> {
        let draw = || -> Result<()> {
            let root = BitMapBackend::new(tmp, size).into_drawing_area();
            root.fill(&WHITE).map_err(perr(&final_path))?;
            f(&root, &final_path)?;
            root.present().map_err(perr(&final_path))
        };
        draw().map_err(std::io::Error::other)
    });
    drawn.map_err(|e| match e.downcast::<SimError>() {
        Ok(sim_error) => sim_error,
        Err(e) => sim(e),
    })?;
    Ok(name.to_string())
}

pub fn write_all(out: &Path, r: &Reproduction) -> Result<Vec<String>> {
    std::fs::create_dir_all(out).map_err(SimError::io(out))?;
    let methods = Method::paper_methods();
    let mut names = Vec::new();
    let by_bw = |m: &Method| Series {
        name: m.to_string(),
        points: paper::BANDWIDTHS
            .iter()
            .map(|&b| {
                (
                    b,
                    find(&r.rows, &m.to_string(), 4, 1024, b).unwrap().speedup,
                )
            })
            .collect(),
    };
    names.push(render(
        out,
        "fig1-speedup-vs-bandwidth.png",
        (W, H),
        |root, p| {
            let s: Vec<Series> = methods.iter().map(by_bw).collect();
            panel(
                root,
                p,
                Axes { title: "Speedup over one device vs bandwidth (N = 4, T = 1024, paper latency model)", x_desc: "bandwidth (Mbit/s, log scale)", y_desc: "speedup (×, log scale)", x: (8.0, 620.0, true), x_fmt: &|v| format!("{v:.0}") },
                &s,
            )
        },
    )?);
    // Figs 4 and 5: two panels (10 and 100 Mbit/s) of speedup against one varying quantity.
    let two_panels = |name: &str,
                      what: &str,
                      x: (f64, f64),
                      configs: &[(f64, u32, u64)],
                      x_fmt: &dyn Fn(&f64) -> String| {
        render(out, name, (W, H), |root, p| {
            for (area, bw) in root.split_evenly((1, 2)).iter().zip([10.0, 100.0]) {
                let s: Vec<Series> = methods
                    .iter()
                    .map(|m| Series {
                        name: m.to_string(),
                        points: configs
                            .iter()
                            .map(|&(xv, n, t)| {
                                (xv, find(&r.rows, &m.to_string(), n, t, bw).unwrap().speedup)
                            })
                            .collect(),
                    })
                    .collect();
                let title = format!("Speedup vs {what}, {bw} Mbit/s");
                let axes = Axes {
                    title: &title,
                    x_desc: what,
                    y_desc: "speedup (×, log scale)",
                    x: (x.0, x.1, false),
                    x_fmt,
                };
                panel(area, p, axes, &s)?;
            }
            Ok(())
        })
    };
    let by_devices: Vec<(f64, u32, u64)> = paper::DEVICES
        .iter()
        .map(|&n| (n as f64, n, 1024))
        .collect();
    names.push(two_panels(
        "fig4-speedup-vs-devices.png",
        "devices N (T = 1024)",
        (1.5, 8.5),
        &by_devices,
        &|v| format!("{v:.0}"),
    )?);
    // x is log2 T, labelled at the powers of two.
    let by_tokens: Vec<(f64, u32, u64)> = paper::TOKENS
        .iter()
        .map(|&t| ((t as f64).log2(), 4, t))
        .collect();
    let pow2 = |v: &f64| {
        if (v - v.round()).abs() < 1e-6 {
            format!("{}", 2f64.powf(v.round()))
        } else {
            String::new()
        }
    };
    names.push(two_panels(
        "fig5-speedup-vs-tokens.png",
        "tokens T (N = 4, log scale)",
        (7.6, 12.4),
        &by_tokens,
        &pow2,
    )?);
    names.push(render(
        out,
        "fig3-latency-breakdown.png",
        (W, H),
        |root, p| fig3(root, p, r),
    )?);
    names.push(render(
        out,
        "fig11-dynamic-network.png",
        (W, H),
        |root, p| fig11(root, p, r),
    )?);
    Ok(names)
}

fn fig3(root: &DrawingArea<BitMapBackend, Shift>, p: &Path, r: &Reproduction) -> Result<()> {
    let e = perr(p);
    let mut bars: Vec<(String, f64, f64)> = vec![("single".into(), paper::FIG3_SINGLE_MS, 0.0)];
    for m in Method::paper_methods() {
        let row = find(&r.rows, &m.to_string(), 4, 1024, 10.0).unwrap();
        bars.push((m.to_string(), row.outcome.compute_ms, row.outcome.comm_ms));
    }
    let n = bars.len();
    let hi = bars.iter().map(|b| b.1.max(b.2)).fold(0.0, f64::max) * 2.0;
    let mut chart = ChartBuilder::on(root)
        .caption(
            "Latency split at N = 4, T = 1024, 10 Mbit/s (paper latency model)",
            ("sans-serif", 24),
        )
        .margin(14)
        .x_label_area_size(70)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), (1.0f64..hi).log_scale())
        .map_err(&e)?;
    let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|v| {
            let i = v.round();
            if (v - i).abs() < 1e-6 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("time (ms, log scale)")
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(&e)?;
    let compute = RGBColor(52, 101, 164);
    let comm = RGBColor(204, 85, 0);
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            Rectangle::new(
                [(i as f64 - 0.38, 1.0), (i as f64 - 0.02, b.1)],
                compute.filled(),
            )
        }))
        .map_err(&e)?
        .label("compute")
        .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 18, y + 6)], compute.filled()));
    chart
        .draw_series(
            bars.iter()
                .enumerate()
                .filter(|(_, b)| b.2 > 0.0)
                .map(|(i, b)| {
                    Rectangle::new(
                        [(i as f64 + 0.02, 1.0), (i as f64 + 0.38, b.2)],
                        comm.filled(),
                    )
                }),
        )
        .map_err(&e)?
        .label("communication")
        .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 18, y + 6)], comm.filled()));
    legend(&mut chart, 16, SeriesLabelPosition::UpperLeft).map_err(&e)?;
    Ok(())
}

fn fig11(root: &DrawingArea<BitMapBackend, Shift>, p: &Path, r: &Reproduction) -> Result<()> {
    let e = perr(p);
    let (top, bottom) = root.split_vertically(260);
    let secs = r.trace.seconds() as f64;
    let mut c = ChartBuilder::on(&top)
        .caption(
            "Dynamic network: the paper's 600-s bandwidth trace",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..secs, 0.0..110.0)
        .map_err(&e)?;
    c.configure_mesh()
        .y_desc("Mbit/s")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(&e)?;
    c.draw_series(LineSeries::new(
        r.trace.mbps.iter().enumerate().map(|(i, &b)| (i as f64, b)),
        BLACK.stroke_width(2),
    ))
    .map_err(&e)?;
    let max = r.dynamic.iter().map(|d| d.total).max().unwrap_or(1) as f64;
    let mut c = ChartBuilder::on(&bottom)
        .caption(
            "Requests completed so far (Llama-3-8B prefill, 4 devices, one request at a time)",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..secs, 0.0..(max * 1.08))
        .map_err(&e)?;
    c.configure_mesh()
        .x_desc("time (s)")
        .y_desc("requests completed")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(&e)?;
    for (i, d) in r.dynamic.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mut total = 0usize;
        let mut points = vec![(0.0, 0.0)];
        for (w, &n) in d.per_window.iter().enumerate() {
            total += n;
            points.push((((w + 1) * 10) as f64, total as f64));
        }
        c.draw_series(LineSeries::new(points, color.stroke_width(3)))
            .map_err(&e)?
            .label(format!("{} ({} in 600 s)", d.method, d.total))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
    }
    legend(&mut c, 15, SeriesLabelPosition::UpperLeft).map_err(&e)?;
    Ok(())
}
