//! `linescan bench`: load generation against a running server and in-process baselines.

pub mod aoi;
pub mod cpu;
pub mod infer;
pub mod inprocess;
pub mod load;
pub mod report;
pub mod rul;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::config::{at_least_one, non_negative, positive};
use crate::signals::{Interrupted, StopWatch};

/// The longest run or warm-up: a week. Longer is a typo (and would overflow the clock).
const MAX_RUN_SECONDS: f64 = 7.0 * 24.0 * 3600.0;

fn run_seconds(text: &str) -> Result<f64, String> {
    at_most(positive(text)?, MAX_RUN_SECONDS, "seconds (a week)")
}

fn warmup_seconds(text: &str) -> Result<f64, String> {
    at_most(non_negative(text)?, MAX_RUN_SECONDS, "seconds (a week)")
}

/// Most clients (closed loop) or requests in flight (open loop): each holds a connection, and
/// a typo's hundred million would exhaust memory before the first request.
const MAX_CONCURRENCY: usize = 65_536;

fn concurrency(text: &str) -> Result<usize, String> {
    let clients = at_least_one::<usize>(text)?;
    if clients > MAX_CONCURRENCY {
        return Err(format!("must be at most {MAX_CONCURRENCY}"));
    }
    Ok(clients)
}

/// Requests per second: from one every 1,000 s to one per microsecond.
fn request_rate(text: &str) -> Result<f64, String> {
    let rate = at_most(positive(text)?, 1e6, "requests per second")?;
    if rate < 1e-3 {
        return Err("must be at least 0.001 requests per second".into());
    }
    Ok(rate)
}

fn at_most(value: f64, limit: f64, unit: &str) -> Result<f64, String> {
    if value > limit {
        return Err(format!("must be at most {limit} {unit}"));
    }
    Ok(value)
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Send Open Inference Protocol infer requests to a server (linescan or any KServe v2 server).
    Infer(InferArgs),
    /// Run a model in-process with ONNX Runtime at a fixed batch size (the baseline for `infer`).
    Inprocess(InProcessArgs),
    /// Stream board images through AOI inspection, over HTTP (templates registered first) or
    /// in-process; real DeepPCB-format pairs with --list/--root, synthetic boards without.
    Aoi(AoiArgs),
    /// Send live sensor windows (`POST /v1/rul/{model}`) to a server: latency of the sensor API.
    Rul(RulArgs),
}

/// The server a load generator talks to.
#[derive(Args)]
pub struct ServerArgs {
    /// Server base URL.
    #[arg(long, env = "LINESCAN_URL", default_value = "http://127.0.0.1:8000", value_parser = base_url)]
    pub url: String,
    /// Key of a server started with --api-key, sent as `Authorization: Bearer <key>`.
    #[arg(long, env = "LINESCAN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// An http(s) base URL without its trailing slashes (paths are appended to it).
fn base_url(text: &str) -> Result<String, String> {
    let url = text.trim().trim_end_matches('/');
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err("must start with http:// or https:// (e.g. http://127.0.0.1:8000)".into());
    }
    Ok(url.to_string())
}

/// Fails before a run whose report could not be written afterwards, without touching an
/// existing report. The report is written beside its path and renamed over it at the end, so a
/// run that fails leaves no empty or partial file.
fn check_report_path(report: &Option<PathBuf>) -> anyhow::Result<()> {
    if let Some(path) = report {
        anyhow::ensure!(
            !path.is_dir(),
            "cannot write the report to {}: it is a folder",
            path.display()
        );
        crate::durable::check_writable(path)
            .with_context(|| format!("cannot write the report to {}", path.display()))?;
    }
    Ok(())
}

impl ServerArgs {
    /// An HTTP client for a load run that keeps up to --concurrency idle connections and sends
    /// the key. A request may wait until the run ends (the run, not the client, gives up on it
    /// then, so a stall longer than any fixed timeout still counts as waiting).
    pub fn client(&self, load: &LoadArgs) -> anyhow::Result<reqwest::Client> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(key) = &self.api_key {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
                .context("--api-key holds characters an HTTP header cannot carry")?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        Ok(reqwest::Client::builder()
            .default_headers(headers)
            .pool_max_idle_per_host(load.concurrency)
            .timeout(Duration::from_secs_f64(load.warmup + load.duration + 60.0))
            .build()?)
    }
}

