//! Progress of long work: a bar on a terminal, and plain lines every few seconds where stderr is
//! not a terminal (a CI log, `nohup`, a pipe), so a log never goes quiet for minutes.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Seconds between plain progress lines (`KILN_PROGRESS_SECS` overrides the default of 5).
fn line_interval() -> Duration {
    static SECS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let s = *SECS.get_or_init(|| {
        std::env::var("KILN_PROGRESS_SECS")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|s| *s >= 0.0)
            .unwrap_or(5.0)
    });
    Duration::from_secs_f64(s)
}

/// What a plain line needs between prints.
struct Lines {
    label: String,
    unit: &'static str,
    len: u64,
    pos: u64,
    msg: String,
    start: Instant,
    /// The position and time of the previous line; the first update always prints.
    last: Option<Instant>,
}

impl Lines {
    fn line(&self) -> String {
        let secs = self.start.elapsed().as_secs_f64();
        let mut s = format!("{}: {}/{} {}", self.label, self.pos, self.len, self.unit);
        if self.len > 0 {
            s.push_str(&format!(" ({:.0}%)", 100.0 * self.pos as f64 / self.len as f64));
        }
        if !self.msg.is_empty() {
            s.push_str(&format!(", {}", self.msg));
        }
        s.push_str(&format!(", {} elapsed", clock(secs)));
        s
    }
}

/// `h:mm:ss` or `m:ss`.
fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

enum Kind {
    Hidden,
    Bar(ProgressBar),
    Lines(Mutex<Lines>),
}

/// A progress report over `len` units of work: a bar, plain lines, or nothing.
pub struct Progress {
    kind: Kind,
}

impl Progress {
    /// Reports nothing when `show` is false; otherwise a bar drawn with `template` (indicatif's
    /// syntax) on a terminal, or a line `label: pos/len unit (p%), msg, elapsed` every few seconds.
    pub fn new(show: bool, label: &str, unit: &'static str, len: u64, template: &str) -> Progress {
        let kind = if !show {
            Kind::Hidden
        } else if std::io::stderr().is_terminal() {
            let style = ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar());
            Kind::Bar(ProgressBar::new(len).with_style(style))
        } else {
            Kind::Lines(Mutex::new(Lines {
                label: label.to_string(),
                unit,
                len,
                pos: 0,
                msg: String::new(),
                start: Instant::now(),
                last: None,
            }))
        };
        Progress { kind }
    }

    pub fn set_message(&self, msg: String) {
        match &self.kind {
            Kind::Bar(b) => b.set_message(msg),
            Kind::Lines(l) => l.lock().unwrap_or_else(|e| e.into_inner()).msg = msg,
            Kind::Hidden => {}
        }
    }

    pub fn set_position(&self, pos: u64) {
        match &self.kind {
            Kind::Bar(b) => b.set_position(pos),
            Kind::Lines(l) => {
                let mut l = l.lock().unwrap_or_else(|e| e.into_inner());
                l.pos = pos;
                Self::maybe_print(&mut l, false);
            }
            Kind::Hidden => {}
        }
    }

    /// Adds `n` to the position (safe from several threads).
    pub fn inc(&self, n: u64) {
        match &self.kind {
            Kind::Bar(b) => b.inc(n),
            Kind::Lines(l) => {
                let mut l = l.lock().unwrap_or_else(|e| e.into_inner());
                l.pos += n;
                Self::maybe_print(&mut l, false);
            }
            Kind::Hidden => {}
        }
    }

    fn maybe_print(l: &mut Lines, force: bool) {
        let due = l.last.is_none_or(|t| t.elapsed() >= line_interval());
        if force || due {
            eprintln!("{}", l.line());
            l.last = Some(Instant::now());
        }
    }

    /// Prints `msg` above the bar (or as its own line).
    pub fn println(&self, msg: &str) {
        match &self.kind {
            Kind::Bar(b) => b.println(msg),
            _ => println!("{msg}"),
        }
    }

    /// Ends the report: the bar is cleared; plain lines print the final position.
    pub fn finish(&self) {
        match &self.kind {
            Kind::Bar(b) => b.finish_and_clear(),
            Kind::Lines(l) => {
                let mut l = l.lock().unwrap_or_else(|e| e.into_inner());
                if l.last.is_some() {
                    Self::maybe_print(&mut l, true);
                }
            }
            Kind::Hidden => {}
        }
    }

    /// Ends the report where it stands (an error or an interrupt), leaving the bar visible.
    pub fn abandon(&self) {
        if let Kind::Bar(b) = &self.kind {
            b.abandon();
        }
    }
}

/// A report for work of unknown length (training a tokenizer): a spinner on a terminal, or a
/// line every few seconds saying it is still going. It stops when dropped.
pub struct Ticker {
    bar: Option<ProgressBar>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    pub fn new(show: bool, what: &str) -> Ticker {
        let stop = Arc::new(AtomicBool::new(false));
        if !show {
            return Ticker { bar: None, stop, thread: None };
        }
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_message(what.to_string());
            bar.enable_steady_tick(Duration::from_millis(120));
            return Ticker { bar: Some(bar), stop, thread: None };
        }
        eprintln!("{what} ...");
        let (flag, what, start) = (stop.clone(), what.to_string(), Instant::now());
        let thread = std::thread::spawn(move || {
            let mut last = Instant::now();
            while !flag.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
                if last.elapsed() >= line_interval().max(Duration::from_millis(100)) {
                    eprintln!("{what}: still going, {} elapsed", clock(start.elapsed().as_secs_f64()));
                    last = Instant::now();
                }
            }
        });
        Ticker { bar: None, stop, thread: Some(thread) }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
