//! AOI routes: golden templates per board and inspection of test images against them.

use std::io::{Read, Seek};
use std::sync::Arc;

use actix_multipart::Multipart;
use actix_web::http::Method;
use actix_web::http::header::HeaderMap;
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::aoi::detections::Detection;
use crate::aoi::image_io::ImageError;
use crate::aoi::pipeline::{Alignment, StageTimings};
use crate::aoi::templates::{Board, TemplateInfo, validate_board_name};
use crate::aoi::{AoiError, AoiService};
use crate::server::body::{
    MAX_BODY_FLAG, body_memory, declared_length, decoded, drain_form, media_type, read_limited,
    refuse_declared, too_large, unreadable,
};
use crate::server::body_memory::BodyClaim;
use crate::server::client_gone::unless_client_leaves;
use crate::server::early_refusal::{BodyRoute, Head};
use crate::server::error::ApiError;
use crate::server::file_response::streamed;
use crate::server::routing::resource;
use crate::server::state::AppState;
use crate::server::{NoParameters, NoQuery};

/// Images one batch request may carry.
const MAX_BATCH_IMAGES: usize = 64;

const TEMPLATE: &str = "/v1/templates/{board}";
const INSPECT: &str = "/v1/inspect/{board}";
const INSPECT_BATCH: &str = "/v1/inspect/{board}/batch";

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .service(resource(
            "/v1/templates",
            [(Method::GET, web::route().to(list_templates))],
        ))
        .service(resource(
            TEMPLATE,
            [
                (Method::PUT, web::route().to(put_template)),
                (Method::GET, web::route().to(get_template)),
                (Method::DELETE, web::route().to(delete_template)),
            ],
        ))
        .service(resource(
            "/v1/templates/{board}/image",
            [(Method::GET, web::route().to(template_image))],
        ))
        .service(resource(
            INSPECT,
            [(Method::POST, web::route().to(inspect))],
        ))
        .service(resource(
            INSPECT_BATCH,
            [(Method::POST, web::route().to(inspect_batch))],
        ));
}

/// Template uploads and inspections.
pub(super) fn body_routes() -> Vec<BodyRoute> {
    vec![
        BodyRoute::new(Method::PUT, TEMPLATE, template_head),
        BodyRoute::new(Method::POST, INSPECT, inspect_head),
        BodyRoute::new(Method::POST, INSPECT_BATCH, inspect_head),
    ]
}

/// `put_template`'s refusals before its body, in its order.
fn template_head(state: &AppState, head: &Head) -> Result<(), ApiError> {
    let query = head.query::<PutQuery>()?;
    images_refused(state, head)?;
    head.check_params(|board: String| template_target(state, &board, &query))
}

/// `inspect`'s and `inspect_batch`'s refusals before their body, in their order.
fn inspect_head(state: &AppState, head: &Head) -> Result<(), ApiError> {
    head.query::<NoParameters>()?;
    images_refused(state, head)?;
    head.check_params(|board: String| inspected_board(state, &board))
}

impl From<AoiError> for ApiError {
    fn from(error: AoiError) -> Self {
        match error {
            AoiError::Image(ImageError::Unsupported(_) | ImageError::UnsupportedLayout { .. }) => {
                ApiError::UnsupportedMediaType(error.to_string())
            }
            AoiError::Image(ImageError::TooLarge { .. }) => {
                ApiError::PayloadTooLarge(error.to_string())
            }
            AoiError::Image(ImageError::Corrupt { .. } | ImageError::Empty)
            | AoiError::SizeMismatch { .. }
            | AoiError::TemplateTooSmall { .. }
            | AoiError::TemplateUniform { .. } => ApiError::Unprocessable(error.to_string()),
            AoiError::TemplatesFull(message) => ApiError::InsufficientStorage(message),
            AoiError::Infer(infer) => infer.into(),
            AoiError::Setup(message) => ApiError::Internal(message),
            AoiError::Preprocess(preprocess) => ApiError::Internal(preprocess.to_string()),
        }
    }
}

fn service(state: &AppState) -> Result<&Arc<AoiService>, ApiError> {
    state.registry()?;
    state.aoi().ok_or_else(|| {
        ApiError::NotFound(
            "AOI is not enabled: the model repository has no aoi_defect model".into(),
        )
    })
}

fn board_name(board: &str) -> Result<String, ApiError> {
    validate_board_name(board).map_err(ApiError::Unprocessable)?;
    Ok(board.to_string())
}

