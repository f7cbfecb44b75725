//! Parity of every GPU kernel with the CPU reference on synthetic inputs: exact for the integer
//! stages and the crop averages, within [`scaling_tolerance`] for sensor scaling. A backend
//! that cannot start on this machine skips with the reason.

use crate::aoi::bitimage::BitImage;
use crate::aoi::components::Component;
use crate::aoi::params::PipelineParams;
use crate::preprocess::cpu::CpuPreprocessor;
use crate::preprocess::{GpuKernels, Preprocess, PreprocessError, scaling_tolerance};
use crate::sensors::channels::ChannelMap;
use crate::sensors::params::SensorParams;
use crate::sensors::window::{Scaler, WindowSpan};

/// A grey board-like image: blobs and lines on a dark background, with noise, so every
/// threshold, shift and morphology case (edges, single pixels, borders) appears.
fn grey_board(width: usize, height: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut pixels: Vec<u8> = (0..width * height).map(|_| rng.u8(0..60)).collect();
    for _ in 0..40 {
        let (x0, y0) = (rng.usize(0..width), rng.usize(0..height));
        let (w, h) = (rng.usize(1..40), rng.usize(1..12));
        for y in y0..(y0 + h).min(height) {
            for x in x0..(x0 + w).min(width) {
                pixels[y * width + x] = 180 + rng.u8(0..70);
            }
        }
    }
    for _ in 0..200 {
        pixels[rng.usize(0..width * height)] = 255;
    }
    pixels
}

/// Odd sizes (not multiples of 32 or 64) catch padding and last-word mistakes; images
/// narrower than a word, one pixel and one row catch the edge cases of both.
const SIZES: [(usize, usize); 7] = [
    (640, 640),
    (203, 77),
    (64, 1),
    (1, 1),
    (5, 3),
    (33, 2),
    (65, 1),
];

pub(crate) fn check_backend(gpu: &dyn Preprocess) {
    let cpu = CpuPreprocessor;
    for (i, &(width, height)) in SIZES.iter().enumerate() {
        let gray = grey_board(width, height, i as u64);
        let histogram = gpu.histogram(&gray).unwrap();
        assert_eq!(
            histogram,
            cpu.histogram(&gray).unwrap(),
            "histogram {width}x{height}"
        );
        for threshold in [0u8, 100, 254, 255] {
            assert_eq!(
                gpu.threshold(&gray, width, height, threshold).unwrap(),
                cpu.threshold(&gray, width, height, threshold).unwrap(),
                "threshold {threshold} on {width}x{height}"
            );
        }
        let test = cpu.threshold(&gray, width, height, 120).unwrap();
        let template = binary_board(width, height, 100 + i as u64);
        let (w, h) = (width as isize, height as isize);
        // The last two leave nothing of the template on the image.
        for shift in [
            (0, 0),
            (3, -2),
            (-5, 7),
            (70, 1),
            (-1, -66),
            (w, 0),
            (0, -h),
        ] {
            for (open, merge) in [(1, 1), (2, 5), (3, 2), (4, 1)] {
                assert_eq!(
                    gpu.compare(&test, &template, shift, open, merge).unwrap(),
                    cpu.compare(&test, &template, shift, open, merge).unwrap(),
                    "compare {width}x{height} shift {shift:?} open {open} merge {merge}"
                );
            }
        }
        check_crops(gpu, &[&test, &template], &PipelineParams::default());
    }
    check_crop_settings(gpu);
    check_concurrent_callers(gpu);
    check_boards(gpu);
    check_scaling(gpu);
    check_window_stacking(gpu);
}

/// The whole CPU part of an inspection gives the same board on both backends: threshold,
/// shift, candidates and classifier input, on binarised and grey synthetic boards.
fn check_boards(gpu: &dyn Preprocess) {
    use crate::aoi::pipeline::{PreparedTemplate, prepare_board};
    use crate::aoi::synthetic::{DefectKind, board, grey};
    let params = PipelineParams::default();
    let drawn = board(&DefectKind::ALL, (2, -3));
    let template = PreparedTemplate::new(&drawn.template, &params);
    for test in [drawn.test.clone(), grey(&drawn.test, 5)] {
        let cpu = prepare_board(&test, &template, &params, &CpuPreprocessor, None).unwrap();
        let other = prepare_board(&test, &template, &params, gpu, None).unwrap();
        assert!(!cpu.candidates.is_empty());
        assert_eq!(
            (other.test_threshold, other.shift.dx, other.shift.dy),
            (cpu.test_threshold, cpu.shift.dx, cpu.shift.dy)
        );
        assert_eq!(other.candidates, cpu.candidates);
        assert_eq!(other.crops.host(), cpu.crops.host());
    }
}

