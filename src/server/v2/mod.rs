//! Open Inference Protocol (KServe v2) routes, as spoken by NVIDIA Triton, so `tritonclient`,
//! `perf_analyzer` and KServe tooling work unchanged.

pub mod codec;
mod json_data;

use std::time::{Duration, Instant};

use actix_web::http::Method;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::json;

use crate::engine::ServedModel;
use crate::server::body::{MAX_BODY_FLAG, media_type, read_limited, refused_head};
use crate::server::client_gone::unless_client_leaves;
use crate::server::early_refusal::{BodyRoute, Head, HeadCheck};
use crate::server::error::ApiError;
use crate::server::routing::resource;
use crate::server::state::AppState;
use crate::server::{NoParameters, NoQuery};

/// Media types accepted on infer: JSON, the binary extension, and what curl sends by default.
const INFER_MEDIA_TYPES: &[&str] = &[
    "application/json",
    "application/octet-stream",
    "application/x-www-form-urlencoded",
    "text/plain",
];

/// A route that reads a small body of its own limit.
struct SmallBody {
    path: &'static str,
    limit: usize,
    /// Where its 413 says the limit comes from.
    source: &'static str,
}

const INDEX: SmallBody = SmallBody {
    path: "/v2/repository/index",
    limit: 4096,
    source: "the repository index's limit",
};

const MODEL_CONTROL: SmallBody = SmallBody {
    path: "/v2/repository/models/{model}/{action:load|unload}",
    limit: 64 * 1024,
    source: "a model control request's limit",
};

/// The scope of a model's routes, and of a version's within it.
const MODEL_SCOPE: &str = "/v2/models/{model}";
const VERSION_SCOPE: &str = "/versions/{version}";
const INFER: &str = "/infer";

pub fn routes(config: &mut web::ServiceConfig) {
    // Per-model routes live under one scope: actix matches each dynamic pattern with a regex, so
    // an infer request costs one match for `{model}` and string compares for the rest, instead
    // of a regex for every per-model route registered before it.
    let per_model = |scope: actix_web::Scope| {
        scope
            .service(resource(INFER, [(Method::POST, web::route().to(infer))]))
            .service(resource(
                "",
                [(Method::GET, web::route().to(model_metadata))],
            ))
            .service(resource(
                "/ready",
                [(Method::GET, web::route().to(model_ready))],
            ))
            .service(resource(
                "/config",
                [(Method::GET, web::route().to(model_config))],
            ))
            .service(resource(
                "/stats",
                [(Method::GET, web::route().to(model_stats))],
            ))
    };
    config
        .service(resource(
            "/v2",
            [(Method::GET, web::route().to(server_metadata))],
        ))
        .service(resource(
            "/v2/health/live",
            [(Method::GET, web::route().to(live))],
        ))
        .service(resource(
            READY_PATH,
            [(Method::GET, web::route().to(ready))],
        ))
        .service(resource(
            INDEX.path,
            [(Method::POST, web::route().to(repository_index))],
        ))
        .service(resource(
            MODEL_CONTROL.path,
            [(Method::POST, web::route().to(load_or_unload))],
        ))
        // Before the per-model scope, which would take "stats" for a model's name.
        .service(resource(
            "/v2/models/stats",
            [(Method::GET, web::route().to(all_stats))],
        ))
        .service(per_model(web::scope(MODEL_SCOPE)).service(per_model(web::scope(VERSION_SCOPE))));
}

/// Infer, of the latest version and of a given one, and the repository routes.
pub(super) fn body_routes() -> Vec<BodyRoute> {
    let index: HeadCheck = |_, head| {
        head.query::<NoParameters>()?;
        refused_head(head.headers, INDEX.limit, INDEX.source)
    };
    let control: HeadCheck =
        |_, head| refused_head(head.headers, MODEL_CONTROL.limit, MODEL_CONTROL.source);
    let infer = [
        format!("{MODEL_SCOPE}{INFER}"),
        format!("{MODEL_SCOPE}{VERSION_SCOPE}{INFER}"),
    ]
    .map(|pattern| BodyRoute::new(Method::POST, &pattern, infer_head));
    infer
        .into_iter()
        .chain([
            BodyRoute::new(Method::POST, INDEX.path, index),
            BodyRoute::new(Method::POST, MODEL_CONTROL.path, control),
        ])
        .collect()
}