fn unknown_board(service: &AoiService, board: &str) -> ApiError {
    match service.templates.unloaded(board) {
        Some(reason) => ApiError::NotFound(format!(
            "board {board}'s stored template could not be loaded at start ({reason}); register \
             it again with PUT /v1/templates/{board}"
        )),
        None => ApiError::NotFound(format!(
            "board {board} has no template; register one with PUT /v1/templates/{board}"
        )),
    }
}

/// The board's registered template, or the 404 that says why it has none.
fn find_board(service: &AoiService, board: &str) -> Result<Arc<Board>, ApiError> {
    service
        .templates
        .get(board)
        .ok_or_else(|| unknown_board(service, board))
}

fn is_form(headers: &HeaderMap) -> bool {
    media_type(headers).as_deref() == Some("multipart/form-data")
}

fn empty_body() -> ApiError {
    ApiError::Unprocessable(
        "the body is empty: send the image as the body or as multipart/form-data".into(),
    )
}

/// What `read_images` refuses from the head: a body above `--max-body-bytes`, an encoding it
/// does not decode, a body declared empty.
fn images_refused(state: &AppState, head: &Head) -> Result<(), ApiError> {
    head.within_max_body(state)?;
    if declared_length(head.headers) == Some(0) {
        return Err(empty_body());
    }
    Ok(())
}

/// The images of a request: the raw body, or every part of a multipart form, each a file;
/// with their claim on `--max-body-memory`, to keep while they are inspected.
async fn read_images(
    request: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<(Vec<(Option<String>, Bytes)>, BodyClaim), ApiError> {
    if !is_form(request.headers()) {
        let (body, claim) = read_limited(request, payload, limit, MAX_BODY_FLAG).await?;
        if body.is_empty() {
            return Err(empty_body());
        }
        return Ok((vec![(None, body)], claim));
    }
    // The form as sent is refused above the limit too, as a raw body is.
    refuse_declared(request, &mut payload, limit, MAX_BODY_FLAG).await?;
    // An empty form is an empty body, as a raw one is, not a malformed form.
    let mut body = decoded(request, payload)?;
    let first = loop {
        match body.next().await {
            None => return Err(empty_body()),
            Some(Ok(chunk)) if chunk.is_empty() => continue,
            Some(chunk) => break chunk,
        }
    };
    let body = futures_util::stream::once(async { first }).chain(body);
    let mut form = Multipart::new(request.headers(), body);
    let mut images = Vec::new();
    let mut total = 0usize;
    let mut claim = body_memory(request).claim();
    while let Some(field) = form.next().await {
        let mut field = field.map_err(|e| unreadable("malformed multipart body", &e))?;
        let disposition = field.content_disposition();
        if disposition.and_then(|d| d.get_filename()).is_none() {
            let field_name = disposition.and_then(|d| d.get_name()).unwrap_or_default();
            let error = ApiError::Unprocessable(format!(
                "multipart field {field_name:?} is not a file: images go in file parts \
                 (curl -F 'image=@board.png')"
            ));
            drop(field);
            drain_form(&mut form).await;
            return Err(error);
        }
        let name = disposition.and_then(|d| d.get_filename().map(String::from));
        let mut bytes = BytesMut::new();
        while let Some(chunk) = field.next().await {
            let chunk = chunk.map_err(|e| unreadable("malformed multipart body", &e))?;
            total += chunk.len();
            if total > limit {
                drop(field);
                drain_form(&mut form).await;
                return Err(too_large(None, limit, MAX_BODY_FLAG));
            }
            claim.cover(total)?;
            bytes.extend_from_slice(&chunk);
        }
        images.push((name, bytes.freeze()));
        if images.len() > MAX_BATCH_IMAGES {
            // Read off, so the client still sending its parts gets this answer (the form gives
            // its next field only once this one is dropped).
            drop(field);
            drain_form(&mut form).await;
            return Err(ApiError::PayloadTooLarge(format!(
                "at most {MAX_BATCH_IMAGES} images per request; this one holds more (send \
                 the rest in another request)"
            )));
        }
    }
    if images.is_empty() {
        return Err(ApiError::Unprocessable(
            "the multipart form holds no file".into(),
        ));
    }
    Ok((images, claim))
}

async fn list_templates(
    _query: NoQuery,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let service = service(&state)?;
    let (templates, unloaded) = service.templates.list();
    Ok(HttpResponse::Ok().json(TemplateList {
        templates: templates
            .iter()
            .map(|t| template_view(service, t))
            .collect(),
        not_loaded: unloaded
            .iter()
            .map(|(board, reason)| NotLoaded { board, reason })
            .collect(),
    }))
}

// Responses are typed structs rather than `json!` values: those widen f32 to f64 and print
// 0.999 as 0.9990000128746033.
#[derive(Serialize)]
struct TemplateList<'a> {
    templates: Vec<TemplateView<'a>>,
    /// Stored boards whose template did not load at start: not served until replaced.
    not_loaded: Vec<NotLoaded<'a>>,
}

