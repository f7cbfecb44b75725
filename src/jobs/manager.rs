//! The job queue and its bounded pool of worker threads.
//!
//! Submitted jobs are queued in memory and on disk; `--job-workers` threads take them in order
//! and run them (`runner::run`), each job's windows going through the shared batchers. Progress
//! and rows/s are kept in memory and written to `state.json` at most once a second, outside the
//! record's lock, so a status request never waits on a progress write; state changes are
//! written at once, before anyone can read them, so a state seen is a state that survives a
//! crash. Cancellation is checked between chunks. A bad archive fails its
//! own job only. On start, jobs found queued or running on disk are re-queued from the
//! beginning; on shutdown, running jobs stop at the next chunk and are left queued.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::disk_reserve::DiskReserve;
use crate::jobs::JobArgs;
use crate::jobs::archive::Partition;
use crate::jobs::check::{self, ChildCheck};
use crate::jobs::results;
use crate::jobs::runner::{self, Control, Monitor, RunError, RunOptions};
use crate::jobs::store::{InputKind, JobInput, JobRecord, JobState, JobStore, now_unix};
use crate::sensors::SensorService;

/// How often a running job's progress is written to disk.
const SAVE_EVERY: Duration = Duration::from_secs(1);

struct JobEntry {
    record: Mutex<JobRecord>,
    /// Counts the record's writes; taken under `record`'s lock, so revisions follow the order
    /// of the changes.
    revision: AtomicU64,
    /// The revision last written, held while writing: a progress copy older than it is not
    /// written.
    saved: Mutex<u64>,
    cancel: AtomicBool,
}

impl JobEntry {
    fn record(&self) -> MutexGuard<'_, JobRecord> {
        self.record.lock().expect("record lock")
    }

    /// Has `write` write `record`, whose lock the caller holds, so the change is on disk
    /// before anyone can read it.
    fn write_through<E>(
        &self,
        record: &JobRecord,
        write: impl FnOnce(&JobRecord) -> Result<(), E>,
    ) -> Result<(), E> {
        let revision = self.revision.fetch_add(1, Ordering::AcqRel) + 1;
        let mut saved = self.saved.lock().expect("save lock");
        write(record)?;
        *saved = revision;
        Ok(())
    }

    /// Has `write` write the record as `record` holds it once its lock is released (for
    /// progress, which readers need not wait for), unless a later change is written first.
    fn write_behind(&self, record: MutexGuard<'_, JobRecord>, write: impl FnOnce(&JobRecord)) {
        let revision = self.revision.fetch_add(1, Ordering::AcqRel) + 1;
        let copy = record.clone();
        drop(record);
        let mut saved = self.saved.lock().expect("save lock");
        if *saved < revision {
            write(&copy);
            *saved = revision;
        }
    }
}

pub struct JobManager {
    store: JobStore,
    reserve: DiskReserve,
    jobs: Mutex<HashMap<String, Arc<JobEntry>>>,
    /// Held by a submission from its `--job-max-pending` check to its entry: concurrent
    /// submissions cannot pass the limit together.
    admission: Mutex<()>,
    /// Held by a purge from its lookup of the job to its removal: a second purge of the same
    /// job then finds it gone instead of failing to move its folder.
    purging: Mutex<()>,
    sender: Sender<String>,
    stop: Arc<AtomicBool>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    sensors: Arc<SensorService>,
    args: JobArgs,
    metrics: Arc<crate::metrics::Metrics>,
}

/// Runs of one job the process may fail to outlive before the job is failed at start.
const MAX_RUNS_LOST: u32 = 3;

/// Why a submission is not taken.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// `--job-max-pending` jobs are queued or running.
    #[error("{0}")]
    Busy(String),
    /// The disk has no room above `--job-min-free-bytes`.
    #[error("{0}")]
    LowDisk(String),
    #[error("cannot queue the job: {0:#}")]
    Store(anyhow::Error),
}

