//! Fleet job routes: HDF5 archives scored as batch jobs.
//!
//! - `POST /v1/jobs`: an HDF5 archive as the body, as a multipart file, or `{"path": ...}` under
//!   `--jobs-allow-path` → 202 `{"id"}`.
//! - `GET /v1/jobs`, `GET /v1/jobs/{id}`: state, progress, rows/s, error.
//! - `GET /v1/jobs/{id}/result?format=h5|csv|json[&view=rows|units]`.
//! - `DELETE /v1/jobs/{id}[?purge=true]`: cancels (purge also removes a finished job's files).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use actix_multipart::Multipart;
use actix_web::http::Method;
use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::disk_reserve::DiskReserve;
use crate::jobs::archive::Partition;
use crate::jobs::gaps::MissingPolicy;
use crate::jobs::manager::Refused;
use crate::jobs::results::{self, Format, ResultMeta, View};
use crate::jobs::store::{InputKind, JobInput, JobRecord, JobState};
use crate::jobs::{Fleet, PathRefused};
use crate::sensors::AssessSettings;
use crate::server::NoQuery;
use crate::server::body::{
    BodyError, accepted_encoding, declared_length, decoded, drain_form, drain_unread, media_type,
    read_limited, refused_head, unreadable,
};
use crate::server::early_refusal::{BodyRoute, HeadCheck};
use crate::server::error::{ApiError, parse_query};
use crate::server::file_response::streamed;
use crate::server::routing::resource;
use crate::server::sensors::{fleet, sensor_model, settings};
use crate::server::state::AppState;

/// The columns of CSV and JSON exports, in the names of their cached files: a server that adds
/// a column (cols2: `held`) exports a finished job's result again rather than serve the old file.
const EXPORT_COLUMNS: &str = "cols2";

/// Largest `{"path": ...}` submission body, and where its 413 says the limit comes from.
const PATH_BODY_LIMIT: usize = 64 * 1024;
const PATH_BODY_SOURCE: &str = "a JSON {\"path\": ...} submission's; send the HDF5 archive \
                                itself as the body (any type but application/json) or as a \
                                multipart file";

const JOBS: &str = "/v1/jobs";

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .service(resource(
            JOBS,
            [
                (Method::POST, web::route().to(submit_job)),
                (Method::GET, web::route().to(list_jobs)),
            ],
        ))
        .service(resource(
            "/v1/jobs/{id}",
            [
                (Method::GET, web::route().to(get_job)),
                (Method::DELETE, web::route().to(cancel_job)),
            ],
        ))
        .service(resource(
            "/v1/jobs/{id}/result",
            [(Method::GET, web::route().to(job_result))],
        ));
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SubmitOptions {
    /// Server-side archive (JSON submissions only).
    path: Option<String>,
    model: Option<String>,
    partition: Option<Partition>,
    missing: Option<MissingPolicy>,
    critical: Option<f64>,
    warning: Option<f64>,
    /// Name recorded as the result's source.
    name: Option<String>,
}

/// An option given in the query and the JSON body: once, or the same in both.
fn either<T: PartialEq + Serialize>(
    field: &str,
    query: Option<T>,
    body: Option<T>,
) -> Result<Option<T>, ApiError> {
    match (query, body) {
        (Some(q), Some(b)) if q != b => {
            let show = |v: &T| serde_json::to_string(v).unwrap_or_default();
            Err(ApiError::Unprocessable(format!(
                "\"{field}\" is {} in the query and {} in the body; give it once",
                show(&q),
                show(&b)
            )))
        }
        (q, b) => Ok(b.or(q)),
    }
}

/// Longest job name, in bytes.
const MAX_NAME_BYTES: usize = 255;

/// A job's name is stored as the result's source (an HDF5 string attribute, a CSV and JSON
/// field): text without control characters, of bounded length.
fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    if let Some(bad) = name.chars().find(|c| c.is_control()) {
        return Err(ApiError::Unprocessable(format!(
            "{what} holds the control character {bad:?}; a job name is text without control \
             characters"
        )));
    }
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(ApiError::Unprocessable(format!(
            "{what} is {} bytes; a job name is 1 to {MAX_NAME_BYTES}",
            name.len()
        )));
    }
    Ok(())
}

