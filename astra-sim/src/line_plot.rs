//! `astra-sim plot-lines`: a figure from a CSV of points, for results that come from outside the
//! simulator (accuracy tables, throughput). Columns `series,x,y,source`: one line per series, in
//! file order, each in the next colour of the house palette; `source` is `ours` (solid line, filled
//! markers) or `paper` (dashed line, hollow markers), so the paper's numbers stand beside ours.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Result, SimError};
use crate::figure_csv;
use crate::plot_style::{
    self, decade_label, draw_hollow, draw_line, grid_bold, grid_light, side_legend, Entry, Family,
};

/// One series of points.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    pub name: String,
    pub paper: bool,
    pub points: Vec<(f64, f64)>,
}

/// The house palette's colours in the order series take them.
const COLOURS: [RGBColor; 6] = [
    plot_style::BLUE,
    plot_style::VERMILLION,
    plot_style::BLUISH_GREEN,
    plot_style::ORANGE,
    plot_style::REDDISH_PURPLE,
    plot_style::SKY_BLUE,
];

/// The series of a `series,x,y,source` CSV, in order of first appearance.
pub fn read(path: &Path) -> Result<Vec<Line>> {
    let mut lines: Vec<Line> = Vec::new();
    for row in figure_csv::rows(path, "series,x,y,source")? {
        let f = &row.fields;
        let paper = match f[3].as_str() {
            "ours" => false,
            "paper" => true,
            other => return Err(row.error(path, format!("source '{other}' is not ours or paper"))),
        };
        let any = |_| true;
        let point = (
            row.number(path, 1, "a finite number", any)?,
            row.number(path, 2, "a finite number", any)?,
        );
        match lines.iter_mut().find(|l| l.name == f[0]) {
            Some(l) => l.points.push(point),
            None => lines.push(Line {
                name: f[0].clone(),
                paper,
                points: vec![point],
            }),
        }
    }
    if lines.is_empty() {
        return Err(SimError::invalid(
            "csv",
            format!("{} holds no points", path.display()),
        ));
    }
    Ok(lines)
}

/// Axis descriptions and scales of a line figure.
pub struct LineAxes<'a> {
    pub title: &'a str,
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    pub log_x: bool,
}

/// Draws `lines` to the PNG `out`.
pub fn plot(lines: &[Line], axes: &LineAxes, out: &Path) -> Result<()> {
    let e = crate::plots::perr(out);
    crate::plots::render_to(out, (1400, 800), |root, _| {
        let colour = |i: usize| COLOURS[i % COLOURS.len()];
        let (plot, side) = root.split_horizontally(1400 - 300);
        let entries: Vec<Entry> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| Entry {
                label: l.name.clone(),
                color: colour(i),
                family: if l.paper { Family::Bp } else { Family::Astra },
                hollow: false,
            })
            .collect();
        side_legend(&side, &entries).map_err(&e)?;
        let all = || lines.iter().flat_map(|l| l.points.iter().copied());
        let (x0, x1) = if axes.log_x {
            plot_style::log_range(all().map(|p| p.0), 1.5)
        } else {
            padded(all().map(|p| p.0))
        };
        let (y0, y1) = padded(all().map(|p| p.1));
        let mut b = ChartBuilder::on(&plot);
        b.caption(axes.title, ("sans-serif", 22))
            .margin(14)
            .x_label_area_size(48)
            .y_label_area_size(80);
        macro_rules! draw {
            ($chart:expr, $xfmt:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc(axes.x_desc)
                    .y_desc(axes.y_desc)
                    .label_style(("sans-serif", 16))
                    .axis_desc_style(("sans-serif", 18))
                    .bold_line_style(grid_bold())
                    .light_line_style(grid_light())
                    .x_label_formatter($xfmt)
                    .draw()
                    .map_err(&e)?;
                // Ours solid with filled markers; the paper's dashed with hollow ones.
                for (i, l) in lines.iter().enumerate() {
                    let family = if l.paper { Family::Bp } else { Family::Astra };
                    draw_line(&mut chart, &l.points, colour(i), family, !l.paper).map_err(&e)?;
                    if l.paper {
                        draw_hollow(&mut chart, &l.points, colour(i)).map_err(&e)?;
                    }
                }
            }};
        }
        if axes.log_x {
            draw!(
                b.build_cartesian_2d((x0..x1).log_scale(), y0..y1)
                    .map_err(&e)?,
                &decade_label
            );
        } else {
            draw!(
                b.build_cartesian_2d(x0..x1, y0..y1).map_err(&e)?,
                &|v: &f64| format!("{v}")
            );
        }
        Ok(())
    })
}

/// The range of `values` with 8% of it added on each side.
fn padded(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let pad = ((hi - lo) * 0.08).max(1e-9);
    (lo - pad, hi + pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_series_in_order_and_refuses_bad_rows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.csv");
        std::fs::write(
            &p,
            "series,x,y,source\nours,8,-4.4,ours\npaper C,10,-3.6,paper\nours,256,-0.2,ours\n",
        )
        .unwrap();
        let lines = read(&p).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].points, vec![(8.0, -4.4), (256.0, -0.2)]);
        assert!(lines[1].paper && !lines[0].paper);
        let out = dir.path().join("a.png");
        let axes = LineAxes {
            title: "t",
            x_desc: "bits",
            y_desc: "Δ",
            log_x: true,
        };
        plot(&lines, &axes, &out).unwrap();
        assert_eq!(crate::plots::png_size(&out), (1400, 800));
        for (bad, needle) in [
            ("x,y\n1,2\n", "header"),
            ("series,x,y,source\na,1,NaN,ours\n", "a.csv:2:"),
            ("series,x,y,source\na,1,2,theirs\n", "theirs"),
            ("series,x,y,source\na,1,2\n", "3 fields"),
            ("series,x,y,source\n", "no points"),
        ] {
            std::fs::write(&p, bad).unwrap();
            let e = read(&p).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }
}
