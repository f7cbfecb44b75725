//! Keeps a library's error lines from flooding the log. actix-http logs every malformed
//! request at ERROR ("stream error: ...") before any of our code sees it, so a client sending
//! garbage in a loop would write thousands of lines a second. It logs through the `log` crate:
//! its lines arrive as events of the `log` bridge, whose own target is only "log".

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::layer::{Context, Layer};

/// Events dropped by every limit since the last `take_left_out`.
static LEFT_OUT: AtomicU64 = AtomicU64::new(0);

/// How many library lines were left out since the last call (the server logs the count now
/// and then, so a flood shows its size).
pub fn take_left_out() -> u64 {
    LEFT_OUT.swap(0, Ordering::Relaxed)
}

/// Lets through at most one ERROR or WARN event a second from targets under `prefix`; the
/// others are dropped for every layer, and counted. Other events pass untouched.
pub struct LibraryErrorLimit {
    prefix: &'static str,
    every: Duration,
    last: Mutex<Option<Instant>>,
}

impl LibraryErrorLimit {
    pub fn new(prefix: &'static str) -> LibraryErrorLimit {
        LibraryErrorLimit {
            prefix,
            every: Duration::from_secs(1),
            last: Mutex::new(None),
        }
    }
}

impl<S: Subscriber> Layer<S> for LibraryErrorLimit {
    fn event_enabled(&self, event: &Event<'_>, _: Context<'_, S>) -> bool {
        let bridged = event.normalized_metadata();
        let metadata = bridged.as_ref().unwrap_or_else(|| event.metadata());
        if *metadata.level() > Level::WARN || !metadata.target().starts_with(self.prefix) {
            return true;
        }
        let now = Instant::now();
        let mut last = self.last.lock().expect("log limit lock");
        if last.is_some_and(|at| now.duration_since(at) < self.every) {
            LEFT_OUT.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        *last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Counts the events that reach it.
    struct Count(Arc<AtomicUsize>);

    impl<S: Subscriber> Layer<S> for Count {
        fn on_event(&self, _: &Event<'_>, _: Context<'_, S>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_burst_of_library_errors_logs_one_line_and_other_lines_all_pass() {
        let seen = Arc::new(AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry()
            .with(LibraryErrorLimit::new("actix_http"))
            .with(Count(seen.clone()));
        tracing::subscriber::with_default(subscriber, || {
            // As actix-http logs: through the `log` crate and its bridge.
            let bridged = |level, target| {
                let record = log::Record::builder()
                    .level(level)
                    .target(target)
                    .args(format_args!("stream error: request parse error"))
                    .build();
                tracing_log::format_trace(&record).unwrap();
            };
            for _ in 0..100 {
                bridged(log::Level::Error, "actix_http::h1::dispatcher");
            }
            for _ in 0..100 {
                tracing::error!(target: "actix_http::h1::dispatcher", "stream error");
            }
            assert_eq!(seen.load(Ordering::Relaxed), 1);
            assert_eq!(take_left_out(), 199);
            for _ in 0..10 {
                tracing::error!(target: "linescan::server", "ours");
                bridged(log::Level::Error, "actix_server::worker");
                bridged(log::Level::Info, "actix_http::h1::dispatcher");
            }
            assert_eq!(seen.load(Ordering::Relaxed), 31);
        });
    }
}