/// A file name made a valid job name: control characters dropped, cut to length; None when
/// nothing is left.
fn printable_name(filename: &str) -> Option<String> {
    let mut name = String::new();
    for c in filename.chars().filter(|c| !c.is_control()) {
        if name.len() + c.len_utf8() > MAX_NAME_BYTES {
            break;
        }
        name.push(c);
    }
    (!name.is_empty()).then_some(name)
}

/// The model a submission names, or the only one.
fn job_model(fleet: &Fleet, name: Option<&str>) -> Result<String, ApiError> {
    match name {
        Some(name) => Ok(sensor_model(fleet, name)?.name().to_string()),
        None => {
            let names = fleet.sensors.names();
            match names.as_slice() {
                [only] => Ok(only.clone()),
                _ => Err(ApiError::Unprocessable(format!(
                    "name the model with ?model= (sensor models: {})",
                    names.join(", ")
                ))),
            }
        }
    }
}

/// The 413 of an archive upload; `size` when the request declared it.
/// `declared`: the request's Content-Length, which for a form includes its framing.
fn too_large(declared: Option<u64>, limit: u64) -> ApiError {
    let archive = declared.map_or("archive".into(), |size| {
        format!("request body of {size} bytes (the archive, or the form that holds it)")
    });
    ApiError::PayloadTooLarge(format!(
        "{archive} above the limit of {limit} bytes (--job-max-upload-bytes / \
         LINESCAN_JOB_MAX_UPLOAD_BYTES); large archives can be submitted by path with \
         --jobs-allow-path"
    ))
}

/// Bytes gathered before each write. The writes run on actix's blocking pool, so a disk that
/// stalls holds up that pool rather than the HTTP worker and every connection on it, and each
/// overlaps the reading of the next buffer from the socket.
const UPLOAD_WRITE_BYTES: usize = 4 << 20;

type Written = Result<(std::fs::File, Vec<u8>), ApiError>;

/// Writes `buffer` to `file` on the blocking pool; the file and the buffer come back.
fn start_write(mut file: std::fs::File, buffer: Vec<u8>) -> impl Future<Output = Written> {
    let write = web::block(move || file.write_all(&buffer).map(|()| (file, buffer)));
    async move {
        write
            .await
            .map_err(|e| upload_failed(&e))?
            .map_err(|e| upload_failed(&e))
    }
}

fn upload_failed(error: &dyn std::fmt::Display) -> ApiError {
    ApiError::Internal(format!("cannot store the upload: {error}"))
}

impl From<Refused> for ApiError {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::Busy(message) => ApiError::Unavailable {
                message,
                retry_after: 10,
            },
            Refused::LowDisk(message) => ApiError::InsufficientStorage(message),
            Refused::Store(_) => ApiError::Internal(refused.to_string()),
        }
    }
}

/// Streams an upload to `path` under `limit` bytes, each write leaving `reserve` free on the
/// disk; returns its size.
async fn save_stream<S, E>(
    mut stream: S,
    path: &Path,
    limit: u64,
    reserve: &DiskReserve,
) -> Result<u64, ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: BodyError,
{
    let target = path.to_path_buf();
    let file = web::block(move || std::fs::File::create(target))
        .await
        .map_err(|e| upload_failed(&e))?
        .map_err(|e| upload_failed(&e))?;
    // The file is either here or with the write in flight.
    let mut idle = Some(file);
    let mut in_flight = None;
    let mut in_flight_bytes = 0;
    let mut buffer = Vec::with_capacity(UPLOAD_WRITE_BYTES);
    let mut spare = Vec::with_capacity(UPLOAD_WRITE_BYTES);
    let mut size = 0u64;
    loop {
        let chunk = stream.next().await;
        let last = chunk.is_none();
        if let Some(chunk) = chunk {
            let chunk = chunk.map_err(|e| unreadable("reading the upload", &e))?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(too_large(None, limit));
            }
            buffer.extend_from_slice(&chunk);
        }
        if buffer.len() >= UPLOAD_WRITE_BYTES || last {
            // Checked straight after a read, before waiting for the write in flight (its bytes
            // may not be on the disk yet, so they count too): actix stops reading a body that
            // nobody polls, and one dropped in that state is neither drained nor closed, so
            // the client would wait on its send for ever.
            reserve
                .check((buffer.len() + in_flight_bytes) as u64)
                .map_err(ApiError::InsufficientStorage)?;
            let file = match in_flight.take() {
                Some(write) => {
                    let (file, mut done): (std::fs::File, Vec<u8>) = write.await?;
                    done.clear();
                    spare = done;
                    file
                }
                None => idle
                    .take()
                    .expect("the file is idle when no write is in flight"),
            };
            let full = std::mem::replace(&mut buffer, std::mem::take(&mut spare));
            in_flight_bytes = full.len();
            in_flight = Some(start_write(file, full));
        }
        if last {
            break;
        }
    }
    let (file, _) = in_flight
        .expect("the last chunk always starts a write")
        .await?;
    // On the disk before the 202: an accepted job's archive survives a power cut.
    web::block(move || file.sync_all())
        .await?
        .map_err(|e| upload_failed(&e))?;
    Ok(size)
}

