//! `linescan aoi detect` and `linescan aoi eval` on a DeepPCB-format folder of synthetic pairs
//! written on the fly: the file contract evaluators script against.

mod common;

use std::path::Path;

use common::{Repository, run_cli};
use linescan::aoi::synthetic::{self, DefectKind};

/// DeepPCB type numbers of the defect kinds.
fn type_number(kind: DefectKind) -> usize {
    DefectKind::ALL.iter().position(|k| *k == kind).unwrap() + 1
}

fn write_dataset(root: &Path) -> std::path::PathBuf {
    let group = root.join("group1");
    std::fs::create_dir_all(group.join("1")).unwrap();
    std::fs::create_dir_all(group.join("1_not")).unwrap();
    let mut list = String::new();
    let layouts: [&[DefectKind]; 3] = [
        &DefectKind::ALL,
        &[],
        &[DefectKind::Open, DefectKind::Copper],
    ];
    for (i, defects) in layouts.iter().enumerate() {
        let id = format!("100{i}");
        let board = synthetic::board(defects, (i as i64 - 1, 0));
        std::fs::write(
            group.join(format!("1/{id}_test.jpg")),
            synthetic::encode(&board.test, image::ImageFormat::Jpeg),
        )
        .unwrap();
        std::fs::write(
            group.join(format!("1/{id}_temp.jpg")),
            synthetic::encode(&board.template, image::ImageFormat::Jpeg),
        )
        .unwrap();
        let annotations: String = board
            .defects
            .iter()
            .map(|(kind, b)| {
                format!(
                    "{} {} {} {} {}\n",
                    b[0],
                    b[1],
                    b[2],
                    b[3],
                    type_number(*kind)
                )
            })
            .collect();
        std::fs::write(group.join(format!("1_not/{id}.txt")), annotations).unwrap();
        list.push_str(&format!("group1/1/{id}.jpg group1/1_not/{id}.txt\n"));
    }
    let path = root.join("list.txt");
    std::fs::write(&path, list).unwrap();
    path
}

/// `linescan aoi detect` on the dataset at `root` with the repository's models.
fn detect(
    root: &Path,
    list: &Path,
    out: &Path,
    repository: &Repository,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "aoi",
        "detect",
        "--list",
        list.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--model-repository",
        repository.path().to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run_cli(&args)
}

/// `linescan aoi eval` on the detections in `det`.
fn eval(root: &Path, list: &Path, det: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "aoi",
        "eval",
        "--list",
        list.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
        "--det",
        det.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run_cli(&args)
}

#[test]
fn detect_writes_deeppcb_files_and_eval_scores_them() {
    let repository = Repository::with_models(&["aoi_defect"]);
    let root = tempfile::tempdir().unwrap();
    let list = write_dataset(root.path());
    let out = root.path().join("det");
    let models = repository.path().to_str().unwrap();
    let detect = detect(root.path(), &list, &out, &repository, &[]);
    let stdout = String::from_utf8_lossy(&detect.stdout);
    assert!(
        detect.status.success(),
        "{}\n{}",
        stdout,
        String::from_utf8_lossy(&detect.stderr)
    );
    assert!(
        stdout.contains("3 pairs") && stdout.contains("pairs/s"),
        "{stdout}"
    );
    for stage in ["template", "decode", "align", "classify"] {
        assert!(stdout.contains(stage), "{stage} timing missing: {stdout}");
    }
    // One file per pair; each line `x1,y1,x2,y2,confidence,type` with integer box. Every
    // injected defect is found with its class, its box holding the defect's centre (the
    // classifier draws DeepPCB-sized boxes, wider than the synthetic ones, so IoU is not the
    // test here), and the clean board gives nothing. The annotations, written as detections,
    // are scored below.
    let perfect = root.path().join("perfect");
    std::fs::create_dir_all(&perfect).unwrap();
    for id in ["1000", "1001", "1002"] {
        let text = std::fs::read_to_string(out.join(format!("{id}.txt"))).unwrap();
        let mut found = Vec::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split(',').collect();
            assert_eq!(fields.len(), 6, "{line}");
            let bbox: Vec<i64> = fields[..4]
                .iter()
                .map(|f| {
                    f.parse()
                        .unwrap_or_else(|_| panic!("box field {f} in {line}"))
                })
                .collect();
            let confidence: f64 = fields[4].parse().unwrap();
            assert!((0.0..=1.0).contains(&confidence));
            assert!(
                DefectKind::ALL.iter().any(|k| k.class_name() == fields[5]),
                "{line}"
            );
            if confidence >= 0.5 {
                found.push((bbox, fields[5]));
            }
        }
        let truth =
            std::fs::read_to_string(root.path().join(format!("group1/1_not/{id}.txt"))).unwrap();
        let truth: Vec<Vec<i64>> = truth
            .lines()
            .map(|l| l.split(' ').map(|v| v.parse().unwrap()).collect())
            .collect();
        assert_eq!(found.len(), truth.len(), "{id}: {found:?} for {truth:?}");
        for t in &truth {
            let (cx, cy) = ((t[0] + t[2]) / 2, (t[1] + t[3]) / 2);
            let class = DefectKind::ALL[t[4] as usize - 1].class_name();
            assert!(
                found.iter().any(|(b, c)| *c == class
                    && (b[0]..b[2]).contains(&cx)
                    && (b[1]..b[3]).contains(&cy)),
                "{id}: no {class} around ({cx}, {cy}) in {found:?}"
            );
        }
        let lines: String = truth
            .iter()
            .map(|t| format!("{},{},{},{},1.0,{}\n", t[0], t[1], t[2], t[3], t[4]))
            .collect();
        std::fs::write(perfect.join(format!("{id}.txt")), lines).unwrap();
    }
    let eval = eval(root.path(), &list, &out, &["--model-repository", models]);
    let report = String::from_utf8_lossy(&eval.stdout);
    assert!(
        eval.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    for expected in [
        "3 images, 8 ground-truth defects",
        "AP (all detections ranked by confidence)",
        "AP pin-hole",
        "mean AP",
        "F-score",
    ] {
        assert!(
            report.contains(expected),
            "{expected:?} missing in {report}"
        );
    }
    // The annotations themselves as detections score perfectly.
    let scored = self::eval(
        root.path(),
        &list,
        &perfect,
        &["--model-repository", models],
    );
    let report = String::from_utf8_lossy(&scored.stdout);
    assert!(scored.status.success(), "{report}");
    for expected in [
        "mean AP (classes with ground truth): 1.0000",
        "F-score 1.0000",
    ] {
        assert!(
            report.contains(expected),
            "{expected:?} missing in {report}"
        );
    }
}

