//! `linescan aoi detect` and `linescan aoi eval`: the DeepPCB-format contract evaluators script
//! against.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};

use crate::aoi::deeppcb::{self, PairEntry};
use crate::aoi::evaluation::{self, ImageResult};
use crate::aoi::pipeline::{DEFECT_MODEL, Inspection, Inspector, StageTimings};
use crate::bench::report::{self, Percentiles};
use crate::config::{ModelArgs, at_least_one, unit_interval};
use crate::engine::ModelRegistry;
use crate::metrics::Metrics;
use crate::preprocess::PreprocessArgs;
use crate::runtime::ModelRepository;
use crate::signals::{Interrupted, StopWatch};

#[derive(Subcommand)]
pub enum AoiCommand {
    /// Inspect DeepPCB-format pairs and write one detection file per pair.
    Detect(DetectArgs),
    /// Score detection files against the annotations (DeepPCB protocol: IoU > 0.33, same class).
    Eval(EvalArgs),
}

#[derive(Args)]
pub struct DetectArgs {
    /// List file with lines `groupX/X/ID.jpg groupX/X_not/ID.txt`.
    #[arg(long, env = "LINESCAN_AOI_LIST")]
    pub list: PathBuf,
    /// Data root: images are ROOT/groupX/X/ID_test.jpg and ROOT/groupX/X/ID_temp.jpg.
    #[arg(long, env = "LINESCAN_AOI_ROOT")]
    pub root: PathBuf,
    /// Output folder: DIR/ID.txt with lines `x1,y1,x2,y2,confidence,type`. The listed pairs'
    /// files are removed at start and each is written when its pair is done, so a run cut
    /// short (Ctrl-C, a failed pair) never leaves an earlier run's answer in its place.
    #[arg(long, env = "LINESCAN_AOI_OUT")]
    pub out: PathBuf,
    /// Lowest confidence written (low keeps the ranking that AP needs).
    #[arg(long, env = "LINESCAN_AOI_MIN_SCORE", default_value_t = 0.01, value_parser = unit_interval::<f32>)]
    pub min_score: f32,
    /// Pairs in flight (their crops share classifier batches).
    #[arg(long, env = "LINESCAN_AOI_CONCURRENCY", default_value_t = 16, value_parser = at_least_one::<usize>)]
    pub concurrency: usize,
    /// Largest image accepted, in pixels.
    #[arg(long, env = "LINESCAN_MAX_IMAGE_PIXELS", default_value_t = 50_000_000, value_parser = at_least_one::<u64>)]
    pub max_image_pixels: u64,
    #[command(flatten)]
    pub preprocess: PreprocessArgs,
    #[command(flatten)]
    pub models: ModelArgs,
}

#[derive(Args)]
pub struct EvalArgs {
    /// DeepPCB-format list: lines `groupX/X/ID.jpg groupX/X_not/ID.txt`.
    #[arg(long, env = "LINESCAN_AOI_LIST")]
    pub list: PathBuf,
    /// Data root: ground truth is read from ROOT/groupX/X_not/ID.txt.
    #[arg(long, env = "LINESCAN_AOI_ROOT")]
    pub root: PathBuf,
    /// Folder of detection files written by `aoi detect`.
    #[arg(long, env = "LINESCAN_AOI_DET")]
    pub det: PathBuf,
    /// Operating threshold for precision, recall and F-score (default: the aoi_defect model's in
    /// --model-repository, or 0.5 when there is none).
    #[arg(long, env = "LINESCAN_AOI_SCORE_THRESHOLD", value_parser = unit_interval::<f64>)]
    pub score_threshold: Option<f64>,
    /// Also write the figures as JSON here.
    #[arg(long, env = "LINESCAN_AOI_JSON")]
    pub json: Option<PathBuf>,
    /// Model repository whose aoi_defect config gives the default operating threshold (when
    /// neither this nor the variable is given: ./models if it exists, else 0.5).
    #[arg(long, env = "LINESCAN_MODEL_REPOSITORY")]
    pub model_repository: Option<PathBuf>,
}

