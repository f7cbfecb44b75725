//! Parity with the Python reference on real DeepPCB pairs: the CPU stages (thresholds, shift,
//! mask pixel counts, candidates, crops) and `linescan aoi detect` must reproduce what `pipeline.py` wrote to
//! models/train/aoi/reference_outputs.json. Skipped when the DeepPCB data is not on this machine.

mod common;

use std::path::{Path, PathBuf};

use common::{Repository, models_root, repo_root, run_cli};
use linescan::aoi::bitimage::BitImage;
use linescan::aoi::image_io::decode_gray;
use linescan::aoi::params::PipelineParams;
use linescan::aoi::pipeline::{PreparedTemplate, prepare_board};
use linescan::preprocess::cpu::CpuPreprocessor;
use linescan::runtime::ModelConfig;
use serde_json::Value;

/// The reference rounds scores to 3 decimals (error <= 5e-4); ONNX Runtime float differences
/// between the Python and Rust runs (batch composition) are ~1e-6.
const SCORE_TOLERANCE: f64 = 5e-4 + 1e-5;

/// `LINESCAN_DEEPPCB`, else ../shared/data/deeppcb beside the repository.
/// Where the DeepPCB data is looked for: `LINESCAN_DEEPPCB`, else `../shared/data/deeppcb`.
fn deeppcb_path() -> PathBuf {
    std::env::var_os("LINESCAN_DEEPPCB")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/data/deeppcb"))
}

fn deeppcb_root() -> Option<PathBuf> {
    let root = deeppcb_path();
    root.is_dir().then_some(root)
}

fn reference() -> Value {
    let path = repo_root().join("models/train/aoi/reference_outputs.json");
    serde_json::from_slice(&std::fs::read(path).expect("reference_outputs.json"))
        .expect("valid JSON")
}

fn bundled_params() -> PipelineParams {
    let config = ModelConfig::load(&models_root().join("aoi_defect/config.toml")).expect("config");
    PipelineParams::from_table(config.preprocessing.as_ref()).expect("[preprocessing]")
}

fn ints(value: &Value) -> Vec<i64> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_i64().expect("integer"))
        .collect()
}

/// Stages 2-5 through the functions the CLI and the server call.
fn check_stages(root: &Path, pair: &Value, params: &PipelineParams) {
    let name = pair["pair"].as_str().unwrap();
    let read = |key: &str| {
        let bytes = std::fs::read(root.join(pair[key].as_str().unwrap())).expect("image");
        decode_gray(&bytes, u64::MAX).expect("decode")
    };
    let test = read("test");
    let template = PreparedTemplate::new(&read("template"), params);
    let board = prepare_board(&test, &template, params, &CpuPreprocessor, None).expect("prepare");
    assert_eq!(
        (board.test_threshold as i64, template.threshold as i64),
        (
            pair["otsu_test"].as_i64().unwrap(),
            pair["otsu_template"].as_i64().unwrap()
        ),
        "{name}: Otsu thresholds"
    );
    assert_eq!(
        [
            board.shift.dx as i64,
            board.shift.dy as i64,
            board.shift.xor_count as i64
        ],
        [
            pair["shift_dx"].as_i64().unwrap(),
            pair["shift_dy"].as_i64().unwrap(),
            pair["xor_count_at_shift"].as_i64().unwrap()
        ],
        "{name}: shift"
    );
    // The masks behind the candidates, rebuilt with the same functions prepare_board uses.
    let (dx, dy) = (board.shift.dx, board.shift.dy);
    let test_bits =
        BitImage::from_threshold(&test.pixels, test.width, test.height, board.test_threshold);
    let valid = BitImage::valid_after_shift(test.width, test.height, dx, dy);
    let difference = test_bits.xor(&template.bits.shifted(dx, dy)).and(&valid);
    let opened = difference.open_square(params.open_size);
    let counts = [&test_bits, &template.bits, &difference, &opened].map(|b| b.count_ones() as i64);
    let keys = [
        "foreground_test",
        "foreground_template",
        "xor_pixels",
        "opened_pixels",
    ];
    assert_eq!(
        counts,
        keys.map(|k| pair[k].as_i64().unwrap()),
        "{name}: pixel counts {keys:?}"
    );
    let ours: Vec<Vec<i64>> = board
        .candidates
        .iter()
        .map(|c| {
            vec![
                c.x1 as i64,
                c.y1 as i64,
                c.x2 as i64,
                c.y2 as i64,
                c.area as i64,
            ]
        })
        .collect();
    let theirs: Vec<Vec<i64>> = pair["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let mut row = ints(&c["box"]);
            row.push(c["area"].as_i64().unwrap());
            row
        })
        .collect();
    assert_eq!(ours, theirs, "{name}: candidates (x1, y1, x2, y2, area)");
    // Channel sums of candidate 0's crop are exact (multiples of 1/4).
    let crops = board
        .crops
        .host()
        .expect("the CPU backend's crops are in host memory");
    let per_crop = crops.len() / board.candidates.len().max(1);
    let plane = params.crop_size * params.crop_size;
    let sums: Vec<f64> = crops[..per_crop]
        .chunks(plane)
        .map(|c| c.iter().map(|v| *v as f64).sum())
        .collect();
    let expected: Vec<f64> = pair["crop_checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(sums, expected, "{name}: crop channel sums of candidate 0");
}

