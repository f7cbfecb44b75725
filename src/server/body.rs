//! Request bodies read under a size limit, so an oversized upload is refused with 413 before it
//! is buffered whole.

use actix_web::{HttpRequest, http::header, web};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use crate::server::error::ApiError;

/// Oversized bodies up to this many bytes are read and dropped before the 413, so the client,
/// which may still be sending, receives the answer instead of a reset connection.
const DRAIN_LIMIT: usize = 256 * 1024 * 1024;

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
        drain(&mut payload, size).await;
        return Err(too_large(size));
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(8192).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            let size = body.len() + chunk.len();
            drain(&mut payload, size).await;
            return Err(too_large(size));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Reads and drops the rest of a body when it is small enough to be worth it.
async fn drain(payload: &mut web::Payload, declared: usize) {
    if declared > DRAIN_LIMIT {
        return;
    }
    let mut read = 0usize;
    while let Some(Ok(chunk)) = payload.next().await {
        read += chunk.len();
        if read > DRAIN_LIMIT {
            return;
        }
    }
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
