//! Metrics as JSON lines (one object per logged step or evaluation) and the loss-curve plot
//! (SVG, drawn with plotters) made from them.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// One line of metrics.jsonl.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub step: usize,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tokens_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_ppl: Option<f64>,
    pub elapsed_s: f64,
}

/// Reads metrics.jsonl (an absent file is an empty history).
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(Error::read(path, e)),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::malformed(path, "metrics file", format!("line {}: {e}", i + 1)))
        })
        .collect()
}

/// Appends records to metrics.jsonl.
pub fn append(path: &Path, records: &[Record]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::write(path, e))?;
    for r in records {
        let line = serde_json::to_string(r).expect("a record serialises");
        writeln!(f, "{line}").map_err(|e| Error::write(path, e))?;
    }
    Ok(())
}

/// Keeps only the records up to `step` (a resumed run rewrites what came after its checkpoint).
pub fn truncate_after(path: &Path, step: usize) -> Result<()> {
    let keep: Vec<Record> = read(path)?.into_iter().filter(|r| r.step <= step).collect();
    let mut text = String::new();
    for r in &keep {
        text.push_str(&serde_json::to_string(r).expect("a record serialises"));
        text.push('\n');
    }
    crate::io::write_atomic(path, |w| w.write_all(text.as_bytes()))
}

/// Draws training loss (line) and validation loss (points) against the step into an SVG.
pub fn plot(records: &[Record], path: &Path, title: &str) -> Result<()> {
    let train: Vec<(f64, f64)> = records.iter().filter_map(|r| r.loss.map(|l| (r.step as f64, l))).collect();
    let val: Vec<(f64, f64)> = records.iter().filter_map(|r| r.val_loss.map(|l| (r.step as f64, l))).collect();
    render(path, title, "loss (nats/token)", &[("train".into(), train)], &[("validation".into(), val)])
}

/// Draws several named curves (step, value) into one SVG: the comparison plot.
pub fn plot_runs(series: &[(String, Vec<(f64, f64)>)], path: &Path, title: &str, y_desc: &str) -> Result<()> {
    render(path, title, y_desc, series, &[])
}

type Series = (String, Vec<(f64, f64)>);

/// The chart's layout in pixels: the legend is placed from where the data falls in it.
const WIDTH: u32 = 900;
const HEIGHT: u32 = 540;
const MARGIN: u32 = 12;
/// Room right of the plot for half of the last step label ("12000" at 14 px is ~40 px wide).
const MARGIN_RIGHT: u32 = 30;
const X_LABELS: u32 = 40;
const Y_LABELS: u32 = 56;
/// The caption's height at the title's font size.
const CAPTION: u32 = 28;
const LEGEND_FONT: u32 = 14;
/// Radius of a point series' dots.
const DOT: i32 = 4;

/// A corner of the plot for the legend, in the order tried.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Corner {
    UpperRight,
    UpperLeft,
    LowerRight,
    LowerLeft,
}

/// Where the legend goes: the first corner whose box no line, segment or dot reaches, with the
/// plot's y range; or, when every corner is taken, the upper right with the top of the y range
/// raised until the data stays below the box. The data is given in plot fractions (0..1 each way).
fn legend_place(lines: &[Vec<(f64, f64)>], dots: &[Vec<(f64, f64)>], labels: &[&str]) -> (Corner, f64) {
    let (w, h) = ((WIDTH - MARGIN - MARGIN_RIGHT - Y_LABELS) as f64, (HEIGHT - 2 * MARGIN - CAPTION - X_LABELS) as f64);
    // plotters sets the box 5 px in from the corner: text, a 30 px symbol column, 10 px margins;
    // text is estimated at 0.6 em a character (a little wider than plotters' own estimate)
    let chars = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0) as f64;
    let font = LEGEND_FONT as f64 / 1.24;
    let (bw, bh) = (5.0 + 50.0 + 0.6 * font * chars + 6.0, 5.0 + 20.0 + 1.25 * font * labels.len() as f64 + 6.0);
    let (fw, fh) = ((bw / w).min(1.0), (bh / h).min(1.0));
    let (rx, ry) = (DOT as f64 / w, DOT as f64 / h);
    let inside = |c: Corner, (x, y): (f64, f64), (px, py): (f64, f64)| {
        let in_x = match c {
            Corner::UpperRight | Corner::LowerRight => x + px >= 1.0 - fw,
            Corner::UpperLeft | Corner::LowerLeft => x - px <= fw,
        };
        let in_y = match c {
            Corner::UpperRight | Corner::UpperLeft => y + py >= 1.0 - fh,
            Corner::LowerRight | Corner::LowerLeft => y - py <= fh,
        };
        in_x && in_y
    };
    let free = |c: Corner| {
        let on_lines = lines.iter().any(|s| {
            s.windows(2).any(|p| {
                (0..=32).any(|k| {
                    let t = k as f64 / 32.0;
                    inside(c, (p[0].0 + t * (p[1].0 - p[0].0), p[0].1 + t * (p[1].1 - p[0].1)), (0.0, 0.0))
                })
            }) || s.iter().any(|&p| inside(c, p, (0.0, 0.0)))
        });
        !on_lines && !dots.iter().flatten().any(|&p| inside(c, p, (rx, ry)))
    };
    let corners = [Corner::UpperRight, Corner::UpperLeft, Corner::LowerRight, Corner::LowerLeft];
    match corners.into_iter().find(|&c| free(c)) {
        Some(c) => (c, 1.0),
        None => {
            let top = lines.iter().chain(dots).flatten().map(|p| p.1 + ry).fold(0.0, f64::max);
            (Corner::UpperRight, top / (1.0 - fh).max(0.05))
        }
    }
}