impl JobManager {
    /// Opens the store, re-queues what was queued or running, and starts the workers.
    pub fn open(
        root: &Path,
        sensors: Arc<SensorService>,
        args: JobArgs,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> anyhow::Result<Arc<JobManager>> {
        let store = JobStore::open(root)
            .map_err(|e| anyhow::anyhow!("cannot open the job store {}: {e}", root.display()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("job-io")
            .enable_all()
            .build()?;
        let (sender, receiver) = crossbeam_channel::unbounded();
        let manager = Arc::new(JobManager {
            store,
            reserve: DiskReserve::new(root.to_path_buf(), args.min_free_bytes),
            jobs: Mutex::new(HashMap::new()),
            admission: Mutex::new(()),
            purging: Mutex::new(()),
            sender,
            stop: Arc::new(AtomicBool::new(false)),
            workers: Mutex::new(Vec::new()),
            runtime: Mutex::new(Some(runtime)),
            sensors,
            args,
            metrics,
        });
        // Zero series for alerts on the first failed job (see Batcher::new).
        for model in manager.sensors.names() {
            for state in [JobState::Done, JobState::Failed, JobState::Cancelled] {
                manager
                    .metrics
                    .jobs_ended
                    .with_label_values(&[&model, state.name()]);
            }
        }
        let mut requeued = 0;
        let forced_stop = manager.store.take_forced_stop_mark();
        for mut record in manager.store.load_all() {
            manager.store.remove_partial_results(&record.id);
            if record.state == JobState::Running && !forced_stop {
                record.runs_lost += 1;
            }
            let damaged_result = (record.state == JobState::Done)
                .then(|| {
                    results::check(&manager.store.result_path(&record.id), record.rows_done).err()
                })
                .flatten();
            if let Some(problem) = &damaged_result {
                tracing::warn!(job = %record.id, "{problem:#}; the job runs again");
            }
            if record.state.is_final() && damaged_result.is_none() {
                // Stays as it is.
            } else if record.cancel_requested {
                tracing::info!(job = %record.id, "job cancelled before the restart; not run again");
                manager.end_at_start(&mut record, JobState::Cancelled, None)?;
            } else if record.runs_lost >= MAX_RUNS_LOST {
                // An archive that crashes the HDF5 library (or runs the process out of
                // memory) would otherwise take the server down at every start.
                let message = format!(
                    "not run again: the server stopped {} times while running it (a crash or a \
                     kill each time, e.g. an archive that crashes the HDF5 library or runs the \
                     server out of memory); check the archive, then submit it again",
                    record.runs_lost
                );
                tracing::warn!(job = %record.id, "{message}");
                manager.end_at_start(&mut record, JobState::Failed, Some(message))?;
            } else if let Some(refused) = manager.path_moved(&record.input) {
                // The file was allowed when the job was submitted; this start's
                // --jobs-allow-path (or the file system, a link that now leads elsewhere) says
                // otherwise: not run behind its back.
                let message =
                    format!("not run again after the restart: {refused}; submit the job again");
                tracing::warn!(job = %record.id, "{message}");
                manager.end_at_start(&mut record, JobState::Failed, Some(message))?;
            } else {
                record.requeue();
                manager.store.clear_results(&record.id);
                manager.store.save(&record)?;
                let _ = manager.sender.send(record.id.clone());
                requeued += 1;
            }
            manager.insert(record);
        }
        if requeued > 0 {
            tracing::info!(
                jobs = requeued,
                "re-queued jobs found queued or running on disk"
            );
        }
        if requeued >= manager.args.max_pending {
            tracing::warn!(
                jobs = requeued,
                max_pending = manager.args.max_pending,
                "as many jobs re-queued as --job-max-pending allows, or more: new submissions \
                 are refused (503) until fewer are queued or running"
            );
        }
        let mut workers = manager.workers.lock().expect("workers lock");
        for index in 0..manager.args.workers.max(1) {
            let weak = Arc::downgrade(&manager);
            let receiver = receiver.clone();
            let stop = manager.stop.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("job-worker-{index}"))
                    .spawn(move || worker_loop(weak, receiver, stop))?,
            );
        }
        if let Some(hours) = manager.args.retention_hours {
            let retention = Duration::from_secs_f64(hours * 3600.0);
            // Before the server is ready, so nothing expired is served.
            manager.purge_expired(retention);
            let weak = Arc::downgrade(&manager);
            let stop = manager.stop.clone();
            workers.push(
                std::thread::Builder::new()
                    .name("job-retention".into())
                    .spawn(move || retention_loop(weak, stop, retention))?,
            );
        }
        drop(workers);
        Ok(manager)
    }

    /// Purges finished jobs that ended more than `retention` ago.
    fn purge_expired(&self, retention: Duration) {
        let cutoff = now_unix() - retention.as_secs_f64();
        let expired: Vec<String> = self
            .list()
            .into_iter()
            .filter(|r| r.state.is_final() && r.finished_unix.unwrap_or(r.created_unix) < cutoff)
            .map(|r| r.id)
            .collect();
        for id in expired {
            match self.purge(&id) {
                Ok(()) => tracing::info!(job = %id, "finished job removed (--job-retention-hours)"),
                Err(error) => {
                    tracing::warn!(job = %id, error = %format!("{error:#}"), "cannot remove an expired job")
                }
            }
        }
    }

    pub fn store(&self) -> &JobStore {
        &self.store
    }

    /// Ends a job found unfinished at start without running it: final state, no results.
    fn end_at_start(
        &self,
        record: &mut JobRecord,
        state: JobState,
        error: Option<String>,
    ) -> anyhow::Result<()> {
        record.state = state;
        record.error = error;
        record.finished_unix = Some(now_unix());
        self.store.clear_results(&record.id);
        self.store.save(record)?;
        Ok(())
    }

    fn insert(&self, record: JobRecord) {
        let id = record.id.clone();
        self.jobs
            .lock()
            .expect("jobs lock")
            .insert(id, Self::new_entry(record));
    }

    fn new_entry(record: JobRecord) -> Arc<JobEntry> {
        Arc::new(JobEntry {
            record: Mutex::new(record),
            revision: AtomicU64::new(0),
            saved: Mutex::new(0),
            cancel: AtomicBool::new(false),
        })
    }

    /// Every job's entry, taken from the map at once: their records are read after the map's
    /// lock is released, as a record may be held while its change is written.
    fn entries(&self) -> Vec<Arc<JobEntry>> {
        self.jobs
            .lock()
            .expect("jobs lock")
            .values()
            .cloned()
            .collect()
    }

    fn entry(&self, id: &str) -> Option<Arc<JobEntry>> {
        self.jobs.lock().expect("jobs lock").get(id).cloned()
    }

    /// Whether a submission bringing `incoming` bytes is taken now; asked before an upload is
    /// read, so a refused one is not stored first.
    pub fn admit(&self, incoming: u64) -> Result<(), Refused> {
        self.check_pending()?;
        self.reserve.check(incoming).map_err(Refused::LowDisk)
    }

    /// The free space an upload in progress must leave.
    pub fn reserve(&self) -> &DiskReserve {
        &self.reserve
    }

    fn check_pending(&self) -> Result<(), Refused> {
        let limit = self.args.max_pending;
        let pending = self
            .entries()
            .iter()
            .filter(|e| !e.record().state.is_final())
            .count();
        if pending < limit {
            return Ok(());
        }
        Err(Refused::Busy(format!(
            "{pending} jobs are queued or running, the most this server takes \
             (--job-max-pending / LINESCAN_JOB_MAX_PENDING); submit again when some have ended"
        )))
    }

    /// Records and queues a job whose folder and input are ready, unless `--job-max-pending`
    /// jobs are already waiting (checked and entered one submission at a time, so concurrent
    /// submissions cannot pass it together).
    pub fn submit(&self, record: JobRecord) -> Result<JobRecord, Refused> {
        let id = record.id.clone();
        let entry = Self::new_entry(record.clone());
        {
            let _one_at_a_time = self.admission.lock().expect("admission lock");
            self.check_pending()?;
            self.jobs
                .lock()
                .expect("jobs lock")
                .insert(id.clone(), entry.clone());
        }
        // Under the record's lock, like every state change: a cancel that comes at once is
        // written after this.
        let saved = entry.write_through(&entry.record(), |record| self.store.save(record));
        if let Err(error) = saved {
            self.jobs.lock().expect("jobs lock").remove(&id);
            return Err(Refused::Store(error.into()));
        }
        self.sender
            .send(id)
            .map_err(|_| Refused::Store(anyhow::anyhow!("the job queue is closed")))?;
        Ok(record)
    }

    pub fn get(&self, id: &str) -> Option<JobRecord> {
        self.entry(id).map(|e| e.record().clone())
    }

    /// Every job, oldest first.
    pub fn list(&self) -> Vec<JobRecord> {
        let mut records: Vec<JobRecord> =
            self.entries().iter().map(|e| e.record().clone()).collect();
        records.sort_by(|a, b| a.created_unix.total_cmp(&b.created_unix));
        records
    }

    /// Cancels a job: a queued one at once, a running one at its next chunk; a finished one is
    /// left as it is. The record as it stands after the call.
    pub fn cancel(&self, id: &str) -> Option<JobRecord> {
        let entry = self.entry(id)?;
        entry.cancel.store(true, Ordering::Release);
        let mut record = entry.record();
        match record.state {
            JobState::Queued => {
                record.state = JobState::Cancelled;
                record.finished_unix = Some(now_unix());
                self.count_ended(&record);
                self.save(&entry, &record);
            }
            // The worker sees the flag at its next chunk; the record keeps the request in case
            // the process stops first.
            JobState::Running => {
                record.cancel_requested = true;
                self.save(&entry, &record);
            }
            _ => {}
        }
        Some(record.clone())
    }

    /// Removes a finished job and its files (an unknown id has nothing to remove).
    pub fn purge(&self, id: &str) -> anyhow::Result<()> {
        let _purging = self.purging.lock().expect("purging lock");
        let Some(entry) = self.entry(id) else {
            return Ok(());
        };
        let state = entry.record().state;
        anyhow::ensure!(
            state.is_final(),
            "job {id} is {}; cancel it first",
            state.name()
        );
        // Files first: a removal that fails leaves the job listed, as it still is on disk.
        self.store.remove(id)?;
        self.jobs.lock().expect("jobs lock").remove(id);
        Ok(())
    }

    /// Stops the workers: running jobs stop at their next chunk and stay queued on disk.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        let workers = std::mem::take(&mut *self.workers.lock().expect("workers lock"));
        for worker in workers {
            let _ = worker.join();
        }
    }

