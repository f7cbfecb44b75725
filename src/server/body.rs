//! Request bodies read under a size limit, so an oversized upload is refused with 413 before it
//! is buffered whole.

use actix_web::{HttpRequest, http::header, web};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use crate::server::error::ApiError;

pub async fn read_limited(
    request: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let too_large = |size: usize| {
        ApiError::PayloadTooLarge(format!(
            "request body of {size} bytes exceeds the limit of {limit} bytes \
             (--max-body-bytes / LINESCAN_MAX_BODY_BYTES)"
        ))
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(size) = declared.filter(|size| *size > limit) {
        return Err(too_large(size));
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(8192).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(too_large(body.len() + chunk.len()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The media type without parameters, lower-cased; None when the header is absent.
pub fn media_type(request: &HttpRequest) -> Option<String> {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
}