/// Candidates in the middle, at every border and past the corners.
fn edge_candidates(width: usize, height: usize) -> Vec<Component> {
    [(0, 0), (width / 2, height / 2), (width - 1, height - 1)]
        .iter()
        .flat_map(|&(x, y)| {
            [(0usize, 0usize), (3, 9), (30, 2)].map(|(w, h)| Component {
                x1: x.saturating_sub(w),
                y1: y.saturating_sub(h),
                x2: (x + w + 1).min(width),
                y2: (y + h + 1).min(height),
                area: 1,
            })
        })
        .collect()
}

fn check_crops(gpu: &dyn Preprocess, channels: &[&BitImage], params: &PipelineParams) {
    let (width, height) = (channels[0].width(), channels[0].height());
    check_crops_of(gpu, channels, &edge_candidates(width, height), params);
}

fn check_crops_of(
    gpu: &dyn Preprocess,
    channels: &[&BitImage],
    candidates: &[Component],
    params: &PipelineParams,
) {
    let (mut expected, mut got) = (Vec::new(), Vec::new());
    CpuPreprocessor
        .crops(channels, candidates, params, &mut expected)
        .unwrap();
    gpu.crops(channels, candidates, params, &mut got).unwrap();
    let (width, height) = (channels[0].width(), channels[0].height());
    assert!(
        got == expected,
        "crops of {} candidates on {width}x{height}, window {} scale {}",
        candidates.len(),
        params.crop_window,
        params.crop_scale
    );
}

fn binary_board(width: usize, height: usize, seed: u64) -> BitImage {
    CpuPreprocessor
        .threshold(&grey_board(width, height, seed), width, height, 120)
        .unwrap()
}

/// Crop settings other than the shipped ones: the generic block average (scale 4, no fine
/// window), and a batch large enough that the launch needs a second row of groups (the grid's
/// x dimension stops at 65,535 groups of 64).
fn check_crop_settings(gpu: &dyn Preprocess) {
    let (test, template) = (binary_board(300, 200, 1), binary_board(300, 200, 2));
    let coarse = PipelineParams {
        crop_window: 64,
        crop_scale: 4,
        crop_size: 16,
        fine_window: 0,
        ..PipelineParams::default()
    };
    check_crops(gpu, &[&test, &template], &coarse);
    let params = PipelineParams::default();
    let mut rng = fastrand::Rng::with_seed(11);
    let candidates: Vec<Component> = (0..300)
        .map(|_| {
            let (x, y) = (rng.usize(0..290), rng.usize(0..190));
            Component {
                x1: x,
                y1: y,
                x2: x + rng.usize(1..10),
                y2: y + rng.usize(1..10),
                area: 1,
            }
        })
        .collect();
    let planes = crate::preprocess::crop_planes(&candidates, &params, 2).len();
    let values = planes * params.crop_size * params.crop_size;
    assert!(
        values > 65_535 * 64,
        "{values} values fit one row of groups"
    );
    check_crops_of(gpu, &[&test, &template], &candidates, &params);
}

/// Callers on several threads at once, each with its own image size, as the server's
/// inspection workers are: every result must still be its own.
fn check_concurrent_callers(gpu: &dyn Preprocess) {
    std::thread::scope(|scope| {
        for (k, (width, height)) in [(640, 640), (203, 77), (33, 2), (500, 300)]
            .into_iter()
            .enumerate()
        {
            scope.spawn(move || {
                let test = binary_board(width, height, 20 + k as u64);
                let template = binary_board(width, height, 30 + k as u64);
                for _ in 0..5 {
                    check_crops(gpu, &[&test, &template], &PipelineParams::default());
                    assert_eq!(
                        gpu.compare(&test, &template, (2, -1), 3, 2).unwrap(),
                        CpuPreprocessor
                            .compare(&test, &template, (2, -1), 3, 2)
                            .unwrap(),
                        "compare {width}x{height} beside other callers"
                    );
                }
            });
        }
    });
}

