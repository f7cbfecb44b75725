//! Live sensor routes: RUL/anomaly/health scoring of windows sent as JSON (fleet jobs over HDF5
//! archives are in `server::jobs`).
//!
//! - `GET /v1/rul`, `GET /v1/rul/{model}`: sensor models and what they take.
//! - `POST /v1/rul/{model}`: windows as JSON → RUL, uncertainty, risk, anomaly, health each.

use std::sync::Arc;

use actix_web::http::Method;
use actix_web::http::header::HeaderMap;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::engine::Priority;
use crate::jobs::Fleet;
use crate::runtime::device::PlacedBytes;
use crate::sensors::{AssessSettings, SensorError, SensorModel, live};
use crate::server::NoQuery;
use crate::server::body::{MAX_BODY_FLAG, media_type, read_limited};
use crate::server::client_gone::unless_client_leaves;
use crate::server::early_refusal::{BodyRoute, Head};
use crate::server::error::ApiError;
use crate::server::routing::resource;
use crate::server::state::AppState;
use crate::tensor::f32_bytes;

const LIVE: &str = "/v1/rul/{model}";

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .service(resource(
            "/v1/rul",
            [(Method::GET, web::route().to(list_models))],
        ))
        .service(resource(
            LIVE,
            [
                (Method::GET, web::route().to(model_info)),
                (Method::POST, web::route().to(score_live)),
            ],
        ));
}

/// Live scoring.
pub(super) fn body_routes() -> Vec<BodyRoute> {
    vec![BodyRoute::new(Method::POST, LIVE, live_head)]
}

impl From<SensorError> for ApiError {
    fn from(error: SensorError) -> Self {
        match error {
            SensorError::Setup(message) => ApiError::Internal(message),
            SensorError::Syntax(message) => ApiError::BadRequest(message),
            SensorError::Invalid(message) => ApiError::Unprocessable(message),
            SensorError::TooMany(message) => ApiError::PayloadTooLarge(message),
            SensorError::Infer(infer) => infer.into(),
        }
    }
}

/// The sensor models and jobs, or why the routes are not served.
pub(super) fn fleet(state: &AppState) -> Result<&Arc<Fleet>, ApiError> {
    state.registry()?;
    state.fleet().ok_or_else(|| {
        ApiError::NotFound(
            "sensors are not enabled: the model repository has no rul_* model".into(),
        )
    })
}

pub(super) fn sensor_model(fleet: &Fleet, name: &str) -> Result<Arc<SensorModel>, ApiError> {
    fleet.sensors.model(name).cloned().ok_or_else(|| {
        ApiError::NotFound(format!(
            "no sensor model {name} (sensor models: {})",
            fleet.sensors.names().join(", ")
        ))
    })
}

/// Server settings with the request's overrides, validated.
pub(super) fn settings(
    fleet: &Fleet,
    critical: Option<f64>,
    warning: Option<f64>,
) -> Result<AssessSettings, ApiError> {
    let settings = fleet.sensors.settings.with(critical, warning);
    settings.validate().map_err(ApiError::Unprocessable)?;
    Ok(settings)
}

fn describe(model: &SensorModel, settings: &AssessSettings) -> serde_json::Value {
    json!({
        "model": model.name(),
        "version": model.rul.spec.version,
        "anomaly_model": model.anomaly.as_ref().map(|a| a.name()),
        "anomaly_version": model.anomaly.as_ref().map(|a| a.spec.version),
        "window": model.params.window,
        "channels": model.params.channels,
        "padding": model.params.padding.name(),
        "rul_cap": model.params.rul_cap,
        "max_windows_per_batch": model.batch_rows(),
        "anomaly_alarm_threshold": model.alarm_threshold(),
        "rul_sigma_calibrated": model.rul_calibration.is_some(),
        "risk": {"critical": settings.critical, "warning": settings.warning},
        "health_anomaly_weight": settings.health_anomaly_weight,
    })
}

async fn list_models(
    _query: NoQuery,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let fleet = fleet(&state)?;
    let models: Vec<serde_json::Value> = fleet
        .sensors
        .names()
        .iter()
        .filter_map(|n| fleet.sensors.model(n))
        .map(|m| describe(m, &fleet.sensors.settings))
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "models": models })))
}

