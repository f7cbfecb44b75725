//! Each CPU stage of the AOI pipeline on a 640x640 synthetic board with all six defects and a
//! (2, -1) misregistration: `cargo bench --bench aoi_stages`.

use criterion::{Criterion, criterion_group, criterion_main};
use linescan::aoi::align::estimate_shift;
use linescan::aoi::binarize::otsu_threshold;
use linescan::aoi::bitimage::BitImage;
use linescan::aoi::candidates::candidates;
use linescan::aoi::crops::make_crops;
use linescan::aoi::image_io::decode_gray;
use linescan::aoi::params::PipelineParams;
use linescan::aoi::pipeline::{PreparedTemplate, prepare_board};
use linescan::aoi::synthetic::{self, DefectKind};
use linescan::preprocess::cpu::CpuPreprocessor;

fn stages(c: &mut Criterion) {
    let params = PipelineParams::default();
    let board = synthetic::board(&DefectKind::ALL, (2, -1));
    let jpeg = synthetic::encode(&board.test, image::ImageFormat::Jpeg);
    let png = synthetic::encode(&board.test, image::ImageFormat::Png);
    let template = PreparedTemplate::new(&board.template, &params);
    let size = (board.test.width, board.test.height);
    let threshold = otsu_threshold(&board.test.pixels, 127);
    let test_bits = BitImage::from_threshold(&board.test.pixels, size.0, size.1, threshold);
    let shift = estimate_shift(
        &test_bits,
        &template.bits,
        params.align_radius,
        params.align_step,
    );
    let aligned = template.bits.shifted(shift.dx, shift.dy);
    let valid = BitImage::valid_after_shift(size.0, size.1, shift.dx, shift.dy);
    let difference = test_bits.xor(&aligned).and(&valid);
    let found = candidates(&difference, &params).kept;
    assert_eq!(found.len(), 6, "one candidate per drawn defect");

    let mut group = c.benchmark_group("aoi_cpu");
    group.bench_function("decode_jpeg_640", |b| {
        b.iter(|| decode_gray(&jpeg, u64::MAX).unwrap())
    });
    group.bench_function("decode_png_640", |b| {
        b.iter(|| decode_gray(&png, u64::MAX).unwrap())
    });
    group.bench_function("binarize_otsu_640", |b| {
        b.iter(|| {
            let t = otsu_threshold(&board.test.pixels, 127);
            BitImage::from_threshold(&board.test.pixels, size.0, size.1, t)
        })
    });
    group.bench_function("align_r12_640", |b| {
        b.iter(|| {
            estimate_shift(
                &test_bits,
                &template.bits,
                params.align_radius,
                params.align_step,
            )
        })
    });
    group.bench_function("difference_candidates_640", |b| {
        b.iter(|| {
            let aligned = template.bits.shifted(shift.dx, shift.dy);
            let difference = test_bits.xor(&aligned).and(&valid);
            candidates(&difference, &params)
        })
    });
    group.bench_function("crops_6_candidates", |b| {
        b.iter(|| {
            let mut out = Vec::new();
            make_crops(
                &[&test_bits, &aligned, &difference],
                &found,
                &params,
                &mut out,
            );
            out
        })
    });
    group.bench_function("prepare_board_total", |b| {
        b.iter(|| prepare_board(&board.test, &template, &params, &CpuPreprocessor, None).unwrap())
    });
    group.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
