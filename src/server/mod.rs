//! The HTTP server: binds first (so liveness answers during loading), loads and warms every model
//! on a background thread (readiness turns true when done), and on SIGTERM/Ctrl-C stops accepting,
//! finishes in-flight requests and drains the batcher queues before exiting.

pub mod access_log;
pub mod aoi;
pub mod api_key;
pub mod body;
pub mod body_memory;
pub mod client_gone;
pub mod early_refusal;
pub mod error;
pub mod file_response;
pub mod jobs;
pub mod listener;
pub mod open_files;
pub mod routing;
pub mod sensors;
pub mod shutdown;
pub mod state;
pub mod v2;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix_web::dev::{Service, ServiceResponse};
use actix_web::http::Method;
use actix_web::{App, HttpResponse, web};
use anyhow::Context;
use futures_util::future::{Either, ready};

use crate::config::ServeArgs;
use crate::engine::ModelRegistry;
use crate::metrics::Metrics;
use crate::runtime::{ModelRepository, library};
use crate::server::api_key::ApiKey;
use crate::server::early_refusal::EarlyRefusal;
use crate::server::error::{ApiError, bad_query};
use crate::server::listener::ListenOptions;
use crate::server::state::AppState;
use crate::signals::StopWatch;

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // From here on a stop signal is answered (not left to its default, which kills): scripts
    // and tests may send one as soon as the process exists, or the address is printed.
    let stop_watch = StopWatch::start()?;
    tracing::info!(
        config = %serde_json::to_string(&args).unwrap_or_default(),
        "starting linescan {}",
        env!("CARGO_PKG_VERSION")
    );
    for warning in args.exposure_warnings() {
        tracing::warn!("{warning}");
    }
    match open_files::raise_to_hard_limit() {
        Ok(Some((before, after))) => tracing::info!(
            before,
            after,
            "open-file limit raised to the hard limit (each client connection takes two)"
        ),
        Ok(None) => {}
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
    }
    // Fail before binding on what can be checked at once: the flags' values together, then
    // configs, files and the runtime library.
    args.assess.validate().map_err(anyhow::Error::msg)?;
    args.check_api_key()?;
    args.check_body_limits()?;
    let repository = ModelRepository::scan(&args.models.model_repository)?;
    let options = args.models.load_options()?;
    library::environment()?;
    std::fs::create_dir_all(&args.data_dir).with_context(|| {
        format!(
            "cannot create the data folder {} (--data-dir)",
            args.data_dir.display()
        )
    })?;
    if let Some(folder) = &args.jobs.allow_path
        && !folder.is_dir()
    {
        anyhow::bail!(
            "--jobs-allow-path {} is not a folder that exists (path job submissions read files \
             under it)",
            folder.display()
        );
    }
    // Held until the process ends: a second server on this folder would re-run this one's jobs
    // and remove its uploads and results.
    let _data_lock = lock_data_dir(&args.data_dir)?;

    let jobs_dir = args.data_dir.join("jobs");
    let marked_dir = jobs_dir.clone();
    stop_watch.before_exit_now(move || crate::jobs::store::mark_forced_stop(&marked_dir));
    let metrics = Arc::new(Metrics::new());
    let state = web::Data::new(AppState::new(
        metrics.clone(),
        args.max_body_bytes,
        args.max_body_memory,
        std::time::Duration::from_secs(args.body_timeout),
    ));
    let api_key = ApiKey::new(args.api_key.as_deref());
    let app_state = state.clone();
    let response_metrics = metrics.clone();
    let failure_log = Arc::new(access_log::FailureLog::default());
    let early = EarlyRefusal::new(state.clone(), api_key.clone(), failure_log.clone());
    let app =
        move || {
            let api_key = api_key.clone();
            let metrics = response_metrics.clone();
            let failures = failure_log.clone();
            App::new()
                .app_data(app_state.clone())
                .app_data(web::QueryConfig::default().error_handler(|error, request| {
                    bad_query(&error, request.query_string()).into()
                }))
                .wrap_fn(move |request, service| {
                    if api_key.admits(request.path(), request.headers()) {
                        Either::Left(service.call(request))
                    } else {
                        Either::Right(ready(Ok(ServiceResponse::new(
                            request.into_parts().0,
                            ApiKey::refusal(),
                        ))))
                    }
                })
                // Outermost: counts, times and logs every response, refusals of the API key included.
                .wrap_fn(move |request, service| {
                    let metrics = metrics.clone();
                    let failures = failures.clone();
                    let started = Instant::now();
                    let response = service.call(request);
                    async move {
                        let response = response.await?;
                        access_log::record(&metrics, &failures, &response, started);
                        Ok(response)
                    }
                })
                .configure(v2::routes)
                .configure(aoi::routes)
                .configure(sensors::routes)
                .configure(jobs::routes)
                .service(routing::resource(
                    "/metrics",
                    [(Method::GET, web::route().to(render_metrics))],
                ))
                .default_service(web::to(no_route))
        };
    let listen = ListenOptions {
        host: &args.host,
        port: args.port,
        workers: args.http_workers,
        shutdown_timeout: args.shutdown_timeout,
    };
    let (server, addresses) = listener::serve_app(&listen, app, early)
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    for address in addresses {
        // Printed on stdout so scripts and tests can find an ephemeral port.
        println!("linescan listening on http://{address}");
    }
    let loader_stop = stop_watch.clone();
    let handle = server.handle();
    actix_web::rt::spawn(access_log::report_library_lines_left_out());
    actix_web::rt::spawn(shutdown::stop_on_signal(
        stop_watch,
        handle.clone(),
        state.clone(),
        args.shutdown_timeout,
    ));

    let load_error: Arc<Mutex<Option<anyhow::Error>>> = Arc::default();
    let loader_error = load_error.clone();
    let loader_state = state.clone();
    let services = ServiceOptions {
        data_dir: args.data_dir.clone(),
        jobs_dir,
        max_image_pixels: args.max_image_pixels,
        max_template_bytes: args.max_template_bytes,
        preprocess: args.preprocess,
        assess: args.assess,
        jobs: args.jobs.clone(),
    };
    let loader = std::thread::Builder::new()
        .name("model-loader".into())
        .spawn(move || {
            // A panic while loading is a load failure too: otherwise the server would stay
            // live and never become ready.
            let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                load_services(
                    &repository,
                    &options,
                    &services,
                    &metrics,
                    &loader_state,
                    &loader_stop,
                )
            }))
            .unwrap_or_else(|panic| {
                let reason = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown cause".into());
                Err(anyhow::anyhow!("model loading panicked: {reason}"))
            });
            match loaded {
                Ok(()) => {}
                Err(error) => {
                    tracing::error!(%error, "loading failed; stopping");
                    *loader_error.lock().expect("load error lock") = Some(error);
                    // The stop command is sent at once; its completion future is not needed here.
                    drop(handle.stop(false));
                }
            }
        })
        .context("cannot start the model loader thread")?;

    server.await.context("HTTP server failed")?;
    tracing::info!("HTTP stopped");
    shutdown::await_loader(&loader, args.shutdown_timeout);
    if let Some(error) = load_error.lock().expect("load error lock").take() {
        return Err(error);
    }
    if let Some(fleet) = state.fleet() {
        tracing::info!("stopping job workers (running jobs stay queued)");
        fleet.jobs.shutdown();
    }
    if let Ok(registry) = state.registry() {
        tracing::info!("draining batcher queues");
        registry.shutdown();
    }
    tracing::info!("shut down cleanly");
    Ok(())
}

