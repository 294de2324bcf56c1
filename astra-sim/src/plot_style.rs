//! The one look of every figure: a colour-blind-safe palette (Okabe & Ito) with one fixed colour
//! per method, line style by family (ASTRA solid, BP dashed, TP/SP dotted), light grids, labels
//! only where they are meant (decades on log axes, the paper's settings on x), and the paper's own
//! values as hollow markers. Legends go beside the data, never over it.

use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;

/// Okabe & Ito's palette (Color Universal Design), without its yellow (too light on white).
pub const VERMILLION: RGBColor = RGBColor(213, 94, 0);
pub const BLUE: RGBColor = RGBColor(0, 114, 178);
pub const BLUISH_GREEN: RGBColor = RGBColor(0, 158, 115);
pub const ORANGE: RGBColor = RGBColor(230, 159, 0);
pub const SKY_BLUE: RGBColor = RGBColor(86, 180, 233);
pub const REDDISH_PURPLE: RGBColor = RGBColor(204, 121, 167);
pub const GREY: RGBColor = RGBColor(110, 110, 110);
pub const INK: RGBColor = RGBColor(0, 0, 0);

/// What drawing on a bitmap can fail with.
type BitmapError = <BitMapBackend<'static> as DrawingBackend>::ErrorType;

/// How a method's line is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// ASTRA: solid.
    Astra,
    /// Block parallelism: dashed.
    Bp,
    /// Tensor and sequence parallelism: dotted.
    Baseline,
}

/// The fixed colour and family of a method, by its name (`astra-g16`, `bp-ag-nb1`, `tp`, …).
pub fn method_style(name: &str) -> (RGBColor, Family) {
    match name {
        "astra-g1" => (VERMILLION, Family::Astra),
        "astra-g16" => (BLUE, Family::Astra),
        "astra-g32" => (BLUISH_GREEN, Family::Astra),
        "bp-ag-nb1" => (ORANGE, Family::Bp),
        "bp-ag-nb4" => (SKY_BLUE, Family::Bp),
        "bp-sp-nb1" => (REDDISH_PURPLE, Family::Bp),
        "bp-sp-nb4" => (GREY, Family::Bp),
        "bp-nb4" => (ORANGE, Family::Bp),
        "bp-nb8" => (SKY_BLUE, Family::Bp),
        "tp" => (INK, Family::Baseline),
        "sp" => (GREY, Family::Baseline),
        "single" => (INK, Family::Astra),
        n if n.starts_with("astra") => (BLUE, Family::Astra),
        n if n.starts_with("bp") => (ORANGE, Family::Bp),
        _ => (INK, Family::Baseline),
    }
}

/// Grid lines: the bold ones faint, the light ones fainter still.
pub fn grid_bold() -> ShapeStyle {
    INK.mix(0.14).stroke_width(1)
}
pub fn grid_light() -> ShapeStyle {
    INK.mix(0.04).stroke_width(1)
}

/// A log-axis label only at powers of ten ("0.01", "0.1", "1", "10", …).
pub fn decade_label(v: &f64) -> String {
    let e = v.log10();
    if (e - e.round()).abs() > 1e-9 {
        return String::new();
    }
    if *v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.*}", (-e.round()) as usize)
    }
}