/// `infer`'s refusals before its body, in its order.
fn infer_head(state: &AppState, head: &Head) -> Result<(), ApiError> {
    head.query::<NoParameters>()?;
    accepted_media_type(head.headers)?;
    head.within_max_body(state)?;
    head.check_params(|path: ModelPath| path.resolve(state))
}

/// The 415 of an infer body of another media type than `INFER_MEDIA_TYPES`.
fn accepted_media_type(headers: &actix_web::http::header::HeaderMap) -> Result<(), ApiError> {
    match media_type(headers).filter(|m| !INFER_MEDIA_TYPES.contains(&m.as_str())) {
        Some(media) => Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type {media} is not accepted on infer (use one of: {})",
            INFER_MEDIA_TYPES.join(", ")
        ))),
        None => Ok(()),
    }
}

/// The readiness probe's path.
pub const READY_PATH: &str = "/v2/health/ready";

#[derive(serde::Deserialize)]
struct ModelPath {
    model: String,
    version: Option<String>,
}

impl ModelPath {
    fn resolve(&self, state: &AppState) -> Result<std::sync::Arc<ServedModel>, ApiError> {
        state.model(&self.model, self.version.as_deref())
    }
}

async fn server_metadata(_query: NoQuery) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "name": "linescan",
        "version": env!("CARGO_PKG_VERSION"),
        // Not "model_repository": models are loaded at start, never loaded or unloaded later.
        "extensions": ["binary_tensor_data", "model_configuration", "statistics"],
    }))
}

/// Triton's model control: linescan serves what its repository held at start.
async fn load_or_unload(
    path: web::Path<(String, String)>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    // The body first: an answer sent with the body unread makes actix drop the connection.
    read_limited(&request, payload, MODEL_CONTROL.limit, MODEL_CONTROL.source).await?;
    let (model, action) = path.into_inner();
    Err(ApiError::NotImplemented(format!(
        "cannot {action} model {model}: linescan loads its model repository at start and \
         serves it unchanged; change the repository and restart the server (SIGTERM lets \
         requests in flight finish)"
    )))
}

async fn live(_query: NoQuery) -> HttpResponse {
    HttpResponse::Ok().json(json!({ "live": true }))
}

async fn ready(_query: NoQuery, state: web::Data<AppState>) -> HttpResponse {
    if state.ready() {
        HttpResponse::Ok().json(json!({ "ready": true }))
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "1"))
            .json(json!({ "ready": false, "error": "models are still loading" }))
    }
}

/// The body Triton's repository index takes: every model it lists is loaded and ready, so
/// `ready` filters nothing here, but anything else is refused rather than ignored.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct IndexRequest {
    #[serde(rename = "ready")]
    _ready: Option<bool>,
}

async fn repository_index(
    _query: NoQuery,
    state: web::Data<AppState>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (body, _) = read_limited(&request, payload, INDEX.limit, INDEX.source).await?;
    if !body.iter().all(u8::is_ascii_whitespace) {
        serde_json::from_slice::<IndexRequest>(&body).map_err(|e| {
            ApiError::BadRequest(format!(
                "the repository index takes an empty body or {{\"ready\": true|false}}: {e}"
            ))
        })?;
    }
    let index: Vec<_> = state
        .registry()?
        .models()
        .map(|m| json!({ "name": m.name(), "version": m.spec.version.to_string(), "state": "READY" }))
        .collect();
    Ok(HttpResponse::Ok().json(index))
}

async fn model_metadata(
    _query: NoQuery,
    state: web::Data<AppState>,
    path: web::Path<ModelPath>,
) -> Result<HttpResponse, ApiError> {
    let model = path.resolve(&state)?;
    let config = &model.spec.config;
    let versions: Vec<String> = state
        .registry()?
        .models()
        .filter(|m| m.name() == model.name())
        .map(|m| m.spec.version.to_string())
        .collect();
    let tensors = |specs: &[crate::runtime::model_config::TensorSpec]| {
        specs
            .iter()
            .map(|s| json!({ "name": s.name, "datatype": s.datatype, "shape": s.full_shape(config.batching()) }))
            .collect::<Vec<_>>()
    };
    Ok(HttpResponse::Ok().json(json!({
        "name": config.name,
        "versions": versions,
        "platform": config.platform,
        "inputs": tensors(&config.inputs),
        "outputs": tensors(&config.outputs),
    })))
}

async fn model_ready(
    _query: NoQuery,
    state: web::Data<AppState>,
    path: web::Path<ModelPath>,
) -> Result<HttpResponse, ApiError> {
    let model = path.resolve(&state)?;
    Ok(HttpResponse::Ok().json(json!({ "name": model.name(), "ready": true })))
}

