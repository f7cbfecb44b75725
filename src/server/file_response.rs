//! Files answered as streamed responses (256 KiB reads on the blocking pool), so a large one is
//! never held in memory whole, however many clients fetch it or however slowly they read.

use std::io::Read;

use actix_web::{HttpResponse, web};
use bytes::Bytes;

use crate::server::error::ApiError;

/// `file` from where it stands to its end, as `content_type`; with `attachment`, offered for
/// download under that file name.
pub fn streamed(
    file: std::fs::File,
    content_type: &str,
    attachment: Option<&str>,
) -> Result<HttpResponse, ApiError> {
    let length = file
        .metadata()
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .len();
    let stream = futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let read = web::block(move || {
            let mut buffer = vec![0u8; 256 * 1024];
            let n = file.read(&mut buffer)?;
            buffer.truncate(n);
            Ok::<_, std::io::Error>((file, buffer))
        })
        .await;
        match read {
            Ok(Ok((_, buffer))) if buffer.is_empty() => None,
            Ok(Ok((file, buffer))) => Some((Ok(Bytes::from(buffer)), Some(file))),
            Ok(Err(e)) => Some((Err(actix_web::error::ErrorInternalServerError(e)), None)),
            Err(e) => Some((Err(actix_web::error::ErrorInternalServerError(e)), None)),
        }
    });
    let mut response = HttpResponse::Ok();
    response.content_type(content_type);
    if let Some(filename) = attachment {
        response.insert_header((
            "Content-Disposition",
            format!("attachment; filename=\"{filename}\""),
        ));
    }
    Ok(response.no_chunking(length).streaming(Box::pin(stream)))
}
