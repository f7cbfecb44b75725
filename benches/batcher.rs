//! The batcher and the session under it: what dynamic batching costs and what it buys.
//! Uses the bundled AOI classifier; run with `cargo bench --bench batcher`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use linescan::engine::ModelRegistry;
use linescan::engine::registry::LoadOptions;
use linescan::metrics::Metrics;
use linescan::runtime::ModelRepository;
use linescan::tensor::Tensor;

const MODEL: &str = "aoi_defect";

fn random_inputs(registry: &ModelRegistry, rows: usize, seed: u64) -> Vec<Tensor> {
    let model = registry.get(MODEL, None).expect("bundled model");
    let mut rng = fastrand::Rng::with_seed(seed);
    model
        .spec
        .config
        .inputs
        .iter()
        .map(|input| {
            let shape = input.concrete_shape(true, rows);
            let values: Vec<f32> = (0..shape.iter().product()).map(|_| rng.f32()).collect();
            Tensor::from_f32(shape, &values)
        })
        .collect()
}

fn batcher(c: &mut Criterion) {
    let repository = ModelRepository::scan("models".as_ref()).expect("model repository");
    let registry = ModelRegistry::load(
        &repository,
        &LoadOptions::default(),
        &Arc::new(Metrics::new()),
    )
    .expect("load models");
    let model = registry.get(MODEL, None).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();

    let mut group = c.benchmark_group("batcher");
    group.measurement_time(Duration::from_secs(5));
    for concurrency in [1usize, 8, 32] {
        let requests: Vec<Vec<Tensor>> = (0..concurrency)
            .map(|i| random_inputs(&registry, 1, i as u64))
            .collect();
        group.throughput(Throughput::Elements(concurrency as u64));
        group.bench_with_input(
            BenchmarkId::new("concurrent_single_row_requests", concurrency),
            &requests,
            |b, requests| {
                b.iter(|| {
                    runtime.block_on(async {
                        let calls = requests.iter().map(|inputs| {
                            model.batcher.infer(
                                inputs.clone(),
                                1,
                                Instant::now() + Duration::from_secs(10),
                            )
                        });
                        for outcome in futures_util::future::join_all(calls).await {
                            outcome.expect("inference");
                        }
                    })
                })
            },
        );
    }
    group.finish();
    registry.shutdown();
}

criterion_group!(benches, batcher);
criterion_main!(benches);