/// Triton's statistics extension: every version of the model, or the one in the path.
async fn model_stats(
    _query: NoQuery,
    state: web::Data<AppState>,
    path: web::Path<ModelPath>,
) -> Result<HttpResponse, ApiError> {
    let stats: Vec<_> = match &path.version {
        Some(_) => vec![stats_of(&*path.resolve(&state)?)],
        None => {
            path.resolve(&state)?; // a 404 naming the model when there is none
            state
                .registry()?
                .models()
                .filter(|m| m.name() == path.model)
                .map(|m| stats_of(m))
                .collect()
        }
    };
    Ok(HttpResponse::Ok().json(json!({ "model_stats": stats })))
}

/// Every loaded model version's statistics.
async fn all_stats(_query: NoQuery, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let stats: Vec<_> = state.registry()?.models().map(|m| stats_of(m)).collect();
    Ok(HttpResponse::Ok().json(json!({ "model_stats": stats })))
}

fn stats_of(model: &ServedModel) -> serde_json::Value {
    model
        .batcher
        .stats()
        .json(model.name(), &model.spec.version.to_string())
}

async fn model_config(
    _query: NoQuery,
    state: web::Data<AppState>,
    path: web::Path<ModelPath>,
) -> Result<HttpResponse, ApiError> {
    let model = path.resolve(&state)?;
    let mut config =
        serde_json::to_value(&*model.spec.config).map_err(|e| ApiError::Internal(e.to_string()))?;
    config["execution_providers_loaded"] = json!(model.provider_names());
    if let Some(labels) = &model.spec.labels {
        config["label_names"] = json!(labels.as_slice());
    }
    Ok(HttpResponse::Ok().json(config))
}

async fn infer(
    _query: NoQuery,
    state: web::Data<AppState>,
    path: web::Path<ModelPath>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    // The body is read before anything that can fail, so an early error never leaves part of
    // it on a kept-alive connection (413 and 415 close the connection instead).
    accepted_media_type(request.headers())?;
    let (body, _held) =
        read_limited(&request, payload, state.max_body_bytes, MAX_BODY_FLAG).await?;
    let model = path.resolve(&state)?;
    let config = &model.spec.config;
    let version = model.spec.version.to_string();
    let labels = [config.name.as_str(), version.as_str()];
    let invalid = |error: ApiError| {
        state.metrics.failure(
            labels[0],
            labels[1],
            crate::metrics::FailureReason::InvalidInput,
        );
        error
    };
    let header_length = match request.headers().get(codec::HEADER_LENGTH) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    invalid(ApiError::BadRequest(format!(
                        "{} must be a byte count (the length of the JSON header that starts \
                         the body), not {:?}",
                        codec::HEADER_LENGTH,
                        String::from_utf8_lossy(value.as_bytes())
                    )))
                })?,
        ),
    };
    let decoded = codec::decode(body, header_length, config).map_err(invalid)?;
    let timeout = decoded.timeout.unwrap_or(Duration::from_millis(
        config.dynamic_batching.default_timeout_ms,
    ));
    let inference = model
        .batcher
        .infer(decoded.inputs, decoded.rows, Instant::now() + timeout);
    let response = unless_client_leaves(&request, inference).await?;
    let outputs: Vec<_> = decoded
        .outputs
        .iter()
        .map(|(index, binary)| (&config.outputs[*index], &response.outputs[*index], *binary))
        .collect();
    let encoded = codec::encode(
        &config.name,
        model.spec.version,
        decoded.id.as_deref(),
        &outputs,
    );
    let mut reply = HttpResponse::Ok();
    reply
        .insert_header((
            "X-Linescan-Queue-Us",
            response.queue_time.as_micros().to_string(),
        ))
        .insert_header((
            "X-Linescan-Compute-Us",
            response.compute_time.as_micros().to_string(),
        ))
        .insert_header(("X-Linescan-Batch-Rows", response.batch_rows.to_string()));
    match encoded.header_length {
        Some(length) => reply
            .insert_header((codec::HEADER_LENGTH, length.to_string()))
            .content_type("application/octet-stream"),
        None => reply.content_type("application/json"),
    };
    state
        .metrics
        .request_duration
        .with_label_values(&labels)
        .observe(started.elapsed().as_secs_f64());
    Ok(reply.body(encoded.body))
}
