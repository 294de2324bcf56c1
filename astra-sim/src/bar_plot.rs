//! `astra-sim plot-bars`: grouped horizontal bars from a CSV `group,bar,value`, e.g. training
//! throughput of ours (plain, ASTRA) against the PyTorch peer per model. Bars keep one colour
//! per bar name across groups (the house palette, in order of first appearance); each bar is
//! labelled with its value; an optional reference line (`--reference 1`) marks parity.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Result, SimError};
use crate::figure_csv;
use crate::plot_style::{self, grid_bold, grid_light, side_legend, Entry, Family};

/// The bars of one group, in file order.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub name: String,
    pub bars: Vec<(String, f64)>,
}

const COLOURS: [RGBColor; 8] = [
    plot_style::BLUE,
    plot_style::VERMILLION,
    plot_style::GREY,
    plot_style::BLUISH_GREEN,
    plot_style::ORANGE,
    plot_style::REDDISH_PURPLE,
    plot_style::SKY_BLUE,
    plot_style::INK,
];

/// The legend strip's width in pixels: wide enough for the longest bar name (the legend's font
/// is about 9 pixels a character), between 300 and half the figure.
fn legend_width(names: &[String]) -> u32 {
    let longest = names.iter().map(|n| n.chars().count()).max().unwrap_or(0) as u32;
    (70 + 9 * longest).clamp(300, 700)
}

/// The groups of a `group,bar,value` CSV (values finite and ≥ 0).
pub fn read(path: &Path) -> Result<Vec<Group>> {
    let mut groups: Vec<Group> = Vec::new();
    for row in figure_csv::rows(path, "group,bar,value")? {
        let v = row.number(path, 2, "a number ≥ 0", |v| v >= 0.0)?;
        let (group, bar) = (&row.fields[0], row.fields[1].clone());
        match groups.iter_mut().find(|g| &g.name == group) {
            Some(g) => g.bars.push((bar, v)),
            None => groups.push(Group {
                name: group.clone(),
                bars: vec![(bar, v)],
            }),
        }
    }
    if groups.is_empty() {
        return Err(SimError::invalid(
            "csv",
            format!("{} holds no bars", path.display()),
        ));
    }
    Ok(groups)
}

/// How a group's bars are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Layout {
    /// One bar per row, each labelled with its value.
    Grouped,
    /// A group's bars end to end on one row (parts of a whole), its total at the end.
    Stacked,
}

/// Draws `groups` to the PNG `out`; `x_desc` names the value axis; `reference` draws a line at
/// that value (e.g. 1 for parity with a peer).
pub fn plot(
    groups: &[Group],
    title: &str,
    x_desc: &str,
    reference: Option<f64>,
    out: &Path,
) -> Result<()> {
    plot_as(groups, Layout::Grouped, title, x_desc, reference, out)
}

