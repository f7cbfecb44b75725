//! The one error type of the HTTP boundary: every failure becomes a status and `{"error": msg}`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

use crate::engine::InferError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// 405 with `Allow`: the path exists, the method does not.
    #[error("{message}")]
    MethodNotAllowed { message: String, allow: String },
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Unprocessable(String),
    /// 507: the server's disk has no room for what the request would store.
    #[error("{0}")]
    InsufficientStorage(String),
    /// 503 with `Retry-After` seconds.
    #[error("{message}")]
    Unavailable { message: String, retry_after: u32 },
    #[error("{0}")]
    Timeout(String),
    /// 408: the client stopped sending its request.
    #[error("{0}")]
    ClientTimeout(String),
    /// 499 (nginx's): the client closed its connection and its request was withdrawn before it
    /// ran; nobody reads the answer, but the access log and `/metrics` show it.
    #[error("{0}")]
    ClientClosedRequest(String),
    #[error("{0}")]
    Internal(String),
    /// 501: a part of the protocol linescan does not offer.
    #[error("{0}")]
    NotImplemented(String),
}

impl ApiError {
    pub fn not_ready() -> ApiError {
        ApiError::Unavailable {
            message: "models are still loading; see /v2/health/ready".into(),
            retry_after: 1,
        }
    }
}

/// The 400 of a query string that does not parse as the route's parameters.
pub fn bad_query(error: &actix_web::error::QueryPayloadError, query: &str) -> ApiError {
    // serde_urlencoded does not always name the parameter: show the query too.
    let detail = match error {
        actix_web::error::QueryPayloadError::Deserialize(e) => e
            .to_string()
            .replace(", there are no fields", " (this route takes no parameters)"),
        other => other.to_string(),
    };
    ApiError::BadRequest(format!("bad query string {query:?}: {detail}"))
}

/// `query` parsed as a route's `web::Query<T>` extractor parses it, and refused as it is.
pub fn parse_query<T: serde::de::DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    actix_web::web::Query::<T>::from_query(query)
        .map(actix_web::web::Query::into_inner)
        .map_err(|error| bad_query(&error, query))
}

impl From<InferError> for ApiError {
    fn from(error: InferError) -> Self {
        match error {
            InferError::QueueFull(_) => ApiError::Unavailable {
                message: error.to_string(),
                retry_after: 1,
            },
            InferError::ShuttingDown => ApiError::Unavailable {
                message: error.to_string(),
                retry_after: 5,
            },
            InferError::Timeout => ApiError::Timeout(error.to_string()),
            InferError::Cancelled => ApiError::ClientClosedRequest(error.to_string()),
            InferError::Invalid(message) => ApiError::Unprocessable(message),
            InferError::Inference(message) => ApiError::Internal(message),
        }
    }
}

/// A task on actix's blocking pool that panicked or was dropped (actix-web's own message, "Blocking
/// thread pool is shut down unexpectedly", says neither).
impl From<actix_web::error::BlockingError> for ApiError {
    fn from(_: actix_web::error::BlockingError) -> Self {
        ApiError::Internal(
            "internal error: the request's background work stopped without an answer (a bug; \
             the server log has the details)"
                .into(),
        )
    }
}

/// Longest error text answered and logged. Messages name what was wrong, and that may be a
/// client's megabyte-long name or value: its start and end (the allowed values) are kept.
const MAX_ERROR_BYTES: usize = 2048;

fn bounded(text: String) -> String {
    if text.len() <= MAX_ERROR_BYTES {
        return text;
    }
    let head = text.floor_char_boundary(MAX_ERROR_BYTES / 2);
    let tail = text.ceil_char_boundary(text.len() - MAX_ERROR_BYTES / 4);
    format!(
        "{} [... {} bytes left out ...] {}",
        &text[..head],
        tail - head,
        &text[tail..]
    )
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::ClientTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::ClientClosedRequest(_) => {
                StatusCode::from_u16(499).expect("499 is a valid status")
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        match self {
            ApiError::Unavailable { retry_after, .. } => {
                response.insert_header(("Retry-After", retry_after.to_string()));
            }
            ApiError::MethodNotAllowed { allow, .. } => {
                response.insert_header(("Allow", allow.as_str()));
            }
            // These may be answered with the body partly unread (a limit hit, a type refused
            // from its header, a stalled client); what is left of it on the connection would
            // otherwise be taken for the next request. A connection that read its body whole is
            // closed needlessly.
            ApiError::PayloadTooLarge(_)
            | ApiError::UnsupportedMediaType(_)
            | ApiError::InsufficientStorage(_)
            | ApiError::ClientTimeout(_)
            | ApiError::ClientClosedRequest(_) => {
                response.force_close();
            }
            _ => {}
        }
        let text = bounded(self.to_string());
        let mut response = response.json(serde_json::json!({ "error": text }));
        crate::server::access_log::attach_error_text(&mut response, text);
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_full_is_503_with_retry_after() {
        let error = ApiError::from(InferError::QueueFull("m".into()));
        let response = error.error_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers().get("Retry-After").unwrap(), "1");
        assert_eq!(
            ApiError::from(InferError::Timeout).status_code(),
            StatusCode::GATEWAY_TIMEOUT
        );
    }

    #[test]
    fn long_messages_keep_their_start_and_end() {
        let short = "input \"x\" is not an input (inputs: a, b)".to_string();
        assert_eq!(bounded(short.clone()), short);
        let name = "é".repeat(500_000);
        let text = bounded(format!("input \"{name}\" is not an input (inputs: a, b)"));
        assert!(text.len() <= MAX_ERROR_BYTES + 64, "{}", text.len());
        assert!(text.starts_with("input \"éé"), "{text}");
        assert!(
            text.ends_with("éé\" is not an input (inputs: a, b)"),
            "{text}"
        );
        assert!(text.contains("bytes left out"), "{text}");
    }
}
