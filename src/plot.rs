//! The chart of `visor compare --plot`: a grouped bar chart of the median
//! time per operation, one group per benchmark and one bar per engine and
//! guest mode, on a log scale. Drawn with plotters' SVG backend alone: text
//! becomes SVG `<text>` elements, so no font files are read.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// What to draw.
pub struct Chart<'a> {
    pub title: &'a str,
    /// The groups (benchmarks), left to right.
    pub groups: &'a [String],
    /// The bars of each group (engine/mode), in legend order.
    pub series: &'a [String],
    /// `values[group][series]`: ns per operation, `None` where there is none.
    pub values: &'a [Vec<Option<f64>>],
}

/// The powers of ten around the values (1..10 without any).
fn log_range(values: &[Vec<Option<f64>>]) -> (f64, f64) {
    let all = values.iter().flatten().flatten().copied();
    let all: Vec<f64> = all.filter(|v| v.is_finite() && *v > 0.0).collect();
    let min = all.iter().copied().fold(f64::INFINITY, f64::min);
    let max = all.iter().copied().fold(0.0, f64::max);
    if all.is_empty() {
        return (1.0, 10.0);
    }
    let lo = 10f64.powf(min.log10().floor());
    let hi = 10f64.powf(max.log10().ceil());
    (lo, if hi > lo { hi } else { lo * 10.0 })
}

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("drawing the chart: {e:?}")
}

/// Width of the legend, right of the chart.
const LEGEND_WIDTH: u32 = 160;

/// The chart as an SVG document.
pub fn svg(c: &Chart) -> Result<String, String> {
    let n = c.groups.len().max(1);
    let width = (n * (c.series.len() * 16 + 36) + 120).max(760) as u32 + LEGEND_WIDTH;
    let (lo, hi) = log_range(c.values);
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (width, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (left, legend) = root.split_horizontally(width - LEGEND_WIDTH);
        let mut chart = ChartBuilder::on(&left)
            .caption(c.title, ("sans-serif", 18))
            .margin(14)
            .x_label_area_size(36)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..n as f64, (lo..hi).log_scale())
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc("ns per operation (log scale)")
            .y_label_formatter(&|v| {
                if *v >= 1.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v}")
                }
            })
            .draw()
            .map_err(err)?;
        let w = 0.8 / c.series.len().max(1) as f64;
        let label = TextStyle::from(("sans-serif", 14).into_font());
        for (j, name) in c.series.iter().enumerate() {
            let color = Palette99::pick(j).to_rgba();
            let bars = c.values.iter().enumerate().filter_map(|(i, row)| {
                let v = (*row.get(j)?)?;
                let x0 = i as f64 + 0.1 + j as f64 * w;
                Some(Rectangle::new(
                    [(x0, lo), (x0 + w, v.max(lo))],
                    color.filled(),
                ))
            });
            chart.draw_series(bars).map_err(err)?;
            let y = 60 + 22 * j as i32;
            legend
                .draw(&Rectangle::new([(8, y), (22, y + 14)], color.filled()))
                .map_err(err)?;
            legend
                .draw(&Text::new(name.as_str(), (30, y), label.clone()))
                .map_err(err)?;
        }
        // The group names under their groups, once each.
        let centered = label.pos(Pos::new(HPos::Center, VPos::Top));
        for (i, g) in c.groups.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(i as f64 + 0.5, lo));
            left.draw(&Text::new(g.as_str(), (x, y + 8), centered.clone()))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(log_range(&[]), (1.0, 10.0));
        assert_eq!(
            log_range(&[vec![Some(20.0), None, Some(3000.0)]]),
            (10.0, 10000.0)
        );
        assert_eq!(log_range(&[vec![Some(100.0)]]), (100.0, 1000.0));
    }
}
