//! The answer to `Expect: 100-continue`. A client that asks it (curl does for bodies over
//! 1 MB, so for most archive and image uploads) waits for `100 Continue` before it sends the
//! body; a request that its head already condemns is refused instead, and the body is never
//! sent. Each route that reads a body names, as a `BodyRoute`, the checks its handler makes
//! from the head (query, media type, declared size, encoding, the model or board asked for, a
//! job queue with room): the handler makes the same checks through the same functions, for
//! clients that do not ask. Requests that match no body route go on to the router, which
//! answers them (404, 405) as usual.
//!
//! The refusal closes the connection: the client may have started sending anyway (RFC 9110
//! section 10.1.1), and what it sends must not be read as the next request.

use std::sync::Arc;
use std::time::Instant;

use actix_http::body::BoxBody;
use actix_http::{Method, Request, Response};
use actix_web::dev::{Path, ResourceDef, Url};
use actix_web::http::header::HeaderMap;
use actix_web::web;
use actix_web::{HttpMessage, ResponseError};
use serde::de::DeserializeOwned;

use crate::server::access_log::{self, Answered, ErrorText, FailureLog};
use crate::server::api_key::ApiKey;
use crate::server::body::{MAX_BODY_FLAG, refused_head};
use crate::server::error::{ApiError, parse_query};
use crate::server::state::AppState;
use crate::server::{aoi, jobs, sensors, v2};

/// The `route` label of answers given here: no route has matched yet.
const ROUTE: &str = "expect: 100-continue";

/// What a route's handler refuses from the head alone; `Err` is its answer.
pub type HeadCheck = fn(&AppState, &Head) -> Result<(), ApiError>;

/// A route that reads a body, with the refusals its handler makes before reading it.
pub struct BodyRoute {
    method: Method,
    path: ResourceDef,
    check: HeadCheck,
}

impl BodyRoute {
    /// `pattern` is the route's, as registered with the router.
    pub fn new(method: Method, pattern: &str, check: HeadCheck) -> Self {
        BodyRoute {
            method,
            path: ResourceDef::new(pattern),
            check,
        }
    }
}

/// A request's head, as a route's check sees it.
pub struct Head<'a> {
    params: Path<Url>,
    query: &'a str,
    pub headers: &'a HeaderMap,
}

impl Head<'_> {
    /// `check` of the path's parameters, decoded as the route's `web::Path` extractor decodes
    /// them; parameters that do not decode are left to the route, which gives its own answer.
    pub fn check_params<T: DeserializeOwned, R>(
        &self,
        check: impl FnOnce(T) -> Result<R, ApiError>,
    ) -> Result<(), ApiError> {
        match self.params.load() {
            Ok(params) => check(params).map(drop),
            Err(_) => Ok(()),
        }
    }

    /// The query, parsed as the route's `web::Query` extractor parses it (400 naming the fault).
    pub fn query<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        parse_query(self.query)
    }

    /// The raw query string.
    pub fn query_string(&self) -> &str {
        self.query
    }

    /// What reading the body under `--max-body-bytes` refuses from the head: a declared size
    /// above it (413), an encoding that is not decoded (415).
    pub fn within_max_body(&self, state: &AppState) -> Result<(), ApiError> {
        refused_head(self.headers, state.max_body_bytes, MAX_BODY_FLAG)
    }
}

/// Decides, per request that asks `Expect: 100-continue`, whether it goes on.
#[derive(Clone)]
pub struct EarlyRefusal {
    state: web::Data<AppState>,
    api_key: ApiKey,
    failures: Arc<FailureLog>,
    routes: Arc<[BodyRoute]>,
}

impl EarlyRefusal {
    /// Refusals for every route that reads a body.
    pub fn new(state: web::Data<AppState>, api_key: ApiKey, failures: Arc<FailureLog>) -> Self {
        let routes = [
            v2::body_routes(),
            aoi::body_routes(),
            sensors::body_routes(),
            jobs::body_routes(),
        ];
        EarlyRefusal {
            state,
            api_key,
            failures,
            routes: routes.into_iter().flatten().collect(),
        }
    }