pub fn run(command: AoiCommand) -> anyhow::Result<()> {
    match command {
        AoiCommand::Detect(args) => detect(&args),
        AoiCommand::Eval(args) => eval(&args),
    }
}

/// Loads only the defect model (the CLI needs nothing else).
pub fn load_inspector(
    models: &ModelArgs,
    max_image_pixels: u64,
    preprocess: &PreprocessArgs,
) -> anyhow::Result<(Arc<ModelRegistry>, Arc<Inspector>)> {
    let mut repository = ModelRepository::scan(&models.model_repository)?;
    repository
        .versions
        .retain(|v| v.config.name == DEFECT_MODEL);
    anyhow::ensure!(
        !repository.versions.is_empty(),
        "model {DEFECT_MODEL} is not in {}",
        models.model_repository.display()
    );
    let preprocess = preprocess.select()?;
    let metrics = Arc::new(Metrics::new());
    let registry = Arc::new(ModelRegistry::load(
        &repository,
        &models.load_options()?,
        &metrics,
    )?);
    let inspector = Arc::new(Inspector::new(
        &registry,
        metrics,
        max_image_pixels,
        preprocess,
    )?);
    Ok((registry, inspector))
}

/// Decodes both images and runs the whole pipeline on one pair; the template stage is timed
/// apart because a line registers templates once.
async fn inspect_pair(
    inspector: Arc<Inspector>,
    pair: PairEntry,
    min_score: f32,
) -> anyhow::Result<(Inspection, f64)> {
    let prepared_by = inspector.clone();
    let (board, template_ms) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let read = |path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
        };
        let template_bytes = read(&pair.template)?;
        let test_bytes = read(&pair.test)?;
        let t = Instant::now();
        let template_gray = prepared_by
            .decode(&template_bytes)
            .with_context(|| pair.template.display().to_string())?;
        let template = prepared_by.prepare_template(&template_gray);
        let template_ms = t.elapsed().as_secs_f64() * 1000.0;
        let board = prepared_by
            .prepare(&test_bytes, &template)
            .with_context(|| pair.test.display().to_string())?;
        Ok((board, template_ms))
    })
    .await??;
    let inspection = inspector.finish(board, min_score).await?;
    Ok((inspection, template_ms))
}

/// Creates the output folder and removes the listed pairs' files from an earlier run.
fn prepare_output(out: &std::path::Path, pairs: &[PairEntry]) -> anyhow::Result<()> {
    if out.exists() && !out.is_dir() {
        anyhow::bail!("--out {} exists and is not a folder", out.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for pair in pairs {
        let earlier = out.join(format!("{}.txt", pair.id));
        match std::fs::remove_file(&earlier) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| {
                    format!("cannot remove the earlier run's {}", earlier.display())
                });
            }
            _ => {}
        }
    }
    Ok(())
}

