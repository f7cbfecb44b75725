//! The API key (`--api-key`): every route but the probes and `/metrics` needs
//! `Authorization: Bearer <key>`. Checked by a middleware, and from the head of a request that
//! asks `Expect: 100-continue`, so a refused upload is never sent.

use std::sync::Arc;

use actix_web::HttpResponse;
use actix_web::http::header::HeaderMap;

use crate::server::access_log;
use crate::server::v2;

/// Paths that stay open without the API key (probes and scrapers).
const OPEN_PATHS: &[&str] = &["/v2/health/live", v2::READY_PATH, "/metrics"];

/// The key every request must present, if the server has one.
#[derive(Clone, Default)]
pub struct ApiKey(Option<Arc<str>>);

impl ApiKey {
    pub fn new(key: Option<&str>) -> Self {
        Self(key.map(Arc::from))
    }

    /// Whether a request for `path` with these headers may go on.
    pub fn admits(&self, path: &str, headers: &HeaderMap) -> bool {
        let Some(expected) = &self.0 else {
            return true;
        };
        OPEN_PATHS.contains(&path)
            || headers
                .get("Authorization")
                .and_then(|v| bearer_token(v.as_bytes()))
                .is_some_and(|token| same_key(token, expected))
    }

    /// The 401 of a request `admits` refused.
    pub fn refusal() -> HttpResponse {
        let refusal = "missing or wrong API key (send Authorization: Bearer <key>)";
        let mut response = HttpResponse::Unauthorized()
            .insert_header(("WWW-Authenticate", "Bearer"))
            .json(serde_json::json!({ "error": refusal }));
        access_log::attach_error_text(&mut response, refusal.into());
        response
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is case-insensitive,
/// RFC 9110 section 11.1).
fn bearer_token(header: &[u8]) -> Option<&str> {
    let (scheme, token) = std::str::from_utf8(header).ok()?.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

/// Compares a presented API key in time that does not depend on where it first differs, so
/// response times do not reveal the key a prefix at a time (only its length can show).
fn same_key(presented: &str, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    presented.as_bytes().ct_eq(expected.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{AUTHORIZATION, HeaderValue};

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token(b"Bearer k3y"), Some("k3y"));
        assert_eq!(bearer_token(b"bearer  k3y"), Some("k3y"));
        assert_eq!(bearer_token(b"Basic k3y"), None);
        assert_eq!(bearer_token(b"k3y"), None);
    }

    #[test]
    fn only_the_whole_key_matches() {
        assert!(same_key("s3cret", "s3cret"));
        assert!(!same_key("s3cre", "s3cret"));
        assert!(!same_key("s3cret!", "s3cret"));
        assert!(!same_key("S3cret", "s3cret"));
        assert!(!same_key("", "s3cret"));
    }

    #[test]
    fn probes_are_open_and_the_rest_needs_the_key() {
        let key = ApiKey::new(Some("s3cret"));
        let mut with_key = HeaderMap::new();
        with_key.insert(AUTHORIZATION, HeaderValue::from_static("Bearer s3cret"));
        assert!(key.admits("/v2/health/live", &HeaderMap::new()));
        assert!(key.admits("/metrics", &HeaderMap::new()));
        assert!(!key.admits("/v1/jobs", &HeaderMap::new()));
        assert!(key.admits("/v1/jobs", &with_key));
        assert!(ApiKey::new(None).admits("/v1/jobs", &HeaderMap::new()));
    }
}
