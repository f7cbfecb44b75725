//! Finds and loads the ONNX Runtime shared library (`ort` is built with `load-dynamic`).
//! Looked for, in order: `ORT_DYLIB_PATH` / `LINESCAN_ORT_LIB`, the project's `.venv`,
//! a `lib/` folder beside the executable, then the `onnxruntime` package of `python3`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;

use crate::python_env;
use crate::runtime::RuntimeError;

pub const REQUIRED_VERSION: &str = "1.31.1";
const ENV_VARS: [&str; 2] = ["LINESCAN_ORT_LIB", "ORT_DYLIB_PATH"];

static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

/// The process-wide ONNX Runtime environment, loading the library on first use.
pub fn environment() -> Result<Environment, RuntimeError> {
    ENVIRONMENT
        .get_or_init(|| {
            let path = find_library()?;
            tracing::info!(library = %path.display(), "loading ONNX Runtime");
            let builder = ort::init_from(&path)
                .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
            builder
                .with_name("linescan")
                .build()
                .map_err(|e| format!("cannot create the environment: {e}"))
        })
        .clone()
        .map_err(RuntimeError::Library)
}

fn find_library() -> Result<PathBuf, String> {
    let mut looked = Vec::new();
    for var in ENV_VARS {
        if let Some(value) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            let path = PathBuf::from(value);
            if path.is_file() {
                return Ok(path);
            }
            return Err(format!("{var}={} does not name a file", path.display()));
        }
        looked.push(format!("${var} (unset)"));
    }
    let mut folders: Vec<PathBuf> = Vec::new();
    for venv in python_env::venvs() {
        let sites = python_env::site_packages_of(&venv);
        if sites.is_empty() {
            let shown = std::path::absolute(&venv).unwrap_or(venv);
            looked.push(format!("{} (no virtual environment)", shown.display()));
        }
        folders.extend(sites.into_iter().map(|site| site.join("onnxruntime/capi")));
    }
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        folders.push(exe_dir.join("lib"));
    }
    // python3 is asked only when nothing closer has the library.
    let python3 = std::iter::once_with(|| {
        python_env::python3_paths(
            "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))",
        )
    })
    .flatten()
    .map(|package| package.join("capi"));
    let mut python3_has_it = false;
    for folder in folders
        .into_iter()
        .chain(python3.inspect(|_| python3_has_it = true))
    {
        if let Some(lib) = library_in(&folder) {
            return Ok(lib);
        }
        looked.push(folder.display().to_string());
    }
    if !python3_has_it {
        looked.push("python3 on PATH (no onnxruntime package, or no python3)".into());
    }
    Err(format!(
        "libonnxruntime.so not found; install it with `pip install onnxruntime=={REQUIRED_VERSION}` \
         (into ./.venv or the python3 on PATH) or set ORT_DYLIB_PATH to the library file. Looked in: {}",
        looked.join(", ")
    ))
}

/// `libonnxruntime.so.<version>` preferred over the unversioned name.
fn library_in(folder: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(folder)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so"))
        })
        .collect();
    candidates.sort();
    candidates.pop()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_versioned_library_in_folder() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(library_in(dir.path()), None);
        std::fs::write(dir.path().join("libonnxruntime.so"), b"").unwrap();
        std::fs::write(dir.path().join("libonnxruntime.so.1.31.1"), b"").unwrap();
        std::fs::write(dir.path().join("libonnxruntime_providers_shared.so"), b"").unwrap();
        assert_eq!(
            library_in(dir.path()).unwrap().file_name().unwrap(),
            "libonnxruntime.so.1.31.1"
        );
    }
}