#[derive(Args)]
pub struct AoiArgs {
    /// The server, when the boards go over HTTP (without --in-process).
    #[command(flatten)]
    pub server: ServerArgs,
    /// Run the pipeline in this process instead (loads the aoi_defect model; the model and
    /// preprocessing flags below apply only then: a server's are set on `serve`).
    #[arg(long, env = "LINESCAN_BENCH_IN_PROCESS", action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, value_parser = clap::builder::BoolishValueParser::new())]
    pub in_process: bool,
    /// DeepPCB-format list (`groupX/X/ID.jpg groupX/X_not/ID.txt` lines).
    #[arg(long, env = "LINESCAN_BENCH_LIST")]
    pub list: Option<PathBuf>,
    /// Data root of the list.
    #[arg(long, env = "LINESCAN_BENCH_ROOT")]
    pub root: Option<PathBuf>,
    /// Boards used (read into memory before measuring): the list's first N pairs, or up to 16
    /// synthetic boards (16 distinct defect and shift mixes) without --list.
    #[arg(long, env = "LINESCAN_BENCH_BOARDS", default_value_t = 200, value_parser = at_least_one::<usize>)]
    pub boards: usize,
    #[command(flatten)]
    pub preprocess: crate::preprocess::PreprocessArgs,
    #[command(flatten)]
    pub models: crate::config::ModelArgs,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Args)]
pub struct RulArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Sensor model to call.
    #[arg(long, env = "LINESCAN_BENCH_RUL_MODEL", default_value = "rul_fd001")]
    pub model: String,
    /// Windows per request.
    #[arg(long, env = "LINESCAN_BENCH_WINDOWS", default_value_t = 1, value_parser = at_least_one::<usize>)]
    pub windows: usize,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Args)]
pub struct LoadArgs {
    /// Concurrent clients (closed loop), or the cap on requests in flight (open loop); 1 to
    /// 65,536.
    #[arg(long, env = "LINESCAN_BENCH_CONCURRENCY", default_value_t = 8, value_parser = concurrency)]
    pub concurrency: usize,
    /// Open loop: start this many requests per second whatever the answers (0.001 to 1,000,000).
    #[arg(long, env = "LINESCAN_BENCH_RATE", value_parser = request_rate)]
    pub rate: Option<f64>,
    /// Seconds to measure.
    #[arg(long, env = "LINESCAN_BENCH_DURATION", default_value_t = 10.0, value_parser = run_seconds)]
    pub duration: f64,
    /// Seconds to run before measuring.
    #[arg(long, env = "LINESCAN_BENCH_WARMUP", default_value_t = 2.0, value_parser = warmup_seconds)]
    pub warmup: f64,
    /// Write the report as JSON here.
    #[arg(long, env = "LINESCAN_BENCH_REPORT")]
    pub report: Option<PathBuf>,
    /// Client threads of the load generator.
    #[arg(long, env = "LINESCAN_BENCH_CLIENT_THREADS", default_value_t = 1, value_parser = at_least_one::<usize>)]
    pub client_threads: usize,
}

#[derive(Args)]
pub struct InferArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Model to call.
    #[arg(long, env = "LINESCAN_BENCH_MODEL")]
    pub model: String,
    /// Model version (default: the server's latest).
    #[arg(long, env = "LINESCAN_BENCH_MODEL_VERSION")]
    pub model_version: Option<String>,
    /// Rows per request.
    #[arg(long, env = "LINESCAN_BENCH_BATCH", default_value_t = 1, value_parser = at_least_one::<usize>)]
    pub batch: usize,
    /// Send and receive tensors with the binary extension instead of JSON arrays.
    #[arg(long, env = "LINESCAN_BENCH_BINARY", action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, value_parser = clap::builder::BoolishValueParser::new())]
    pub binary: bool,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Args)]
pub struct InProcessArgs {
    /// Model repository: <model>/config.toml and <model>/<version>/model.onnx.
    #[arg(long, env = "LINESCAN_MODEL_REPOSITORY", default_value = "models")]
    pub model_repository: PathBuf,
    /// Model to run (its latest version).
    #[arg(long, env = "LINESCAN_BENCH_MODEL")]
    pub model: String,
    /// Rows per run.
    #[arg(long, env = "LINESCAN_BENCH_BATCH", default_value_t = 8, value_parser = at_least_one::<usize>)]
    pub batch: usize,
    /// Sessions run in parallel, one thread each.
    #[arg(long, env = "LINESCAN_INSTANCES", default_value_t = 1, value_parser = at_least_one::<usize>)]
    pub sessions: usize,
    /// Intra-op threads per session.
    #[arg(long, env = "LINESCAN_THREADS", default_value_t = 1, value_parser = at_least_one::<usize>)]
    pub threads: usize,
    /// Seconds to measure.
    #[arg(long, env = "LINESCAN_BENCH_DURATION", default_value_t = 10.0, value_parser = run_seconds)]
    pub duration: f64,
    /// Seconds to run before measuring.
    #[arg(long, env = "LINESCAN_BENCH_WARMUP", default_value_t = 1.0, value_parser = warmup_seconds)]
    pub warmup: f64,
    /// Write the report as JSON here.
    #[arg(long, env = "LINESCAN_BENCH_REPORT")]
    pub report: Option<PathBuf>,
}