    fn runtime_handle(&self) -> Option<tokio::runtime::Handle> {
        self.runtime
            .lock()
            .expect("runtime lock")
            .as_ref()
            .map(|r| r.handle().clone())
    }

    /// Writes a state change of the entry's record, whose lock the caller holds.
    fn save(&self, entry: &JobEntry, record: &JobRecord) {
        let _ = entry.write_through(record, |record| self.store_logged(record));
    }

    /// Writes `record` to the store, logging a failure (the job goes on in memory).
    fn store_logged(&self, record: &JobRecord) -> std::io::Result<()> {
        self.store.save(record).inspect_err(|error| {
            tracing::error!(job = %record.id, %error, "cannot save job state");
        })
    }

    fn run_job(&self, id: &str) {
        let Some(entry) = self.entry(id) else {
            return;
        };
        let (model_name, options, input) = {
            let mut record = entry.record();
            if record.state != JobState::Queued {
                return; // cancelled while queued
            }
            record.state = JobState::Running;
            record.started_unix = Some(now_unix());
            record.attempts += 1;
            record.error = None;
            self.save(&entry, &record);
            let mut options = RunOptions::new(
                record.settings,
                record.input.name.clone(),
                self.sensors.preprocess.clone(),
            );
            options.partition = record.partition;
            options.missing = record.missing;
            options.chunk_rows = self.args.chunk_rows;
            options.throttle = Duration::from_millis(self.args.throttle_ms);
            (record.model.clone(), options, record.input.clone())
        };
        tracing::info!(job = %id, model = %model_name, "job started");
        let outcome = match (
            self.path_moved(&input),
            self.sensors.model(&model_name),
            self.runtime_handle(),
        ) {
            (Some(problem), _, _) => Err(RunError::Output(anyhow::anyhow!(
                "{problem}; the job reads only the file it was given: submit it again"
            ))),
            (None, None, _) => Err(RunError::Output(anyhow::anyhow!(
                "model {model_name} is not loaded (sensor models: {})",
                self.sensors.names().join(", ")
            ))),
            (None, _, None) => Err(RunError::Interrupted),
            (None, Some(model), Some(runtime)) => {
                let monitor = JobMonitor {
                    manager: self,
                    entry: &entry,
                    started: OnceLock::new(),
                    last_save: Mutex::new(Instant::now()),
                };
                let result_path = self.store.result_path(id);
                self.check_in_child(id, &input, options.partition, &monitor)
                    .and_then(|()| {
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            runner::run(
                                &input.path,
                                model,
                                &options,
                                &result_path,
                                &runtime,
                                &monitor,
                            )
                        }))
                        .unwrap_or_else(|_| {
                            Err(RunError::Output(anyhow::anyhow!(
                                "internal error while scoring (see the server log)"
                            )))
                        })
                    })
            }
        };
        // Stopped by shutdown after a cancel arrived: the cancel wins.
        let outcome = match outcome {
            Err(RunError::Interrupted) if entry.cancel.load(Ordering::Acquire) => {
                Err(RunError::Cancelled)
            }
            other => other,
        };
        let mut record = entry.record();
        match outcome {
            Ok(summary) => {
                record.state = JobState::Done;
                record.progress = 1.0;
                record.rows_done = summary.rows as u64;
                record.rows_total = summary.rows as u64;
                record.units = Some(summary.units as u64);
                record.values_held = summary.values_held;
                record.rows_per_second = summary.rows_per_second;
                record.finished_unix = Some(now_unix());
                tracing::info!(job = %id, rows = summary.rows, seconds = summary.seconds, "job done");
                self.metrics
                    .job_rows
                    .with_label_values(&[&model_name])
                    .inc_by(summary.rows as u64);
            }
            Err(RunError::Cancelled) => {
                record.state = JobState::Cancelled;
                record.finished_unix = Some(now_unix());
                self.store.clear_results(id);
                tracing::info!(job = %id, "job cancelled");
            }
            Err(RunError::Interrupted) => {
                record.requeue();
                self.store.clear_results(id);
                tracing::info!(job = %id, "job interrupted by shutdown; it will run again at the next start");
            }
            Err(error) => {
                record.state = JobState::Failed;
                record.error = Some(error.to_string());
                record.finished_unix = Some(now_unix());
                self.store.clear_results(id);
                tracing::warn!(job = %id, %error, "job failed");
            }
        }
        if record.state.is_final() {
            self.count_ended(&record);
        }
        self.save(&entry, &record);
    }

    /// Reads the archive whole in a child process first (`jobs::check`), so one that crashes
    /// the HDF5 library fails its job instead of taking the server down. A child that cannot
    /// be started is logged and the job goes on without the check.
    fn check_in_child(
        &self,
        id: &str,
        input: &JobInput,
        partition: Partition,
        monitor: &dyn Monitor,
    ) -> Result<(), RunError> {
        match check::in_child(&input.path, partition, &|| monitor.control(), false) {
            Ok(ChildCheck::Stopped(Control::Cancel)) => Err(RunError::Cancelled),
            Ok(ChildCheck::Stopped(_)) => Err(RunError::Interrupted),
            Ok(ended) => match ended.refusal(&input.name) {
                Some(reason) => Err(RunError::Output(anyhow::Error::msg(reason))),
                None => Ok(()),
            },
            Err(error) => {
                tracing::warn!(job = %id, %error, "cannot start the archive check; the job reads the archive without it");
                Ok(())
            }
        }
    }

    /// Why a path job's file is no longer the one accepted (a link or folder changed since,
    /// or it is no longer a regular file under `--jobs-allow-path`), if it is not; None for an
    /// upload.
    fn path_moved(&self, input: &JobInput) -> Option<String> {
        if input.kind != InputKind::Path {
            return None;
        }
        let accepted = &input.path;
        match self.args.resolve(accepted) {
            Ok(resolved) if resolved == *accepted => None,
            Ok(resolved) => Some(format!(
                "{} now leads to {}",
                accepted.display(),
                resolved.display()
            )),
            Err(refused) => Some(refused.to_string()),
        }
    }

    fn count_ended(&self, record: &JobRecord) {
        self.metrics
            .jobs_ended
            .with_label_values(&[&record.model, record.state.name()])
            .inc();
    }
}