/// What the head of a submission decides before its body is read.
struct Admitted {
    fleet: Arc<Fleet>,
    options: SubmitOptions,
    /// An upload's model and settings; None for a JSON `{"path": ...}` submission, whose
    /// options are only complete once its body is read.
    upload: Option<(String, AssessSettings)>,
}

/// The refusals a submission's head (query, Content-Type, Content-Length) decides: the handler
/// makes them before it reads the body, and the `Expect: 100-continue` hook before the client
/// sends it, so a refused archive is not uploaded for nothing.
fn admit_submission(
    state: &AppState,
    query: &str,
    headers: &HeaderMap,
) -> Result<Admitted, ApiError> {
    let options: SubmitOptions = parse_query(query)?;
    let fleet = fleet(state)?.clone();
    if options.path.is_some() {
        return Err(ApiError::Unprocessable(
            "send {\"path\": ...} as a JSON body, not in the query".into(),
        ));
    }
    if media_type(headers).as_deref() == Some("application/json") {
        refused_head(headers, PATH_BODY_LIMIT, PATH_BODY_SOURCE)?;
        return Ok(Admitted {
            fleet,
            options,
            upload: None,
        });
    }
    let declared = declared_length(headers);
    let limit = fleet.args.max_upload_bytes;
    if let Some(size) = declared.filter(|size| *size > limit) {
        return Err(too_large(Some(size), limit));
    }
    if let Some(name) = &options.name {
        check_name("?name=", name)?;
    }
    let model = job_model(&fleet, options.model.as_deref())?;
    let settings = settings(&fleet, options.critical, options.warning)?;
    fleet.jobs.admit(declared.unwrap_or(0))?;
    accepted_encoding(headers)?;
    Ok(Admitted {
        fleet,
        options,
        upload: Some((model, settings)),
    })
}

/// Submissions, refused from the head as `submit_job` refuses them.
pub(super) fn body_routes() -> Vec<BodyRoute> {
    let check: HeadCheck =
        |state, head| admit_submission(state, head.query_string(), head.headers).map(drop);
    vec![BodyRoute::new(Method::POST, JOBS, check)]
}

