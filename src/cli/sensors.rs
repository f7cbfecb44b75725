//! `linescan job run|merge` (fleet archives offline, the server's job code path) and
//! `linescan rul cmapss` (the C-MAPSS text contract evaluators script against).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::{ModelArgs, at_least_one};
use crate::durable::PartialFile;
use crate::engine::{ModelRegistry, Priority};
use crate::jobs::archive::{Partition, has_signature};
use crate::jobs::check::ChildCheck;
use crate::jobs::gaps::MissingPolicy;
use crate::jobs::results::{self, Format, View};
use crate::jobs::runner::{self, Control, Monitor, RunError, RunOptions, Shard};
use crate::metrics::Metrics;
use crate::runtime::ModelRepository;
use crate::runtime::device::PlacedBytes;
use crate::sensors::channels::ChannelMap;
use crate::sensors::window::single_window;
use crate::sensors::{ANOMALY_PREFIX, AssessSettings, RUL_PREFIX, SensorModel};
use crate::signals::{Interrupted, StopWatch};
use crate::tensor::f32_bytes;

#[derive(Subcommand)]
pub enum JobCommand {
    /// Score an HDF5 archive (generic or N-CMAPSS layout) into RESULT.h5, .csv or .json.
    Run(JobRunArgs),
    /// Merge the results of every shard of an archive into the result of one run.
    Merge(JobMergeArgs),
    /// Write a synthetic generic archive (C-MAPSS-like degradation series, 24 f32 channels).
    Synth(JobSynthArgs),
    /// Read an archive whole without scoring it (layout, units, every value): exit 0 when it
    /// can be read, 1 with the reason when not (a crash of the HDF5 library included: the read
    /// runs in a child process, as before each server job). It does not check the archive
    /// against a model: a missing channel or a NaN fails the job (and `job run`), not this.
    Check(JobCheckArgs),
    /// `job check`'s read itself, in this process: the child process that `job check`, `job
    /// run` and the server's jobs start.
    #[command(hide = true)]
    CheckInProcess(JobCheckArgs),
}

#[derive(Args)]
pub struct JobCheckArgs {
    /// The HDF5 archive.
    pub archive: PathBuf,
    /// N-CMAPSS partitions to read (a generic archive has one; only `all` applies to it).
    #[arg(
        long,
        env = "LINESCAN_JOB_PARTITION",
        value_enum,
        default_value = "all"
    )]
    pub partition: Partition,
}

#[derive(Args)]
pub struct JobSynthArgs {
    /// The archive to write.
    #[arg(long, env = "LINESCAN_JOB_SYNTH_OUT")]
    pub out: PathBuf,
    /// Rows (units of 128..362 cycles until the count is reached; the last may be cut short).
    #[arg(long, env = "LINESCAN_JOB_ROWS", default_value_t = 1_000_000, value_parser = at_least_one::<usize>)]
    pub rows: usize,
    /// Random seed: the same seed and row count write the same archive.
    #[arg(long, env = "LINESCAN_JOB_SEED", default_value_t = 1)]
    pub seed: u64,
}

#[derive(Args)]
pub struct JobRunArgs {
    /// The HDF5 archive.
    pub archive: PathBuf,
    /// Result file; its extension picks the format (.h5, .csv, .json).
    #[arg(long, env = "LINESCAN_JOB_RUN_OUT")]
    pub out: PathBuf,
    /// Score only shard i of N (by unit range); `job merge` joins the shards.
    #[arg(long, env = "LINESCAN_JOB_SHARD")]
    pub shard: Option<Shard>,
    /// Sensor model (default: the repository's only rul_* model).
    #[arg(long, env = "LINESCAN_JOB_MODEL")]
    pub model: Option<String>,
    /// N-CMAPSS partitions to score (a generic archive has one; only `all` applies to it).
    #[arg(
        long,
        env = "LINESCAN_JOB_PARTITION",
        value_enum,
        default_value = "all"
    )]
    pub partition: Partition,
    /// A NaN or infinite value in a model channel: `fail` the run naming it, or `hold` the
    /// unit's last finite value of the channel over it (results count held values per window).
    #[arg(long, env = "LINESCAN_JOB_MISSING", value_enum, default_value = "fail")]
    pub missing: MissingPolicy,
    /// Archive rows read per chunk.
    #[arg(long, env = "LINESCAN_JOB_CHUNK_ROWS", default_value_t = 16_384, value_parser = at_least_one::<usize>)]
    pub chunk_rows: usize,
    /// Model batches in flight (default: two per session, plus two).
    #[arg(long, env = "LINESCAN_JOB_IN_FLIGHT", value_parser = at_least_one::<usize>)]
    pub in_flight: Option<usize>,
    /// No progress bar.
    #[arg(long, env = "LINESCAN_JOB_QUIET", action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, value_parser = clap::builder::BoolishValueParser::new())]
    pub quiet: bool,
    #[command(flatten)]
    pub assess: AssessSettings,
    #[command(flatten)]
    pub preprocess: crate::preprocess::PreprocessArgs,
    #[command(flatten)]
    pub models: ModelArgs,
}

