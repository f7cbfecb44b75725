//! Fleet batch jobs: HDF5 archives scored in chunks by a bounded pool of workers, with their
//! state on disk so they survive restarts.
//!
//! `archive` (the two layouts, validation, chunked hyperslab reads), `runner` (one archive end
//! to end, also used offline by `linescan job run`, sharding), `check` (an archive read whole,
//! in a child process before a server job), `results` (HDF5 writer, CSV and
//! JSON exports, shard merge), `store` (job folders and `state.json`), `manager` (queue, worker
//! pool, progress, cancellation, restart, admission).

pub mod archive;
pub mod check;
pub mod gaps;
pub mod manager;
pub mod results;
pub mod runner;
pub mod store;
pub mod synthetic;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use serde::Serialize;

pub use manager::JobManager;

use crate::config::{at_least_one, positive};
use crate::sensors::SensorService;

/// Job settings of the server; every flag is also an environment variable.
#[derive(Debug, Clone, Args, Serialize)]
pub struct JobArgs {
    /// Jobs scored at the same time (each streams its archive in chunks, so memory stays bounded).
    #[arg(
        long = "job-workers",
        env = "LINESCAN_JOB_WORKERS",
        default_value_t = 2,
        value_parser = at_least_one::<usize>
    )]
    pub workers: usize,
    /// Accept `{"path": ...}` job submissions for files under this folder (off when unset).
    #[arg(long = "jobs-allow-path", env = "LINESCAN_JOBS_ALLOW_PATH")]
    pub allow_path: Option<PathBuf>,
    /// Largest archive upload accepted, in bytes (larger: 413).
    #[arg(long = "job-max-upload-bytes", env = "LINESCAN_JOB_MAX_UPLOAD_BYTES", default_value_t = 16 * 1024 * 1024 * 1024, value_parser = at_least_one::<u64>)]
    pub max_upload_bytes: u64,
    /// Jobs queued or running at most; a submission beyond is refused (503 with Retry-After)
    /// before its upload is read.
    #[arg(
        long = "job-max-pending",
        env = "LINESCAN_JOB_MAX_PENDING",
        default_value_t = 1000,
        value_parser = at_least_one::<usize>
    )]
    pub max_pending: usize,
    /// Bytes kept free on the data folder's disk: a job submission, upload or template
    /// registration that would leave less is refused (507), a partial upload removed. 0 turns
    /// the check off.
    #[arg(
        long = "job-min-free-bytes",
        env = "LINESCAN_JOB_MIN_FREE_BYTES",
        default_value_t = 1_000_000_000
    )]
    pub min_free_bytes: u64,
    /// Archive rows read per chunk.
    #[arg(
        long = "job-chunk-rows",
        env = "LINESCAN_JOB_CHUNK_ROWS",
        default_value_t = 16_384,
        value_parser = at_least_one::<usize>
    )]
    pub chunk_rows: usize,
    /// Remove finished jobs (done, failed or cancelled) with their files this many hours after
    /// they ended, e.g. 72 (fractions allowed). Unset: kept until `DELETE ...?purge=true`.
    #[arg(
        long = "job-retention-hours",
        env = "LINESCAN_JOB_RETENTION_HOURS",
        value_parser = positive
    )]
    pub retention_hours: Option<f64>,
    /// Pause after each chunk, in milliseconds (for tests and demos of progress and cancel).
    #[arg(
        long = "job-throttle-ms",
        env = "LINESCAN_JOB_THROTTLE_MS",
        default_value_t = 0,
        hide = true
    )]
    pub throttle_ms: u64,
}

impl Default for JobArgs {
    fn default() -> Self {
        JobArgs {
            workers: 2,
            allow_path: None,
            max_upload_bytes: 16 * 1024 * 1024 * 1024,
            max_pending: 1000,
            min_free_bytes: 1_000_000_000,
            chunk_rows: 16_384,
            retention_hours: None,
            throttle_ms: 0,
        }
    }
}

/// Why a server-side path cannot be read by a job.
#[derive(Debug, thiserror::Error)]
pub enum PathRefused {
    /// The server's side: paths are off, or the allowed folder itself is unreadable.
    #[error("{0}")]
    Server(String),
    /// The requested path: missing, not a file, or outside the allowed folder.
    #[error("{0}")]
    Request(String),
}

impl JobArgs {
    /// `requested` (absolute, or relative to --jobs-allow-path) resolved, symbolic links and
    /// `..` included, and checked to be a file under --jobs-allow-path.
    pub fn resolve(&self, requested: &Path) -> Result<PathBuf, PathRefused> {
        let root = self.allow_path.as_ref().ok_or_else(|| {
            PathRefused::Request(
                "server-side paths are disabled; start the server with --jobs-allow-path DIR, \
                 or send the archive as the body"
                    .into(),
            )
        })?;
        let root = root.canonicalize().map_err(|e| {
            PathRefused::Server(format!("--jobs-allow-path {}: {e}", root.display()))
        })?;
        let shown = requested.display();
        let outside = || {
            PathRefused::Request(format!(
                "path {shown} is outside the folder jobs may read ({})",
                root.display()
            ))
        };
        let joined = root.join(requested);
        let resolved = match joined.canonicalize() {
            Ok(resolved) => resolved,
            // Whether a file outside the folder exists is not the client's to learn.
            Err(_) if !lexically_normal(&joined).starts_with(&root) => return Err(outside()),
            Err(e) => {
                return Err(PathRefused::Request(format!(
                    "path {shown} cannot be read: {e}"
                )));
            }
        };
        if !resolved.starts_with(&root) {
            return Err(outside());
        }
        if !resolved.is_file() {
            return Err(PathRefused::Request(format!("path {shown} is not a file")));
        }
        Ok(resolved)
    }
}

/// `path` with `.` and `..` applied to its text, the file system not asked.
fn lexically_normal(path: &Path) -> PathBuf {
    let mut normal = PathBuf::new();
    for component in path.components() {
        match component {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                normal.pop();
            }
            other => normal.push(other),
        }
    }
    normal
}

/// What the sensor and job routes need once the models are loaded.
pub struct Fleet {
    pub sensors: Arc<SensorService>,
    pub jobs: Arc<JobManager>,
    pub args: JobArgs,
    /// The result problems already logged, as "job/what": each request for a damaged result
    /// is refused, but its reason is logged once per job.
    pub problems_logged: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Fleet {
    /// Whether `what` about `job` is new to the log (and now recorded as logged).
    pub fn first_report(&self, job: &str, what: &str) -> bool {
        let mut logged = self
            .problems_logged
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        logged.insert(format!("{job}/{what}"))
    }
}