/// Domain settings the loader needs once the models are in.
struct ServiceOptions {
    data_dir: std::path::PathBuf,
    /// The job store's folder, also where a forced exit leaves its mark.
    jobs_dir: std::path::PathBuf,
    max_image_pixels: u64,
    max_template_bytes: u64,
    preprocess: crate::preprocess::PreprocessArgs,
    assess: crate::sensors::AssessSettings,
    jobs: crate::jobs::JobArgs,
}

/// Loads and warms every model, opens the domain services over them, then marks the server ready.
fn load_services(
    repository: &ModelRepository,
    options: &crate::engine::registry::LoadOptions,
    services: &ServiceOptions,
    metrics: &Arc<Metrics>,
    state: &AppState,
    stop: &StopWatch,
) -> anyhow::Result<()> {
    // The backend first: a GPU that is asked for and missing fails before minutes of warm-up.
    let preprocess = services.preprocess.select()?;
    let registry = Arc::new(ModelRegistry::load_until(
        repository,
        options,
        metrics,
        &|| stop.requested().is_some(),
    )?);
    if let Some(name) = stop.requested() {
        // The job workers would only start re-queued jobs to stop them again.
        tracing::info!("{name} received while loading: the AOI and job services are not opened");
        state.set_registry(registry);
        return Ok(());
    }
    metrics.record_preprocess_backend(preprocess.as_ref());
    if registry
        .get(crate::aoi::pipeline::DEFECT_MODEL, None)
        .is_some()
    {
        let inspector = crate::aoi::Inspector::new(
            &registry,
            metrics.clone(),
            services.max_image_pixels,
            preprocess.clone(),
        )?;
        let service = crate::aoi::AoiService::open(
            inspector,
            &services.data_dir.join("templates"),
            services.max_template_bytes,
            crate::disk_reserve::DiskReserve::new(
                services.data_dir.clone(),
                services.jobs.min_free_bytes,
            ),
        )?;
        // At 0 from the start, like a model's counters (see Batcher::new).
        for verdict in ["PASS", "REJECT"] {
            metrics.aoi_inspections.with_label_values(&[verdict]);
        }
        state.set_aoi(Arc::new(service));
    }
    if let Some(sensors) =
        crate::sensors::SensorService::open(&registry, services.assess, preprocess)?
    {
        let sensors = Arc::new(sensors);
        let jobs = crate::jobs::JobManager::open(
            &services.jobs_dir,
            sensors.clone(),
            services.jobs.clone(),
            metrics.clone(),
        )?;
        state.set_fleet(Arc::new(crate::jobs::Fleet {
            sensors,
            jobs,
            args: services.jobs.clone(),
            problems_logged: Default::default(),
        }));
    }
    state.set_registry(registry);
    tracing::info!("all models loaded and warmed up: ready");
    Ok(())
}

/// Takes the data folder's lock file for this process, or says who holds it.
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join("linescan.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "the data folder {} is in use by another linescan server (it holds {}); give each \
             server its own --data-dir",
            dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// The query of a route that takes no parameters: a parameter there is refused (400, naming
/// it), as a mistyped one is on the routes that take some, instead of being silently ignored.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParameters {}

pub type NoQuery = web::Query<NoParameters>;

async fn render_metrics(_query: NoQuery, state: web::Data<AppState>) -> HttpResponse {
    if let Some(aoi) = state.aoi() {
        let (loaded, not_loaded) = aoi.templates.counts();
        let templates = &state.metrics.aoi_templates;
        templates.with_label_values(&["loaded"]).set(loaded as i64);
        templates
            .with_label_values(&["not_loaded"])
            .set(not_loaded as i64);
        let (used, limit) = aoi.templates.memory();
        let memory = &state.metrics.aoi_template_memory;
        for (of, bytes) in [("used", used), ("limit", limit)] {
            let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
            memory.with_label_values(&[of]).set(bytes);
        }
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}

async fn no_route(request: actix_web::HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!(
        "no route for {} {} (see README: /v2 for inference, /metrics, /v1 for inspection and jobs)",
        request.method(),
        request.path()
    )))
}
