//! Where pip-installed native libraries live: the runtime libraries linescan loads at run time
//! (ONNX Runtime, NVIDIA's NVRTC) come from PyPI wheels, in the project's `.venv` or `python3`'s.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `site-packages` folders of the virtual environments linescan is run beside (`venvs`).
pub fn venv_site_packages() -> Vec<PathBuf> {
    venvs()
        .iter()
        .flat_map(|venv| site_packages_of(venv))
        .collect()
}

/// The virtual environments linescan looks in, whether or not they exist: `./.venv`,
/// `../.venv`, and the repository's `.venv` when the binary is `target/<profile>/linescan`.
pub fn venvs() -> Vec<PathBuf> {
    let mut venvs = vec![PathBuf::from(".venv"), PathBuf::from("../.venv")];
    if let Some(repo) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent()?.parent().map(Path::to_path_buf))
    {
        venvs.push(repo.join(".venv"));
    }
    venvs
}

pub fn site_packages_of(venv: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(venv.join("lib")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|entry| entry.path().join("site-packages"))
        .filter(|path| path.is_dir())
        .collect()
}

/// What `python3 -c CODE` prints, one path per line; empty when there is no such Python or the
/// code fails (the package is not installed there).
pub fn python3_paths(code: &str) -> Vec<PathBuf> {
    let Ok(output) = Command::new("python3").args(["-c", code]).output() else {
        return Vec::new();
    };
    if !output.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(PathBuf::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_site_packages_of_a_venv() {
        let venv = tempfile::tempdir().unwrap();
        assert!(site_packages_of(venv.path()).is_empty());
        std::fs::create_dir_all(venv.path().join("lib/python3.11/site-packages")).unwrap();
        std::fs::create_dir_all(venv.path().join("lib/python3.12")).unwrap();
        assert_eq!(
            site_packages_of(venv.path()),
            vec![venv.path().join("lib/python3.11/site-packages")]
        );
    }
}
