//! `convert -p`: a redrawn bar with rate and ETA on a terminal; plain periodic lines otherwise
//! (so a task log shows them).

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::common::human_size;

/// Minimum time between redraws of the terminal bar.
const TTY_INTERVAL: Duration = Duration::from_millis(200);
/// Minimum time between plain progress lines, unless another 10 % is done first.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Percentage step that prints a plain line even before [`LOG_INTERVAL`].
const LOG_STEP_PERCENT: f64 = 10.0;

struct State {
    start: Instant,
    last_print: Option<Instant>,
    last_percent: f64,
    last_done: u64,
    finished: bool,
}

/// Renders progress to stderr.
pub struct ProgressPrinter {
    tty: bool,
    state: Mutex<State>,
}

impl ProgressPrinter {
    pub fn new() -> Self {
        ProgressPrinter {
            tty: std::io::stderr().is_terminal(),
            state: Mutex::new(State {
                start: Instant::now(),
                last_print: None,
                last_percent: -LOG_STEP_PERCENT,
                last_done: 0,
                finished: false,
            }),
        }
    }

    pub fn update(&self, done: u64, total: u64) {
        let Ok(mut s) = self.state.lock() else { return };
        let now = Instant::now();
        let percent = if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 };
        let complete = done >= total;
        let due = match s.last_print {
            None => true,
            Some(t) if self.tty => now - t >= TTY_INTERVAL || complete,
            Some(t) => now - t >= LOG_INTERVAL || percent - s.last_percent >= LOG_STEP_PERCENT || complete,
        };
        if !due || (complete && s.finished) {
            return;
        }
        let elapsed = (now - s.start).as_secs_f64().max(1e-6);
        let rate = done as f64 / elapsed;
        let eta = if rate > 0.0 && !complete { Some(((total - done) as f64 / rate) as u64) } else { None };
        let eta = eta.map_or(String::new(), |e| format!(", ETA {}:{:02}:{:02}", e / 3600, e / 60 % 60, e % 60));
        let line = format!(
            "    ({percent:.2}/100%) {} of {}, {}/s{eta}",
            human_size(done),
            human_size(total),
            human_size(rate as u64)
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r{line}\x1b[K");
            if complete {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{}", line.trim_start());
        }
        let _ = err.flush();
        s.last_print = Some(now);
        s.last_percent = percent;
        s.last_done = done;
        s.finished |= complete;
    }

    /// End the bar's line if the copy stopped before completing.
    pub fn finish(&self) {
        let Ok(s) = self.state.lock() else { return };
        if self.tty && !s.finished && s.last_print.is_some() {
            let _ = writeln!(std::io::stderr());
        }
        let _ = s.last_done;
    }
}