#[derive(Args)]
pub struct JobMergeArgs {
    /// Shard results (HDF5), in any order.
    #[arg(required = true)]
    pub parts: Vec<PathBuf>,
    /// Merged result; its extension picks the format (.h5, .csv, .json).
    #[arg(long, env = "LINESCAN_JOB_MERGE_OUT")]
    pub out: PathBuf,
}

#[derive(Subcommand)]
pub enum RulCommand {
    /// Predict the RUL at the last cycle of every unit of a C-MAPSS text file → `unit,rul` CSV.
    Cmapss(CmapssArgs),
}

#[derive(Args)]
pub struct CmapssArgs {
    /// C-MAPSS text file (train_FD001.txt layout: unit, cycle, 3 settings, 21 sensors).
    #[arg(long, env = "LINESCAN_RUL_INPUT")]
    pub input: PathBuf,
    /// CSV written: a header line `unit,rul`, then one line per unit, in ascending order.
    #[arg(long, env = "LINESCAN_RUL_OUT")]
    pub out: PathBuf,
    /// Sensor model (default: the repository's only rul_* model).
    #[arg(long, env = "LINESCAN_RUL_MODEL")]
    pub model: Option<String>,
    #[command(flatten)]
    pub models: ModelArgs,
}

pub fn run_job(command: JobCommand) -> anyhow::Result<()> {
    match command {
        JobCommand::Run(args) => job_run(&args),
        JobCommand::Merge(args) => job_merge(&args),
        JobCommand::Check(args) => job_check(&args),
        JobCommand::CheckInProcess(args) => {
            let started = Instant::now();
            let checked = crate::jobs::check::read_whole(&args.archive, args.partition)
                .with_context(|| format!("checking {}", args.archive.display()))?;
            println!(
                "{}: {} layout, {} rows of {} units x {} channels, read whole in {:.2} s",
                args.archive.display(),
                checked.layout.name(),
                checked.rows,
                checked.units,
                checked.channels,
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        JobCommand::Synth(args) => {
            anyhow::ensure!(
                Format::from_path(&args.out) == Some(Format::H5),
                "{}: job synth writes HDF5; give the file an .h5 extension",
                args.out.display()
            );
            anyhow::ensure!(
                !args.out.is_dir(),
                "--out {} is a folder; name the archive file",
                args.out.display()
            );
            crate::durable::check_writable(&args.out)
                .with_context(|| format!("cannot write {}", args.out.display()))?;
            let stop = StopWatch::start()?;
            let started = Instant::now();
            // Written beside --out and moved over it when whole: a file already there is
            // replaced only by a finished archive.
            let partial = PartialFile::new(crate::durable::with_suffix(&args.out, ".partial"));
            let stopped = || stop.requested().is_some();
            let written = crate::jobs::synthetic::write_large_generic(
                partial.path(),
                args.rows,
                args.seed,
                &stopped,
            );
            let (rows, units) = match (written, stop.requested()) {
                (Ok(counts), _) => counts,
                (Err(_), Some(name)) => {
                    return Err(Interrupted(format!(
                        "interrupted ({name}): {} was not written",
                        args.out.display()
                    ))
                    .into());
                }
                (Err(error), None) => return Err(error),
            };
            crate::durable::replace(partial, &args.out)
                .with_context(|| format!("cannot move the archive to {}", args.out.display()))?;
            println!(
                "{rows} rows of {units} unit{} x 24 channels written to {} in {:.2} s",
                if units == 1 { "" } else { "s" },
                args.out.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

pub fn run_rul(command: RulCommand) -> anyhow::Result<()> {
    match command {
        RulCommand::Cmapss(args) => cmapss(&args),
    }
}

/// Loads a RUL model and, `with_anomaly`, its anomaly twin (nothing else) and opens them for
/// scoring.
pub fn load_sensor_model(
    models: &ModelArgs,
    name: Option<&str>,
    with_anomaly: bool,
) -> anyhow::Result<(Arc<ModelRegistry>, Arc<SensorModel>)> {
    let mut repository = ModelRepository::scan(&models.model_repository)?;
    let mut candidates: Vec<String> = repository
        .versions
        .iter()
        .map(|v| v.config.name.clone())
        .filter(|n| n.starts_with(RUL_PREFIX))
        .collect();
    candidates.dedup();
    let name = match name {
        Some(name) => name.to_string(),
        None => match candidates.as_slice() {
            [only] => only.clone(),
            [] => anyhow::bail!("{} has no rul_* model", models.model_repository.display()),
            many => anyhow::bail!("name the model with --model (one of {})", many.join(", ")),
        },
    };
    anyhow::ensure!(
        candidates.contains(&name),
        "model {name} is not a rul_* model of {} (found: {})",
        models.model_repository.display(),
        candidates.join(", ")
    );
    let anomaly = format!(
        "{ANOMALY_PREFIX}{}",
        name.strip_prefix(RUL_PREFIX).unwrap_or(&name)
    );
    repository
        .versions
        .retain(|v| v.config.name == name || (with_anomaly && v.config.name == anomaly));
    let metrics = Arc::new(Metrics::new());
    let registry = Arc::new(ModelRegistry::load(
        &repository,
        &models.load_options()?,
        &metrics,
    )?);
    let model = Arc::new(SensorModel::open(&registry, &name)?);
    Ok((registry, model))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

/// The progress bar, and Ctrl-C or SIGTERM as a cancel: the run stops at its next chunk and
/// removes its partial output instead of dying with it half written.
struct BarMonitor {
    bar: ProgressBar,
    stop: StopWatch,
}

impl Monitor for BarMonitor {
    fn progress(&self, done: usize, total: usize) {
        self.bar.set_length(total as u64);
        self.bar.set_position(done as u64);
    }
    fn control(&self) -> Control {
        cancel_on_stop(&self.stop)
    }
}

/// Ctrl-C or SIGTERM as a cancel of the offline run or check.
fn cancel_on_stop(stop: &StopWatch) -> Control {
    match stop.requested() {
        Some(_) => Control::Cancel,
        None => Control::Go,
    }
}

/// Refuses a run that would write over one of its inputs: `out`, or another file it writes on
/// the way (`written`).
fn refuse_overwriting(inputs: &[&Path], out: &Path, written: &[&Path]) -> anyhow::Result<()> {
    for output in std::iter::once(out).chain(written.iter().copied()) {
        let Ok(output_file) = output.canonicalize() else {
            continue; // not there yet
        };
        let Some(input) = inputs
            .iter()
            .find(|input| input.canonicalize().is_ok_and(|i| i == output_file))
        else {
            continue;
        };
        if output == out {
            anyhow::bail!(
                "--out {} is the input {}; write the result to another file",
                out.display(),
                input.display()
            );
        }
        anyhow::bail!(
            "the input {} is where this run writes its result before --out {} ({}); rename the \
             input or choose another --out",
            input.display(),
            out.display(),
            output.display()
        );
    }
    Ok(())
}

/// The HDF5 file a run writes its result to: `out` itself, or for a CSV or JSON `out` a file
/// beside it that does not exist yet (`<out>.<step>-XXXXXXXX.h5`), so that removing it after
/// the export removes nothing else. Refuses a run that would write over an input, or an `out`
/// that is a folder, before any work is done.
fn result_file(
    inputs: &[&Path],
    out: &Path,
    format: Format,
    step: &str,
) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        !out.is_dir(),
        "--out {} is a folder; name the result file",
        out.display()
    );
    let h5 = match format {
        Format::H5 => out.to_path_buf(),
        _ => loop {
            let candidate = out.with_extension(format!("{step}-{:08x}.h5", fastrand::u32(..)));
            let taken = |path: &Path| path.symlink_metadata().is_ok();
            if !taken(&candidate) && !taken(&results::partial_path(&candidate)) {
                break candidate;
            }
        },
    };
    refuse_overwriting(inputs, out, &[&h5, &results::partial_path(&h5)])?;
    crate::durable::check_writable(out)
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(h5)
}

fn output_format(out: &Path) -> anyhow::Result<Format> {
    Format::from_path(out).with_context(|| {
        format!(
            "{}: the extension must be .h5, .csv or .json",
            out.display()
        )
    })
}

/// Writes `h5` (a finished result) to `out` in the format of `out`'s extension. When that
/// fails, `h5` is kept and named, so the scoring need not be run again.
fn deliver(h5: &Path, out: &Path, format: Format) -> anyhow::Result<()> {
    if format != Format::H5 {
        results::export(h5, format, View::Rows, out).with_context(|| {
            format!(
                "cannot write {}; the scored result is kept in {}",
                out.display(),
                h5.display()
            )
        })?;
        std::fs::remove_file(h5).with_context(|| {
            format!(
                "{} is written, but the scored HDF5 beside it cannot be removed",
                out.display()
            )
        })?;
    }
    Ok(())
}

/// The archive read whole in a child process that shows what it found; a crash of the HDF5
/// library in it is reported instead of ending this process.
fn job_check(args: &JobCheckArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.archive.is_file(),
        "{} is not a file",
        args.archive.display()
    );
    let stop = StopWatch::start()?;
    let control = || cancel_on_stop(&stop);
    let ended = crate::jobs::check::in_child(&args.archive, args.partition, &control, true)
        .context("cannot start the process that reads the archive")?;
    match ended {
        ChildCheck::Finished { read: true } => Ok(()),
        // The child printed its reason.
        ChildCheck::Finished { read: false } => Err(anyhow::anyhow!(
            "{} cannot be read whole (the reason is above)",
            args.archive.display()
        )),
        ChildCheck::Stopped(_) => Err(Interrupted(format!(
            "interrupted ({}) while {} was read",
            stop.requested().unwrap_or("a stop signal"),
            args.archive.display()
        ))
        .into()),
        crashed_or_slow => Err(anyhow::Error::msg(
            crashed_or_slow
                .refusal(&args.archive.display().to_string())
                .unwrap_or_default(),
        )),
    }
}

/// Reads the archive whole in a child process first, as the server does before a job: an
/// archive that crashes the HDF5 library is then refused with its reason instead of ending
/// this process with a segmentation fault.
fn check_in_child(args: &JobRunArgs, stop: &StopWatch) -> anyhow::Result<()> {
    let control = || cancel_on_stop(stop);
    match crate::jobs::check::in_child(&args.archive, args.partition, &control, false) {
        Ok(ChildCheck::Stopped(_)) => Err(Interrupted(format!(
            "interrupted ({}) while the archive was checked: {} was not written",
            stop.requested().unwrap_or("a stop signal"),
            args.out.display()
        ))
        .into()),
        Ok(ended) => match ended.refusal(&args.archive.display().to_string()) {
            Some(reason) => Err(anyhow::Error::msg(reason)),
            None => Ok(()),
        },
        Err(error) => {
            tracing::warn!(%error, "cannot start the archive check; reading the archive without it");
            Ok(())
        }
    }
}

fn job_run(args: &JobRunArgs) -> anyhow::Result<()> {
    let format = output_format(&args.out)?;
    let h5 = result_file(&[&args.archive], &args.out, format, "scoring")?;
    args.assess.validate().map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        args.archive.is_file(),
        "{} is not a file",
        args.archive.display()
    );
    // Batch mode: one session per core (at most 8) for each model unless told otherwise (the RUL model is
    // the expensive one, and one session runs on one core).
    let mut models = args.models.clone();
    let instances = *models
        .instances
        .get_or_insert_with(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(8)));
    let preprocess = args.preprocess.select()?;
    let stop = StopWatch::start()?;
    check_in_child(args, &stop)?;
    let (registry, model) = load_sensor_model(&models, args.model.as_deref(), true)?;
    if let Some(name) = stop.requested() {
        registry.shutdown();
        return Err(Interrupted(format!(
            "interrupted ({name}) while the models loaded: {} was not written",
            args.out.display()
        ))
        .into());
    }
    let runtime = runtime()?;
    let source = args
        .archive
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut options = RunOptions::new(args.assess, source, preprocess);
    options.partition = args.partition;
    options.missing = args.missing;
    options.shard = args.shard;
    options.chunk_rows = args.chunk_rows;
    options.in_flight = args.in_flight.unwrap_or(2 * instances + 2);
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} rows {per_sec} eta {eta}")
            .expect("valid template"),
    );
    let monitor = BarMonitor { bar, stop };
    let scored = runner::run(
        &args.archive,
        &model,
        &options,
        &h5,
        runtime.handle(),
        &monitor,
    );
    if let (Err(RunError::Cancelled), Some(name)) = (&scored, monitor.stop.requested()) {
        monitor.bar.finish_and_clear();
        registry.shutdown();
        return Err(Interrupted(format!(
            "interrupted ({name}) before the end: {} was not written",
            args.out.display()
        ))
        .into());
    }
    let summary = scored.with_context(|| format!("scoring {}", args.archive.display()))?;
    monitor.bar.finish_and_clear();
    deliver(&h5, &args.out, format)?;
    println!(
        "{} rows of {} units scored in {:.2} s ({:.0} rows/s) with {}{}{} → {}",
        summary.rows,
        summary.units,
        summary.seconds,
        summary.rows_per_second,
        summary.meta.model,
        summary
            .meta
            .anomaly_model
            .as_ref()
            .map(|a| format!(" + {a}"))
            .unwrap_or_default(),
        summary
            .meta
            .shard
            .as_ref()
            .map(|s| format!(
                " (shard {}/{}: rows {}..{})",
                s.index, s.count, s.rows_start, s.rows_end
            ))
            .unwrap_or_default(),
        args.out.display()
    );
    if summary.values_held > 0 {
        println!(
            "{} values were NaN, infinite or beyond float32 and held the unit's last finite value \
             (missing=hold); the result's `held` column counts them per window",
            summary.values_held
        );
    }
    registry.shutdown();
    Ok(())
}

