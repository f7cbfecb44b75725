//! Server settings: every flag doubles as an environment variable; defaults serve the bundled
//! models on localhost.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::runtime::providers::ProviderKind;

#[derive(Debug, Clone, Args, Serialize)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "LINESCAN_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on (0 picks a free one and prints it).
    #[arg(long, env = "LINESCAN_PORT", default_value_t = 8000)]
    pub port: u16,

    #[command(flatten)]
    #[serde(flatten)]
    pub models: ModelArgs,

    #[command(flatten)]
    #[serde(flatten)]
    pub preprocess: crate::preprocess::PreprocessArgs,

    /// Where templates and job state are kept (created if missing).
    #[arg(long, env = "LINESCAN_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,

    /// Largest image accepted, in pixels (checked from the header before decoding; larger: 413).
    #[arg(long, env = "LINESCAN_MAX_IMAGE_PIXELS", default_value_t = 50_000_000, value_parser = at_least_one::<u64>)]
    pub max_image_pixels: u64,

    /// Memory the registered templates may take, in bytes (1 bit per pixel: a 640x640 board
    /// takes 51 kB). A PUT that would pass it is refused (507); at start, stored templates
    /// beyond it (by board name) are listed as not loaded.
    #[arg(long, env = "LINESCAN_MAX_TEMPLATE_BYTES", default_value_t = 2_000_000_000, value_parser = at_least_one::<u64>)]
    pub max_template_bytes: u64,

    /// Largest request body accepted, in bytes (larger ones get 413).
    #[arg(long, env = "LINESCAN_MAX_BODY_BYTES", default_value_t = 64 * 1024 * 1024, value_parser = at_least_one::<usize>)]
    pub max_body_bytes: usize,

    /// Memory that all request bodies may hold together until their requests are answered, in
    /// bytes (bodies are buffered before they are handled; one that would pass it gets 503 with
    /// Retry-After; job uploads go to disk and do not count). At least --max-body-bytes.
    #[arg(long, env = "LINESCAN_MAX_BODY_MEMORY", default_value_t = 1024 * 1024 * 1024, value_parser = at_least_one::<usize>)]
    pub max_body_memory: usize,

    /// Seconds a request body may go without a byte before the request is refused with 408 (a
    /// stalled client would hold its connection, its bytes and every graceful stop).
    #[arg(long, env = "LINESCAN_BODY_TIMEOUT", default_value_t = 30, value_parser = at_least_one::<u64>)]
    pub body_timeout: u64,

    /// HTTP worker threads (default: one per CPU core).
    #[arg(long, env = "LINESCAN_HTTP_WORKERS", value_parser = at_least_one::<usize>)]
    pub http_workers: Option<usize>,

    /// Seconds in-flight requests get to finish after SIGTERM/Ctrl-C.
    #[arg(long, env = "LINESCAN_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,

    /// Risk thresholds and health weighting of sensor predictions.
    #[command(flatten)]
    #[serde(flatten)]
    pub assess: crate::sensors::AssessSettings,

    /// Fleet jobs: workers, uploads, server-side paths.
    #[command(flatten)]
    #[serde(flatten)]
    pub jobs: crate::jobs::JobArgs,

    /// Require `Authorization: Bearer <key>` on every route but health and metrics (prefer the
    /// environment variable: a flag's value shows in the process list).
    #[arg(long, env = "LINESCAN_API_KEY", hide_env_values = true)]
    #[serde(serialize_with = "redact")]
    pub api_key: Option<String>,
}

/// Where models come from and how their sessions run; shared by every command that loads models.
#[derive(Debug, Clone, Args, Serialize)]
pub struct ModelArgs {
    /// Model repository: <model>/config.toml and <model>/<version>/model.onnx.
    #[arg(long, env = "LINESCAN_MODEL_REPOSITORY", default_value = "models")]
    pub model_repository: PathBuf,

    /// Execution providers for every model, replacing config.toml (comma separated, in order).
    #[arg(long, env = "LINESCAN_PROVIDERS", value_delimiter = ',')]
    pub providers: Option<Vec<ProviderArg>>,

    /// Sessions per model version, replacing config.toml.
    #[arg(long, env = "LINESCAN_INSTANCES", value_parser = at_least_one::<usize>)]
    pub instances: Option<usize>,