/// `lo..hi` of positive values with a margin of `pad` (a factor) on a log axis.
pub fn log_range(values: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| *v > 0.0 && v.is_finite())
        .fold((f64::INFINITY, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
    if hi <= 0.0 {
        return (0.1, 10.0);
    }
    (lo / pad, hi * pad)
}

/// One legend entry: a label, and how its line (or marker) looks.
pub struct Entry {
    pub label: String,
    pub color: RGBColor,
    pub family: Family,
    /// A hollow marker instead of a line (the paper's values).
    pub hollow: bool,
}

impl Entry {
    pub fn method(name: &str) -> Self {
        let (color, family) = method_style(name);
        Entry {
            label: name.to_string(),
            color,
            family,
            hollow: false,
        }
    }
    pub fn paper() -> Self {
        Entry {
            label: "paper".to_string(),
            color: INK,
            family: Family::Astra,
            hollow: true,
        }
    }
}

/// Draws the legend down `area` (a strip beside the plots).
pub fn side_legend(
    area: &DrawingArea<BitMapBackend, Shift>,
    entries: &[Entry],
) -> Result<(), DrawingAreaErrorKind<BitmapError>> {
    let font = ("sans-serif", 17).into_font();
    for (i, e) in entries.iter().enumerate() {
        let y = 70 + 28 * i as i32;
        let (x0, x1) = (8, 52);
        if e.hollow {
            area.draw(&Circle::new((30, y), 6, e.color.stroke_width(2)))?;
        } else {
            let style = e.color.stroke_width(3);
            match e.family {
                Family::Astra => area.draw(&PathElement::new(vec![(x0, y), (x1, y)], style))?,
                Family::Bp => {
                    area.draw(&DashedPathElement::new(vec![(x0, y), (x1, y)], 9, 5, style))?
                }
                Family::Baseline => {
                    area.draw(&DashedPathElement::new(vec![(x0, y), (x1, y)], 3, 5, style))?
                }
            }
        }
        area.draw(&Text::new(e.label.clone(), (60, y - 9), font.clone()))?;
    }
    Ok(())
}

/// Draws `points` as a method's line (by family), with filled markers when `markers`.
pub fn draw_method<X, Y>(
    chart: &mut ChartContext<'_, BitMapBackend, Cartesian2d<X, Y>>,
    name: &str,
    points: &[(X::ValueType, Y::ValueType)],
    markers: bool,
) -> Result<(), DrawingAreaErrorKind<BitmapError>>
where
    X: Ranged,
    Y: Ranged,
    X::ValueType: Clone + 'static,
    Y::ValueType: Clone + 'static,
{
    let (color, family) = method_style(name);
    draw_line(chart, points, color, family, markers)
}

/// The paper's values for a method: hollow markers in its colour.
pub fn draw_paper<X, Y>(
    chart: &mut ChartContext<'_, BitMapBackend, Cartesian2d<X, Y>>,
    name: &str,
    points: &[(X::ValueType, Y::ValueType)],
) -> Result<(), DrawingAreaErrorKind<BitmapError>>
where
    X: Ranged,
    Y: Ranged,
    X::ValueType: Clone + 'static,
    Y::ValueType: Clone + 'static,
{
    draw_hollow(chart, points, method_style(name).0)
}

/// `points` joined by a line in `color`, drawn as `family` draws (solid, dashed, dotted), with
/// filled markers when `markers`.
pub fn draw_line<X, Y>(
    chart: &mut ChartContext<'_, BitMapBackend, Cartesian2d<X, Y>>,
    points: &[(X::ValueType, Y::ValueType)],
    color: RGBColor,
    family: Family,
    markers: bool,
) -> Result<(), DrawingAreaErrorKind<BitmapError>>
where
    X: Ranged,
    Y: Ranged,
    X::ValueType: Clone + 'static,
    Y::ValueType: Clone + 'static,
{
    let style = color.stroke_width(3);
    let pts = points.to_vec();
    match family {
        Family::Astra => chart.draw_series(LineSeries::new(pts.clone(), style))?,
        Family::Bp => chart.draw_series(DashedLineSeries::new(pts.clone(), 9, 5, style))?,
        Family::Baseline => chart.draw_series(DashedLineSeries::new(pts.clone(), 3, 5, style))?,
    };
    if markers {
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    Ok(())
}

/// Hollow markers in `color` (how the paper's values are drawn).
pub fn draw_hollow<X, Y>(
    chart: &mut ChartContext<'_, BitMapBackend, Cartesian2d<X, Y>>,
    points: &[(X::ValueType, Y::ValueType)],
    color: RGBColor,
) -> Result<(), DrawingAreaErrorKind<BitmapError>>
where
    X: Ranged,
    Y: Ranged,
    X::ValueType: Clone + 'static,
    Y::ValueType: Clone + 'static,
{
    chart.draw_series(
        points
            .iter()
            .cloned()
            .map(|p| Circle::new(p, 8, color.stroke_width(2))),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decades_only_and_fitted_ranges() {
        let labels: Vec<String> = [0.001, 0.005, 0.01, 0.1, 0.3, 1.0, 2.0, 10.0, 100.0]
            .iter()
            .map(decade_label)
            .collect();
        assert_eq!(
            labels,
            ["0.001", "", "0.01", "0.1", "", "1", "", "10", "100"]
        );
        let (lo, hi) = log_range([0.0076, 2.84, 0.0, f64::NAN].into_iter(), 1.25);
        assert!(
            (lo - 0.00608).abs() < 1e-9 && (hi - 3.55).abs() < 1e-9,
            "{lo} {hi}"
        );
        // Every paper method has its own colour.
        let names = [
            "astra-g1",
            "astra-g16",
            "astra-g32",
            "bp-ag-nb1",
            "bp-ag-nb4",
            "bp-sp-nb1",
            "tp",
        ];
        let mut colors: Vec<_> = names.iter().map(|n| method_style(n).0).collect();
        colors.dedup();
        assert_eq!(colors.len(), names.len());
    }
}