/// One `x1,y1,x2,y2,confidence,type` line per detection, in the order written.
fn read_detections(path: &Path) -> Vec<(Vec<i64>, f64, String)> {
    std::fs::read_to_string(path)
        .expect("detection file")
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            let bbox = f[..4].iter().map(|v| v.parse().expect("box")).collect();
            (bbox, f[4].parse().expect("confidence"), f[5].to_string())
        })
        .collect()
}

fn compare_detections(ours: &[(Vec<i64>, f64, String)], theirs: &Value, what: &str) {
    let theirs = theirs.as_array().unwrap();
    assert_eq!(
        ours.len(),
        theirs.len(),
        "{what}: count\n{ours:?}\n{theirs:?}"
    );
    for (i, ((bbox, confidence, label), t)) in ours.iter().zip(theirs).enumerate() {
        let score = t["score"].as_f64().unwrap();
        assert!(
            *bbox == ints(&t["box"])
                && label == t["label"].as_str().unwrap()
                && (confidence - score).abs() <= SCORE_TOLERANCE,
            "{what}: detection {i}: ours {bbox:?} {label} {confidence}, pipeline.py {t}"
        );
    }
}

/// `linescan aoi detect` at `min_score` over the reference pairs; detections per pair id.
fn detect(root: &Path, pairs: &[Value], min_score: &str) -> Vec<Vec<(Vec<i64>, f64, String)>> {
    let repository = Repository::with_models(&["aoi_defect"]);
    let work = tempfile::tempdir().unwrap();
    let list: String = pairs
        .iter()
        .map(|p| {
            let parts: Vec<&str> = p["pair"].as_str().unwrap().split('/').collect();
            format!(
                "{0}/{1}/{2}.jpg {0}/{1}_not/{2}.txt\n",
                parts[0], parts[1], parts[2]
            )
        })
        .collect();
    let list_path = work.path().join("list.txt");
    std::fs::write(&list_path, list).unwrap();
    let out = work.path().join("det");
    let output = run_cli(&[
        "aoi",
        "detect",
        "--list",
        list_path.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--min-score",
        min_score,
        "--model-repository",
        repository.path().to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    pairs
        .iter()
        .map(|p| {
            let id = p["pair"].as_str().unwrap().rsplit('/').next().unwrap();
            read_detections(&out.join(format!("{id}.txt")))
        })
        .collect()
}

#[test]
fn the_reference_describes_the_pipeline_the_bundled_config_runs() {
    // Needs no DeepPCB data, so it runs everywhere: every parameter the reference was made
    // with is the bundled config's.
    let ours = serde_json::to_value(bundled_params()).unwrap();
    let theirs = reference()["params"].as_object().unwrap().clone();
    assert!(!theirs.is_empty());
    for (key, value) in &theirs {
        assert_eq!(
            ours.get(key),
            Some(value),
            "config.toml [preprocessing] and reference_outputs.json differ on {key}"
        );
    }
}

#[test]
fn rust_pipeline_matches_pipeline_py_on_deeppcb() {
    let Some(root) = deeppcb_root() else {
        println!(
            "skipped: no DeepPCB data at {} (set LINESCAN_DEEPPCB to its folder)",
            deeppcb_path().display()
        );
        return;
    };
    let reference = reference();
    let params = bundled_params();
    let pairs = reference["pairs"].as_array().unwrap();
    for pair in pairs {
        check_stages(&root, pair, &params);
    }
    // Reported detections (score >= threshold, merged), then the full AP ranking (min_score 0:
    // merged high-score survivors followed by the low-score NMS survivors).
    let threshold = params.score_threshold.to_string();
    for (min_score, key) in [
        (threshold.as_str(), "detections"),
        ("0", "detections_all_nms"),
    ] {
        for (ours, pair) in detect(&root, pairs, min_score).iter().zip(pairs) {
            let what = format!("{} {key}", pair["pair"].as_str().unwrap());
            compare_detections(ours, &pair[key], &what);
        }
    }
}
