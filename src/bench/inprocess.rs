//! Baseline: the same model run in-process by ONNX Runtime at a fixed batch size, with no HTTP
//! and no batcher. The server's throughput is judged against this.

use std::time::{Duration, Instant};

use crate::bench::cpu::{self, CpuSample};
use crate::bench::report::{self, Percentiles, Report};
use crate::runtime::providers::ProviderPlan;
use crate::runtime::session::BatchInput;
use crate::runtime::{ModelRepository, ModelSession};
use crate::tensor::Tensor;

pub struct InProcessPlan<'a> {
    pub repository: &'a std::path::Path,
    pub model: &'a str,
    pub batch: usize,
    pub sessions: usize,
    pub threads: usize,
    pub duration: Duration,
    pub warmup: Duration,
}

pub fn run(plan: &InProcessPlan<'_>) -> anyhow::Result<Report> {
    let repository = ModelRepository::scan(plan.repository)?;
    let spec = repository
        .versions
        .iter()
        .rev()
        .find(|v| v.config.name == plan.model)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "model {} is not in {}",
                plan.model,
                plan.repository.display()
            )
        })?
        .clone();
    let config = spec.config.clone();
    if config.batching() {
        anyhow::ensure!(
            plan.batch <= config.max_batch_size,
            "--batch {} is above model {}'s max_batch_size {}",
            plan.batch,
            plan.model,
            config.max_batch_size
        );
    } else {
        // Each run is one inference: a larger --batch would multiply the figures.
        anyhow::ensure!(
            plan.batch == 1,
            "model {} does not batch (max_batch_size 0): use --batch 1",
            plan.model
        );
    }
    let plan_providers = ProviderPlan::new(&config.runtime.execution_providers, None);
    let mut workers = Vec::new();
    for _ in 0..plan.sessions.max(1) {
        workers.push(ModelSession::load(&spec, &plan_providers, plan.threads)?);
    }
    // Sessions that pad their batches run --batch rows as the server's would: padded.
    let run_rows = workers[0].run_rows(plan.batch);
    let shapes: Vec<Vec<usize>> = config
        .inputs
        .iter()
        .map(|input| input.concrete_shape(config.batching(), run_rows))
        .collect();
    let mut rng = fastrand::Rng::with_seed(7);
    let buffers: Vec<Vec<u8>> = config
        .inputs
        .iter()
        .zip(&shapes)
        .map(|(input, shape)| {
            let bytes = Tensor::byte_len(input.datatype, shape);
            match input.datatype {
                crate::tensor::DataType::Fp32 => (0..bytes / 4)
                    .flat_map(|_| rng.f32().to_le_bytes())
                    .collect(),
                _ => vec![0u8; bytes],
            }
        })
        .collect();
    let started = Instant::now();
    let measure_from = started + plan.warmup;
    let end = measure_from + plan.duration;
    let (histograms, cpu) = std::thread::scope(|scope| {
        let handles: Vec<_> = workers
            .into_iter()
            .map(|mut session| {
                let config = &config;
                let shapes = &shapes;
                let buffers = &buffers;
                scope.spawn(move || -> anyhow::Result<_> {
                    // Copy into aligned storage once, as the batcher does per batch.
                    let aligned: Vec<crate::tensor::AlignedBytes> = buffers
                        .iter()
                        .map(|b| {
                            let mut a = crate::tensor::AlignedBytes::with_capacity(b.len());
                            a.extend_from_slice(b);
                            a
                        })
                        .collect();
                    let mut histogram = report::new_histogram();
                    loop {
                        let t0 = Instant::now();
                        if t0 >= end {
                            break;
                        }
                        let inputs: Vec<BatchInput<'_>> = config
                            .inputs
                            .iter()
                            .zip(shapes)
                            .zip(&aligned)
                            .map(|((spec, shape), data)| BatchInput {
                                dtype: spec.datatype,
                                shape,
                                data: data.as_bytes(),
                            })
                            .collect();
                        session.run(&inputs)?;
                        // Runs that end in the window count, as answers do in `bench infer`.
                        let done = Instant::now();
                        if done >= measure_from && done <= end {
                            report::record(&mut histogram, done - t0);
                        }
                    }
                    Ok(histogram)
                })
            })
            .collect();
        std::thread::sleep(measure_from.saturating_duration_since(Instant::now()));
        let first = CpuSample::own();
        std::thread::sleep(end.saturating_duration_since(Instant::now()));
        let cpu = first.until(&CpuSample::own());
        let histograms = handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .collect::<anyhow::Result<Vec<_>>>();
        histograms.map(|h| (h, cpu))
    })?;
    let mut latency = report::new_histogram();
    for h in histograms {
        latency.add(h).expect("same bounds");
    }
    let runs = latency.len();
    let seconds = plan.duration.as_secs_f64();
    let inferences_per_s = (runs * plan.batch as u64) as f64 / seconds;
    Ok(Report {
        mode: "in-process".into(),
        target: format!(
            "onnxruntime sessions={} threads={}{}",
            plan.sessions,
            plan.threads,
            if run_rows > plan.batch {
                format!(" (each batch padded to {run_rows} rows, as the server runs it)")
            } else {
                String::new()
            }
        ),
        model: plan.model.into(),
        concurrency: plan.sessions,
        target_rate: None,
        batch: plan.batch,
        duration_s: seconds,
        requests_ok: runs,
        requests_failed: 0,
        requests_unanswered: 0,
        unanswered_in_latency: 0,
        unanswered_wait: None,
        failures: Default::default(),
        first_errors: Default::default(),
        requests_per_s: runs as f64 / seconds,
        inferences_per_s,
        row_name: "inference".into(),
        inferences_per_cpu_s: cpu::inferences_per_cpu_second(
            inferences_per_s,
            cpu.inference_cores(false),
        ),
        cpu,
        latency: (runs > 0).then(|| Percentiles::of(&latency)),
        failed_latency: None,
        send_lag: None,
        stages: Default::default(),
        mean_batch_rows: Some(plan.batch as f64),
        machine: report::machine_description(),
    })
}