#[derive(Serialize)]
struct NotLoaded<'a> {
    board: &'a str,
    reason: &'a str,
}

/// A template as the API shows it: its record, and the threshold its verdicts use.
#[derive(Serialize)]
struct TemplateView<'a> {
    #[serde(flatten)]
    info: &'a TemplateInfo,
    /// The board's `reject_threshold`, or the model's operating threshold when it has none.
    effective_reject_threshold: f32,
}

fn template_view<'a>(service: &AoiService, info: &'a TemplateInfo) -> TemplateView<'a> {
    TemplateView {
        info,
        effective_reject_threshold: service.reject_threshold(info.reject_threshold),
    }
}

#[derive(Serialize)]
struct InspectResult {
    board: String,
    verdict: &'static str,
    defects: Vec<Detection>,
    /// Candidates beyond the model's `max_candidates`, never classified (the board is then
    /// rejected).
    unclassified_candidates: usize,
    alignment: Alignment,
    timings_ms: StageTimings,
}

/// One image of a batch: its result, or why it has none.
#[derive(Serialize)]
struct BatchItem {
    index: usize,
    name: Option<String>,
    #[serde(flatten)]
    outcome: BatchOutcome,
}

#[derive(Serialize)]
#[serde(untagged)]
enum BatchOutcome {
    Inspected(InspectResult),
    Failed {
        board: String,
        status: u16,
        error: String,
    },
}

