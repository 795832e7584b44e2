//! A `pv`-like progress line on stderr.

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::time::Duration;

/// A progress line updated from a polling closure until dropped.
pub struct Progress {
    bar: ProgressBar,
    task: tokio::task::JoinHandle<()>,
    poll: std::sync::Arc<dyn Fn() -> Snapshot + Send + Sync>,
}

/// What to show: bytes so far, and a note such as the backlog or the lag.
pub struct Snapshot {
    pub bytes: u64,
    pub note: String,
}

impl Progress {
    /// Starts updating a progress line ten times a second from `poll`.
    pub fn start(poll: impl Fn() -> Snapshot + Send + Sync + 'static) -> Self {
        let poll: std::sync::Arc<dyn Fn() -> Snapshot + Send + Sync> = std::sync::Arc::new(poll);
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(10));
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {bytes:>11} {binary_bytes_per_sec:>13} {elapsed_precise} {msg}",
            )
            .expect("valid template"),
        );
        let (shown, polled) = (bar.clone(), poll.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                show(&shown, polled());
            }
        });
        Self { bar, task, poll }
    }

    /// Stops updating and leaves the final figures on screen.
    pub fn finish(self) {
        self.task.abort();
        show(&self.bar, (self.poll)());
        self.bar.abandon();
    }
}

fn show(bar: &ProgressBar, s: Snapshot) {
    bar.set_position(s.bytes);
    bar.set_message(s.note);
}

/// Formats a byte count for a progress note.
pub fn bytes(n: u64) -> String {
    HumanBytes(n).to_string()
}
