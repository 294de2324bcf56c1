//! PNG figures of `reproduce` (plotters, with an embedded DejaVu Sans so no system fonts are needed).

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Result, SimError};
use crate::method::Method;
use crate::paper;
use crate::plot_style::{
    self, decade_label, draw_method, draw_paper, grid_bold, grid_light, log_range, side_legend,
    Entry,
};
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

pub(crate) fn perr<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> SimError + '_ {
    move |e| SimError::File {
        path: path.into(),
        reason: format!("plot: {e}"),
    }
}

const W: u32 = 1400;
const H: u32 = 800;

struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

/// What a panel shows on its axes; x is (from, to, log scale); `x_fmt` labels x values (empty:
/// no label there).
struct Axes<'a> {
    title: &'a str,
    x_desc: &'a str,
    y_desc: &'a str,
    x: (f64, f64, bool),
    x_fmt: &'a dyn Fn(&f64) -> String,
}

/// Width of the legend strip beside the plots.
const LEGEND_W: u32 = 190;

/// The plot area and, to its right, the legend strip (method lines, then the paper's marker).
fn with_legend<'b>(
    root: &DrawingArea<BitMapBackend<'b>, Shift>,
    path: &Path,
    names: &[String],
    paper: bool,
) -> Result<DrawingArea<BitMapBackend<'b>, Shift>> {
    let (plot, side) = root.split_horizontally(root.dim_in_pixel().0 - LEGEND_W);
    let mut entries: Vec<Entry> = names.iter().map(|n| Entry::method(n)).collect();
    if paper {
        entries.push(Entry::paper());
    }
    side_legend(&side, &entries).map_err(perr(path))?;
    Ok(plot)
}

/// One panel: each method's line in its style, the paper's values as hollow markers, log-scale
/// y fitted to the data with decade labels, optional log-scale x.
fn panel(
    area: &DrawingArea<BitMapBackend, Shift>,
    path: &Path,
    axes: Axes,
    series: &[Series],
    paper: &[Series],
) -> Result<()> {
    let Axes {
        title,
        x_desc,
        y_desc,
        x,
        x_fmt,
    } = axes;
    let e = perr(path);
    let (lo, hi) = log_range(
        series
            .iter()
            .chain(paper)
            .flat_map(|s| s.points.iter().map(|p| p.1)),
        1.3,
    );
    let mut b = ChartBuilder::on(area);
    b.caption(title, ("sans-serif", 22))
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
                .bold_line_style(grid_bold())
                .light_line_style(grid_light())
                .y_label_formatter(&decade_label)
                .x_label_formatter(x_fmt)
                .draw()
                .map_err(&e)?;
            for s in series {
                draw_method(&mut chart, &s.name, &s.points, true).map_err(&e)?;
            }
            for s in paper {
                draw_paper(&mut chart, &s.name, &s.points).map_err(&e)?;
            }
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
    render_to(&out.join(name), size, f)?;
    Ok(name.to_string())
}

/// Draws a `size` PNG at `path` with `f`: rendered beside the target and renamed, so a reader
/// never sees half a PNG.
pub(crate) fn render_to(
    path: &Path,
    size: (u32, u32),
    f: impl FnOnce(&DrawingArea<BitMapBackend, Shift>, &Path) -> Result<()>,
) -> Result<()> {
    register_font();
    let sim = |e: std::io::Error| SimError::io(path)(e);
    let drawn = astra_quant::atomic::write_via(path, |tmp| -> std::io::Result<()> {
        let draw = || -> Result<()> {
            let root = BitMapBackend::new(tmp, size).into_drawing_area();
            root.fill(&WHITE).map_err(perr(path))?;
            f(&root, path)?;
            root.present().map_err(perr(path))
        };
        draw().map_err(std::io::Error::other)
    });
    drawn.map_err(|e| match e.downcast::<SimError>() {
        Ok(sim_error) => sim_error,
        Err(e) => sim(e),
    })
}

