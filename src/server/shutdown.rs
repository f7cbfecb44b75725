//! How the server answers stop signals. actix-web's own handlers treat Ctrl-C (SIGINT) as a
//! forced stop that drops in-flight requests; here SIGTERM and SIGINT both stop gracefully.

use actix_web::dev::ServerHandle;

use crate::signals::{EXIT_INTERRUPTED, Stop, StopSignals};

/// Stops `server` on the signals: gracefully on the first SIGTERM or SIGINT (the listener
/// closes, so probes see the server gone), at once on SIGQUIT. A second signal during a
/// graceful stop exits the process: actix-web takes no other command until that stop ends.
pub async fn stop_on_signal(mut signals: StopSignals, server: ServerHandle, grace_seconds: u64) {
    match signals.next().await {
        Stop::Clean(name) => {
            tracing::info!(
                "{name} received: no new connections; finishing in-flight requests (up to \
                 {grace_seconds} s, --shutdown-timeout); another SIGTERM or Ctrl-C exits at once"
            );
            // The stop command is sent at once; its completion is what `serve` awaits.
            drop(server.stop(true));
            signals.next().await;
            tracing::warn!("second stop signal: exiting now, in-flight requests get no answer");
            std::process::exit(EXIT_INTERRUPTED);
        }
        Stop::Now => {
            tracing::warn!("SIGQUIT received: stopping now, in-flight requests get no answer");
            drop(server.stop(false));
        }
    }
}
