//! The loss plots as SVG: whole-number step labels, none cut off at the right edge, and a legend
//! that covers no line or point, wherever the data lies.

use kiln::train::metrics::{plot, plot_runs, Record};
use std::path::Path;

/// What the checks need from an SVG that plotters wrote: its text, the data it drew and the
/// legend's box.
struct Svg {
    width: f64,
    /// (x, y, text-anchor, font size, content)
    texts: Vec<(f64, f64, String, f64, String)>,
    /// Data lines (2 px polylines) and dots (x, y, r), drawn before the legend.
    lines: Vec<Vec<(f64, f64)>>,
    dots: Vec<(f64, f64, f64)>,
    /// The legend's border: x, y, width, height.
    legend: Option<(f64, f64, f64, f64)>,
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    Some(tag[at..at + tag[at..].find('"')?].to_string())
}

fn num(tag: &str, name: &str) -> f64 {
    attr(tag, name).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no number {name} in {tag}"))
}

fn parse(path: &Path) -> Svg {
    let text = std::fs::read_to_string(path).unwrap();
    let mut svg = Svg { width: 0.0, texts: vec![], lines: vec![], dots: vec![], legend: None };
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let tag = line.trim();
        if tag.starts_with("<svg") {
            svg.width = num(tag, "width");
        } else if tag.starts_with("<text") {
            let content = lines.next().unwrap().trim().to_string();
            let anchor = attr(tag, "text-anchor").unwrap_or_default();
            svg.texts.push((num(tag, "x"), num(tag, "y"), anchor, num(tag, "font-size"), content));
        } else if tag.starts_with("<rect") && attr(tag, "fill").as_deref() == Some("none") {
            svg.legend = Some((num(tag, "x"), num(tag, "y"), num(tag, "width"), num(tag, "height")));
        } else if svg.legend.is_none()
            && tag.starts_with("<polyline")
            && attr(tag, "stroke-width").as_deref() == Some("2")
        {
            let points = attr(tag, "points").unwrap();
            let xy = points.split_whitespace().map(|p| {
                let (x, y) = p.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            });
            svg.lines.push(xy.collect());
        } else if svg.legend.is_none() && tag.starts_with("<circle") {
            svg.dots.push((num(tag, "cx"), num(tag, "cy"), num(tag, "r")));
        }
    }
    svg
}

/// The step labels under the x axis (centred numbers), left to right.
fn step_labels(svg: &Svg) -> Vec<&(f64, f64, String, f64, String)> {
    let mut t: Vec<_> = svg.texts.iter().filter(|t| t.2 == "middle" && t.4.parse::<f64>().is_ok()).collect();
    t.sort_by(|a, b| a.0.total_cmp(&b.0));
    t
}

/// Checks the three promises on one plot; `ticks` are labels that must appear.
fn check(path: &Path, ticks: &[&str]) {
    let svg = parse(path);
    let labels = step_labels(&svg);
    let shown: Vec<&str> = labels.iter().map(|t| t.4.as_str()).collect();
    assert!(labels.len() >= 3, "{}: step labels {shown:?}", path.display());
    for t in &labels {
        assert!(
            t.4.parse::<u64>().is_ok(),
            "{}: step label {:?} is not a whole number: {shown:?}",
            path.display(),
            t.4
        );
    }
    let mut unique = shown.clone();
    unique.dedup();
    assert_eq!(unique, shown, "repeated step labels");
    for want in ticks {
        assert!(shown.contains(want), "{}: no step label {want}: {shown:?}", path.display());
    }
    // the last label, centred on its tick, fits inside the image (DejaVu Sans digits are 0.64 em wide)
    let last = labels.last().unwrap();
    let right = last.0 + 0.64 * last.3 * last.4.len() as f64 / 2.0;
    assert!(
        right <= svg.width,
        "{}: step label {:?} runs to x = {right:.0}, past {}",
        path.display(),
        last.4,
        svg.width
    );

    let (lx, ly, lw, lh) = svg.legend.expect("a legend");
    let hit = |x: f64, y: f64, r: f64| x + r >= lx && x - r <= lx + lw && y + r >= ly && y - r <= ly + lh;
    for line in &svg.lines {
        for seg in line.windows(2) {
            for k in 0..=50 {
                let t = k as f64 / 50.0;
                let (x, y) = (seg[0].0 + t * (seg[1].0 - seg[0].0), seg[0].1 + t * (seg[1].1 - seg[0].1));
                assert!(!hit(x, y, 1.0), "{}: a line crosses the legend at ({x:.0}, {y:.0})", path.display());
            }
        }
    }
    for &(x, y, r) in &svg.dots {
        assert!(!hit(x, y, r), "{}: a point at ({x}, {y}) lies under the legend", path.display());
    }
    let names: Vec<&str> = svg.texts.iter().map(|t| t.4.as_str()).collect();
    assert!(!svg.lines.is_empty(), "no data drawn");
    assert!(names.iter().any(|n| ["train", "scratch", "wiggle"].contains(n)), "the legend names the series: {names:?}");
}