async fn submit_job(
    state: web::Data<AppState>,
    request: HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let admitted = admit_submission(&state, request.query_string(), request.headers());
    let Admitted {
        fleet,
        mut options,
        upload,
    } = match admitted {
        Ok(admitted) => admitted,
        Err(error) => {
            // Read off the refused body (when small enough), so the client gets this answer
            // rather than a connection closed under its feet.
            drain_unread(&request, &mut payload).await;
            return Err(error);
        }
    };
    let Some((model, settings)) = upload else {
        let (body, _) = read_limited(&request, payload, PATH_BODY_LIMIT, PATH_BODY_SOURCE).await?;
        let from_body: SubmitOptions = serde_json::from_slice(&body).map_err(|e| {
            if e.is_syntax() || e.is_eof() {
                return ApiError::BadRequest(format!("the body is not valid JSON: {e}"));
            }
            ApiError::Unprocessable(format!(
                "a JSON submission is {{\"path\": \"...\", \"model\"?, \"partition\"?, \
                 \"missing\"?, \"critical\"?, \"warning\"?, \"name\"?}}: {}",
                crate::json_error::describe(&e)
            ))
        })?;
        options = SubmitOptions {
            path: from_body.path,
            model: either("model", options.model, from_body.model)?,
            partition: either("partition", options.partition, from_body.partition)?,
            missing: either("missing", options.missing, from_body.missing)?,
            critical: either("critical", options.critical, from_body.critical)?,
            warning: either("warning", options.warning, from_body.warning)?,
            name: either("name", options.name, from_body.name)?,
        };
        if let Some(name) = &options.name {
            check_name("\"name\"", name)?;
        }
        let requested = options
            .path
            .clone()
            .ok_or_else(|| ApiError::Unprocessable("a JSON submission needs \"path\"".into()))?;
        let model = job_model(&fleet, options.model.as_deref())?;
        let settings = settings(&fleet, options.critical, options.warning)?;
        let resolved =
            fleet
                .args
                .resolve(Path::new(&requested))
                .map_err(|refused| match refused {
                    PathRefused::Server(message) => ApiError::Internal(message),
                    PathRefused::Request(message) => ApiError::Unprocessable(message),
                })?;
        fleet.jobs.admit(0)?;
        let bytes = std::fs::metadata(&resolved).map(|m| m.len()).unwrap_or(0);
        let id = fleet
            .jobs
            .store()
            .create()
            .map_err(|e| ApiError::Internal(format!("cannot create the job: {e}")))?;
        let name = options.name.clone().unwrap_or_else(|| file_name(&resolved));
        let input = JobInput {
            kind: InputKind::Path,
            path: resolved,
            name,
            bytes,
        };
        return accepted(&fleet, id, model, &options, settings, input).await;
    };
    let limit = fleet.args.max_upload_bytes;
    let media = media_type(request.headers());
    let store = fleet.jobs.store();
    let id = store
        .create()
        .map_err(|e| ApiError::Internal(format!("cannot create the job: {e}")))?;
    let target = store.upload_path(&id);
    let reserve = fleet.jobs.reserve();
    let saved = if media.as_deref() == Some("multipart/form-data") {
        save_multipart(&request, payload, &target, limit, reserve).await
    } else {
        match decoded(&request, payload) {
            Ok(payload) => save_stream(payload, &target, limit, reserve)
                .await
                .map(|size| (size, None)),
            Err(refused) => Err(refused),
        }
    };
    let (bytes, filename) = match saved {
        Ok(saved) => saved,
        Err(error) => {
            let _ = store.remove(&id);
            return Err(error);
        }
    };
    if bytes == 0 {
        let _ = store.remove(&id);
        return Err(ApiError::Unprocessable(
            "the body is empty: send the HDF5 archive as the body, as a multipart file, or \
             {\"path\": ...} as JSON"
                .into(),
        ));
    }
    let name = options
        .name
        .clone()
        .or(filename.as_deref().and_then(printable_name))
        .unwrap_or_else(|| "upload.h5".into());
    let input = JobInput {
        kind: InputKind::Upload,
        path: target,
        name,
        bytes,
    };
    accepted(&fleet, id, model, &options, settings, input).await
}

/// The one file of a multipart form, streamed to `target`: its size and file name. Any other
/// field is refused by name, so a form field that looks like an option is never dropped unread.
async fn save_multipart(
    request: &HttpRequest,
    payload: web::Payload,
    target: &Path,
    limit: u64,
    reserve: &DiskReserve,
) -> Result<(u64, Option<String>), ApiError> {
    let mut form = Multipart::new(request.headers(), decoded(request, payload)?);
    let mut saved = None;
    while let Some(field) = form.next().await {
        let field = field.map_err(|e| unreadable("malformed multipart body", &e))?;
        let disposition = field.content_disposition().cloned();
        let filename = disposition
            .as_ref()
            .and_then(|d| d.get_filename().map(String::from));
        let name = disposition
            .as_ref()
            .and_then(|d| d.get_name().map(String::from))
            .unwrap_or_default();
        let is_archive = filename.is_some() || matches!(name.as_str(), "archive" | "file");
        if !is_archive {
            drop(field);
            drain_form(&mut form).await;
            return Err(ApiError::Unprocessable(format!(
                "multipart field {name:?} is not taken: a job form holds one file (the archive); \
                 give options in the query string, e.g. ?model=...&partition=..."
            )));
        }
        if saved.is_some() {
            drop(field);
            drain_form(&mut form).await;
            return Err(ApiError::Unprocessable(format!(
                "a job form holds one archive, got a second file (field {name:?}); submit one \
                 job per archive"
            )));
        }
        let size = save_stream(field, target, limit, reserve).await?;
        saved = Some((size, filename));
    }
    saved.ok_or_else(|| {
        ApiError::Unprocessable(
            "the multipart form holds no file (send the archive as a file field)".into(),
        )
    })
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .and_then(|n| printable_name(&n.to_string_lossy()))
        .unwrap_or_else(|| "archive.h5".into())
}