/// Width and height of a PNG file, after checking that it is one whole PNG (signature, IHDR
/// first, IEND last): what the figure tests check of every figure.
#[cfg(test)]
pub(crate) fn png_size(path: &Path) -> (u32, u32) {
    let png = std::fs::read(path).unwrap();
    assert_eq!(
        &png[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    assert_eq!(&png[12..16], b"IHDR", "{}", path.display());
    assert_eq!(
        &png[png.len() - 8..png.len() - 4],
        b"IEND",
        "{} is cut short",
        path.display()
    );
    let dim = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    (dim(16), dim(20))
}

pub fn write_all(out: &Path, r: &Reproduction) -> Result<Vec<String>> {
    std::fs::create_dir_all(out).map_err(SimError::io(out))?;
    let methods = Method::paper_methods();
    let mut names = Vec::new();
    let names_of: Vec<String> = methods.iter().map(|m| m.to_string()).collect();
    names.push(fig1(out, r, &names_of)?);
    // Figs 4 and 5: two panels (10 and 100 Mbit/s) of speedup against one varying quantity.
    let two_panels = |name: &str,
                      what: &str,
                      x: (f64, f64),
                      configs: &[(f64, u32, u64)],
                      x_fmt: &dyn Fn(&f64) -> String| {
        render(out, name, (W, H), |root, p| {
            let plots = with_legend(root, p, &names_of, false)?;
            for (area, bw) in plots.split_evenly((1, 2)).iter().zip([10.0, 100.0]) {
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
                panel(area, p, axes, &s, &[])?;
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

/// Fig 1: speedup against bandwidth at N = 4, T = 1024, the paper's printed values beside ours.
fn fig1(out: &Path, r: &Reproduction, names_of: &[String]) -> Result<String> {
    let methods = Method::paper_methods();
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
    // The paper's printed speedups at N = 4, T = 1024 beside ours.
    let paper_n4: Vec<Series> = paper::SPEEDUP_N4_T1024
        .iter()
        .map(|(m, v)| Series {
            name: m.to_string(),
            points: paper::BANDWIDTHS
                .iter()
                .copied()
                .zip(v.iter().copied())
                .collect(),
        })
        .collect();
    let at_bandwidths = |v: &f64| {
        if paper::BANDWIDTHS.iter().any(|b| (b - v).abs() < 1e-6) {
            format!("{v:.0}")
        } else {
            String::new()
        }
    };
    render(out, "fig1-speedup-vs-bandwidth.png", (W, H), |root, p| {
        let plot = with_legend(root, p, names_of, true)?;
        let s: Vec<Series> = methods.iter().map(by_bw).collect();
        let axes = Axes {
            title: "Speedup over one device vs bandwidth (N = 4, T = 1024, paper latency model)",
            x_desc: "bandwidth (Mbit/s, log scale)",
            y_desc: "speedup (×, log scale)",
            x: (8.0, 620.0, true),
            x_fmt: &at_bandwidths,
        };
        panel(&plot, p, axes, &s, &paper_n4)
    })
}

fn fig3(root: &DrawingArea<BitMapBackend, Shift>, p: &Path, r: &Reproduction) -> Result<()> {
    let e = perr(p);
    let mut bars: Vec<(String, f64, f64)> = vec![("single".into(), paper::FIG3_SINGLE_MS, 0.0)];
    for m in Method::paper_methods() {
        let row = find(&r.rows, &m.to_string(), 4, 1024, 10.0).unwrap();
        bars.push((m.to_string(), row.outcome.compute_ms, row.outcome.comm_ms));
    }
    let (compute, comm) = (plot_style::BLUE, plot_style::VERMILLION);
    let (plot, side) = root.split_horizontally(root.dim_in_pixel().0 - LEGEND_W);
    let entry = |label: &str, color| Entry {
        label: label.into(),
        color,
        family: plot_style::Family::Astra,
        hollow: false,
    };
    side_legend(
        &side,
        &[
            entry("compute", compute),
            entry("communication", comm),
            Entry::paper(),
        ],
    )
    .map_err(&e)?;
    let n = bars.len();
    let (_, hi) = log_range(bars.iter().flat_map(|b| [b.1, b.2]), 1.4);
    let mut chart = ChartBuilder::on(&plot)
        .caption(
            "Latency split at N = 4, T = 1024, 10 Mbit/s (paper latency model)",
            ("sans-serif", 22),
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
        .bold_line_style(grid_bold())
        .light_line_style(grid_light())
        .y_label_formatter(&decade_label)
        .draw()
        .map_err(&e)?;
    let bar = |i: usize, left: bool, v: f64, color: RGBColor| {
        let x = i as f64 + if left { -0.38 } else { 0.02 };
        Rectangle::new([(x, 1.0), (x + 0.36, v)], color.filled())
    };
    chart
        .draw_series(
            bars.iter()
                .enumerate()
                .map(|(i, b)| bar(i, true, b.1, compute)),
        )
        .map_err(&e)?;
    chart
        .draw_series(
            bars.iter()
                .enumerate()
                .filter(|(_, b)| b.2 > 0.0)
                .map(|(i, b)| bar(i, false, b.2, comm)),
        )
        .map_err(&e)?;
    // The paper's printed split, as hollow markers on the bars' tops.
    let paper_marks = bars.iter().enumerate().flat_map(|(i, (name, _, _))| {
        let printed = if name == "single" {
            Some((paper::FIG3_SINGLE_MS, 0.0))
        } else {
            paper::FIG3.iter().find(|f| f.0 == name).map(|f| (f.1, f.2))
        };
        printed
            .into_iter()
            .flat_map(move |(c, m)| [(i as f64 - 0.2, c), (i as f64 + 0.2, m)])
            .filter(|p| p.1 > 0.0)
    });
    chart
        .draw_series(paper_marks.map(|p| Circle::new(p, 8, plot_style::INK.stroke_width(2))))
        .map_err(&e)?;
    Ok(())
}

fn fig11(root: &DrawingArea<BitMapBackend, Shift>, p: &Path, r: &Reproduction) -> Result<()> {
    let e = perr(p);
    let (plots, side) = root.split_horizontally(root.dim_in_pixel().0 - LEGEND_W - 40);
    let entries: Vec<Entry> = r
        .dynamic
        .iter()
        .map(|d| Entry {
            label: format!("{} ({})", d.method, d.total),
            ..Entry::method(&d.method.to_string())
        })
        .collect();
    side_legend(&side, &entries).map_err(&e)?;
    let (top, bottom) = plots.split_vertically(260);
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
        .bold_line_style(grid_bold())
        .light_line_style(grid_light())
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(&e)?;
    c.draw_series(LineSeries::new(
        r.trace.mbps.iter().enumerate().map(|(i, &b)| (i as f64, b)),
        plot_style::INK.stroke_width(2),
    ))
    .map_err(&e)?;
    let max = r.dynamic.iter().map(|d| d.total).max().unwrap_or(1) as f64;
    let mut c = ChartBuilder::on(&bottom)
        .caption(
            "Requests completed in 600 s (Llama-3-8B prefill, 4 devices, one request at a time)",
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
        .bold_line_style(grid_bold())
        .light_line_style(grid_light())
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(&e)?;
    for d in &r.dynamic {
        let mut total = 0usize;
        let mut points = vec![(0.0, 0.0)];
        for (w, &n) in d.per_window.iter().enumerate() {
            total += n;
            points.push((((w + 1) * 10) as f64, total as f64));
        }
        draw_method(&mut c, &d.method.to_string(), &points, false).map_err(&e)?;
    }
    Ok(())
}
