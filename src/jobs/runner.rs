//! Scores an archive end to end: the same code path for server jobs and `linescan job run`.
//!
//! The archive is read in chunks (hyperslabs of `chunk_rows` rows); each chunk is scaled by the
//! preprocessing backend and its rows are cut into batches of the models' `max_batch_size`
//! windows (one window ends at every row, short units padded by policy), stacked by the backend
//! and sent to the batchers while the next chunk is prepared (`in_flight` batches at most).
//! Memory stays bounded by the chunk and the batches in flight, whatever the archive's size.
//!
//! **Batches are aligned to archive rows** (batch k holds the windows ending at rows
//! `[k·B, (k+1)·B)`, the last one padded to B): every window is computed in the same batch at
//! the same position whatever the run covers, so a shard's rows are bit for bit the rows of the
//! one-run result. **Sharding** (`--shard i/N`) is by unit range: shard i takes the units whose
//! first row lies in `[i·n/N, (i+1)·n/N)`, so shards are contiguous runs of rows and merge by
//! concatenation in shard order.
//!
//! **Gaps** (NaN, ±Inf, values beyond the float32 range) fail the run, or with
//! [`MissingPolicy::Hold`] take the unit's last finite value of their channel ([`GapFiller`]);
//! each result row counts the held values its window read (`held`).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::engine::{InferError, Priority};
use crate::jobs::archive::{Archive, ArchiveError, Partition, UnitSpan};
use crate::jobs::gaps::{GapFiller, MissingPolicy};
use crate::jobs::results::{Columns, ResultMeta, ResultWriter, ShardInfo};
use crate::preprocess::{Preprocess, PreprocessError, handoff_device};
use crate::runtime::device::PlacedBytes;
use crate::sensors::window::{WindowSpan, describe_non_finite};
use crate::sensors::{AssessSettings, Scores, SensorModel};
use crate::tensor::f32_bytes;

/// How far a job's batch may wait for a busy batcher before giving up.
const BATCH_DEADLINE: Duration = Duration::from_secs(600);
/// How often a run waiting for a batch looks for a cancel or a stop: live traffic can keep a
/// job's batch waiting in the bulk lane for long.
const CONTROL_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(text: &str) -> Result<Shard, String> {
        let (index, count) = text
            .split_once('/')
            .ok_or_else(|| format!("shard \"{text}\" is not i/N (e.g. 0/4)"))?;
        let index: usize = index
            .trim()
            .parse()
            .map_err(|_| format!("shard index \"{index}\" is not a number"))?;
        let count: usize = count
            .trim()
            .parse()
            .map_err(|_| format!("shard count \"{count}\" is not a number"))?;
        if count == 0 || index >= count {
            return Err(format!("shard {index}/{count}: need 0 <= i < N"));
        }
        Ok(Shard { index, count })
    }
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub settings: AssessSettings,
    pub partition: Partition,
    pub missing: MissingPolicy,
    pub shard: Option<Shard>,
    /// Archive rows read per hyperslab.
    pub chunk_rows: usize,
    /// Model batches in flight per run.
    pub in_flight: usize,
    /// Pause between chunks (a test and demo hook; 0 in production).
    pub throttle: Duration,
    /// Name recorded as the result's source.
    pub source_name: String,
    /// Backend of the scaling stage.
    pub preprocess: Arc<dyn Preprocess>,
}

impl RunOptions {
    pub fn new(
        settings: AssessSettings,
        source_name: String,
        preprocess: Arc<dyn Preprocess>,
    ) -> RunOptions {
        RunOptions {
            settings,
            partition: Partition::All,
            missing: MissingPolicy::Fail,
            shard: None,
            chunk_rows: 16_384,
            in_flight: 4,
            throttle: Duration::ZERO,
            source_name,
            preprocess,
        }
    }
}

/// What a run is told between chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Go,
    /// The user cancelled the job.
    Cancel,
    /// The process is stopping: leave the job to be re-queued at the next start.
    Interrupt,
}

/// Progress reports and cancellation.
pub trait Monitor {
    /// Scored rows so far of `total` (the rows this run writes).
    fn progress(&self, done: usize, total: usize);
    fn control(&self) -> Control;
}

/// No progress display, never cancelled.
pub struct Unmonitored;