async fn accepted(
    fleet: &Fleet,
    id: String,
    model: String,
    options: &SubmitOptions,
    settings: AssessSettings,
    input: JobInput,
) -> Result<HttpResponse, ApiError> {
    let mut record = JobRecord::queued(
        id.clone(),
        model,
        options.partition.unwrap_or_default(),
        settings,
        input,
    );
    record.missing = options.missing.unwrap_or_default();
    // Off the HTTP worker: the record is flushed to the disk.
    let jobs = fleet.jobs.clone();
    let record = web::block(move || {
        jobs.submit(record).map_err(|refused| {
            let _ = jobs.store().remove(&id);
            ApiError::from(refused)
        })
    })
    .await??;
    let id = &record.id;
    Ok(HttpResponse::Accepted()
        .insert_header(("Location", format!("/v1/jobs/{id}")))
        .json(job_json(&record)))
}

fn job_json(record: &JobRecord) -> serde_json::Value {
    json!({
        "id": record.id,
        "state": record.state,
        "model": record.model,
        "progress": record.progress,
        "rows_done": record.rows_done,
        "rows_total": record.rows_total,
        "rows_per_second": record.rows_per_second,
        "units": record.units,
        "error": record.error,
        "source": record.input.name,
        "input_bytes": record.input.bytes,
        "partition": record.partition,
        "missing": record.missing,
        "values_held": record.values_held,
        "settings": record.settings,
        "created_unix": record.created_unix,
        "started_unix": record.started_unix,
        "finished_unix": record.finished_unix,
        "attempts": record.attempts,
        "runs_lost": record.runs_lost,
        // Set by a DELETE while the job runs: it stops at its next chunk.
        "cancel_requested": record.cancel_requested,
        "result": (record.state == JobState::Done).then(|| format!("/v1/jobs/{}/result", record.id)),
    })
}

fn job_record(fleet: &Fleet, id: &str) -> Result<JobRecord, ApiError> {
    fleet
        .jobs
        .get(id)
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))
}

async fn list_jobs(_query: NoQuery, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let fleet = fleet(&state)?;
    let jobs: Vec<serde_json::Value> = fleet.jobs.list().iter().map(job_json).collect();
    Ok(HttpResponse::Ok().json(json!({ "jobs": jobs })))
}

