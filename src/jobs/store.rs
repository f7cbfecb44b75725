//! Jobs on disk: `<data_dir>/jobs/<id>/` holds the uploaded archive (`input.h5`; server-side
//! path jobs point at their file instead), `state.json` (written durably, see [`crate::durable`],
//! so it is always whole) and the results (`result.h5`, and `result.cols2.csv` / `result.cols2.json` once
//! asked for).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::durable;
use crate::jobs::archive::Partition;
use crate::jobs::gaps::MissingPolicy;
use crate::sensors::AssessSettings;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// Where a job's archive came from; `kind` in `state.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    /// Sent with the submission and kept in the job folder.
    Upload,
    /// A server-side file under --jobs-allow-path.
    Path,
    /// The job's state could not be read at start-up.
    Unknown,
}

/// Where a job's archive is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInput {
    pub kind: InputKind,
    pub path: PathBuf,
    /// The name results record as their source.
    pub name: String,
    pub bytes: u64,
}

/// Everything known about a job; `state.json` on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub state: JobState,
    pub model: String,
    pub partition: Partition,
    /// Gaps in the archive's values: fail the job, or hold the unit's last value over them.
    #[serde(default)]
    pub missing: MissingPolicy,
    pub settings: AssessSettings,
    pub input: JobInput,
    pub created_unix: f64,
    pub started_unix: Option<f64>,
    pub finished_unix: Option<f64>,
    /// 0..1 of the rows scored.
    pub progress: f64,
    pub rows_done: u64,
    pub rows_total: u64,
    pub rows_per_second: f64,
    pub units: Option<u64>,
    /// Values held over gaps in the result's rows (missing=hold).
    #[serde(default)]
    pub values_held: u64,
    pub error: Option<String>,
    /// Times the job was started (more than one after a restart).
    pub attempts: u32,
    /// Runs the process did not outlive (a crash or a kill): found running at a start.
    #[serde(default)]
    pub runs_lost: u32,
    /// A cancel arrived while the job ran: kept on disk, so a restart before the worker
    /// stopped cancels the job instead of running it again.
    #[serde(default)]
    pub cancel_requested: bool,
}

impl JobRecord {
    /// A job just submitted: queued, created now, nothing run yet.
    pub fn queued(
        id: String,
        model: String,
        partition: Partition,
        settings: AssessSettings,
        input: JobInput,
    ) -> JobRecord {
        JobRecord {
            id,
            state: JobState::Queued,
            model,
            partition,
            missing: MissingPolicy::Fail,
            settings,
            input,
            created_unix: now_unix(),
            started_unix: None,
            finished_unix: None,
            progress: 0.0,
            rows_done: 0,
            rows_total: 0,
            rows_per_second: 0.0,
            units: None,
            values_held: 0,
            error: None,
            attempts: 0,
            runs_lost: 0,
            cancel_requested: false,
        }
    }

    /// Back in the queue to run again from the beginning (after a restart, or a shutdown
    /// that interrupted it): nothing of the earlier run is reported as this one's.
    /// What it keeps is the job's (what to run, when it came, its runs so far, a cancel
    /// asked for); every figure of a run starts as a new job's.
    pub fn requeue(&mut self) {
        let fresh = JobRecord::queued(
            self.id.clone(),
            self.model.clone(),
            self.partition,
            self.settings,
            self.input.clone(),
        );
        *self = JobRecord {
            missing: self.missing,
            created_unix: self.created_unix,
            attempts: self.attempts,
            runs_lost: self.runs_lost,
            cancel_requested: self.cancel_requested,
            ..fresh
        };
    }
}

pub fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The end of a removed job's folder name until it is deleted (job ids are hex, so none ends so).
const REMOVED: &str = ".removed";

pub struct JobStore {
    root: PathBuf,
}

