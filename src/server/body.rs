//! Request bodies read under a size limit, so an oversized upload is refused with 413 before it
//! is buffered whole.

use actix_web::dev::Decompress;
use actix_web::{HttpRequest, http::header, web};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use crate::server::error::ApiError;

/// Oversized bodies up to this many bytes are read and dropped before the 413, so the client,
/// which may still be sending, receives the answer instead of a reset connection.
const DRAIN_LIMIT: usize = 256 * 1024 * 1024;

/// Where the usual limit comes from, for the 413's message.
pub const MAX_BODY_FLAG: &str = "--max-body-bytes / LINESCAN_MAX_BODY_BYTES";

/// The whole body, refused with 413 above `limit` bytes; `source` says where the limit comes
/// from (a flag, or a fixed limit of the route) so the message can name it.
pub async fn read_limited(
    request: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
    source: &str,
) -> Result<Bytes, ApiError> {
    // A declared size is the body's; a streamed one is only what arrived before the limit.
    let too_large = |size: Option<usize>| {
        let body = size.map_or("request body".into(), |size| {
            format!("request body of {size} bytes")
        });
        ApiError::PayloadTooLarge(format!(
            "{body} exceeds the limit of {limit} bytes ({source})"
        ))
    };
    let declared = declared_length(request).map(|size| size as usize);
    if let Some(size) = declared.filter(|size| *size > limit) {
        drain(&mut payload, size).await;
        return Err(too_large(Some(size)));
    }
    // The limit holds for the decompressed body, so a small gzip bomb is refused too.
    let mut payload = decoded(request, payload)?;
    let mut body = BytesMut::with_capacity(declared.unwrap_or(8192).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            drain(&mut payload, body.len() + chunk.len()).await;
            return Err(too_large(None));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The body size the client declared in `Content-Length`, if it did.
pub fn declared_length(request: &HttpRequest) -> Option<u64> {
    request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// The body as sent without `Content-Encoding`, or as gzip or deflate (decompressed as it is
/// read, as Triton does); other encodings are refused with 415.
pub fn decoded(
    request: &HttpRequest,
    payload: web::Payload,
) -> Result<Decompress<web::Payload>, ApiError> {
    let encoding = request
        .headers()
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("").trim().to_ascii_lowercase());
    match encoding.as_deref() {
        None | Some("identity" | "gzip" | "x-gzip" | "deflate") => {
            Ok(Decompress::from_headers(payload, request.headers()))
        }
        Some(other) => Err(ApiError::UnsupportedMediaType(format!(
            "Content-Encoding {other:?} is not accepted (send the body as it is, or as gzip or \
             deflate)"
        ))),
    }
}

/// Reads and drops the rest of a body when it is small enough to be worth it.
pub async fn drain<S, E>(payload: &mut S, declared: usize)
where
    S: futures_util::Stream<Item = Result<Bytes, E>> + Unpin,
{
    if declared <= DRAIN_LIMIT {
        drop_chunks(payload, 0).await;
    }
}

/// Reads and drops what is left of a multipart form after a refusal, up to the same limit as
/// `drain`, so the answer reaches a client that is still sending.
pub async fn drain_form(form: &mut actix_multipart::Multipart) {
    let mut read = 0usize;
    while read <= DRAIN_LIMIT
        && let Some(Ok(mut field)) = form.next().await
    {
        read = drop_chunks(&mut field, read).await;
    }
}

/// Drops chunks until the stream ends, fails, or `read` (bytes dropped so far, these included)
/// passes `DRAIN_LIMIT`; returns `read`.
async fn drop_chunks<S, E>(stream: &mut S, mut read: usize) -> usize
where
    S: futures_util::Stream<Item = Result<Bytes, E>> + Unpin,
{
    while let Some(Ok(chunk)) = stream.next().await {
        read += chunk.len();
        if read > DRAIN_LIMIT {
            break;
        }
    }
    read
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