fn detect(args: &DetectArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.root.is_dir(),
        "--root {} is not a folder (the data root the list's paths are under)",
        args.root.display()
    );
    let pairs = deeppcb::read_list(&args.list, &args.root)?;
    let stop = StopWatch::start()?;
    let (registry, inspector) =
        load_inspector(&args.models, args.max_image_pixels, &args.preprocess)?;
    if let Some(name) = stop.requested() {
        registry.shutdown();
        return Err(Interrupted(format!(
            "interrupted ({name}) while the models loaded: nothing was written"
        ))
        .into());
    }
    prepare_output(&args.out, &pairs)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let progress = ProgressBar::new(pairs.len() as u64);
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} pairs {per_sec} eta {eta}")
            .expect("valid template"),
    );
    let mut stages: Vec<Histogram<u64>> = (0..StageTimings::STAGES.len() + 2)
        .map(|_| report::new_histogram())
        .collect();
    let started = Instant::now();
    let listed = pairs.len();
    let mut candidates = 0usize;
    // Pairs with candidates beyond `max_candidates`, and those candidates: their files may
    // miss defects, which is said at the end.
    let (mut capped_pairs, mut unclassified) = (0usize, 0usize);
    // A pair that cannot be read, inspected or written is reported at the end; the others are
    // still written, so one bad image does not cost a whole evaluation run.
    // (position in the list, what went wrong), printed in list order.
    let mut failures: Vec<(usize, String)> = Vec::new();
    let mut interrupted = None;
    let mut written = 0usize;
    runtime.block_on(async {
        let mut results = futures_util::stream::iter(pairs.into_iter().enumerate())
            .map(|(position, pair)| {
                let id = pair.id.clone();
                let inspected = inspect_pair(inspector.clone(), pair, args.min_score);
                async move {
                    let result = inspected.await.with_context(|| format!("pair {id}"));
                    (position, id, result)
                }
            })
            .buffer_unordered(args.concurrency);
        loop {
            let (position, id, result) = tokio::select! {
                next = results.next() => match next {
                    Some(next) => next,
                    None => break,
                },
                name = stop.wait() => {
                    interrupted = Some(name);
                    break;
                }
            };
            progress.inc(1);
            let (inspection, template_ms) = match result {
                Ok(inspected) => inspected,
                Err(error) => {
                    failures.push((position, format!("{error:#}")));
                    continue;
                }
            };
            let path = args.out.join(format!("{id}.txt"));
            if let Err(error) =
                std::fs::write(&path, deeppcb::format_detections(&inspection.defects))
            {
                failures.push((
                    position,
                    format!("pair {id}: cannot write {}: {error}", path.display()),
                ));
                continue;
            }
            written += 1;
            candidates += inspection.candidates;
            if inspection.unclassified_candidates > 0 {
                capped_pairs += 1;
                unclassified += inspection.unclassified_candidates;
            }
            let timings = &inspection.timings_ms;
            for (histogram, value) in stages.iter_mut().zip(
                [template_ms]
                    .into_iter()
                    .chain(timings.values())
                    .chain([timings.total]),
            ) {
                report::record(
                    histogram,
                    std::time::Duration::from_secs_f64(value / 1000.0),
                );
            }
        }
    });
    progress.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    if let Some(name) = interrupted {
        // The sessions stop before the process does: ONNX Runtime torn down under a running
        // batch logs errors.
        drop(runtime);
        registry.shutdown();
        return Err(Interrupted(format!(
            "interrupted ({name}): {written} of {listed} pairs were written to {}; the others \
             have no file, so `aoi eval` on this list scores them as missed",
            args.out.display()
        ))
        .into());
    }
    let count = listed - failures.len();
    println!(
        "{count} pairs in {seconds:.2} s: {:.1} pairs/s (both images decoded per pair), detections in {}",
        count as f64 / seconds,
        args.out.display()
    );
    println!(
        "{:.1} candidates per pair classified",
        candidates as f64 / count.max(1) as f64
    );
    println!("per-stage latency (ms):");
    let names = ["template"]
        .into_iter()
        .chain(StageTimings::STAGES)
        .chain(["total (excl. template)"]);
    for (name, histogram) in names.zip(&stages) {
        let p = Percentiles::of(histogram);
        println!(
            "  {name:<24} mean {:>7.3}  p50 {:>7.3}  p99 {:>7.3}",
            p.mean_ms, p.p50_ms, p.p99_ms
        );
    }
    registry.shutdown();
    if capped_pairs > 0 {
        eprintln!(
            "warning: {capped_pairs} of {count} pairs had more candidates than the {} classified \
             per board: {unclassified} candidates were not classified, so those pairs' files may \
             miss defects; raise max_candidates under [preprocessing] in {}/config.toml",
            inspector.params.max_candidates,
            args.models.model_repository.join(DEFECT_MODEL).display()
        );
    }
    failures.sort_unstable();
    for (position, failure) in &failures {
        eprintln!("failed: pair {} of the list: {failure}", position + 1);
    }
    anyhow::ensure!(
        failures.is_empty(),
        "{} of {listed} pairs failed (listed above); the detections of the other {count} were \
         written",
        failures.len()
    );
    Ok(())
}