impl LoadArgs {
    pub fn plan(&self) -> load::LoadPlan {
        load::LoadPlan {
            concurrency: self.concurrency,
            rate: self.rate,
            duration: Duration::from_secs_f64(self.duration),
            warmup: Duration::from_secs_f64(self.warmup),
        }
    }

    /// Runs a workload on a runtime of its own and prints (and optionally saves) the report;
    /// `client` sends the workload's requests.
    pub fn execute<F>(&self, client: reqwest::Client, prepare: F) -> anyhow::Result<()>
    where
        F: AsyncFnOnce() -> anyhow::Result<Arc<dyn load::Workload>>,
    {
        check_report_path(&self.report)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.client_threads.max(1))
            .enable_all()
            .build()?;
        let stop = StopWatch::start()?;
        let report = runtime.block_on(async {
            let run = async {
                let workload = prepare().await?;
                load::run(workload, &self.plan(), client).await
            };
            tokio::select! {
                report = run => report,
                name = stop.wait() => Err(Interrupted(format!(
                    "interrupted ({name}) before the run ended: no report"
                ))
                .into()),
            }
        })?;
        report.deliver(self.report.as_deref())?;
        if report.requests_ok == 0 && report.requests_failed > 0 {
            let errors: Vec<String> = report
                .first_errors
                .iter()
                .map(|(reason, error)| format!("{reason}: {error}"))
                .collect();
            anyhow::bail!("every request failed ({})", errors.join("; "));
        }
        anyhow::ensure!(
            report.requests_ok > 0,
            "no request was answered in the measured window ({} unanswered at its end)",
            report.requests_unanswered
        );
        Ok(())
    }
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Infer(args) => {
            let client = args.server.client(&args.load)?;
            args.load.execute(client.clone(), async || {
                let workload = infer::InferWorkload::prepare(
                    &client,
                    &args.server.url,
                    &args.model,
                    args.model_version.as_deref(),
                    args.batch,
                    args.binary,
                )
                .await?;
                Ok(Arc::new(workload) as Arc<dyn load::Workload>)
            })
        }
        BenchCommand::Aoi(args) => {
            let boards = aoi::load_boards(args.list.as_deref(), args.root.as_deref(), args.boards)?;
            if args.in_process {
                let (registry, inspector) =
                    crate::cli::aoi::load_inspector(&args.models, u64::MAX, &args.preprocess)?;
                let outcome = args.load.execute(reqwest::Client::new(), async || {
                    Ok(
                        Arc::new(aoi::InProcessAoiWorkload::prepare(inspector, boards)?)
                            as Arc<dyn load::Workload>,
                    )
                });
                registry.shutdown();
                outcome
            } else {
                let client = args.server.client(&args.load)?;
                let url = &args.server.url;
                let registered = std::sync::Mutex::new(Vec::new());
                let outcome = args.load.execute(client.clone(), async || {
                    let workload =
                        aoi::HttpAoiWorkload::prepare(&client, url, boards, &registered).await?;
                    Ok(Arc::new(workload) as Arc<dyn load::Workload>)
                });
                // Also after a failure or Ctrl-C: what was registered is removed.
                let registered = registered.into_inner().unwrap_or_else(|e| e.into_inner());
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(aoi::remove_templates(&client, url, &registered));
                outcome
            }
        }
        BenchCommand::Rul(args) => {
            let client = args.server.client(&args.load)?;
            args.load.execute(client.clone(), async || {
                let workload =
                    rul::RulWorkload::prepare(&client, &args.server.url, &args.model, args.windows)
                        .await?;
                Ok(Arc::new(workload) as Arc<dyn load::Workload>)
            })
        }
        BenchCommand::Inprocess(args) => {
            check_report_path(&args.report)?;
            let report = inprocess::run(&inprocess::InProcessPlan {
                repository: &args.model_repository,
                model: &args.model,
                batch: args.batch,
                sessions: args.sessions,
                threads: args.threads,
                duration: Duration::from_secs_f64(args.duration),
                warmup: Duration::from_secs_f64(args.warmup),
            })?;
            report.deliver(args.report.as_deref())?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_flags_are_bounded() {
        assert_eq!(concurrency("16"), Ok(16));
        assert_eq!(concurrency("65536"), Ok(65_536));
        assert!(concurrency("0").unwrap_err().contains("at least 1"));
        assert!(
            concurrency("100000000")
                .unwrap_err()
                .contains("at most 65536")
        );
        assert!(request_rate("0").is_err());
        assert!(request_rate("2e6").unwrap_err().contains("at most"));
        assert_eq!(request_rate("0.5"), Ok(0.5));
    }
}
