//! A one-line progress display on stderr: redrawn with `\r` on a terminal, a line at the start
//! and the end of each step otherwise (so CI logs stay short).

use std::io::{IsTerminal as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

const REDRAW: Duration = Duration::from_millis(200);

/// The progress of one step; clone the counter into tasks, [`Progress::finish`] at the end.
#[derive(Debug)]
pub struct Progress {
    label: String,
    total: u64,
    done: Arc<AtomicU64>,
    started: Instant,
    painter: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts showing `label` with `done/total` (a total of 0 shows only the count).
    pub fn start(label: impl Into<String>, total: u64) -> Progress {
        let label = label.into();
        let done = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let painter = if std::io::stderr().is_terminal() {
            let (label, done) = (label.clone(), Arc::clone(&done));
            Some(tokio::spawn(async move {
                loop {
                    paint(&label, done.load(Ordering::Relaxed), total, started, false);
                    tokio::time::sleep(REDRAW).await;
                }
            }))
        } else {
            eprintln!("{label} ...");
            None
        };
        Progress { label, total, done, started, painter }
    }

    /// A counter that tasks increment as they complete work.
    pub fn counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.done)
    }

    pub fn add(&self, amount: u64) {
        self.done.fetch_add(amount, Ordering::Relaxed);
    }

    pub fn set(&self, value: u64) {
        self.done.store(value, Ordering::Relaxed);
    }

    pub fn finish(mut self) {
        let interactive = self.painter.is_some();
        if let Some(painter) = self.painter.take() {
            painter.abort();
        }
        let done = self.done.load(Ordering::Relaxed);
        if interactive {
            paint(&self.label, done, self.total, self.started, true);
        } else {
            eprintln!("{}", status(&self.label, done, self.total, self.started));
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(painter) = self.painter.take() {
            painter.abort();
            eprintln!();
        }
    }
}

fn status(label: &str, done: u64, total: u64, started: Instant) -> String {
    let count = if total > 0 { format!("{done}/{total}") } else { done.to_string() };
    format!("{label}: {count} ({:.1} s)", started.elapsed().as_secs_f64())
}

/// Redraws the line; `last` ends it with a newline.
fn paint(label: &str, done: u64, total: u64, started: Instant, last: bool) {
    let mut stderr = std::io::stderr().lock();
    let _ = write!(stderr, "\r\x1b[2K{}", status(label, done, total, started));
    let _ = if last { writeln!(stderr) } else { stderr.flush() };
}