/// [`plot`] with a choice of [`Layout`].
pub fn plot_as(
    groups: &[Group],
    layout: Layout,
    title: &str,
    x_desc: &str,
    reference: Option<f64>,
    out: &Path,
) -> Result<()> {
    let e = crate::plots::perr(out);
    let mut names: Vec<String> = Vec::new();
    for g in groups {
        for (b, _) in &g.bars {
            if !names.contains(b) {
                names.push(b.clone());
            }
        }
    }
    let colour =
        |bar: &str| COLOURS[names.iter().position(|n| n == bar).unwrap_or(0) % COLOURS.len()];
    let legend_w = legend_width(&names);
    crate::plots::render_to(out, (1400, 800), |root, _| {
        let (plot, side) = root.split_horizontally(1400 - legend_w);
        let entries: Vec<Entry> = names
            .iter()
            .map(|n| Entry {
                label: n.clone(),
                color: colour(n),
                family: Family::Astra,
                hollow: false,
            })
            .collect();
        side_legend(&side, &entries).map_err(&e)?;
        // Rows from the top: per group a title row, then its bars (stacked: one bar).
        let bar_rows = |g: &Group| match layout {
            Layout::Grouped => g.bars.len(),
            Layout::Stacked => 1,
        };
        let rows: usize = groups.iter().map(|g| bar_rows(g) + 1).sum();
        let hi = groups
            .iter()
            .flat_map(|g| match layout {
                Layout::Grouped => g.bars.iter().map(|b| b.1).collect::<Vec<_>>(),
                Layout::Stacked => vec![g.bars.iter().map(|b| b.1).sum()],
            })
            .chain(reference)
            .fold(0.0, f64::max)
            * 1.18;
        let mut chart = ChartBuilder::on(&plot)
            .caption(title, ("sans-serif", 22))
            .margin(14)
            .x_label_area_size(48)
            .y_label_area_size(20)
            .build_cartesian_2d(0.0..hi.max(1e-9), 0.0..rows as f64)
            .map_err(&e)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_desc(x_desc)
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 18))
            .bold_line_style(grid_bold())
            .light_line_style(grid_light())
            .y_label_formatter(&|_| String::new())
            .draw()
            .map_err(&e)?;
        // Each group: its name on a row of its own, then its bars.
        let mut top = rows as f64;
        for g in groups {
            chart
                .draw_series(std::iter::once(Text::new(
                    g.name.clone(),
                    (hi * 0.005, top - 0.35),
                    ("sans-serif", 18).into_font(),
                )))
                .map_err(&e)?;
            let mut start = 0.0;
            for (i, (bar, v)) in g.bars.iter().enumerate() {
                let (y, x0) = match layout {
                    Layout::Grouped => (top - 2.0 - i as f64, 0.0),
                    Layout::Stacked => (top - 2.0, start),
                };
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x0, y + 0.1), (x0 + *v, y + 0.9)],
                        colour(bar).filled(),
                    )))
                    .map_err(&e)?;
                start += v;
                if layout == Layout::Grouped {
                    chart
                        .draw_series(std::iter::once(Text::new(
                            format!("{v:.3}"),
                            (*v + hi * 0.01, y + 0.72),
                            ("sans-serif", 15).into_font(),
                        )))
                        .map_err(&e)?;
                }
            }
            if layout == Layout::Stacked {
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!("{start:.2}"),
                        (start + hi * 0.01, top - 2.0 + 0.72),
                        ("sans-serif", 15).into_font(),
                    )))
                    .map_err(&e)?;
            }
            top -= bar_rows(g) as f64 + 1.0;
        }
        if let Some(r) = reference {
            chart
                .draw_series(DashedLineSeries::new(
                    [(r, 0.0), (r, rows as f64)],
                    6,
                    4,
                    plot_style::INK.stroke_width(2),
                ))
                .map_err(&e)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_groups_and_draws_them() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.csv");
        std::fs::write(&p, "group,bar,value\nViT-B/16,ours plain,0.98\nViT-B/16,ours ASTRA,0.31\nGPT-2,ours plain,1.25\n").unwrap();
        let g = read(&p).unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(
            g[0].bars,
            vec![
                ("ours plain".to_string(), 0.98),
                ("ours ASTRA".to_string(), 0.31)
            ]
        );
        let out = dir.path().join("b.png");
        plot(&g, "t", "× PyTorch", Some(1.0), &out).unwrap();
        assert_eq!(crate::plots::png_size(&out), (1400, 800));
        let stacked = dir.path().join("s.png");
        plot_as(&g, Layout::Stacked, "t", "ms", None, &stacked).unwrap();
        assert_eq!(crate::plots::png_size(&stacked), (1400, 800));
        for (bad, needle) in [
            ("a,b\n", "header"),
            ("group,bar,value\nx,y,-1\n", "b.csv:2:"),
            ("group,bar,value\nx,y\n", "2 fields"),
            ("group,bar,value\n", "no bars"),
        ] {
            std::fs::write(&p, bad).unwrap();
            let e = read(&p).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn the_legend_fits_the_longest_name_and_colours_stay_distinct() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(legend_width(&names(&["a"])), 300);
        let long = "ours ASTRA: search on CUDA cores";
        assert!(legend_width(&names(&[long])) >= 60 + 9 * long.len() as u32);
        assert_eq!(legend_width(&names(&[&"x".repeat(500)])), 700);
        // Eight bar names over the groups (gpu-throughput's figure) take eight different colours.
        let all: std::collections::HashSet<_> = COLOURS.iter().map(|c| (c.0, c.1, c.2)).collect();
        assert_eq!(all.len(), 8);
    }
}
