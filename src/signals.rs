//! The stop signals every long-running command answers: SIGTERM and SIGINT ask for a clean
//! stop, SIGQUIT for an immediate one. Listening starts when `StopSignals` is made, so a signal
//! that arrives before anyone awaits it is not lost (nor does it kill the process outright).

use anyhow::Context;
use tokio::signal::unix::{Signal, SignalKind, signal};

pub struct StopSignals {
    terminate: Signal,
    interrupt: Signal,
    quit: Signal,
}

/// What a stop signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM or SIGINT (named): finish cleanly.
    Clean(&'static str),
    /// SIGQUIT: stop now.
    Now,
}

/// Exit status of a run cut short by a signal: the shell's code for an interrupt (128 + 2).
pub const EXIT_INTERRUPTED: i32 = 130;

/// Ends the process at once with `EXIT_INTERRUPTED`, running no exit handlers: those tear ONNX
/// Runtime down under batches still running, which then fail and answer their callers 500.
pub fn exit_now() -> ! {
    // SAFETY: _exit takes no pointers and does not return.
    unsafe { libc::_exit(EXIT_INTERRUPTED) }
}

impl StopSignals {
    /// Must run inside a tokio runtime.
    pub fn listen() -> anyhow::Result<StopSignals> {
        let listen = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("cannot listen for {name}"))
        };
        Ok(StopSignals {
            terminate: listen(SignalKind::terminate(), "SIGTERM")?,
            interrupt: listen(SignalKind::interrupt(), "SIGINT")?,
            quit: listen(SignalKind::quit(), "SIGQUIT")?,
        })
    }

    /// The next stop signal.
    pub async fn next(&mut self) -> Stop {
        tokio::select! {
            _ = self.terminate.recv() => Stop::Clean("SIGTERM"),
            _ = self.interrupt.recv() => Stop::Clean("SIGINT"),
            _ = self.quit.recv() => Stop::Now,
        }
    }
}