fn check_scaling(gpu: &dyn Preprocess) {
    let names: Vec<String> = (0..5).map(|i| format!("s_{i}")).collect();
    // Model order differs from the source's, so the column gather is exercised.
    let params = SensorParams {
        window: 30,
        channels: ["s_1", "s_3", "s_4", "s_2"].map(String::from).to_vec(),
        scaling: "minmax".into(),
        offset: vec![2388.02, -0.5, 1589.7, 0.0],
        scale: vec![14.1, 0.25, 0.04, 1.0],
        rul_cap: 125.0,
        padding: crate::sensors::params::Padding::RepeatFirst,
    };
    let scaler = Scaler::new(&params);
    let map = ChannelMap::new(&params.channels, &names, true).unwrap();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut source: Vec<f64> = (0..5 * 1000)
        .map(|i| match i % 5 {
            1 => 2388.0 + rng.f64() * 0.2,
            4 => 1580.0 + rng.f64() * 20.0,
            _ => rng.f64() * 10.0 - 5.0,
        })
        .collect();
    let (mut expected, mut got) = (Vec::new(), Vec::new());
    CpuPreprocessor
        .scale_rows(&scaler, &source, &map, &mut expected)
        .unwrap()
        .unwrap();
    gpu.scale_rows(&scaler, &source, &map, &mut got)
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), expected.len());
    for (k, (g, e)) in got.iter().zip(&expected).enumerate() {
        let (row, channel) = (k / 4, k % 4);
        let value = source[row * 5 + map.columns[channel]];
        let bound = scaling_tolerance(value, params.offset[channel], params.scale[channel]);
        assert!(
            ((*g - *e) as f64).abs() <= bound,
            "row {row} channel {channel}: gpu {g} cpu {e} bound {bound}"
        );
    }
    // The first non-finite value in model order is the one reported, as on the CPU.
    source[5 * 600 + 3] = f64::NAN;
    source[5 * 600 + 4] = f64::INFINITY;
    source[5 * 900 + 1] = f64::NEG_INFINITY;
    let cpu_bad = CpuPreprocessor
        .scale_rows(&scaler, &source, &map, &mut Vec::new())
        .unwrap()
        .unwrap_err();
    let gpu_bad = gpu
        .scale_rows(&scaler, &source, &map, &mut Vec::new())
        .unwrap()
        .unwrap_err();
    assert_eq!(
        (gpu_bad.row, gpu_bad.channel),
        (cpu_bad.row, cpu_bad.channel)
    );
}

/// Windows of every kind: full, padded at a unit start inside the buffer, padded at the
/// buffer's first row, window 1, and a buffer starting inside a unit; copies, so exact.
fn check_window_stacking(gpu: &dyn Preprocess) {
    let (width, window) = (14, 30);
    let rows: Vec<f32> = (0..300 * width).map(|v| v as f32 * 0.5 - 7.0).collect();
    let mut spans: Vec<WindowSpan> = (0..300).map(|last| WindowSpan { last, first: 0 }).collect();
    spans.extend((120..200).map(|last| WindowSpan { last, first: 117 }));
    spans.push(WindowSpan {
        last: 299,
        first: 299,
    });
    for window in [window, 1, 7] {
        let (mut expected, mut got) = (Vec::new(), Vec::new());
        CpuPreprocessor
            .stack_windows(&rows, width, window, &spans, &mut expected)
            .unwrap();
        gpu.stack_windows(&rows, width, window, &spans, &mut got)
            .unwrap();
        assert_eq!(got.len(), spans.len() * window * width);
        assert!(got == expected, "stack_windows, window {window}");
    }
}

/// Runs the parity checks, or says why this machine cannot; with the environment variable
/// `require` set, a backend that cannot start fails the test instead.
pub(crate) fn check_or_skip(backend: Result<impl Preprocess, PreprocessError>, require: &str) {
    match backend {
        Ok(gpu) => check_backend(&gpu),
        Err(reason) if std::env::var_os(require).is_some() => {
            panic!("{require} is set but {reason}")
        }
        Err(reason) => eprintln!("skipped: {reason}"),
    }
}

#[test]
fn wgpu_kernels_match_the_cpu() {
    // CI installs Mesa's lavapipe (deploy/setup.sh) and deploy/test.sh sets
    // LINESCAN_REQUIRE_WGPU, so this runs everywhere the set-up ran.
    check_or_skip(
        crate::preprocess::wgpu_backend::WgpuPreprocessor::new().map(GpuKernels),
        "LINESCAN_REQUIRE_WGPU",
    );
}

#[test]
fn cpu_crop_planes_match_make_crops_order() {
    // The planes the GPU kernels use, evaluated on the CPU, give make_crops' output.
    let mut image = BitImage::new(100, 80);
    for y in 10..30 {
        for x in 5..50 {
            if (x * 7 + y * 3) % 5 != 0 {
                image.set(x, y);
            }
        }
    }
    let params = PipelineParams::default();
    let candidates = [Component {
        x1: 8,
        y1: 12,
        x2: 30,
        y2: 20,
        area: 10,
    }];
    let mut expected = Vec::new();
    CpuPreprocessor
        .crops(&[&image], &candidates, &params, &mut expected)
        .unwrap();
    let planes = crate::preprocess::crop_planes(&candidates, &params, 1);
    let size = params.crop_size;
    let mut got = Vec::new();
    for plane in &planes {
        for i in 0..size {
            for j in 0..size {
                let mut count = 0;
                for by in 0..plane.scale as i32 {
                    for bx in 0..plane.scale as i32 {
                        let y = plane.y + plane.scale as i32 * i as i32 + by;
                        let x = plane.x + plane.scale as i32 * j as i32 + bx;
                        if (0..80).contains(&y)
                            && (0..100).contains(&x)
                            && image.get(x as usize, y as usize)
                        {
                            count += 1;
                        }
                    }
                }
                got.push(count as f32 / (plane.scale * plane.scale) as f32);
            }
        }
    }
    assert_eq!(got, expected);
}
