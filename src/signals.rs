//! The stop signals every long-running command answers: the first SIGTERM or SIGINT asks for a
//! clean stop, a second one or SIGQUIT for an immediate one.

use std::sync::{Arc, OnceLock};

use anyhow::Context;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::Notify;

/// Exit status of a run cut short by a signal: the shell's code for an interrupt (128 + 2).
pub const EXIT_INTERRUPTED: u8 = 130;

/// Ends the process at once with `EXIT_INTERRUPTED`, running no exit handlers: those tear ONNX
/// Runtime down under batches still running, which then fail and answer their callers 500.
pub fn exit_now() -> ! {
    // SAFETY: _exit takes no pointers and does not return.
    unsafe { libc::_exit(EXIT_INTERRUPTED.into()) }
}

/// The error of a command cut short by a clean stop: `main` prints it and exits with
/// `EXIT_INTERRUPTED` instead of the status of a failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Interrupted(pub String);

/// Watches the stop signals on a thread of its own for the rest of the process, so they are
/// answered whatever the work's runtimes are doing (even while one is being torn down). The
/// first SIGTERM or SIGINT is recorded for the work to stop cleanly at its next step; a second
/// one, or SIGQUIT, exits at once with `exit_now`. Listening starts before `start` returns, so
/// a signal that arrives before anyone asks is not lost (nor does it kill the process outright).
#[derive(Clone)]
pub struct StopWatch(Arc<Requested>);

#[derive(Default)]
struct Requested {
    /// The name of the signal that asked for the clean stop.
    by: OnceLock<&'static str>,
    changed: Notify,
    /// Run just before an immediate exit.
    last_words: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl StopWatch {
    pub fn start() -> anyhow::Result<StopWatch> {
        let requested = Arc::new(Requested::default());
        let watched = requested.clone();
        let (listening, result) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("stop-signals".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = listening.send(Err(anyhow::Error::new(error)));
                        return;
                    }
                };
                runtime.block_on(async {
                    let mut signals = match Signals::listen() {
                        Ok(signals) => signals,
                        Err(error) => {
                            let _ = listening.send(Err(error));
                            return;
                        }
                    };
                    let _ = listening.send(Ok(()));
                    let mut name = signals.next().await;
                    if name != QUIT {
                        let _ = watched.by.set(name);
                        watched.changed.notify_waiters();
                        name = signals.next().await;
                    }
                    tracing::warn!("{name}: stopping now; work in flight is abandoned");
                    if let Some(last_words) = watched.last_words.get() {
                        last_words();
                    }
                    exit_now();
                })
            })
            .context("cannot start the stop-signal thread")?;
        result
            .recv()
            .context("the stop-signal thread ended before listening")??;
        Ok(StopWatch(requested))
    }

    /// Sets what runs just before an immediate exit (once; a second call is ignored). It must
    /// be quick and must not wait on the work being abandoned.
    pub fn before_exit_now(&self, last_words: impl Fn() + Send + Sync + 'static) {
        let _ = self.0.last_words.set(Box::new(last_words));
    }

    /// The signal that asked for a clean stop, if one has.
    pub fn requested(&self) -> Option<&'static str> {
        self.0.by.get().copied()
    }

    /// Waits for a clean stop to be asked for and names the signal.
    pub async fn wait(&self) -> &'static str {
        loop {
            // Registered before the check, so a signal between the two still wakes it.
            let changed = self.0.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(name) = self.requested() {
                return name;
            }
            changed.await;
        }
    }
}

/// The signal that asks for an immediate stop.
const QUIT: &str = "SIGQUIT";

struct Signals {
    terminate: Signal,
    interrupt: Signal,
    quit: Signal,
}

impl Signals {
    /// Must run inside a tokio runtime.
    fn listen() -> anyhow::Result<Signals> {
        let listen = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("cannot listen for {name}"))
        };
        Ok(Signals {
            terminate: listen(SignalKind::terminate(), "SIGTERM")?,
            interrupt: listen(SignalKind::interrupt(), "SIGINT")?,
            quit: listen(SignalKind::quit(), "SIGQUIT")?,
        })
    }

    /// The name of the next stop signal.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.quit.recv() => QUIT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_stop_is_seen_by_waiters_and_by_polling() {
        let watch = StopWatch::start().unwrap();
        assert_eq!(watch.requested(), None);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let waiter = watch.clone();
        let name = runtime.block_on(async move {
            let waiting = tokio::spawn(async move { waiter.wait().await });
            // SAFETY: raise takes no pointers; SIGTERM is handled by the watch thread.
            unsafe { libc::raise(libc::SIGTERM) };
            waiting.await.unwrap()
        });
        assert_eq!(name, "SIGTERM");
        assert_eq!(watch.requested(), Some("SIGTERM"));
    }
}