fn job_merge(args: &JobMergeArgs) -> anyhow::Result<()> {
    let format = output_format(&args.out)?;
    let parts: Vec<&Path> = args.parts.iter().map(PathBuf::as_path).collect();
    let h5 = result_file(&parts, &args.out, format, "merging")?;
    let meta = results::merge(&args.parts, &h5)?;
    deliver(&h5, &args.out, format)?;
    println!(
        "merged {} shards of {} ({} rows) → {}",
        args.parts.len(),
        meta.source,
        meta.source_rows,
        args.out.display()
    );
    Ok(())
}

/// Up to ten unit ids, for a message.
fn some_units(units: &[i64]) -> String {
    let shown: Vec<String> = units.iter().take(10).map(i64::to_string).collect();
    let more = if units.len() > 10 { ", ..." } else { "" };
    format!("{}{more}", shown.join(", "))
}

/// Column names of C-MAPSS text files.
pub fn cmapss_columns() -> Vec<String> {
    let mut columns: Vec<String> = vec!["unit".into(), "cycle".into()];
    columns.extend((1..=3).map(|i| format!("setting_{i}")));
    columns.extend((1..=21).map(|i| format!("s_{i}")));
    columns
}

/// A unit's rows of a C-MAPSS file: (cycle, all 26 values).
type UnitRows = Vec<(f64, Vec<f64>)>;