#[derive(Serialize)]
struct BatchResult {
    board: String,
    results: Vec<BatchItem>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutQuery {
    reject_threshold: Option<f32>,
}

/// The service and the board name a template upload is for, or why it is refused.
fn template_target(
    state: &AppState,
    board: &str,
    query: &PutQuery,
) -> Result<(Arc<AoiService>, String), ApiError> {
    let service = service(state)?.clone();
    let board = board_name(board)?;
    if let Some(t) = query.reject_threshold.filter(|t| !(0.0..=1.0).contains(t)) {
        return Err(ApiError::Unprocessable(format!(
            "reject_threshold {t} must be within 0..1"
        )));
    }
    Ok((service, board))
}

async fn put_template(
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<PutQuery>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (mut images, _held) = read_images(&request, payload, state.max_body_bytes).await?;
    let (service, board) = template_target(&state, &path, &query)?;
    if images.len() != 1 {
        return Err(ApiError::Unprocessable(format!(
            "a template is one image, got {}",
            images.len()
        )));
    }
    let (_, bytes) = images.remove(0);
    let threshold = query.reject_threshold;
    let (replaced, info) = {
        let service = service.clone();
        web::block(move || {
            service
                .templates
                .put(&board, &bytes, threshold, &service.inspector)
        })
        .await??
    };
    let mut response = if replaced {
        HttpResponse::Ok()
    } else {
        HttpResponse::Created()
    };
    Ok(response.json(template_view(&service, &info)))
}

async fn get_template(
    _query: NoQuery,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let board = board_name(&path)?;
    let service = service(&state)?;
    let found = find_board(service, &board)?;
    Ok(HttpResponse::Ok().json(template_view(service, &found.info)))
}

async fn template_image(
    _query: NoQuery,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let board = board_name(&path)?;
    let service = service(&state)?;
    find_board(service, &board)?;
    let image = service.templates.image_path(&board);
    // Only the header is read here; the rest is streamed, since a template can be tens of
    // megabytes and many clients may fetch it.
    let opened = web::block(move || {
        let mut file = std::fs::File::open(image)?;
        let mut head = Vec::with_capacity(64);
        (&mut file).take(64).read_to_end(&mut head)?;
        file.seek(std::io::SeekFrom::Start(0))?;
        Ok::<_, std::io::Error>((file, head))
    })
    .await;
    let (file, head) = match opened {
        Ok(Ok(opened)) => opened,
        // Deleted between the lookup and the read.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(unknown_board(service, &board));
        }
        Ok(Err(e)) => {
            return Err(ApiError::Internal(format!(
                "template image of {board}: {e}"
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let kind = image::guess_format(&head)
        .map(|f| f.to_mime_type())
        .unwrap_or("application/octet-stream");
    streamed(file, kind, None)
}

async fn delete_template(
    _query: NoQuery,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let board = board_name(&path)?;
    let service = service(&state)?.clone();
    let (deleting, name) = (service.clone(), board.clone());
    let existed = web::block(move || deleting.templates.delete(&name))
        .await?
        .map_err(|e| ApiError::Internal(format!("cannot delete template {board}: {e}")))?;
    if existed {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(unknown_board(&service, &board))
    }
}

/// Inspects one image of a board; a failure is counted by its status, also within a batch
/// (whose own answer is 200).
async fn inspect_one(
    service: &Arc<AoiService>,
    board: &str,
    bytes: Bytes,
) -> Result<InspectResult, ApiError> {
    let result = inspect_image(service, board, bytes).await;
    if let Err(error) = &result {
        use actix_web::ResponseError;
        service
            .inspector
            .metrics
            .aoi_images_failed
            .with_label_values(&[error.status_code().as_str()])
            .inc();
    }
    result
}

async fn inspect_image(
    service: &Arc<AoiService>,
    board: &str,
    bytes: Bytes,
) -> Result<InspectResult, ApiError> {
    let found = find_board(service, board)?;
    let inspector = service.inspector.clone();
    let template = found.template.clone();
    let prepared = web::block(move || inspector.prepare(&bytes, &template)).await??;
    let inspection = service
        .inspector
        .finish(
            prepared,
            service.listing_threshold(found.info.reject_threshold),
        )
        .await?;
    let verdict = service.verdict(&inspection, found.info.reject_threshold);
    let metrics = &service.inspector.metrics;
    metrics.aoi_inspections.with_label_values(&[verdict]).inc();
    for defect in &inspection.defects {
        metrics
            .aoi_defects
            .with_label_values(&[defect.class_name])
            .inc();
    }
    Ok(InspectResult {
        board: board.to_string(),
        verdict,
        defects: inspection.defects,
        unclassified_candidates: inspection.unclassified_candidates,
        alignment: inspection.alignment,
        timings_ms: inspection.timings_ms,
    })
}

/// An inspect request read: the service, the board (which must have a template), the images
/// and their claim on `--max-body-memory`.
type InspectRequest = (
    Arc<AoiService>,
    String,
    Vec<(Option<String>, Bytes)>,
    BodyClaim,
);

/// The service, the board (which must have a template) and the images of an inspect request.
async fn inspect_request(
    state: &AppState,
    path: &web::Path<String>,
    request: &HttpRequest,
    payload: web::Payload,
) -> Result<InspectRequest, ApiError> {
    // The body first: an answer sent with the body unread makes actix drop the connection.
    let (images, claim) = read_images(request, payload, state.max_body_bytes).await?;
    let (service, board) = inspected_board(state, path)?;
    Ok((service, board, images, claim))
}

/// The service and the name of a board with a template, or why an inspection is refused.
fn inspected_board(state: &AppState, board: &str) -> Result<(Arc<AoiService>, String), ApiError> {
    let service = service(state)?.clone();
    let board = board_name(board)?;
    find_board(&service, &board)?;
    Ok((service, board))
}

async fn inspect(
    _query: NoQuery,
    state: web::Data<AppState>,
    path: web::Path<String>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (service, board, mut images, _held) =
        inspect_request(&state, &path, &request, payload).await?;
    if images.len() != 1 {
        return Err(ApiError::Unprocessable(format!(
            "POST /v1/inspect/{board} takes one image (got {}); use /v1/inspect/{board}/batch",
            images.len()
        )));
    }
    let (_, bytes) = images.remove(0);
    let inspection = inspect_one(&service, &board, bytes);
    Ok(HttpResponse::Ok().json(unless_client_leaves(&request, inspection).await?))
}

/// Several images of one board in one request; each gets its result or its own error.
async fn inspect_batch(
    _query: NoQuery,
    state: web::Data<AppState>,
    path: web::Path<String>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (service, board, images, _held) = inspect_request(&state, &path, &request, payload).await?;
    // A few images at a time, in order: enough to keep every core and the classifier's batches
    // busy, while a batch of large images never holds all its decoded pixels at once.
    let in_flight = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
    let inspections = futures_util::stream::iter(images.into_iter().enumerate().map(
        |(index, (name, bytes))| {
            let service = service.clone();
            let board = board.clone();
            async move {
                let outcome = match inspect_one(&service, &board, bytes).await {
                    Ok(result) => BatchOutcome::Inspected(result),
                    Err(error) => {
                        use actix_web::ResponseError;
                        BatchOutcome::Failed {
                            board,
                            status: error.status_code().as_u16(),
                            error: error.to_string(),
                        }
                    }
                };
                BatchItem {
                    index,
                    name,
                    outcome,
                }
            }
        },
    ))
    .buffered(in_flight)
    .collect::<Vec<BatchItem>>();
    let results = unless_client_leaves(&request, inspections).await;
    Ok(HttpResponse::Ok().json(BatchResult { board, results }))
}
