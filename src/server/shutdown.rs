//! How the server answers stop signals. actix-web's own handlers treat Ctrl-C (SIGINT) as a
//! forced stop that drops in-flight requests; here SIGTERM and SIGINT both stop gracefully.

use actix_web::dev::ServerHandle;
use actix_web::web;

use crate::server::state::AppState;
use crate::signals::{Stop, StopSignals, exit_now};

/// Stops `server` on the signals: gracefully on the first SIGTERM or SIGINT (the listener
/// closes, so probes see the server gone, and queued requests run without waiting for
/// company). A second signal during a graceful stop, or SIGQUIT, exits the process at once:
/// actix-web takes no other command until a graceful stop ends.
pub async fn stop_on_signal(
    mut signals: StopSignals,
    server: ServerHandle,
    state: web::Data<AppState>,
    grace_seconds: u64,
) {
    if let Stop::Clean(name) = signals.next().await {
        tracing::info!(
            "{name} received: no new connections; finishing in-flight requests (up to \
             {grace_seconds} s, --shutdown-timeout); another SIGTERM or Ctrl-C exits at once"
        );
        if let Ok(registry) = state.registry() {
            registry.begin_drain();
        }
        // The stop command is sent at once; its completion is what `serve` awaits.
        drop(server.stop(true));
        signals.next().await;
    }
    tracing::warn!("stopping now: in-flight requests get no answer");
    exit_now();
}