/// Reads a C-MAPSS text file into rows per unit (whitespace separated, 26 columns).
pub fn read_cmapss(path: &Path) -> anyhow::Result<BTreeMap<i64, UnitRows>> {
    anyhow::ensure!(
        !has_signature(path).unwrap_or(false),
        "{} is an HDF5 archive, not C-MAPSS text: score it with `linescan job run`",
        path.display()
    );
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not C-MAPSS text (whitespace-separated numbers): byte {} is not UTF-8",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let columns = cmapss_columns();
    let width = columns.len();
    let mut units: BTreeMap<i64, UnitRows> = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let values: Vec<f64> = line
            .split_whitespace()
            .enumerate()
            .map(|(column, v)| {
                v.parse::<f64>().map_err(|_| {
                    let name = columns
                        .get(column)
                        .map_or("beyond the last", String::as_str);
                    anyhow::anyhow!(
                        "{} line {}, column {} ({name}): {v:?} is not a number",
                        path.display(),
                        index + 1,
                        column + 1
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?;
        anyhow::ensure!(
            values.len() == width,
            "{} line {} has {} columns; C-MAPSS files have {width} (unit, cycle, 3 settings, 21 sensors)",
            path.display(),
            index + 1,
            values.len()
        );
        // A fractional unit id would merge units when truncated, a fractional cycle misorder them.
        for (column, value) in values[..2].iter().enumerate() {
            let problem = if value.fract() != 0.0 {
                "is not a whole number (unit ids and cycles are integers)"
            } else if value.abs() >= 2f64.powi(53) {
                "is beyond the integers a C-MAPSS file can hold exactly (2^53)"
            } else {
                continue;
            };
            anyhow::bail!(
                "{} line {}, column {} ({}): {value} {problem}",
                path.display(),
                index + 1,
                column + 1,
                columns[column]
            );
        }
        units
            .entry(values[0] as i64)
            .or_default()
            .push((values[1], values));
    }
    anyhow::ensure!(!units.is_empty(), "{} holds no rows", path.display());
    for (unit, rows) in units.iter_mut() {
        rows.sort_by(|a, b| a.0.total_cmp(&b.0));
        // Two rows of one cycle would make a window of the wrong length in time.
        if let Some(pair) = rows.windows(2).find(|pair| pair[0].0 == pair[1].0) {
            anyhow::bail!(
                "{}: unit {unit} has cycle {} twice; each cycle of a unit is one row",
                path.display(),
                pair[0].0
            );
        }
    }
    Ok(units)
}

fn cmapss(args: &CmapssArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        Format::from_path(&args.out) == Some(Format::Csv),
        "{}: rul cmapss writes CSV (unit,rul); give the file a .csv extension",
        args.out.display()
    );
    refuse_overwriting(&[&args.input], &args.out, &[])?;
    crate::durable::check_writable(&args.out)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    let started = Instant::now();
    let units = read_cmapss(&args.input)?;
    // Only `rul` is written: the anomaly twin is not loaded.
    let (registry, model) = load_sensor_model(&args.models, args.model.as_deref(), false)?;
    let params = &model.params;
    let map = ChannelMap::new(&params.channels, &cmapss_columns(), true).map_err(|p| {
        anyhow::anyhow!(
            "the model's {p} (C-MAPSS columns are unit, cycle, setting_1..3, s_1..s_21)"
        )
    })?;
    let width = params.channels.len();
    let mut windows = Vec::with_capacity(units.len() * params.window_len());
    let mut padded_units = Vec::new();
    let mut gapped_units = Vec::new();
    let mut scaled = Vec::new();
    for (unit, rows) in &units {
        let last = &rows[rows.len().saturating_sub(params.window)..];
        if last.windows(2).any(|pair| pair[1].0 != pair[0].0 + 1.0) {
            gapped_units.push(*unit);
        }
        let flat: Vec<f64> = last.iter().flat_map(|(_, v)| v.iter().copied()).collect();
        scaled.clear();
        model
            .scaler
            .scale_rows(&flat, &map, &mut scaled)
            .map_err(|bad| {
                anyhow::anyhow!(
                    "unit {unit}: {} in {} at cycle {}; the model needs finite values",
                    bad.what(),
                    params.channels[bad.channel],
                    last[bad.row].0
                )
            })?;
        if single_window(&scaled, params.window, width, &mut windows) > 0 {
            padded_units.push(*unit);
        }
    }
    let runtime = runtime()?;
    let batch = model.batch_rows();
    let window_len = params.window_len();
    let mut predictions = Vec::with_capacity(units.len());
    let mut unit_ids = units.keys();
    runtime.block_on(async {
        for chunk in windows.chunks(batch * window_len) {
            let rows = chunk.len() / window_len;
            let scores = model
                .score(
                    PlacedBytes::Host(f32_bytes(chunk.to_vec())),
                    rows,
                    model.default_deadline(),
                    Priority::Bulk,
                )
                .await?;
            for index in 0..rows {
                let unit = unit_ids.next().expect("one window per unit");
                if let Some(problem) = scores.non_finite_at(index) {
                    anyhow::bail!("unit {unit}: {problem}");
                }
            }
            predictions.extend(scores.rul);
        }
        anyhow::Ok(())
    })?;
    let mut csv = String::from("unit,rul\n");
    for (unit, rul) in units.keys().zip(&predictions) {
        csv.push_str(&format!("{unit},{rul:.4}\n"));
    }
    crate::durable::write(&args.out, csv.as_bytes())
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!(
        "{} units scored with {} in {:.2} s{} → {}",
        units.len(),
        model.name(),
        started.elapsed().as_secs_f64(),
        if padded_units.is_empty() {
            String::new()
        } else {
            format!(
                "; {} units had fewer than {} cycles and were padded ({}): {}",
                padded_units.len(),
                params.window,
                params.padding.name(),
                some_units(&padded_units)
            )
        },
        args.out.display()
    );
    if !gapped_units.is_empty() {
        eprintln!(
            "warning: the last {} rows of {} units skip cycles, so their windows span more time \
             than the model was trained on: {}",
            params.window,
            gapped_units.len(),
            some_units(&gapped_units)
        );
    }
    registry.shutdown();
    Ok(())
}