/// One SVG chart against the step: `lines` drawn as lines, `points` as dots, colours in order,
/// written to a temporary file and renamed. Steps are whole numbers and label as such; the legend
/// sits where it covers no data. Non-finite values are left out, and so is a series with nothing
/// left to draw; nothing is written when there is nothing to draw at all.
fn render(path: &Path, title: &str, y_desc: &str, lines: &[Series], points: &[Series]) -> Result<()> {
    use plotters::prelude::*;
    let finite = |s: &'_ Series| s.1.iter().copied().filter(|p| p.1.is_finite()).collect::<Vec<_>>();
    // a series with nothing to draw (no evaluation yet) gets no legend entry either
    let (lines, points): (Vec<_>, Vec<_>) = (
        lines.iter().map(|s| (s.0.as_str(), finite(s))).filter(|s| !s.1.is_empty()).collect(),
        points.iter().map(|s| (s.0.as_str(), finite(s))).filter(|s| !s.1.is_empty()).collect(),
    );
    let all = || lines.iter().chain(&points).flat_map(|(_, s)| s.iter());
    if all().next().is_none() {
        return Ok(());
    }
    let x_max = all().map(|p| p.0.round() as u64).fold(1, u64::max);
    let y_max = all().map(|p| p.1).fold(0.0, f64::max) * 1.05;
    let y_min = all().map(|p| p.1).fold(f64::INFINITY, f64::min).min(y_max) * 0.95;
    let y_max = y_max.max(y_min + 1e-3);
    let frac = |s: &[(f64, f64)]| s.iter().map(|p| (p.0 / x_max as f64, (p.1 - y_min) / (y_max - y_min))).collect();
    let labels: Vec<&str> = lines.iter().chain(&points).map(|s| s.0).collect();
    let (corner, top) = legend_place(
        &lines.iter().map(|s| frac(&s.1)).collect::<Vec<_>>(),
        &points.iter().map(|s| frac(&s.1)).collect::<Vec<_>>(),
        &labels,
    );
    let y_top = y_min + top.max(1.0) * (y_max - y_min);
    let colours = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    let step = |p: &(f64, f64)| (p.0.round() as u64, p.1);
    let tmp = path.with_extension("svg.tmp");
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(&tmp, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(MARGIN)
            .margin_right(MARGIN_RIGHT)
            .x_label_area_size(X_LABELS)
            .y_label_area_size(Y_LABELS)
            .build_cartesian_2d(0..x_max, y_min..y_top)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(y_desc)
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .draw()?;
        for (i, (name, s)) in lines.iter().enumerate() {
            let c = colours[i % colours.len()];
            chart
                .draw_series(LineSeries::new(s.iter().map(step), c.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        }
        for (j, (name, s)) in points.iter().enumerate() {
            let c = colours[(lines.len() + j) % colours.len()];
            chart
                .draw_series(s.iter().map(|p| Circle::new(step(p), DOT, c.filled())))?
                .label(*name)
                .legend(move |(x, y)| Circle::new((x + 9, y), DOT, c.filled()));
        }
        let position = match corner {
            Corner::UpperRight => SeriesLabelPosition::UpperRight,
            Corner::UpperLeft => SeriesLabelPosition::UpperLeft,
            Corner::LowerRight => SeriesLabelPosition::LowerRight,
            Corner::LowerLeft => SeriesLabelPosition::LowerLeft,
        };
        chart
            .configure_series_labels()
            .position(position)
            .label_font(("sans-serif", LEGEND_FONT))
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| Error::write(path, std::io::Error::other(e.to_string())))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::write(path, e))
}