fn eval(args: &EvalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.det.is_dir(),
        "--det {} is not a folder (the detection files `aoi detect` wrote)",
        args.det.display()
    );
    let pairs = deeppcb::read_list(&args.list, &args.root)?;
    let mut results = Vec::with_capacity(pairs.len());
    // A pair without a file (it failed, or the run was cut short) found nothing: its defects
    // count as missed, and the count is said, so a partial run is never scored silently.
    let mut missing = Vec::new();
    for pair in &pairs {
        let path = args.det.join(format!("{}.txt", pair.id));
        let detections = if path.exists() {
            deeppcb::read_detections(&path)?
        } else {
            missing.push(pair.id.as_str());
            Vec::new()
        };
        results.push(ImageResult {
            truth: deeppcb::read_annotations(&pair.annotation)?,
            detections,
        });
    }
    if !missing.is_empty() {
        eprintln!(
            "warning: {} of {} listed pairs have no detection file in {} (scored as finding \
             nothing): {}{}",
            missing.len(),
            pairs.len(),
            args.det.display(),
            missing[..missing.len().min(10)].join(", "),
            if missing.len() > 10 { ", ..." } else { "" }
        );
    }
    let threshold = match args.score_threshold {
        Some(t) => t,
        None => model_score_threshold(args.model_repository.as_deref())?,
    };
    let e = evaluation::evaluate(&results, threshold);
    println!(
        "{} images, {} ground-truth defects",
        e.images, e.ground_truth
    );
    println!("AP (all detections ranked by confidence): {:.4}", e.ap);
    for class in &e.per_class {
        match class.ap {
            Some(ap) => println!(
                "  AP {:<10} {ap:.4}  ({} ground truth)",
                class.class, class.ground_truth
            ),
            None => println!(
                "  AP {:<10} -       (no ground truth in the list)",
                class.class
            ),
        }
    }
    println!("mean AP (classes with ground truth): {:.4}", e.mean_ap);
    println!(
        "at confidence >= {:.3}: precision {:.4}  recall {:.4}  F-score {:.4}  (TP {}, FP {}, FN {})",
        e.score_threshold,
        e.precision,
        e.recall,
        e.f_score,
        e.true_positives,
        e.false_positives,
        e.false_negatives
    );
    if let Some(path) = &args.json {
        let report = EvalReport {
            evaluation: &e,
            pairs_without_detection_file: &missing,
        };
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// `aoi eval --json`: the figures, and which listed pairs had no file (scored as empty).
#[derive(serde::Serialize)]
struct EvalReport<'a> {
    #[serde(flatten)]
    evaluation: &'a evaluation::Evaluation,
    pairs_without_detection_file: &'a [&'a str],
}

/// The defect model's operating threshold, from its config in `repository`; without one named,
/// from ./models when it is there, else the shipped model's.
fn model_score_threshold(repository: Option<&std::path::Path>) -> anyhow::Result<f64> {
    let named = repository.is_some();
    let path = repository
        .unwrap_or(std::path::Path::new("models"))
        .join(DEFECT_MODEL)
        .join("config.toml");
    if !named && !path.exists() {
        // Scoring files needs no model: the shipped model's threshold, said aloud.
        let threshold = crate::aoi::params::PipelineParams::default().score_threshold as f64;
        eprintln!(
            "note: no {} here, so the operating threshold is {threshold} (the shipped model's); \
             pass --score-threshold or --model-repository to choose it",
            path.display()
        );
        return Ok(threshold);
    }
    let read = || -> anyhow::Result<f64> {
        let config = crate::runtime::ModelConfig::load(&path)?;
        let params = crate::aoi::params::PipelineParams::from_table(config.preprocessing.as_ref())
            .map_err(anyhow::Error::msg)?;
        Ok(params.score_threshold as f64)
    };
    read().with_context(|| {
        format!(
            "the default operating threshold comes from {}; pass --score-threshold or \
             --model-repository",
            path.display()
        )
    })
}
