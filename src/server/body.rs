//! Request bodies read under a size limit, so an oversized upload is refused with 413 before it
//! is buffered whole.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::dev::Decompress;
use actix_web::error::PayloadError;
use actix_web::http::header::{self, HeaderMap};
use actix_web::{HttpRequest, web};
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

use crate::server::body_memory::{BodyClaim, BodyMemory};
use crate::server::error::ApiError;
use crate::server::state::AppState;

/// Bytes reserved up front for a body of declared size; a larger one grows as it arrives, so
/// declaring a size without sending it reserves nothing much.
const INITIAL_RESERVE: usize = 4 * 1024 * 1024;

/// Oversized bodies up to this many bytes are read and dropped before the 413, so the client,
/// which may still be sending, receives the answer instead of a reset connection.
const DRAIN_LIMIT: usize = 256 * 1024 * 1024;

/// Where the usual limit comes from, for the 413's message.
pub const MAX_BODY_FLAG: &str = "--max-body-bytes / LINESCAN_MAX_BODY_BYTES";

/// The whole body, refused with 413 above `limit` bytes; `source` says where the limit comes
/// from (a flag, or a fixed limit of the route) so the message can name it. The body counts
/// against `--max-body-memory` until the claim returned with it is dropped: keep it while the
/// body is handled.
pub async fn read_limited(
    request: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
    source: &str,
) -> Result<(Bytes, BodyClaim), ApiError> {
    let declared = refuse_declared(request, &mut payload, limit, source).await?;
    // The limit holds for the decompressed body, so a small gzip bomb is refused too.
    let mut payload = decoded(request, payload)?;
    let mut claim = body_memory(request).claim();
    let capacity = declared.unwrap_or(8192).min(limit).min(INITIAL_RESERVE);
    claim.cover(capacity)?;
    let mut body = BytesMut::with_capacity(capacity);
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| unreadable("reading the body", &e))?;
        if body.len() + chunk.len() > limit {
            drain(&mut payload, body.len() + chunk.len()).await;
            return Err(too_large(None, limit, source));
        }
        claim.cover(body.len() + chunk.len())?;
        body.extend_from_slice(&chunk);
    }
    Ok((body.freeze(), claim))
}

/// The declared size of the body when it is within `limit`; otherwise the 413, once what the
/// client sent of the body has been drained.
pub async fn refuse_declared(
    request: &HttpRequest,
    payload: &mut web::Payload,
    limit: usize,
    source: &str,
) -> Result<Option<usize>, ApiError> {
    let declared = declared_within(request.headers(), limit, source);
    if declared.is_err() {
        drain_unread(request, payload).await;
    }
    declared
}

/// The declared size of the body, or the 413 when it is above `limit`.
fn declared_within(
    headers: &HeaderMap,
    limit: usize,
    source: &str,
) -> Result<Option<usize>, ApiError> {
    match declared_length(headers).map(|size| usize::try_from(size).unwrap_or(usize::MAX)) {
        Some(size) if size > limit => Err(too_large(Some(size), limit, source)),
        declared => Ok(declared),
    }
}

/// What reading a body under `limit` refuses from the head alone, in the order reading does:
/// a declared size above the limit (413), then an encoding that is not decoded (415).
pub fn refused_head(headers: &HeaderMap, limit: usize, source: &str) -> Result<(), ApiError> {
    declared_within(headers, limit, source)?;
    accepted_encoding(headers)
}

/// The 413 of a body above `limit` bytes (`source` says where the limit comes from). A declared
/// `size` is the body's; without one, the client streamed more than the limit.
pub fn too_large(size: Option<usize>, limit: usize, source: &str) -> ApiError {
    let body = size.map_or("request body".into(), |size| {
        format!("request body of {size} bytes")
    });
    ApiError::PayloadTooLarge(format!(
        "{body} exceeds the limit of {limit} bytes ({source})"
    ))
}

/// The body size the client declared in `Content-Length`, if it did.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// The body as sent without `Content-Encoding`, or as gzip or deflate (decompressed as it is
/// read, as Triton does); other encodings are refused with 415.
pub fn decoded(
    request: &HttpRequest,
    payload: web::Payload,
) -> Result<StallLimited<Decompress<web::Payload>>, ApiError> {
    accepted_encoding(request.headers())?;
    Ok(StallLimited::new(
        Decompress::from_headers(payload, request.headers()),
        stall_limit(request),
    ))
}

/// The 415 of a `Content-Encoding` that `decoded` does not decode.
pub fn accepted_encoding(headers: &HeaderMap) -> Result<(), ApiError> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("").trim().to_ascii_lowercase());
    match encoding.as_deref() {
        None | Some("identity" | "gzip" | "x-gzip" | "deflate") => Ok(()),
        Some(other) => Err(ApiError::UnsupportedMediaType(format!(
            "Content-Encoding {other:?} is not accepted (send the body as it is, or as gzip or \
             deflate)"
        ))),
    }
}