impl Monitor for Unmonitored {
    fn progress(&self, _: usize, _: usize) {}
    fn control(&self) -> Control {
        Control::Go
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("cancelled")]
    Cancelled,
    #[error("interrupted (the server is stopping)")]
    Interrupted,
    #[error("scoring failed: {0}")]
    Infer(InferError),
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    #[error(transparent)]
    Output(#[from] anyhow::Error),
}

#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub rows: usize,
    pub units: usize,
    pub seconds: f64,
    pub rows_per_second: f64,
    /// Values held over gaps in the rows the run kept (0 unless `missing` is hold).
    pub values_held: u64,
    pub meta: ResultMeta,
}

/// Windows of one batch on their way through the models.
struct BatchMeta {
    first_row: usize,
    units: Vec<i64>,
    cycles: Vec<i64>,
    padded: Vec<u16>,
    /// Held values the window read (derived from `ends` when the batch is stacked).
    held: Vec<u32>,
    /// Per window: (archive row it ends at, archive row its unit starts at).
    ends: Vec<(usize, usize)>,
}

/// Scaled rows of the archive from row `base` on: the rows that pending windows still need.
struct HeldRows {
    rows: Vec<f32>,
    /// Per row: its values held over gaps.
    held: Vec<u16>,
    base: usize,
    width: usize,
}

impl HeldRows {
    /// Drops the rows before archive row `row`.
    fn forget_before(&mut self, row: usize) {
        let drop = row
            .saturating_sub(self.base)
            .min(self.rows.len() / self.width);
        self.rows.drain(..drop * self.width);
        self.held.drain(..drop);
        self.base += drop;
    }

    /// The batch's windows (its padding recorded in `meta`), stacked by the preprocessing
    /// backend from the rows they read, and only those (a GPU uploads them), `batch` windows in
    /// all: the last batch is padded so every batch has the same shape. With `device`, where
    /// the models read CUDA memory in place, a backend that can leaves them there.
    fn stack(
        &self,
        preprocess: &dyn Preprocess,
        window: usize,
        meta: &mut BatchMeta,
        batch: usize,
        device: Option<i32>,
    ) -> Result<PlacedBytes, PreprocessError> {
        let window_values = window * self.width;
        // Archive row of each window's oldest row: its unit's first row when it is padded.
        let oldest =
            |&(row, unit_first): &(usize, usize)| (row + 1).saturating_sub(window).max(unit_first);
        let (Some(from), Some(to)) = (
            meta.ends.iter().map(oldest).min(),
            meta.ends.iter().map(|&(row, _)| row + 1).max(),
        ) else {
            return Ok(PlacedBytes::Host(f32_bytes(vec![
                0.0;
                batch * window_values
            ])));
        };
        assert!(
            from >= self.base,
            "window rows {from}.. were dropped (held from {})",
            self.base
        );
        // A window whose unit began before `from` reads `window` rows from `from` on, so its
        // span may start at row 0 of the slice.
        let mut spans: Vec<WindowSpan> = meta
            .ends
            .iter()
            .map(|&(row, unit_first)| WindowSpan {
                last: (row - from) as u32,
                first: unit_first.saturating_sub(from) as u32,
            })
            .collect();
        meta.padded = spans.iter().map(|s| s.padded(window) as u16).collect();
        // Padding repeats a unit's first row, which holds nothing (a gap there has no earlier
        // value: the run fails, or the row's windows are not kept), so it adds nothing here.
        meta.held = meta
            .ends
            .iter()
            .map(|end| {
                let (oldest, last) = (oldest(end) - self.base, end.0 - self.base);
                self.held[oldest..=last].iter().map(|&h| h as u32).sum()
            })
            .collect();
        let rows = &self.rows[(from - self.base) * self.width..(to - self.base) * self.width];
        if let Some(device) = device {
            // Padding windows repeat the last one there (their scores are never written).
            let last = *spans.last().expect("a batch has windows");
            spans.resize(batch, last);
            if let Some(on_device) =
                preprocess.stack_windows_on_device(rows, self.width, window, &spans, device)?
            {
                return Ok(PlacedBytes::Device(on_device));
            }
            spans.truncate(meta.ends.len());
        }
        let mut windows = Vec::with_capacity(batch * window_values);
        preprocess.stack_windows(rows, self.width, window, &spans, &mut windows)?;
        windows.resize(batch * window_values, 0.0);
        Ok(PlacedBytes::Host(f32_bytes(windows)))
    }
}

/// A batch being scored; dropped unfinished (the run was cancelled or failed), it stops, and
/// its requests leave the batchers' queues unrun.
struct ScoringTask(tokio::task::JoinHandle<Result<Scores, InferError>>);

impl Drop for ScoringTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Pending = (ScoringTask, BatchMeta);

