//! Start-up checks: a broken repository stops the server with a message naming the file and the
//! problem; `models list|check` describe what would serve.

mod common;

use std::process::Stdio;

use common::{Repository, run_cli};

const MODEL: &str = "aoi_defect";

fn serve_error(repository: &Repository) -> String {
    let output = run_cli(&[
        "serve",
        "--port",
        "0",
        "--model-repository",
        repository.path().to_str().unwrap(),
    ]);
    assert!(
        !output.status.success(),
        "server started on a broken repository"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn invalid_config_names_file_and_problem() {
    let repository = Repository::with_models(&[MODEL]);
    repository.set(MODEL, "max_batch_size", "\"lots\"");
    let error = serve_error(&repository);
    assert!(error.contains("config.toml"), "{error}");
    assert!(error.contains("max_batch_size"), "{error}");
}

#[test]
fn config_that_disagrees_with_the_graph_fails_at_start() {
    let repository = Repository::with_models(&[MODEL]);
    repository.set(MODEL, "datatype", "\"INT64\"");
    let error = serve_error(&repository);
    assert!(error.contains(MODEL), "{error}");
    assert!(error.contains("INT64"), "{error}");
    // Both files are named: either may be the one to fix.
    let model_dir = repository.path().join(MODEL);
    let files = format!(
        "{} does not match {}",
        model_dir.join("1").join("model.onnx").display(),
        model_dir.join("config.toml").display()
    );
    assert!(error.contains(&files), "{error}");
}

#[test]
fn unloadable_provider_is_an_error_not_a_silent_cpu_fallback() {
    let repository = Repository::with_models(&[MODEL]);
    let output = run_cli(&[
        "models",
        "check",
        "--providers",
        "cuda",
        "--model-repository",
        repository.path().to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() {
        // A CUDA-capable ONNX Runtime on a GPU machine: then it must report cuda.
        assert!(String::from_utf8_lossy(&output.stdout).contains("provider=cuda"));
    } else {
        assert!(stderr.contains("cuda"), "{stderr}");
    }
}

#[test]
fn missing_model_file_and_empty_repository_are_reported() {
    let repository = Repository::with_models(&[MODEL]);
    std::fs::remove_file(repository.path().join(MODEL).join("1").join("model.onnx")).unwrap();
    let error = serve_error(&repository);
    assert!(
        error.contains("version folder") && error.contains("has no model.onnx"),
        "{error}"
    );
    // Without the folder the model has no versions at all.
    std::fs::remove_dir(repository.path().join(MODEL).join("1")).unwrap();
    assert!(serve_error(&repository).contains("no versions"));
    let empty = tempfile::tempdir().unwrap();
    let output = run_cli(&[
        "models",
        "list",
        "--model-repository",
        empty.path().to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no models"));
    // A relative repository that is not there is named in full, with the way to point elsewhere.
    let output = run_cli(&["models", "list", "--model-repository", "no-such-repository"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let absolute = common::repo_root().join("no-such-repository");
    assert!(
        stderr.contains(&*absolute.to_string_lossy()) && stderr.contains("--model-repository"),
        "{stderr}"
    );
}

#[test]
fn models_list_and_check_describe_the_bundled_repository() {
    let list = run_cli(&["models", "list"]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains(MODEL), "{text}");
    let check = run_cli(&["models", "check", "--providers", "cpu"]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(String::from_utf8_lossy(&check.stdout).contains(&format!("ok  {MODEL}")));
}

#[test]
fn a_summary_printed_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    // `linescan models list | head -0`: the reader is gone before the first line is written.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let output = common::command(common::BIN)
        .args(["models", "list"])
        .current_dir(common::repo_root())
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run linescan");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(output.status.signal(), Some(libc::SIGPIPE), "{stderr}");
}

#[test]
fn defect_model_that_does_not_fit_the_pipeline_fails_at_start() {
    let repository = Repository::with_models(&[MODEL]);
    // Crops of a different size than the graph takes: [preprocessing] disagrees with the input.
    repository
        .set(MODEL, "crop_size", "32")
        .set(MODEL, "crop_window", "64")
        .set(MODEL, "fine_window", "32");
    let error = serve_error(&repository);
    assert!(
        error.contains("crop_size") && error.contains("[6, 32, 32]"),
        "{error}"
    );
    // `models check` makes the same checks, so it never passes what `serve` refuses.
    let check = run_cli(&[
        "models",
        "check",
        "--model-repository",
        repository.path().to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(!check.status.success(), "{stderr}");
    assert!(stderr.contains("[6, 32, 32]"), "{stderr}");
}

#[tokio::test]
async fn preprocess_backend_is_reported_in_metrics() {
    let repository = Repository::with_models(&[MODEL]);
    let server = common::Server::start(repository.path(), &["--preprocess", "cpu"]);
    let text = server.metrics_text().await;
    let line = text
        .lines()
        .find(|l| l.starts_with("linescan_preprocess_backend_info{"))
        .unwrap_or_else(|| panic!("no backend gauge in {text}"));
    assert!(
        line.contains("backend=\"cpu\"") && line.ends_with(" 1"),
        "{line}"
    );
}

#[test]
fn unavailable_gpu_preprocessing_is_an_error_not_a_silent_cpu_fallback() {
    // With an NVIDIA driver the server would start and serve until stopped: the refusal can
    // only be checked where CUDA is missing.
    if linescan::preprocess::cuda::CudaPreprocessor::new().is_ok() {
        eprintln!("skipped: this machine has CUDA, so --preprocess cuda starts");
        return;
    }
    let repository = Repository::with_models(&[MODEL]);
    let output = run_cli(&[
        "serve",
        "--port",
        "0",
        "--preprocess",
        "cuda",
        "--model-repository",
        repository.path().to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cuda preprocessing is not available"),
        "{stderr}"
    );
}

#[test]
fn bad_settings_stop_serve_before_it_listens() {
    let repository = Repository::with_models(&[MODEL]);
    let blocker = tempfile::NamedTempFile::new().unwrap();
    let data_dir = blocker.path().join("data");
    let cases = [
        (
            vec!["--risk-critical", "90", "--risk-warning", "10"],
            "critical threshold (90)",
        ),
        (vec!["--data-dir", data_dir.to_str().unwrap()], "--data-dir"),
        (
            vec!["--jobs-allow-path", data_dir.to_str().unwrap()],
            "--jobs-allow-path",
        ),
        (
            vec!["--max-body-bytes", "2000", "--max-body-memory", "1000"],
            "--max-body-memory (1000) is below --max-body-bytes (2000)",
        ),
        // A key no client can send; the message must not repeat it.
        (vec!["--api-key", "s3cret "], "7 characters"),
    ];
    for (flags, fragment) in cases {
        let mut args = vec![
            "serve",
            "--port",
            "0",
            "--model-repository",
            repository.path().to_str().unwrap(),
        ];
        args.extend(flags);
        let output = run_cli(&args);
        assert!(!output.status.success(), "{args:?}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(!stdout.contains("listening"), "{args:?}: {stdout}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(fragment), "{args:?}: {stderr}");
        assert!(!stderr.contains("s3cret"), "{stderr}");
    }
    // Flags are checked together before the repository is read: a missing one hides nothing.
    let output = run_cli(&[
        "serve",
        "--model-repository",
        "/nonexistent",
        "--risk-critical",
        "90",
        "--risk-warning",
        "10",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("critical threshold (90)"), "{stderr}");
    // A value outside its range is a usage error (exit 2) that names the flag.
    for (flag, value, reason) in [
        ("--health-anomaly-weight", "2", "must be between 0 and 1"),
        ("--risk-critical", "nan", "must be a number of 0 or more"),
        ("--risk-warning", "-5", "must be a number of 0 or more"),
    ] {
        let output = run_cli(&["serve", flag, value]);
        assert_eq!(output.status.code(), Some(2), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(flag) && stderr.contains(reason),
            "{flag} {value}: {stderr}"
        );
    }
}

#[test]
fn a_stop_while_models_load_waits_for_the_loader_and_exits_cleanly() {
    use std::io::BufRead;
    let repository = Repository::with_models(&[MODEL]);
    let data = tempfile::tempdir().unwrap();
    // Eight sessions to load and warm up keep the loader busy when the signal comes.
    let mut child = common::command(common::BIN)
        .args([
            "serve",
            "--port",
            "0",
            "--instances",
            "8",
            "--model-repository",
        ])
        .arg(repository.path())
        .arg("--data-dir")
        .arg(data.path())
        .env("LINESCAN_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.contains("listening"), "{line}");
    common::signal(child.id(), "TERM");
    let output = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}\n{log}", output.status);
    // Exiting under a warm-up run would tear ONNX Runtime down beneath it and log its errors.
    assert!(
        log.contains("SIGTERM received while loading") && log.contains("shut down cleanly"),
        "{log}"
    );
    // The loader stops at the next session instead of warming up all eight.
    assert!(
        log.contains("the model versions left are not loaded"),
        "{log}"
    );
    assert!(!log.contains("ERROR"), "{log}");
}
