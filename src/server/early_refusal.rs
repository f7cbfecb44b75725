//! The answer to `Expect: 100-continue`. A client that asks it (curl does for bodies over
//! 1 MB, so for most archive uploads) waits for `100 Continue` before it sends the body; a
//! request that its head already condemns is refused instead, and the body is never sent:
//! a missing API key (401), a body above the route's limit (413), a job that cannot be taken
//! (queue full 503, low disk 507, unknown model or bad options 4xx). Anything else goes on to
//! the routes, which make the same checks again for clients that do not ask.
//!
//! The refusal closes the connection: the client may have started sending anyway (RFC 9110
//! section 10.1.1), and what it sends must not be read as the next request.

use std::sync::Arc;
use std::time::Instant;

use actix_http::body::BoxBody;
use actix_http::{Method, Request, Response};
use actix_web::dev::Url;
use actix_web::http::header::HeaderMap;
use actix_web::web;
use actix_web::{HttpMessage, ResponseError};

use crate::server::access_log::{self, Answered, ErrorText, FailureLog};
use crate::server::api_key::ApiKey;
use crate::server::body::{MAX_BODY_FLAG, declared_length, too_large};
use crate::server::error::ApiError;
use crate::server::jobs;
use crate::server::state::AppState;

/// The `route` label of answers given here: no route has matched yet.
const ROUTE: &str = "expect: 100-continue";

/// Decides, per request that asks `Expect: 100-continue`, whether it goes on.
#[derive(Clone)]
pub struct EarlyRefusal {
    pub state: web::Data<AppState>,
    pub api_key: ApiKey,
    pub failures: Arc<FailureLog>,
}

impl EarlyRefusal {
    /// The request back when it may send its body; otherwise the refusal, counted and logged
    /// as the routes' answers are.
    pub fn check(&self, request: Request) -> Result<Request, Response<BoxBody>> {
        let started = Instant::now();
        let headers = request.headers();
        // The raw path, as the API key middleware sees it.
        let mut refusal = if !self.api_key.admits(request.path(), headers) {
            ApiKey::refusal()
        } else {
            // The path as the router sees it (percent-encoded unreserved characters decoded).
            let url = Url::new(request.uri().clone());
            let query = request.uri().query().unwrap_or("");
            match refusal(&self.state, request.method(), url.path(), query, headers) {
                Some(error) => error.error_response(),
                None => return Ok(request),
            }
        };
        refusal
            .head_mut()
            .set_connection_type(actix_http::ConnectionType::Close);
        let error = refusal.extensions().get::<ErrorText>().map(|e| e.0.clone());
        access_log::record_answer(
            &self.state.metrics,
            &self.failures,
            &Answered {
                route: ROUTE,
                method: request.method().as_str(),
                status: refusal.status(),
                peer: request.peer_addr(),
                error: error.as_deref().unwrap_or(""),
                started,
            },
        );
        Err(refusal.map_into_boxed_body().into())
    }
}

/// The refusal of a request with an allowed key, from its head alone.
fn refusal(
    state: &AppState,
    method: &Method,
    path: &str,
    query: &str,
    headers: &HeaderMap,
) -> Option<ApiError> {
    let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    if method == Method::POST && segments == ["v1", "jobs"] {
        return jobs::refuse_submission(state, query, headers);
    }
    if !limited_by_max_body(method, &segments) {
        // Left to the route: its own limit, or its 404 or 405.
        return None;
    }
    let limit = state.max_body_bytes;
    let size = declared_length(headers)?;
    (size > limit as u64).then(|| too_large(Some(size as usize), limit, MAX_BODY_FLAG))
}

/// Whether the route of `method /segments` reads a body under `--max-body-bytes`: infer,
/// inspect, live RUL, and template uploads.
fn limited_by_max_body(method: &Method, segments: &[&str]) -> bool {
    let named = |segment: &str| !segment.is_empty();
    match (method.as_str(), segments) {
        ("POST", ["v2", "models", model, "infer"]) => named(model),
        ("POST", ["v2", "models", model, "versions", version, "infer"]) => {
            named(model) && named(version)
        }
        ("POST", ["v1", "inspect", board] | ["v1", "inspect", board, "batch"]) => named(board),
        ("POST", ["v1", "rul", model]) => named(model),
        ("PUT", ["v1", "templates", board]) => named(board),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limited(method: Method, path: &str) -> bool {
        let segments: Vec<&str> = path[1..].split('/').collect();
        limited_by_max_body(&method, &segments)
    }

    #[test]
    fn only_routes_that_read_a_body_under_the_flag_are_limited_here() {
        assert!(limited(Method::POST, "/v2/models/aoi_defect/infer"));
        assert!(limited(
            Method::POST,
            "/v2/models/aoi_defect/versions/1/infer"
        ));
        assert!(limited(Method::POST, "/v1/inspect/board-7"));
        assert!(limited(Method::POST, "/v1/inspect/board-7/batch"));
        assert!(limited(Method::POST, "/v1/rul/rul_fd001"));
        assert!(limited(Method::PUT, "/v1/templates/board-7"));
        // Unrouted, another method, or an empty name: the route answers (404, 405).
        assert!(!limited(Method::POST, "/v2/models//infer"));
        assert!(!limited(Method::POST, "/v1/inspect/board-7/"));
        assert!(!limited(Method::PUT, "/v1/jobs"));
        assert!(!limited(Method::POST, "/v2/repository/index"));
        assert!(!limited(Method::POST, "/v1/templates/board-7"));
        assert!(!limited(Method::GET, "/v2/models/aoi_defect/infer"));
    }
}