async fn model_info(
    _query: NoQuery,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let fleet = fleet(&state)?;
    let model = sensor_model(fleet, &path)?;
    Ok(HttpResponse::Ok().json(describe(&model, &fleet.sensors.settings)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LiveQuery {
    critical: Option<f64>,
    warning: Option<f64>,
}

/// Serialized directly (not through `json!`) so f32 values print at f32 precision.
#[derive(Serialize)]
struct LiveResponse<'a> {
    model: &'a str,
    version: u64,
    anomaly_model: Option<&'a str>,
    results: Vec<LiveResult>,
}

#[derive(Serialize)]
struct LiveResult {
    unit: serde_json::Value,
    rul: f32,
    rul_std: f32,
    rul_sigma: f32,
    risk: crate::sensors::Risk,
    anomaly: Option<f32>,
    anomaly_raw: Option<f32>,
    anomaly_alarm: Option<bool>,
    health: f32,
    rows: usize,
    padded: usize,
}

/// Live scoring's refusals before its body, in its order.
fn live_head(state: &AppState, head: &Head) -> Result<(), ApiError> {
    let query = head.query::<LiveQuery>()?;
    accepted_media_type(head.headers)?;
    head.within_max_body(state)?;
    head.check_params(|model: String| live_target(state, &model, &query))
}

/// The 415 of live windows sent as anything but JSON.
fn accepted_media_type(headers: &HeaderMap) -> Result<(), ApiError> {
    match media_type(headers).filter(|m| m != "application/json") {
        Some(kind) => Err(ApiError::UnsupportedMediaType(format!(
            "send windows as application/json, not {kind}"
        ))),
        None => Ok(()),
    }
}

/// The sensor model and the settings live windows are scored with, or why they are not.
fn live_target(
    state: &AppState,
    model: &str,
    query: &LiveQuery,
) -> Result<(Arc<SensorModel>, AssessSettings), ApiError> {
    let fleet = fleet(state)?;
    let model = sensor_model(fleet, model)?;
    let settings = settings(fleet, query.critical, query.warning)?;
    Ok((model, settings))
}

async fn score_live(
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<LiveQuery>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    accepted_media_type(request.headers())?;
    // The body before the checks: an answer sent with the body unread makes actix drop the
    // connection.
    let (body, _held) =
        read_limited(&request, payload, state.max_body_bytes, MAX_BODY_FLAG).await?;
    let (model, settings) = live_target(&state, &path, &query)?;
    let started = std::time::Instant::now();
    // Off the HTTP workers: a large body takes a while to parse, and probes must not wait.
    let prepared = {
        let model = model.clone();
        web::block(move || {
            let windows = live::parse_windows(&body)?;
            live::prepare(&windows, &model.params, &model.scaler)
        })
        .await?
    };
    let (input, infos) = prepared?;
    let stage = |name: &str, seconds: f64| {
        state
            .metrics
            .stage_duration
            .with_label_values(&["sensors", name, "cpu"])
            .observe(seconds)
    };
    stage("prepare", started.elapsed().as_secs_f64());
    let scoring = std::time::Instant::now();
    let deadline = model.default_deadline();
    let window_len = model.params.window_len();
    let per_call = model.batch_rows();
    let scoring_calls = async {
        if infos.len() <= per_call {
            let scores = model
                .score(
                    PlacedBytes::Host(f32_bytes(input)),
                    infos.len(),
                    deadline,
                    Priority::Live,
                )
                .await?;
            Ok(vec![scores])
        } else {
            let calls = input.chunks(per_call * window_len).map(|chunk| {
                model.score(
                    PlacedBytes::Host(f32_bytes(chunk.to_vec())),
                    chunk.len() / window_len,
                    deadline,
                    Priority::Live,
                )
            });
            futures_util::future::join_all(calls)
                .await
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
        }
    };
    let scores = unless_client_leaves(&request, scoring_calls).await?;
    stage("score", scoring.elapsed().as_secs_f64());
    let alarm = model.alarm_threshold();
    let mut results = Vec::with_capacity(infos.len());
    let mut infos = infos.into_iter();
    for batch in &scores {
        for index in 0..batch.rul.len() {
            let info = infos.next().expect("one info per window");
            if let Some(problem) = batch.non_finite_at(index) {
                let window = results.len();
                return Err(SensorError::Invalid(match &info.unit {
                    serde_json::Value::Null => format!("window {window}: {problem}"),
                    unit => format!("window {window} (unit {unit}): {problem}"),
                })
                .into());
            }
            let a = model.assess(batch, index, &settings);
            results.push(LiveResult {
                unit: info.unit,
                rul: a.rul,
                rul_std: a.rul_std,
                rul_sigma: a.rul_sigma,
                risk: a.risk,
                anomaly: a.anomaly,
                anomaly_raw: a.anomaly_raw,
                anomaly_alarm: a.anomaly.zip(alarm).map(|(s, t)| s as f64 >= t),
                health: a.health,
                rows: info.rows,
                padded: info.padded,
            });
        }
    }
    let slowest = |f: fn(&crate::sensors::Scores) -> std::time::Duration| {
        scores
            .iter()
            .map(f)
            .max()
            .unwrap_or_default()
            .as_micros()
            .to_string()
    };
    Ok(HttpResponse::Ok()
        .insert_header(("X-Linescan-Queue-Us", slowest(|s| s.queue_time)))
        .insert_header(("X-Linescan-Compute-Us", slowest(|s| s.compute_time)))
        .insert_header((
            "X-Linescan-Batch-Rows",
            scores
                .iter()
                .map(|s| s.batch_rows)
                .max()
                .unwrap_or(0)
                .to_string(),
        ))
        .json(LiveResponse {
            model: model.name(),
            version: model.rul.spec.version,
            anomaly_model: model.anomaly.as_ref().map(|a| a.name()),
            results,
        }))
}