impl JobStore {
    pub fn open(root: &Path) -> std::io::Result<JobStore> {
        std::fs::create_dir_all(root)?;
        Ok(JobStore {
            root: root.to_path_buf(),
        })
    }

    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Whether the last server stopped at its operator's word (a second stop signal or
    /// SIGQUIT) rather than by a crash or a kill; the mark is used up.
    pub fn take_forced_stop_mark(&self) -> bool {
        std::fs::remove_file(forced_stop_mark(&self.root)).is_ok()
    }

    pub fn upload_path(&self, id: &str) -> PathBuf {
        self.dir(id).join("input.h5")
    }

    pub fn result_path(&self, id: &str) -> PathBuf {
        self.dir(id).join("result.h5")
    }

    /// A new, empty job folder with a fresh id.
    pub fn create(&self) -> std::io::Result<String> {
        loop {
            let id = format!("{:016x}", fastrand::u64(..));
            match std::fs::create_dir(self.dir(&id)) {
                Ok(()) => return Ok(id),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes `state.json` durably: whole, old or new, even across a power cut.
    pub fn save(&self, record: &JobRecord) -> std::io::Result<()> {
        let text = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
        durable::write(&self.dir(&record.id).join("state.json"), &text)
    }

    /// Every job; folders without a state (an upload cut short) are removed, and a job whose
    /// state cannot be read comes back failed, with the reason, so it can be seen and purged.
    pub fn load_all(&self) -> Vec<JobRecord> {
        let mut records = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return records;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            if !dir.is_dir() {
                continue;
            }
            if entry.file_name().to_string_lossy().ends_with(REMOVED) {
                tracing::info!(dir = %dir.display(), "deleting the folder of a job removed earlier");
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            }
            let state = dir.join("state.json");
            let problem = match std::fs::read(&state) {
                Ok(bytes) => match serde_json::from_slice::<JobRecord>(&bytes) {
                    Ok(record) => {
                        records.push(record);
                        continue;
                    }
                    Err(error) => error.to_string(),
                },
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    tracing::warn!(dir = %dir.display(), "job folder without state (upload cut short); removed");
                    let _ = std::fs::remove_dir_all(&dir);
                    continue;
                }
                Err(error) => error.to_string(),
            };
            match self.record_damaged(&dir, &state, &problem) {
                Ok(record) => {
                    tracing::error!(job = %record.id, %problem, "unreadable job state; the job is listed as failed");
                    records.push(record);
                }
                Err(error) => {
                    tracing::error!(dir = %dir.display(), %problem, %error, "unreadable job state; skipped")
                }
            }
        }
        records.sort_by(|a, b| a.created_unix.total_cmp(&b.created_unix));
        records
    }

    /// A failed record for a job folder whose `state.json` cannot be read; the damaged file is
    /// kept beside it as `state.json.damaged`.
    fn record_damaged(
        &self,
        dir: &Path,
        state: &Path,
        problem: &str,
    ) -> std::io::Result<JobRecord> {
        let id = dir
            .file_name()
            .and_then(|name| name.to_str())
            .ok_or_else(|| std::io::Error::other("the folder name is not a job id"))?
            .to_string();
        let created_unix = std::fs::metadata(dir)?
            .modified()?
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        if state.exists() {
            std::fs::rename(state, dir.join("state.json.damaged"))?;
        }
        let input = JobInput {
            kind: InputKind::Unknown,
            path: dir.to_path_buf(),
            name: String::new(),
            bytes: 0,
        };
        let error = format!(
            "the job's state could not be read at start-up ({problem}); it is kept as \
             state.json.damaged in {}; DELETE /v1/jobs/{id}?purge=true removes the job",
            dir.display()
        );
        let queued = JobRecord::queued(
            id,
            String::new(),
            Partition::default(),
            AssessSettings::default(),
            input,
        );
        let record = JobRecord {
            state: JobState::Failed,
            created_unix,
            finished_unix: Some(queued.created_unix),
            error: Some(error),
            ..queued
        };
        self.save(&record)?;
        Ok(record)
    }

    /// Removes results (finished or partial) of a job.
    pub fn clear_results(&self, id: &str) {
        let Ok(entries) = std::fs::read_dir(self.dir(id)) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with("result") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Removes result files a process died writing (`result*.partial*`): only safe while no
    /// export runs, i.e. at start.
    pub fn remove_partial_results(&self, id: &str) {
        let Ok(entries) = std::fs::read_dir(self.dir(id)) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("result") && name.contains(".partial") {
                tracing::info!(job = %id, file = %name, "removing a result left unfinished");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Removes a job's folder. It is renamed out of the way first: the rename either fails,
    /// leaving the job whole, or takes the folder from anyone reading or exporting its result
    /// by path, who can then add no file to it to stop its deletion (a purge during a result
    /// download failed with "Directory not empty" and left the job half removed). A folder
    /// whose deletion still fails is deleted at the next start.
    pub fn remove(&self, id: &str) -> std::io::Result<()> {
        let removed = self.root.join(format!("{id}{REMOVED}"));
        std::fs::rename(self.dir(id), &removed)?;
        if let Err(error) = std::fs::remove_dir_all(&removed) {
            tracing::warn!(dir = %removed.display(), %error, "removed job's folder left behind; deleted at the next start");
        }
        Ok(())
    }
}

/// Written by a server exiting at once on its operator's word, so the next start does not
/// count the jobs it left running as runs lost to a crash.
pub fn mark_forced_stop(root: &Path) {
    let _ = std::fs::write(forced_stop_mark(root), b"");
}

fn forced_stop_mark(root: &Path) -> PathBuf {
    root.join(".forced-stop")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_atomically_and_loads_back_in_creation_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        let mut ids = Vec::new();
        for i in 0..3 {
            let id = store.create().unwrap();
            let input = JobInput {
                kind: InputKind::Upload,
                path: store.upload_path(&id),
                name: "a.h5".into(),
                bytes: 1,
            };
            let record = JobRecord {
                created_unix: 100.0 + i as f64,
                ..JobRecord::queued(
                    id.clone(),
                    "rul_x".into(),
                    Partition::All,
                    AssessSettings::default(),
                    input,
                )
            };
            store.save(&record).unwrap();
            ids.push(id);
        }
        let cut_short = store.create().unwrap();
        let loaded = store.load_all();
        assert_eq!(loaded.iter().map(|r| r.id.clone()).collect::<Vec<_>>(), ids);
        assert!(!store.dir(&cut_short).exists());
        assert!(!store.dir(&ids[0]).join("state.json.tmp").exists());
        // A removed job goes at once; a removed folder left behind goes at the next start.
        store.remove(&ids[0]).unwrap();
        assert!(!store.dir(&ids[0]).exists());
        assert_eq!(store.load_all().len(), 2);
        let left_behind = dir.path().join(format!("{}{REMOVED}", ids[1]));
        std::fs::rename(store.dir(&ids[1]), &left_behind).unwrap();
        let loaded = store.load_all();
        assert_eq!(
            loaded.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
            [ids[2].clone()]
        );
        assert!(!left_behind.exists());
    }

    #[test]
    fn a_requeued_job_reports_nothing_of_its_earlier_run() {
        let input = JobInput {
            kind: InputKind::Upload,
            path: PathBuf::from("input.h5"),
            name: "a.h5".into(),
            bytes: 1,
        };
        let queued = JobRecord {
            missing: MissingPolicy::Hold,
            created_unix: 100.0,
            ..JobRecord::queued(
                "j".into(),
                "rul_x".into(),
                Partition::All,
                AssessSettings::default(),
                input,
            )
        };
        let mut record = JobRecord {
            state: JobState::Running,
            started_unix: Some(101.0),
            finished_unix: Some(102.0),
            progress: 0.5,
            rows_done: 10,
            rows_total: 20,
            rows_per_second: 5.0,
            units: Some(100),
            values_held: 198,
            error: Some("earlier".into()),
            attempts: 2,
            runs_lost: 1,
            cancel_requested: true,
            ..queued.clone()
        };
        record.requeue();
        let expected = JobRecord {
            attempts: 2,
            runs_lost: 1,
            cancel_requested: true,
            ..queued
        };
        assert_eq!(record, expected);
    }
}