/// The server's shared state, which every route is given.
fn server_state(request: &HttpRequest) -> &AppState {
    request
        .app_data::<web::Data<AppState>>()
        .expect("the server registers its state for every route")
}

/// What the bodies of this server's requests hold together (`--max-body-memory`).
pub fn body_memory(request: &HttpRequest) -> Arc<BodyMemory> {
    server_state(request).body_memory.clone()
}

/// How long this server lets a body go without a byte (`--body-timeout`).
fn stall_limit(request: &HttpRequest) -> Duration {
    server_state(request).body_stall_limit
}

/// Reads and drops a refused body, none of which has been read (see `drain`); a client that
/// stops sending is given up on after `--body-timeout`, as when a body is read.
pub async fn drain_unread(request: &HttpRequest, payload: &mut web::Payload) {
    let declared = declared_length(request.headers()).unwrap_or(0);
    let mut payload = StallLimited::new(payload, stall_limit(request));
    drain(
        &mut payload,
        usize::try_from(declared).unwrap_or(usize::MAX),
    )
    .await;
}

/// Reads and drops the rest of a body when it is small enough to be worth it.
async fn drain<S, E>(payload: &mut S, declared: usize)
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
pub fn media_type(headers: &HeaderMap) -> Option<String> {
    headers
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

/// An error of a body stream that may be the client's stall (`StallLimited`).
pub trait BodyError: std::fmt::Display {
    /// The stall, if that is what this is.
    fn stall(&self) -> Option<&std::io::Error>;
}

impl BodyError for PayloadError {
    fn stall(&self) -> Option<&std::io::Error> {
        match self {
            PayloadError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => Some(e),
            _ => None,
        }
    }
}

impl BodyError for actix_multipart::MultipartError {
    fn stall(&self) -> Option<&std::io::Error> {
        match self {
            actix_multipart::MultipartError::Payload(e) => e.stall(),
            _ => None,
        }
    }
}

/// The answer to a body that could not be read: 408 when the client stalled, else 400 saying
/// `what` failed.
pub fn unreadable(what: &str, error: &impl BodyError) -> ApiError {
    match error.stall() {
        Some(stall) => ApiError::ClientTimeout(stall.to_string()),
        None => ApiError::BadRequest(format!("{what}: {error}")),
    }
}

/// A body stream that fails with `TimedOut` once `limit` passes without a byte, then ends.
pub struct StallLimited<S> {
    inner: S,
    limit: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    stalled: bool,
}

impl<S> StallLimited<S> {
    fn new(inner: S, limit: Duration) -> StallLimited<S> {
        StallLimited {
            inner,
            limit,
            deadline: Box::pin(tokio::time::sleep(limit)),
            stalled: false,
        }
    }
}

impl<S> Stream for StallLimited<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.stalled {
            return Poll::Ready(None);
        }
        match this.inner.poll_next_unpin(cx) {
            Poll::Ready(item) => {
                let next = tokio::time::Instant::now() + this.limit;
                this.deadline.as_mut().reset(next);
                Poll::Ready(item)
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(()) => {
                    this.stalled = true;
                    Poll::Ready(Some(Err(PayloadError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "no byte of the request body arrived for {} s; the rest of it was \
                             not waited for",
                            this.limit.as_secs()
                        ),
                    )))))
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_after_the_limit_and_a_slow_one_does_not() {
        let limit = Duration::from_secs(30);
        // A chunk every 20 s: never 30 s without a byte.
        let slow = futures_util::stream::iter(0..4).then(|i| async move {
            tokio::time::sleep(Duration::from_secs(20)).await;
            Ok::<_, PayloadError>(Bytes::from(vec![i as u8]))
        });
        let chunks: Vec<_> = StallLimited::new(Box::pin(slow), limit).collect().await;
        assert_eq!(chunks.len(), 4);
        assert!(chunks.iter().all(Result::is_ok));
        // One chunk, then nothing.
        let stalled = futures_util::stream::iter([Ok(Bytes::from_static(b"x"))])
            .chain(futures_util::stream::pending());
        let started = tokio::time::Instant::now();
        let chunks: Vec<_> = StallLimited::new(Box::pin(stalled), limit).collect().await;
        assert_eq!(chunks.len(), 2);
        match &chunks[1] {
            Err(PayloadError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::TimedOut),
            other => panic!("{other:?}"),
        }
        assert_eq!(started.elapsed(), limit);
    }
}