/// The rows a shard keeps: whole units whose first row falls in its share of the rows.
pub fn shard_rows(spans: &[UnitSpan], rows: usize, shard: Shard) -> (usize, usize) {
    let share = |i: usize| (i as u128 * rows as u128 / shard.count as u128) as usize;
    let (low, high) = (share(shard.index), share(shard.index + 1));
    let first = spans.partition_point(|s| s.first_row < low);
    let last = spans.partition_point(|s| s.first_row < high);
    if first >= last {
        let at = spans.get(first).map_or(rows, |s| s.first_row);
        return (at, at);
    }
    (spans[first].first_row, spans[last - 1].end())
}

async fn score_batch(
    model: Arc<SensorModel>,
    windows: PlacedBytes,
    rows: usize,
) -> Result<Scores, InferError> {
    loop {
        let deadline = Instant::now() + BATCH_DEADLINE;
        match model
            .score(windows.clone(), rows, deadline, Priority::Bulk)
            .await
        {
            // Other jobs filled the bulk lane: wait for room rather than fail the job.
            Err(InferError::QueueFull(_)) => {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            outcome => return outcome,
        }
    }
}

struct Output<'a> {
    writer: ResultWriter,
    model: &'a SensorModel,
    settings: AssessSettings,
    keep: (usize, usize),
    rows: Columns,
    /// The unit being written: its latest row and its row count.
    unit: Option<(Columns, u64)>,
    units: usize,
    written: usize,
}

impl Output<'_> {
    fn complete(&mut self, meta: BatchMeta, scores: Scores) -> Result<(), RunError> {
        self.rows.clear();
        for (j, &unit) in meta.units.iter().enumerate() {
            let row = meta.first_row + j;
            if row < self.keep.0 || row >= self.keep.1 {
                continue;
            }
            if let Some(problem) = scores.non_finite_at(j) {
                return Err(RunError::Archive(ArchiveError(format!(
                    "row {row} (unit {unit}, cycle {}): {problem}",
                    meta.cycles[j]
                ))));
            }
            let a = self.model.assess(&scores, j, &self.settings);
            self.rows.push(
                unit,
                meta.cycles[j],
                a.rul,
                a.rul_std,
                a.rul_sigma,
                a.risk,
                a.anomaly,
                a.health,
                meta.padded[j] as u64,
                meta.held[j],
            );
        }
        for i in 0..self.rows.len() {
            self.writer.push_row(&self.rows, i)?;
            let unit = self.rows.unit[i];
            match &mut self.unit {
                Some((latest, count)) if latest.unit[0] == unit => {
                    latest.clear();
                    latest.push_from(&self.rows, i);
                    *count += 1;
                }
                _ => {
                    self.flush_unit()?;
                    let mut latest = Columns::default();
                    latest.push_from(&self.rows, i);
                    self.unit = Some((latest, 1));
                }
            }
        }
        self.written += self.rows.len();
        Ok(())
    }

    fn flush_unit(&mut self) -> anyhow::Result<()> {
        if let Some((mut latest, count)) = self.unit.take() {
            latest.count[0] = count;
            self.writer.push_unit(&latest, 0)?;
            self.units += 1;
        }
        Ok(())
    }
}