impl Drop for JobManager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(runtime) = self.runtime.lock().ok().and_then(|mut r| r.take()) {
            runtime.shutdown_background();
        }
    }
}

fn worker_loop(
    manager: std::sync::Weak<JobManager>,
    receiver: Receiver<String>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Acquire) {
        match receiver.recv_timeout(Duration::from_millis(100)) {
            Ok(id) => match manager.upgrade() {
                Some(manager) => manager.run_job(&id),
                None => return,
            },
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Removes expired jobs every quarter of the retention (10 s to a minute) until the manager
/// stops.
fn retention_loop(
    manager: std::sync::Weak<JobManager>,
    stop: Arc<AtomicBool>,
    retention: Duration,
) {
    let every = (retention / 4).clamp(Duration::from_secs(10), Duration::from_secs(60));
    let mut next = Instant::now() + every;
    while !stop.load(Ordering::Acquire) {
        if Instant::now() >= next {
            let Some(manager) = manager.upgrade() else {
                return;
            };
            manager.purge_expired(retention);
            next = Instant::now() + every;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct JobMonitor<'a> {
    manager: &'a JobManager,
    entry: &'a JobEntry,
    /// When scoring started (its first report), after the archive check: the rate is the
    /// scoring's.
    started: OnceLock<Instant>,
    last_save: Mutex<Instant>,
}

impl Monitor for JobMonitor<'_> {
    fn progress(&self, done: usize, total: usize) {
        let mut record = self.entry.record();
        record.rows_done = done as u64;
        record.rows_total = total as u64;
        record.progress = if total == 0 {
            0.0
        } else {
            done as f64 / total as f64
        };
        let started = self.started.get_or_init(Instant::now);
        record.rows_per_second = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let mut last = self.last_save.lock().expect("save lock");
        if last.elapsed() >= SAVE_EVERY {
            *last = Instant::now();
            drop(last);
            self.entry.write_behind(record, |record| {
                let _ = self.manager.store_logged(record);
            });
        }
    }

    fn control(&self) -> Control {
        if self.entry.cancel.load(Ordering::Acquire) {
            Control::Cancel
        } else if self.manager.stop.load(Ordering::Acquire) {
            Control::Interrupt
        } else {
            Control::Go
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn entry() -> Arc<JobEntry> {
        let input = JobInput {
            kind: InputKind::Upload,
            path: "fleet.h5".into(),
            name: "fleet.h5".into(),
            bytes: 0,
        };
        let record = JobRecord::queued(
            "j1".into(),
            "rul_fd001".into(),
            Partition::default(),
            crate::sensors::AssessSettings::default(),
            input,
        );
        JobManager::new_entry(record)
    }

    /// Sets `rows_done` and writes it (as progress, or as a state change), the write recording
    /// what it wrote into `writes`.
    fn change(entry: Arc<JobEntry>, rows: u64, progress: bool, writes: Arc<Mutex<Vec<u64>>>) {
        let mut record = entry.record();
        record.rows_done = rows;
        let write = |copy: &JobRecord| writes.lock().unwrap().push(copy.rows_done);
        if progress {
            entry.write_behind(record, write);
        } else {
            let written = entry.write_through(&record, |copy| {
                write(copy);
                Ok::<(), std::convert::Infallible>(())
            });
            assert!(written.is_ok());
        }
    }

    #[test]
    fn a_record_is_free_to_read_while_its_progress_is_written() {
        let entry = entry();
        let (started, is_started) = mpsc::channel();
        let (release, is_released) = mpsc::channel::<()>();
        let writer = {
            let entry = entry.clone();
            std::thread::spawn(move || {
                entry.write_behind(entry.record(), |_| {
                    started.send(()).unwrap();
                    is_released.recv().unwrap();
                })
            })
        };
        is_started.recv().unwrap();
        assert!(entry.record.try_lock().is_ok(), "held during the write");
        release.send(()).unwrap();
        writer.join().unwrap();
    }

    #[test]
    fn the_last_write_is_the_last_change() {
        for (first_is_progress, second_is_progress) in [(true, true), (true, false)] {
            for _ in 0..20 {
                let entry = entry();
                let writes = Arc::new(Mutex::new(Vec::new()));
                // Both changes wait for the write lock, the first made first; whichever gets
                // the lock first, the newer change is what is on disk at the end.
                let held = entry.saved.lock().unwrap();
                let mut changes = Vec::new();
                for (rows, progress) in [(1, first_is_progress), (2, second_is_progress)] {
                    let (entry_for, writes_for) = (entry.clone(), writes.clone());
                    changes.push(std::thread::spawn(move || {
                        change(entry_for, rows, progress, writes_for)
                    }));
                    while entry.revision.load(Ordering::Acquire) < rows {
                        std::thread::yield_now();
                    }
                }
                drop(held);
                changes.into_iter().for_each(|c| c.join().unwrap());
                let writes = writes.lock().unwrap();
                assert_eq!(writes.last(), Some(&2), "{writes:?}");
            }
        }
    }
}