    /// ONNX Runtime intra-op threads per session, replacing config.toml.
    #[arg(long, env = "LINESCAN_THREADS", value_parser = at_least_one::<usize>)]
    pub threads: Option<usize>,
}

/// Fewest characters of an API key that is not warned about (failed attempts are not
/// rate-limited, so a short key can be guessed).
const MIN_QUIET_KEY_CHARS: usize = 16;

impl ServeArgs {
    /// Settings that work but expose the server more than their user may mean, in words for
    /// the log at start.
    pub fn exposure_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let loopback = self.host == "localhost"
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        match &self.api_key {
            None if !loopback => warnings.push(format!(
                "--host {} listens beyond this machine and no --api-key is set: whoever reaches \
                 port {} can run the models, register templates and submit jobs",
                self.host, self.port
            )),
            Some(key) if key.chars().count() < MIN_QUIET_KEY_CHARS => warnings.push(format!(
                "the API key has {} characters: use at least {MIN_QUIET_KEY_CHARS} random ones \
                 (failed attempts are not rate-limited)",
                key.chars().count()
            )),
            _ => {}
        }
        // As submissions resolve it: `/tmp/..` or a link to `/` is the root too.
        if let Some(folder) = &self.jobs.allow_path
            && std::fs::canonicalize(folder)
                .as_deref()
                .unwrap_or(folder)
                .parent()
                .is_none()
        {
            warnings.push(format!(
                "--jobs-allow-path {} lets a job submission name any file on this machine (the \
                 answer gives its size); allow a folder of archives only",
                folder.display()
            ));
        }
        warnings
    }

    /// A body of the largest size accepted must fit in what all bodies may hold together.
    pub fn check_body_limits(&self) -> anyhow::Result<()> {
        if self.max_body_memory < self.max_body_bytes {
            anyhow::bail!(
                "--max-body-memory ({}) is below --max-body-bytes ({}): a body of the largest \
                 size accepted could never be read; raise the first or lower the second",
                self.max_body_memory,
                self.max_body_bytes
            );
        }
        Ok(())
    }

    /// An API key a client can send: printable ASCII without spaces (an empty key, or one with
    /// a space from an env file, would lock every client out). The message never shows the key.
    pub fn check_api_key(&self) -> anyhow::Result<()> {
        if let Some(key) = &self.api_key
            && (key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()))
        {
            anyhow::bail!(
                "--api-key / LINESCAN_API_KEY must be 1 or more printable ASCII characters without \
                 spaces (the key given has {} characters; check for a stray space or newline in \
                 the environment file)",
                key.chars().count()
            );
        }
        Ok(())
    }
}

impl ModelArgs {
    /// The options, once `--providers` is a list a model can use.
    pub fn load_options(&self) -> anyhow::Result<crate::engine::registry::LoadOptions> {
        let providers: Option<Vec<ProviderKind>> = self
            .providers
            .as_ref()
            .map(|arguments| arguments.iter().map(|a| a.kind()).collect());
        if let Some(kinds) = &providers {
            ProviderKind::check_list(kinds)
                .map_err(|problem| anyhow::anyhow!("--providers: {problem}"))?;
        }
        Ok(crate::engine::registry::LoadOptions {
            providers,
            instances: self.instances,
            threads: self.threads,
        })
    }
}

#[derive(Debug, Clone, Copy, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderArg {
    Auto,
    Tensorrt,
    Cuda,
    Cpu,
}

impl ProviderArg {
    pub fn kind(self) -> ProviderKind {
        match self {
            ProviderArg::Auto => ProviderKind::Auto,
            ProviderArg::Tensorrt => ProviderKind::TensorRt,
            ProviderArg::Cuda => ProviderKind::Cuda,
            ProviderArg::Cpu => ProviderKind::Cpu,
        }
    }
}

/// Parses a count that must be at least 1 (sessions, threads, clients, rows, bytes).
pub fn at_least_one<T>(text: &str) -> Result<T, String>
where
    T: std::str::FromStr + From<u8> + PartialOrd,
    T::Err: std::fmt::Display,
{
    let value: T = text.trim().parse().map_err(|e| format!("{e}"))?;
    if value < T::from(1) {
        return Err("must be at least 1".into());
    }
    Ok(value)
}