/// Scores the archive at `archive_path` into the HDF5 result `out`.
pub fn run(
    archive_path: &Path,
    model: &Arc<SensorModel>,
    options: &RunOptions,
    out: &Path,
    runtime: &tokio::runtime::Handle,
    monitor: &dyn Monitor,
) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    let check = || match monitor.control() {
        Control::Go => Ok(()),
        Control::Cancel => Err(RunError::Cancelled),
        Control::Interrupt => Err(RunError::Interrupted),
    };
    let archive = Archive::open_named(archive_path, &options.source_name, options.partition)?;
    let features = archive.features(&model.params.channels)?;
    let spans = archive
        .scan_units(&|| monitor.control() == Control::Go)
        .map_err(|e| match check() {
            Err(stop) => stop,
            Ok(()) => RunError::Archive(e),
        })?;
    check()?;
    let n = archive.rows();
    let batch = model.batch_rows();
    let window = model.params.window;
    let width = model.params.channels.len();
    let (keep_start, keep_end) = match options.shard {
        None => (0, n),
        Some(shard) => shard_rows(&spans, n, shard),
    };
    let (emit_start, emit_end) = if keep_start < keep_end {
        (
            keep_start / batch * batch,
            (keep_end.div_ceil(batch) * batch).min(n),
        )
    } else {
        (keep_start, keep_start)
    };
    let stream_start = emit_start.saturating_sub(window - 1);
    let meta = ResultMeta {
        model: model.name().to_string(),
        model_version: model.rul.spec.version,
        anomaly_model: model.anomaly.as_ref().map(|a| a.name().to_string()),
        anomaly_model_version: model.anomaly.as_ref().map(|a| a.spec.version),
        window,
        channels: model.params.channels.clone(),
        padding: model.params.padding.name().to_string(),
        batch_rows: batch,
        settings: options.settings,
        source: options.source_name.clone(),
        source_rows: n,
        missing: options.missing,
        preprocess: Some(options.preprocess.backend().as_str().to_string()),
        providers: Some(match &model.anomaly {
            Some(anomaly) => format!(
                "{} / {}",
                model.rul.provider_names(),
                anomaly.provider_names()
            ),
            None => model.rul.provider_names(),
        }),
        layout: archive.layout().name().to_string(),
        partition: options.partition.name().to_string(),
        shard: options.shard.map(|s| ShardInfo {
            index: s.index,
            count: s.count,
            rows_start: keep_start,
            rows_end: keep_end,
        }),
    };
    let mut output = Output {
        writer: ResultWriter::create(out, &meta)?,
        model,
        settings: options.settings,
        keep: (keep_start, keep_end),
        rows: Columns::default(),
        unit: None,
        units: 0,
        written: 0,
    };
    let total = keep_end - keep_start;
    monitor.progress(0, total);

    let mut values_held = 0u64;
    let outcome = (|| -> Result<(), RunError> {
        let mut in_flight: VecDeque<Pending> = VecDeque::new();
        let finish_front =
            |in_flight: &mut VecDeque<Pending>, output: &mut Output<'_>| -> Result<(), RunError> {
                let (mut task, meta) = in_flight.pop_front().expect("a batch in flight");
                let joined = runtime.block_on(async {
                    loop {
                        tokio::select! {
                            joined = &mut task.0 => return Ok::<_, RunError>(joined),
                            () = tokio::time::sleep(CONTROL_POLL) => check()?,
                        }
                    }
                })?;
                let scores = joined
                    .map_err(|e| RunError::Output(anyhow::anyhow!("scoring task failed: {e}")))?
                    .map_err(|e| match e {
                        InferError::ShuttingDown => RunError::Interrupted,
                        other => RunError::Infer(other),
                    })?;
                output.complete(meta, scores)?;
                monitor.progress(output.written, total);
                Ok(())
            };
        let new_batch = |first_row: usize| BatchMeta {
            first_row,
            units: Vec::with_capacity(batch),
            cycles: Vec::with_capacity(batch),
            // Derived from `ends` when the batch is stacked.
            padded: Vec::new(),
            held: Vec::new(),
            ends: Vec::with_capacity(batch),
        };
        let mut current = new_batch(emit_start);
        let device = handoff_device(options.preprocess.as_ref(), model.device());
        if let Some(device) = device {
            tracing::info!(
                device,
                "sensor windows stay on the GPU: the models' sessions read them in place"
            );
        }
        let submit = |held: &HeldRows,
                      current: &mut BatchMeta,
                      in_flight: &mut VecDeque<Pending>,
                      output: &mut Output<'_>|
         -> Result<(), RunError> {
            let windows =
                held.stack(options.preprocess.as_ref(), window, current, batch, device)?;
            let task = ScoringTask(runtime.spawn(score_batch(model.clone(), windows, batch)));
            let next = new_batch(current.first_row + batch);
            in_flight.push_back((task, std::mem::replace(current, next)));
            while in_flight.len() >= options.in_flight.max(1) {
                finish_front(in_flight, output)?;
            }
            Ok(())
        };

        let mut held = HeldRows {
            rows: Vec::new(),
            held: Vec::new(),
            base: stream_start,
            width,
        };
        let mut raw: Vec<f64> = Vec::new();
        let mut gaps = GapFiller::new(width);
        let unit_of = |row: usize| spans[spans.partition_point(|s| s.end() <= row)];
        // Rows whose results this run writes; the others are read for their windows only.
        let kept = |row: usize| (keep_start..keep_end).contains(&row);
        // Where a value the model cannot take is: "NaN in channel s_4 at row 100 (unit 11, cycle 101)".
        let gap_at = |what: &str, channel: usize, row: usize, cycle: i64| {
            format!(
                "{what} in channel {} at row {row} (unit {}, cycle {cycle})",
                model.params.channels[channel],
                unit_of(row).unit
            )
        };
        let mut span_index = spans.partition_point(|s| s.end() <= stream_start);
        let mut chunk_start = stream_start;
        while chunk_start < emit_end {
            check()?;
            let chunk_end = (chunk_start + options.chunk_rows.max(1)).min(emit_end);
            features.read(chunk_start, chunk_end, &mut raw)?;
            let (_, cycles) = archive.read_ids(chunk_start, chunk_end)?;
            held.forget_before(current.first_row.saturating_sub(window - 1));
            match options.missing {
                MissingPolicy::Fail => held
                    .held
                    .resize(held.held.len() + chunk_end - chunk_start, 0),
                MissingPolicy::Hold => {
                    let before = held.held.len();
                    let filled = gaps.fill(
                        &mut raw,
                        &features.map,
                        |i| unit_of(chunk_start + i).first_row == chunk_start + i,
                        |i| !kept(chunk_start + i),
                        &mut held.held,
                    );
                    if let Err(gap) = filled {
                        let map = &features.map;
                        let value = raw[gap.row * map.source_width + map.columns[gap.channel]];
                        let (row, cycle) = (chunk_start + gap.row, cycles[gap.row]);
                        return Err(RunError::Archive(ArchiveError(format!(
                            "{} is the unit's first value of the channel: missing=hold has no \
                             earlier value to hold over it",
                            gap_at(&describe_non_finite(value), gap.channel, row, cycle)
                        ))));
                    }
                    values_held += (chunk_start..)
                        .zip(&held.held[before..])
                        .filter(|(row, _)| kept(*row))
                        .map(|(_, &h)| h as u64)
                        .sum::<u64>();
                }
            }
            let scaling = options.preprocess.scale_rows(
                &model.scaler,
                &raw,
                &features.map,
                &mut held.rows,
            )?;
            if let Err(bad) = scaling {
                let (row, cycle) = (chunk_start + bad.row, cycles[bad.row]);
                return Err(RunError::Archive(ArchiveError(format!(
                    "{}; the model needs finite values",
                    gap_at(&bad.what(), bad.channel, row, cycle)
                ))));
            }
            for (i, row) in (chunk_start..chunk_end).enumerate() {
                while spans[span_index].end() <= row {
                    span_index += 1;
                }
                let span = spans[span_index];
                if row >= emit_start {
                    current.ends.push((row, span.first_row));
                    current.units.push(span.unit);
                    current.cycles.push(cycles[i]);
                    if current.units.len() == batch {
                        submit(&held, &mut current, &mut in_flight, &mut output)?;
                    }
                }
            }
            chunk_start = chunk_end;
            if !options.throttle.is_zero() {
                std::thread::sleep(options.throttle);
            }
        }
        if !current.units.is_empty() {
            submit(&held, &mut current, &mut in_flight, &mut output)?;
        }
        while !in_flight.is_empty() {
            finish_front(&mut in_flight, &mut output)?;
        }
        output.flush_unit()?;
        Ok(())
    })();

    match outcome {
        Ok(()) => {
            let (rows, units) = (output.written, output.units);
            output.writer.finish()?;
            let seconds = started.elapsed().as_secs_f64();
            Ok(RunSummary {
                rows,
                units,
                seconds,
                rows_per_second: rows as f64 / seconds.max(1e-9),
                values_held,
                meta,
            })
        }
        // The writer goes with `output`, removing its unfinished file.
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(lengths: &[usize]) -> Vec<UnitSpan> {
        let mut first_row = 0;
        lengths
            .iter()
            .enumerate()
            .map(|(i, &rows)| {
                let span = UnitSpan {
                    unit: i as i64 + 1,
                    first_row,
                    rows,
                };
                first_row += rows;
                span
            })
            .collect()
    }

    #[test]
    fn shards_cover_every_unit_once_in_order() {
        let spans = spans(&[10, 50, 5, 5, 30, 100]);
        let rows = 200;
        for count in 1..=8 {
            let mut next = 0;
            for index in 0..count {
                let (start, end) = shard_rows(&spans, rows, Shard { index, count });
                assert_eq!(start, next, "shard {index}/{count}");
                assert!(end >= start);
                assert!(spans.iter().any(|s| s.first_row == start) || start == rows);
                next = end;
            }
            assert_eq!(next, rows, "{count} shards");
        }
    }

    #[test]
    fn shard_syntax() {
        assert_eq!("1/4".parse::<Shard>(), Ok(Shard { index: 1, count: 4 }));
        assert!("4/4".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
        assert!("0/0".parse::<Shard>().is_err());
    }
}
