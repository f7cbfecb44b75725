//! Stop signals. actix-web's own handlers treat Ctrl-C (SIGINT) as a forced stop that drops
//! in-flight requests; here SIGTERM and SIGINT both stop gracefully.

use actix_web::dev::ServerHandle;
use anyhow::Context;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// The stop signals, listened to from the moment this is made (so none is missed while the
/// server starts).
pub struct StopSignals {
    terminate: Signal,
    interrupt: Signal,
    quit: Signal,
}

impl StopSignals {
    /// Must run inside the server's runtime.
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

    async fn next(&mut self) -> Received {
        tokio::select! {
            _ = self.terminate.recv() => Received::Stop("SIGTERM"),
            _ = self.interrupt.recv() => Received::Stop("SIGINT"),
            _ = self.quit.recv() => Received::Quit,
        }
    }

    /// Stops `server` on the signals: gracefully on the first SIGTERM or SIGINT (the listener
    /// closes, so probes see the server gone), at once on SIGQUIT. A second signal during a
    /// graceful stop exits the process: actix-web takes no other command until that stop ends.
    pub async fn stop_on_signal(mut self, server: ServerHandle, grace_seconds: u64) {
        match self.next().await {
            Received::Stop(name) => {
                tracing::info!(
                    "{name} received: no new connections; finishing in-flight requests (up to \
                     {grace_seconds} s, --shutdown-timeout); another SIGTERM or Ctrl-C exits at \
                     once"
                );
                // The stop command is sent at once; its completion is what `serve` awaits.
                drop(server.stop(true));
                self.next().await;
                tracing::warn!("second stop signal: exiting now, in-flight requests get no answer");
                std::process::exit(EXIT_FORCED);
            }
            Received::Quit => {
                tracing::warn!("SIGQUIT received: stopping now, in-flight requests get no answer");
                drop(server.stop(false));
            }
        }
    }
}

/// Exit status of a stop forced by a second signal: the shell's code for an interrupt (128 + 2).
const EXIT_FORCED: i32 = 130;

enum Received {
    Stop(&'static str),
    Quit,
}