/// Parses a score or probability in [0, 1].
pub fn unit_interval<T>(text: &str) -> Result<T, String>
where
    T: std::str::FromStr + Into<f64> + Copy,
    T::Err: std::fmt::Display,
{
    let value: T = text.trim().parse().map_err(|e| format!("{e}"))?;
    if !(0.0..=1.0).contains(&value.into()) {
        return Err("must be between 0 and 1".into());
    }
    Ok(value)
}

/// Parses a duration or rate that must be finite and above 0.
pub fn positive(text: &str) -> Result<f64, String> {
    let value: f64 = text.trim().parse().map_err(|e| format!("{e}"))?;
    if !(value.is_finite() && value > 0.0) {
        return Err("must be a number above 0".into());
    }
    Ok(value)
}

/// Parses a duration that may be 0 (a warm-up), finite and not negative.
pub fn non_negative(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(0.0) => Ok(0.0),
        _ => positive(text).map_err(|_| "must be a number of 0 or more".into()),
    }
}

fn redact<S: serde::Serializer>(value: &Option<String>, serializer: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(_) => serializer.serialize_str("<redacted>"),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn counts_scores_and_durations_are_checked_at_parse_time() {
        assert_eq!(at_least_one::<usize>("3"), Ok(3));
        assert_eq!(at_least_one::<u64>("0"), Err("must be at least 1".into()));
        assert!(at_least_one::<usize>("-1").is_err());
        assert_eq!(unit_interval::<f32>("0.5"), Ok(0.5));
        assert_eq!(
            unit_interval::<f64>("2"),
            Err("must be between 0 and 1".into())
        );
        assert!(unit_interval::<f64>("NaN").is_err());
        assert_eq!(positive("0.5"), Ok(0.5));
        assert!(positive("0").is_err() && positive("inf").is_err());
        assert_eq!(non_negative("0"), Ok(0.0));
        assert!(non_negative("-1").is_err());
        let error = Cli::try_parse_from(["linescan", "--instances", "0"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("--instances") && error.contains("at least 1"),
            "{error}"
        );
    }

    #[test]
    fn exposed_settings_are_warned_about() {
        let warnings = |args: &[&str]| {
            let mut all = vec!["linescan"];
            all.extend(args);
            Cli::try_parse_from(all).unwrap().serve.exposure_warnings()
        };
        for quiet in [
            &[][..],
            &["--host", "localhost"],
            &["--host", "::1"],
            &["--host", "0.0.0.0", "--api-key", "0123456789abcdef"],
            &["--jobs-allow-path", "/srv/archives"],
        ] {
            assert_eq!(warnings(quiet), Vec::<String>::new(), "{quiet:?}");
        }
        let open = warnings(&["--host", "0.0.0.0", "--port", "9000"]);
        assert!(
            open.len() == 1 && open[0].contains("--host 0.0.0.0") && open[0].contains("port 9000"),
            "{open:?}"
        );
        let short = warnings(&["--host", "10.0.0.5", "--api-key", "abc"]);
        assert!(
            short.len() == 1 && short[0].contains("has 3 characters") && !short[0].contains("abc"),
            "{short:?}"
        );
        for root in ["/", "/tmp/.."] {
            let warned = warnings(&["--jobs-allow-path", root]);
            assert!(
                warned.len() == 1 && warned[0].contains("any file"),
                "{warned:?}"
            );
        }
    }

    #[test]
    fn defaults_and_redaction() {
        let cli = Cli::parse_from(["linescan", "--api-key", "s3cret", "--providers", "cuda,cpu"]);
        assert_eq!(cli.serve.host, "127.0.0.1");
        assert_eq!(cli.serve.port, 8000);
        assert_eq!(cli.serve.models.model_repository, PathBuf::from("models"));
        let printed = serde_json::to_string(&cli.serve).unwrap();
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("<redacted>"));
        let options = cli.serve.models.load_options().unwrap();
        assert_eq!(
            options.providers,
            Some(vec![ProviderKind::Cuda, ProviderKind::Cpu])
        );
    }
}
