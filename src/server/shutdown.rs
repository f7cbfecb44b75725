//! How the server answers stop signals. actix-web's own handlers treat Ctrl-C (SIGINT) as a
//! forced stop that drops in-flight requests; here SIGTERM and SIGINT both stop gracefully.

use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use actix_web::web;

use crate::server::state::AppState;
use crate::signals::{StopWatch, exit_now};

/// Stops `server` gracefully on the first SIGTERM or SIGINT: the listener closes, so probes
/// see the server gone, and queued requests run without waiting for company. A second signal
/// during a graceful stop, or SIGQUIT, exits the process at once (`StopWatch`): actix-web
/// takes no other command until a graceful stop ends.
pub async fn stop_on_signal(
    stop: StopWatch,
    server: ServerHandle,
    state: web::Data<AppState>,
    grace_seconds: u64,
) {
    let name = stop.wait().await;
    tracing::info!(
        "{name} received: no new connections; finishing in-flight requests (up to \
         {grace_seconds} s, --shutdown-timeout); another SIGTERM or Ctrl-C exits at once"
    );
    if let Ok(registry) = state.registry() {
        registry.begin_drain();
    }
    // The stop command is sent at once; its completion is what `serve` awaits.
    drop(server.stop(true));
}

/// Waits up to `grace_seconds` for a model loader still at work (a stop during start-up):
/// exiting under it tears ONNX Runtime down beneath a warm-up run. A loader that does not end
/// in time is left to the process's immediate exit.
pub fn await_loader(loader: &std::thread::JoinHandle<()>, grace_seconds: u64) {
    if loader.is_finished() {
        return;
    }
    tracing::info!(
        "waiting for the session being loaded to finish its warm-up (up to {grace_seconds} s, \
         --shutdown-timeout; the models left are not loaded); another SIGTERM or Ctrl-C exits \
         at once"
    );
    let deadline = Instant::now() + Duration::from_secs(grace_seconds);
    while !loader.is_finished() {
        if Instant::now() >= deadline {
            tracing::warn!("model loading did not end within {grace_seconds} s: stopping now");
            exit_now();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