    /// The request back when it may send its body; otherwise the refusal, counted and logged
    /// as the routes' answers are.
    pub fn check(&self, request: Request) -> Result<Request, Response<BoxBody>> {
        let started = Instant::now();
        let headers = request.headers();
        // The raw path, as the API key middleware sees it.
        let mut refusal = if !self.api_key.admits(request.path(), headers) {
            ApiKey::refusal()
        } else {
            match self.route_refusal(&request) {
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

    /// The refusal of a request with an allowed key by the body route it is for, if any.
    fn route_refusal(&self, request: &Request) -> Option<ApiError> {
        // The path as the router sees it (percent-encoded unreserved characters decoded).
        let url = Url::new(request.uri().clone());
        let route = self.matching(request.method(), url.path())?;
        let mut params = Path::new(url);
        route.path.capture_match_info(&mut params);
        let head = Head {
            params,
            query: request.uri().query().unwrap_or(""),
            headers: request.headers(),
        };
        (route.check)(&self.state, &head).err()
    }

    /// The body route of `method path`; None leaves the request to the router.
    fn matching(&self, method: &Method, path: &str) -> Option<&BodyRoute> {
        self.routes
            .iter()
            .find(|route| route.method == method && route.path.is_match(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn refusal() -> EarlyRefusal {
        let state = AppState::new(
            Arc::new(Metrics::new()),
            5000,
            50_000,
            std::time::Duration::from_secs(10),
        );
        EarlyRefusal::new(web::Data::new(state), ApiKey::new(None), Arc::default())
    }

    fn pattern(method: Method, path: &str) -> Option<String> {
        let early = refusal();
        let route = early.matching(&method, path)?;
        route.path.pattern().map(String::from)
    }

    #[test]
    fn every_route_that_reads_a_body_is_checked_from_its_head() {
        let cases = [
            ("/v2/models/aoi_defect/infer", "/v2/models/{model}/infer"),
            (
                "/v2/models/aoi_defect/versions/1/infer",
                "/v2/models/{model}/versions/{version}/infer",
            ),
            ("/v1/inspect/board-7", "/v1/inspect/{board}"),
            ("/v1/inspect/board-7/batch", "/v1/inspect/{board}/batch"),
            ("/v1/rul/rul_fd001", "/v1/rul/{model}"),
            ("/v1/jobs", "/v1/jobs"),
            ("/v2/repository/index", "/v2/repository/index"),
            (
                "/v2/repository/models/m/load",
                "/v2/repository/models/{model}/{action:load|unload}",
            ),
        ];
        for (path, expected) in cases {
            assert_eq!(pattern(Method::POST, path).as_deref(), Some(expected));
        }
        assert_eq!(
            pattern(Method::PUT, "/v1/templates/board-7").as_deref(),
            Some("/v1/templates/{board}")
        );
        // Unrouted, another method, or an empty name: the router answers (404, 405).
        assert_eq!(pattern(Method::POST, "/v2/models//infer"), None);
        assert_eq!(pattern(Method::POST, "/v1/inspect/board-7/"), None);
        assert_eq!(pattern(Method::PUT, "/v1/jobs"), None);
        assert_eq!(pattern(Method::POST, "/v2/repository/models/m/drop"), None);
        assert_eq!(pattern(Method::POST, "/v1/templates/board-7"), None);
        assert_eq!(pattern(Method::GET, "/v2/models/aoi_defect/infer"), None);
    }

    fn refused(method: Method, target: &str, headers: &[(&str, &str)]) -> Option<u16> {
        let mut request = actix_web::test::TestRequest::default()
            .method(method)
            .uri(target);
        for header in headers {
            request = request.insert_header(*header);
        }
        let request = request.to_request();
        let early = refusal();
        early
            .route_refusal(&request)
            .map(|error| error.status_code().as_u16())
    }

    #[test]
    fn the_head_is_checked_in_the_handlers_order() {
        let big = [("content-length", "6000")];
        // Query before media type before size before the model (here: still loading).
        let infer = "/v2/models/m/infer";
        let cases = [
            (
                format!("{infer}?x=1"),
                vec![("content-type", "image/png")],
                400,
            ),
            (
                infer.into(),
                vec![("content-type", "image/png"), big[0]],
                415,
            ),
            (infer.into(), vec![big[0], ("content-encoding", "br")], 413),
            (infer.into(), vec![("content-encoding", "br")], 415),
            (infer.into(), vec![], 503),
            ("/v1/inspect/b?x=1".into(), big.to_vec(), 400),
            ("/v1/inspect/b".into(), big.to_vec(), 413),
            ("/v1/rul/m".into(), vec![("content-type", "text/csv")], 415),
        ];
        for (target, headers, status) in cases {
            assert_eq!(
                refused(Method::POST, &target, &headers),
                Some(status),
                "{target} {headers:?}"
            );
        }
    }
}
