//! Progress of long operator work: a bar on a terminal, structured lines otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Reports `done / total` of a long job.
#[derive(Debug)]
pub struct Progress {
    label: &'static str,
    total: u64,
    bar: Option<ProgressBar>,
    /// Where this run started (a resumed job does not count what an earlier run did).
    base: u64,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    pub fn new(label: &'static str, total: u64) -> Self {
        Progress::resumed(label, total, 0)
    }

    /// A job that an earlier run took to `done` already.
    pub fn resumed(label: &'static str, total: u64, done: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{msg} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_message(label);
            bar.set_position(done);
            bar.reset_eta();
            bar
        });
        Progress {
            label,
            total,
            bar,
            base: done,
            started: Instant::now(),
            last_line: Instant::now(),
        }
    }

    pub fn set(&mut self, done: u64) {
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None if self.last_line.elapsed() >= Duration::from_secs(5) => {
                self.last_line = Instant::now();
                let rate = done.saturating_sub(self.base) as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
                let eta_seconds = (rate > 0.0).then(|| (self.total.saturating_sub(done) as f64 / rate).round());
                tracing::info!(
                    job = self.label,
                    done,
                    total = self.total,
                    per_second = rate.round(),
                    eta_seconds,
                    "progress"
                );
            }
            None => {}
        }
    }

    /// A job whose end moves (a replay tailing the head).
    pub fn set_total(&mut self, total: u64) {
        self.total = total;
        if let Some(bar) = &self.bar {
            bar.set_length(total);
        }
    }

    /// Ends the bar and returns the elapsed time.
    pub fn finish(self) -> Duration {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        self.started.elapsed()
    }
}
