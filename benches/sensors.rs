//! The sensor pipeline: windowing alone, the two models on full batches through their batchers
//! (windows/s in batch mode), and an archive scored end to end (read, window, score, write).
//! Uses the bundled rul_fd001 and anomaly_fd001 with one session per core:
//! `cargo bench --bench sensors`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use linescan::engine::registry::LoadOptions;
use linescan::engine::{ModelRegistry, Priority};
use linescan::jobs::runner::{self, RunOptions, Unmonitored};
use linescan::jobs::synthetic;
use linescan::metrics::Metrics;
use linescan::runtime::ModelRepository;
use linescan::runtime::device::PlacedBytes;
use linescan::sensors::channels::ChannelMap;
use linescan::sensors::window::{WindowSpan, stack_windows};
use linescan::sensors::{AssessSettings, SensorModel};
use linescan::tensor::f32_bytes;

const MODEL: &str = "rul_fd001";

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn load() -> (ModelRegistry, Arc<SensorModel>) {
    let mut repository = ModelRepository::scan("models".as_ref()).expect("model repository");
    repository
        .versions
        .retain(|v| v.config.name == MODEL || v.config.name == "anomaly_fd001");
    let options = LoadOptions {
        instances: Some(cores()),
        ..LoadOptions::default()
    };
    let registry =
        ModelRegistry::load(&repository, &options, &Arc::new(Metrics::new())).expect("load models");
    let model = Arc::new(SensorModel::open(&registry, MODEL).expect("sensor model"));
    (registry, model)
}

fn sensors(c: &mut Criterion) {
    let (registry, model) = load();
    let params = model.params.clone();
    let width = params.channels.len();
    let table = synthetic::fleet(
        &(0..64)
            .map(|i| synthetic::UnitPlan {
                unit: i,
                observed: 256,
                life: 300,
            })
            .collect::<Vec<_>>(),
        1,
    );
    let map = ChannelMap::new(&params.channels, &table.columns, true).unwrap();

    let mut group = c.benchmark_group("sensors");
    group.measurement_time(Duration::from_secs(5));

    // Scaling and one window per row (16,384 rows of 24 channels).
    let mut scaled = Vec::new();
    let mut windows = Vec::with_capacity(table.rows() * params.window_len());
    let scale_and_window = |scaled: &mut Vec<f32>, windows: &mut Vec<f32>| {
        scaled.clear();
        windows.clear();
        model
            .scaler
            .scale_rows(&table.values, &map, scaled)
            .unwrap();
        // Units of 256 rows, one window ending at every row.
        let spans: Vec<WindowSpan> = (0..table.rows() as u32)
            .map(|last| WindowSpan {
                last,
                first: last / 256 * 256,
            })
            .collect();
        stack_windows(scaled, width, params.window, &spans, windows);
        windows.len()
    };
    group.throughput(Throughput::Elements(table.rows() as u64));
    group.bench_function("scale_and_window_rows", |b| {
        b.iter(|| scale_and_window(&mut scaled, &mut windows))
    });
    scale_and_window(&mut scaled, &mut windows);

    // Both models on full batches, two per session in flight.
    let batch = model.batch_rows();
    let in_flight = 2 * cores();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let batches: Vec<PlacedBytes> = (0..in_flight)
        .map(|i| {
            PlacedBytes::Host(f32_bytes(
                windows[i * 64 * params.window_len()..][..batch * params.window_len()].to_vec(),
            ))
        })
        .collect();
    group.throughput(Throughput::Elements((batch * in_flight) as u64));
    group.bench_function("score_full_batches_windows", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let calls = batches.iter().map(|data| {
                    model.score(
                        data.clone(),
                        batch,
                        Instant::now() + Duration::from_secs(60),
                        Priority::Bulk,
                    )
                });
                for outcome in futures_util::future::join_all(calls).await {
                    outcome.expect("scores");
                }
            })
        })
    });

    // An archive of 65,536 rows end to end: read in chunks, window, score, write HDF5.
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("fleet.h5");
    let (rows, _) = synthetic::write_large_generic(&archive, 65_536, 3, &|| false).unwrap();
    let out = dir.path().join("result.h5");
    let mut options = RunOptions::new(
        AssessSettings::default(),
        "fleet.h5".into(),
        std::sync::Arc::new(linescan::preprocess::cpu::CpuPreprocessor),
    );
    options.in_flight = 2 * cores() + 2;
    group.sample_size(10);
    group.throughput(Throughput::Elements(rows as u64));
    group.bench_function("archive_end_to_end_rows", |b| {
        b.iter(|| {
            runner::run(
                &archive,
                &model,
                &options,
                &out,
                runtime.handle(),
                &Unmonitored,
            )
            .expect("run")
            .rows
        })
    });
    group.finish();
    registry.shutdown();
}

criterion_group!(benches, sensors);
criterion_main!(benches);
