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

/// One SVG chart against the step: `lines` drawn as lines, `points` as dots, colours in order,
/// written to a temporary file and renamed. Non-finite values are left out; nothing is written
/// when there is nothing to draw.
fn render(path: &Path, title: &str, y_desc: &str, lines: &[Series], points: &[Series]) -> Result<()> {
    use plotters::prelude::*;
    let finite = |s: &'_ Series| s.1.iter().copied().filter(|p| p.1.is_finite()).collect::<Vec<_>>();
    let (lines, points): (Vec<_>, Vec<_>) = (
        lines.iter().map(|s| (s.0.as_str(), finite(s))).collect(),
        points.iter().map(|s| (s.0.as_str(), finite(s))).collect(),
    );
    let all = || lines.iter().chain(&points).flat_map(|(_, s)| s.iter());
    if all().next().is_none() {
        return Ok(());
    }
    let x_max = all().map(|p| p.0).fold(1.0, f64::max);
    let y_max = all().map(|p| p.1).fold(0.0, f64::max) * 1.05;
    let y_min = all().map(|p| p.1).fold(f64::INFINITY, f64::min).min(y_max) * 0.95;
    let colours = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    let tmp = path.with_extension("svg.tmp");
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(&tmp, (900, 540)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..x_max, y_min..y_max.max(y_min + 1e-3))?;
        chart.configure_mesh().x_desc("step").y_desc(y_desc).draw()?;
        for (i, (name, s)) in lines.iter().enumerate() {
            let c = colours[i % colours.len()];
            chart
                .draw_series(LineSeries::new(s.iter().copied(), c.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        }
        for (j, (name, s)) in points.iter().enumerate() {
            let c = colours[(lines.len() + j) % colours.len()];
            chart
                .draw_series(s.iter().map(|&p| Circle::new(p, 4, c.filled())))?
                .label(*name)
                .legend(move |(x, y)| Circle::new((x + 9, y), 4, c.filled()));
        }
        chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| Error::write(path, std::io::Error::other(e.to_string())))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::write(path, e))
}
