//! Unmodified NVIDIA `tritonclient[http]` against linescan. Needs the project's Python
//! environment (`deploy/setup.sh` installs it); the CI sets LINESCAN_REQUIRE_PYTHON_CLIENT=1 so a
//! missing client fails there instead of skipping.

mod common;

use common::{Repository, Server, command, repo_root};

#[test]
fn tritonclient_health_metadata_and_infer_json_and_binary() {
    let python = repo_root().join(".venv/bin/python");
    let has_client = python.is_file()
        && command(&python)
            .args(["-c", "import tritonclient.http"])
            .status()
            .is_ok_and(|s| s.success());
    if !has_client {
        assert!(
            std::env::var_os("LINESCAN_REQUIRE_PYTHON_CLIENT").is_none(),
            "tritonclient is required here but .venv lacks it: run deploy/setup.sh"
        );
        eprintln!(
            "skipped: .venv/bin/python with tritonclient[http] not found (run deploy/setup.sh)"
        );
        return;
    }
    let repository = Repository::with_models(&["aoi_defect"]);
    let server = Server::start(repository.path(), &[]);
    let address = server.url.trim_start_matches("http://");
    let output = command(&python)
        .arg(repo_root().join("tests/python/tritonclient_check.py"))
        .args([address, "aoi_defect"])
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "tritonclient check failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