async fn get_job(
    _query: NoQuery,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let fleet = fleet(&state)?;
    Ok(HttpResponse::Ok().json(job_json(&job_record(fleet, &path)?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelQuery {
    #[serde(default)]
    purge: bool,
}

async fn cancel_job(
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<CancelQuery>,
) -> Result<HttpResponse, ApiError> {
    let jobs = fleet(&state)?.jobs.clone();
    let id = path.into_inner();
    // Off the HTTP worker: both flush to the disk.
    let cancelled = {
        let (jobs, id) = (jobs.clone(), id.clone());
        web::block(move || jobs.cancel(&id)).await?
    };
    let record = cancelled.ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    let mut body = job_json(&record);
    if query.purge {
        // A job still stopping keeps its files; the caller repeats the purge once it stopped.
        let stopped = record.state.is_final();
        if stopped {
            web::block(move || jobs.purge(&id)).await?.map_err(|e| {
                ApiError::Internal(format!("cannot remove job {}: {e:#}", record.id))
            })?;
            // Its files are gone with it.
            body["result"] = json!(null);
        }
        body["purged"] = json!(stopped);
    }
    Ok(HttpResponse::Ok().json(body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResultQuery {
    format: Option<String>,
    #[serde(default)]
    view: View,
}

async fn job_result(
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<ResultQuery>,
) -> Result<HttpResponse, ApiError> {
    // The query is checked before the job, so a bad one is refused whatever the job's state
    // (a 503 would have the client retry a request that can never succeed).
    let format = match query
        .format
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("h5" | "hdf5") => Format::H5,
        Some("csv") => Format::Csv,
        Some("json") => Format::Json,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "format={other:?} is not one of h5, csv, json"
            )));
        }
    };
    if query.view == View::Units && format != Format::Csv {
        return Err(ApiError::Unprocessable(
            "view=units selects the per-unit table of format=csv; HDF5 and JSON results hold \
             both tables"
                .into(),
        ));
    }
    let fleet = fleet(&state)?.clone();
    let record = job_record(&fleet, &path)?;
    match record.state {
        JobState::Done => {}
        JobState::Queued | JobState::Running => {
            return Err(ApiError::Unavailable {
                message: format!(
                    "job {} is {} ({:.0}% done); its result is not ready yet",
                    record.id,
                    record.state.name(),
                    record.progress * 100.0
                ),
                retry_after: 1,
            });
        }
        JobState::Failed => {
            return Err(ApiError::NotFound(format!(
                "job {} failed, it has no result: {}",
                record.id,
                record.error.as_deref().unwrap_or("unknown error")
            )));
        }
        JobState::Cancelled => {
            return Err(ApiError::NotFound(format!(
                "job {} was cancelled, it has no result",
                record.id
            )));
        }
    }
    let store = fleet.jobs.store();
    let h5 = store.result_path(&record.id);
    let suffix = match (format, query.view) {
        (Format::H5, _) => "h5",
        (Format::Json, _) => "json",
        (Format::Csv, View::Rows) => "csv",
        (Format::Csv, View::Units) => "units.csv",
    };
    let file = match format {
        Format::H5 => h5.clone(),
        _ => store
            .dir(&record.id)
            .join(format!("result.{EXPORT_COLUMNS}.{suffix}")),
    };
    // A result damaged after the job finished is neither served nor exported as if it were
    // whole; the next start runs the job again. The details (with paths) go to the log.
    let (source, rows) = (h5.clone(), record.rows_done);
    let meta = web::block(move || results::check(&source, rows))
        .await?
        .map_err(|e| {
            unless_removed(&fleet, &record.id, || {
                log_once(&fleet, &record.id, "damaged result", &e);
                ApiError::Internal(format!(
                    "the result of job {} is damaged: it no longer opens or does not hold the \
                     rows the job wrote; restarting the server runs the job again",
                    record.id
                ))
            })
        })?;
    if !file.exists() {
        let (source, target, view) = (h5.clone(), file.clone(), query.view);
        web::block(move || results::export(&source, format, view, &target))
            .await?
            .map_err(|e| {
                unless_removed(&fleet, &record.id, || {
                    server_side(&fleet, &record.id, "cannot export the result", &e)
                })
            })?;
    }
    let opened = std::fs::File::open(&file).map_err(|e| {
        unless_removed(&fleet, &record.id, || {
            server_side(&fleet, &record.id, "cannot open the result", &e.into())
        })
    })?;
    let mut response = streamed(
        opened,
        format.content_type(),
        Some(&format!("{}.{suffix}", record.id)),
    )?;
    // The models that scored it, which a CSV file has no place for (HDF5 and JSON carry them).
    let headers = response.headers_mut();
    for (name, value) in model_headers(&meta) {
        if let Ok(value) = HeaderValue::try_from(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    Ok(response)
}

/// `X-Linescan-Model` and `-Model-Version`, and the anomaly model's, of a result.
fn model_headers(meta: &ResultMeta) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        ("x-linescan-model", meta.model.clone()),
        ("x-linescan-model-version", meta.model_version.to_string()),
    ];
    if let (Some(model), Some(version)) = (&meta.anomaly_model, meta.anomaly_model_version) {
        headers.push(("x-linescan-anomaly-model", model.clone()));
        headers.push(("x-linescan-anomaly-model-version", version.to_string()));
    }
    headers
}

/// The answer to a result that could not be read: 404 when its job is gone or going (purged,
/// or past its retention, while the result was read: its folder goes first, then the job),
/// else `otherwise`'s.
fn unless_removed(fleet: &Fleet, id: &str, otherwise: impl FnOnce() -> ApiError) -> ApiError {
    if fleet.jobs.get(id).is_none() || !fleet.jobs.store().dir(id).exists() {
        return ApiError::NotFound(format!(
            "no job {id}: it was removed while its result was read"
        ));
    }
    otherwise()
}

/// Logs why a job's result cannot be served, once per job and problem: a client may ask for
/// it again and again, and each request is refused the same way.
fn log_once(fleet: &Fleet, job: &str, what: &str, error: &anyhow::Error) {
    if fleet.first_report(job, what) {
        tracing::error!(job, error = %format!("{error:#}"), "{what} (logged once per job)");
    }
}

/// The 500 of a result that cannot be served: the details, with the server's paths, go to the
/// log, not to the client.
fn server_side(fleet: &Fleet, job: &str, what: &str, error: &anyhow::Error) -> ApiError {
    log_once(fleet, job, what, error);
    ApiError::Internal(format!(
        "{what} of job {job}; the server log has the reason"
    ))
}
