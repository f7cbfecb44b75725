//! Every preprocessing stage on every backend this machine has (CPU always; wgpu on any Vulkan
//! adapter, lavapipe included; CUDA with an NVIDIA driver), on a 640x640 synthetic board with
//! all six defects: `cargo bench --bench preprocess`. Group names are `preprocess_<backend>`,
//! so a CPU and a GPU line of the same stage sit next to each other in the report.

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use linescan::aoi::align::estimate_shift;
use linescan::aoi::binarize::otsu_threshold;
use linescan::aoi::bitimage::BitImage;
use linescan::aoi::candidates::candidates_in_masks;
use linescan::aoi::params::PipelineParams;
use linescan::aoi::pipeline::{PreparedTemplate, prepare_board};
use linescan::aoi::synthetic::{self, DefectKind};
use linescan::preprocess::cpu::CpuPreprocessor;
use linescan::preprocess::{BackendChoice, Preprocess, select};
use linescan::sensors::channels::ChannelMap;
use linescan::sensors::params::{Padding, SensorParams};
use linescan::sensors::window::{Scaler, WindowSpan};

fn backends() -> Vec<Arc<dyn Preprocess>> {
    [BackendChoice::Cpu, BackendChoice::Wgpu, BackendChoice::Cuda]
        .into_iter()
        .filter_map(|choice| match select(choice) {
            Ok(backend) => Some(backend),
            Err(reason) => {
                eprintln!("not benchmarked: {reason}");
                None
            }
        })
        .collect()
}

fn stages(c: &mut Criterion) {
    let params = PipelineParams::default();
    let board = synthetic::board(&DefectKind::ALL, (2, -1));
    let template = PreparedTemplate::new(&board.template, &params);
    let (width, height) = (board.test.width, board.test.height);
    let threshold = otsu_threshold(&board.test.pixels, 127);
    let test_bits = BitImage::from_threshold(&board.test.pixels, width, height, threshold);
    let shift = estimate_shift(
        &test_bits,
        &template.bits,
        params.align_radius,
        params.align_step,
    );
    let comparison = CpuPreprocessor
        .compare(
            &test_bits,
            &template.bits,
            (shift.dx, shift.dy),
            params.open_size,
            params.merge_size,
        )
        .unwrap();
    let found = candidates_in_masks(&comparison.opened, &comparison.merged, &params).kept;
    let channels = [&test_bits, &comparison.aligned, &comparison.difference];

    // A C-MAPSS-like chunk: 16,384 rows of 24 columns, 14 used by the model.
    let names: Vec<String> = (0..24).map(|i| format!("c_{i}")).collect();
    let sensor_params = SensorParams {
        window: 30,
        channels: names[5..19].to_vec(),
        scaling: "minmax".into(),
        offset: vec![0.5; 14],
        scale: vec![2.0; 14],
        rul_cap: 125.0,
        padding: Padding::RepeatFirst,
    };
    let scaler = Scaler::new(&sensor_params);
    let map = ChannelMap::new(&sensor_params.channels, &names, true).unwrap();
    let rows = 16_384;
    let source: Vec<f64> = (0..rows * 24).map(|i| (i % 97) as f64 * 0.01).collect();
    // One job batch: 1,024 windows of 30 rows x 14 channels over 1,053 scaled rows, units of
    // 200 rows (so some windows are padded).
    let batch_rows: Vec<f32> = (0..1053 * 14).map(|i| (i % 89) as f32 * 0.1).collect();
    let spans: Vec<WindowSpan> = (29..1053u32)
        .map(|last| WindowSpan {
            last,
            first: last / 200 * 200,
        })
        .collect();

    for backend in backends() {
        let mut group = c.benchmark_group(format!("preprocess_{}", backend.backend().as_str()));
        group.throughput(Throughput::Elements(1));
        group.bench_function("histogram_640", |b| {
            b.iter(|| backend.histogram(&board.test.pixels).unwrap())
        });
        group.bench_function("threshold_640", |b| {
            b.iter(|| {
                backend
                    .threshold(&board.test.pixels, width, height, threshold)
                    .unwrap()
            })
        });
        group.bench_function("compare_open2_merge5_640", |b| {
            b.iter(|| {
                backend
                    .compare(
                        &test_bits,
                        &template.bits,
                        (shift.dx, shift.dy),
                        params.open_size,
                        params.merge_size,
                    )
                    .unwrap()
            })
        });
        group.bench_function("crops_6_candidates", |b| {
            b.iter(|| {
                let mut out = Vec::new();
                backend.crops(&channels, &found, &params, &mut out).unwrap();
                out
            })
        });
        group.bench_function("prepare_board_640", |b| {
            b.iter(|| {
                prepare_board(&board.test, &template, &params, backend.as_ref(), None).unwrap()
            })
        });
        group.throughput(Throughput::Elements(rows as u64));
        group.bench_function("scale_rows_16k", |b| {
            b.iter(|| {
                let mut out = Vec::new();
                backend
                    .scale_rows(&scaler, &source, &map, &mut out)
                    .unwrap()
                    .unwrap();
                out
            })
        });
        group.throughput(Throughput::Elements(spans.len() as u64));
        group.bench_function("stack_windows_1024x30x14", |b| {
            b.iter(|| {
                let mut out = Vec::new();
                backend
                    .stack_windows(&batch_rows, 14, 30, &spans, &mut out)
                    .unwrap();
                out
            })
        });
        group.finish();
    }
}

criterion_group!(benches, stages);
criterion_main!(benches);