fn record(step: usize, loss: Option<f64>, val_loss: Option<f64>) -> Record {
    Record { step, loss, lr: None, grad_norm: None, tokens_per_s: None, val_loss, val_ppl: None, elapsed_s: 0.0 }
}

#[test]
fn loss_plots_label_whole_steps_fit_the_last_label_and_keep_the_legend_off_the_data() {
    let dir = tempfile::tempdir().unwrap();
    // a pre-training curve: falls fast, then flattens near its end value; validation dots
    let mut records: Vec<Record> = (0..=120)
        .map(|i| {
            let step = (i * 10).max(1);
            record(step, Some(1.2 + 5.4 * (-(step as f64) / 60.0).exp()), None)
        })
        .collect();
    records.extend((1..=6).map(|k| record(200 * k, None, Some(1.25 + 2.0 * (-(200.0 * k as f64) / 60.0).exp()))));
    let p = dir.path().join("loss.svg");
    plot(&records, &p, "kiln pretrain: loss").unwrap();
    check(&p, &["0", "200", "1200"]);

    // the comparison: one run ends high, near the middle of the right edge, the others low
    let curve =
        |from: f64, to: f64| (1..=12).map(|k| (25.0 * k as f64, from + (to - from) * k as f64 / 12.0)).collect();
    let runs = vec![
        ("scratch".to_string(), curve(3.0, 2.0)),
        ("full".to_string(), curve(1.5, 1.0)),
        ("lora".to_string(), curve(1.4, 0.95)),
    ];
    let p = dir.path().join("compare.svg");
    plot_runs(&runs, &p, "kiln compare: held-out task loss", "validation loss (nats/token)").unwrap();
    check(&p, &["0", "300"]);

    // a short run: five steps label 0..5 once each
    let short: Vec<Record> = (1..=5).map(|s| record(s, Some(3.0 - 0.3 * s as f64), None)).collect();
    let p = dir.path().join("short.svg");
    plot(&short, &p, "kiln finetune: loss").unwrap();
    check(&p, &["1", "5"]);

    // data through every corner: the legend goes above it
    let wiggle = vec![("wiggle".to_string(), (0..=400).map(|s| (s as f64, 2.0 + (s as f64 / 3.0).sin())).collect())];
    let p = dir.path().join("wiggle.svg");
    plot_runs(&wiggle, &p, "wiggle", "value").unwrap();
    check(&p, &["400"]);
}

#[test]
fn a_series_with_nothing_to_draw_has_no_legend_entry() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("loss.svg");
    let records: Vec<Record> = (1..=30).map(|s| record(s, Some(3.0 / s as f64), None)).collect();
    plot(&records, &p, "kiln finetune: loss").unwrap();
    let texts: Vec<String> = parse(&p).texts.into_iter().map(|t| t.4).collect();
    assert!(texts.iter().any(|t| t == "train"), "{texts:?}");
    assert!(!texts.iter().any(|t| t == "validation"), "a legend entry for no validation points: {texts:?}");
}
