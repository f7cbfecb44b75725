//! What the outermost middleware records of every response: its count and latency by route in
//! `/metrics`, and for a failure a log line with the route, the status and the error the client
//! was given. Server errors (5xx) and refused API keys are logged at WARN, other client errors at
//! DEBUG; at most one line per route and status a second, so a flood of 503s cannot flood the
//! log (the line after a pause says how many were not logged). The readiness probe's 503 while
//! models load is counted but not logged. Requests actix-web refuses itself (malformed ones)
//! never reach this middleware: its own lines are limited by `log_limit`, and their count is
//! logged here every 10 s.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::HttpResponse;
use actix_web::dev::ServiceResponse;
use actix_web::http::StatusCode;

use crate::metrics::Metrics;

/// How often the count of actix-web's left-out lines is logged.
const LIBRARY_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Logs, every `LIBRARY_REPORT_INTERVAL` in which there were some, how many of actix-web's own
/// error lines `log_limit` left out: a flood of malformed requests shows its size. Runs until
/// the server's runtime ends.
pub async fn report_library_lines_left_out() {
    let mut every = tokio::time::interval(LIBRARY_REPORT_INTERVAL);
    loop {
        every.tick().await;
        let left_out = crate::log_limit::take_left_out();
        if left_out > 0 {
            tracing::warn!(
                left_out,
                "actix-web error lines left out in the last {} s (at most one a second is \
                 logged, e.g. one per malformed request)",
                LIBRARY_REPORT_INTERVAL.as_secs()
            );
        }
    }
}

/// The error text of an error response, kept on it for the log (its body is already JSON).
pub struct ErrorText(pub String);

/// Puts `text` on `response` for the access log.
pub fn attach_error_text(response: &mut HttpResponse, text: String) {
    response.extensions_mut().insert(ErrorText(text));
}

/// The least time between two log lines of one route and status.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Per route and status: when a line was last logged, and how many were left out since.
#[derive(Default)]
pub struct FailureLog {
    last: Mutex<HashMap<(String, StatusCode), (Instant, u64)>>,
}

impl FailureLog {
    /// Whether to log a failure of `route` with `status` now, and how many of them were left out
    /// since the last line. Routes are patterns and statuses few, so the map stays small.
    fn admit(&self, route: &str, status: StatusCode, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match last.get_mut(&(route.to_owned(), status)) {
            Some((at, left_out)) if now.duration_since(*at) < LOG_INTERVAL => {
                *left_out += 1;
                None
            }
            Some((at, left_out)) => {
                *at = now;
                Some(std::mem::take(left_out))
            }
            None => {
                last.insert((route.to_owned(), status), (now, 0));
                Some(0)
            }
        }
    }
}

/// Counts and times `response`, begun at `started`, and logs it if it is a failure.
pub fn record<B>(
    metrics: &Metrics,
    failures: &FailureLog,
    response: &ServiceResponse<B>,
    started: Instant,
) {
    let request = response.request();
    let route = request.match_pattern();
    let error = response.response().extensions();
    record_answer(
        metrics,
        failures,
        &Answered {
            route: route.as_deref().unwrap_or("unmatched"),
            method: request.method().as_str(),
            status: response.status(),
            peer: request.peer_addr(),
            error: error.get::<ErrorText>().map_or("", |e| e.0.as_str()),
            started,
        },
    );
}

/// One answered request, as the access log records it.
pub struct Answered<'a> {
    /// The route's pattern (a label of the metrics, so never the raw path).
    pub route: &'a str,
    pub method: &'a str,
    pub status: StatusCode,
    pub peer: Option<SocketAddr>,
    /// The error text the client was given, for a failure.
    pub error: &'a str,
    pub started: Instant,
}

/// Counts and times an answer, and logs it if it is a failure.
pub fn record_answer(metrics: &Metrics, failures: &FailureLog, answer: &Answered) {
    let &Answered {
        route,
        method,
        status,
        peer,
        error,
        started,
    } = answer;
    metrics
        .http_responses
        .with_label_values(&[route, status.as_str()])
        .inc();
    metrics
        .http_duration
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    // "Not ready" is the readiness probe's answer while models load, not a failure.
    if route == crate::server::v2::READY_PATH {
        return;
    }
    let loud = status.is_server_error() || status == StatusCode::UNAUTHORIZED;
    let quiet = status.is_client_error() && !loud;
    if !(loud || quiet) {
        return;
    }
    let Some(left_out) = failures.admit(route, status, Instant::now()) else {
        return;
    };
    let peer = peer.map(|a| a.ip().to_string());
    let peer = peer.as_deref().unwrap_or("unknown");
    let status = status.as_u16();
    // One field list for both levels (tracing's levels are fixed per call site).
    macro_rules! failure {
        ($level:expr, $message:literal) => {
            tracing::event!(
                $level, route, method, status, peer, left_out, error, $message
            )
        };
    }
    if loud {
        failure!(tracing::Level::WARN, "request failed");
    } else {
        failure!(tracing::Level::DEBUG, "request refused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_one_failure_is_logged_once_a_second_with_the_count_left_out() {
        let log = FailureLog::default();
        let t0 = Instant::now();
        let busy = StatusCode::SERVICE_UNAVAILABLE;
        assert_eq!(log.admit("/v1/rul/{model}", busy, t0), Some(0));
        for i in 1..=5 {
            assert_eq!(
                log.admit("/v1/rul/{model}", busy, t0 + i * Duration::from_millis(100)),
                None
            );
        }
        // Another route or status is logged on its own clock.
        assert_eq!(
            log.admit("/v1/rul/{model}", StatusCode::GATEWAY_TIMEOUT, t0),
            Some(0)
        );
        assert_eq!(log.admit("/metrics", busy, t0), Some(0));
        assert_eq!(
            log.admit("/v1/rul/{model}", busy, t0 + LOG_INTERVAL),
            Some(5)
        );
        assert_eq!(
            log.admit("/v1/rul/{model}", busy, t0 + 3 * LOG_INTERVAL),
            Some(0)
        );
    }
}