#[test]
fn detect_names_a_missing_image_and_still_writes_the_other_pairs() {
    let repository = Repository::with_models(&["aoi_defect"]);
    let root = tempfile::tempdir().unwrap();
    let list = write_dataset(root.path());
    std::fs::remove_file(root.path().join("group1/1/1001_test.jpg")).unwrap();
    let out = root.path().join("det");
    // An earlier run's file for the pair that now fails must not be scored as this run's.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("1001.txt"), "1,2,3,4,0.9,short\n").unwrap();
    let output = detect(root.path(), &list, &out, &repository, &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("pair 1001") && stderr.contains("1001_test.jpg"),
        "{stderr}"
    );
    assert!(stderr.contains("1 of 3 pairs failed"), "{stderr}");
    assert!(out.join("1000.txt").is_file() && out.join("1002.txt").is_file());
    assert!(!out.join("1001.txt").exists());
    // Scoring the run names the pair without a file and counts its defects as missed.
    let eval = eval(root.path(), &list, &out, &["--score-threshold", "0.5"]);
    let stderr = String::from_utf8_lossy(&eval.stderr);
    assert!(eval.status.success(), "{stderr}");
    assert!(
        stderr.contains("1 of 3 listed pairs have no detection file") && stderr.contains("1001"),
        "{stderr}"
    );
}

#[test]
fn detect_warns_when_a_pair_has_more_candidates_than_the_cap() {
    let repository = Repository::with_models(&["aoi_defect"]);
    repository.set("aoi_defect", "max_candidates", "2");
    let root = tempfile::tempdir().unwrap();
    let list = write_dataset(root.path());
    let out = root.path().join("det");
    let output = detect(root.path(), &list, &out, &repository, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    // The board with all six defects has six candidates; the others two and none.
    assert!(
        stderr.contains("1 of 3 pairs had more candidates than the 2 classified per board")
            && stderr.contains("4 candidates were not classified")
            && stderr.contains("raise max_candidates"),
        "{stderr}"
    );
}

/// One detection line: box, confidence, class.
type Detection = (Vec<i64>, f64, String);

/// Detection lines `x1,y1,x2,y2,confidence,type` of every pair in `dir`, by file name.
fn detections(dir: &Path) -> Vec<(String, Vec<Detection>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).unwrap();
            let lines = text
                .lines()
                .map(|line| {
                    let f: Vec<&str> = line.split(',').collect();
                    let boxed = f[..4].iter().map(|v| v.parse().unwrap()).collect();
                    (boxed, f[4].parse().unwrap(), f[5].to_string())
                })
                .collect();
            (path.file_name().unwrap().to_string_lossy().into(), lines)
        })
        .collect()
}

#[test]
fn detect_with_wgpu_preprocessing_matches_the_cpu() {
    let repository = Repository::with_models(&["aoi_defect"]);
    let root = tempfile::tempdir().unwrap();
    let list = write_dataset(root.path());
    let detect = |backend: &str| {
        let out = root.path().join(format!("det-{backend}"));
        let run = detect(
            root.path(),
            &list,
            &out,
            &repository,
            &["--preprocess", backend],
        );
        (run, out)
    };
    let (wgpu, wgpu_out) = detect("wgpu");
    let stderr = String::from_utf8_lossy(&wgpu.stderr);
    if !wgpu.status.success()
        && stderr.contains("wgpu preprocessing is not available")
        && std::env::var_os("LINESCAN_REQUIRE_WGPU").is_none()
    {
        eprintln!("skipped: no Vulkan adapter (deploy/setup.sh installs Mesa's lavapipe)");
        return;
    }
    assert!(wgpu.status.success(), "{stderr}");
    let (cpu, cpu_out) = detect("cpu");
    assert!(cpu.status.success());
    let (expected, got) = (detections(&cpu_out), detections(&wgpu_out));
    assert_eq!(got.len(), expected.len());
    assert!(expected.iter().any(|(_, lines)| !lines.is_empty()));
    // The tolerance (boxes within 2 px, confidences within 0.02); the kernels are in
    // fact bit-exact, so equal outputs are expected.
    for ((file, lines), (_, wgpu_lines)) in expected.iter().zip(&got) {
        assert_eq!(lines.len(), wgpu_lines.len(), "{file}");
        for ((boxed, confidence, class), (w_box, w_conf, w_class)) in lines.iter().zip(wgpu_lines) {
            assert_eq!(class, w_class, "{file}");
            assert!((confidence - w_conf).abs() <= 0.02, "{file}");
            assert!(
                boxed.iter().zip(w_box).all(|(a, b)| (a - b).abs() <= 2),
                "{file}: {boxed:?} vs {w_box:?}"
            );
        }
    }
}
