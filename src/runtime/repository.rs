//! The model repository on disk, Triton style:
//! `<root>/<model>/config.toml`, `<root>/<model>/<version>/model.onnx`, optional labels file.
//! Folders without a config.toml (such as `train/`) are not models and are skipped.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::runtime::RuntimeError;
use crate::runtime::model_config::{ModelConfig, NamedPolicy, VersionPolicy, read_labels};

/// One loadable version of one model.
#[derive(Debug, Clone)]
pub struct ModelVersionSpec {
    pub config: Arc<ModelConfig>,
    pub version: u64,
    pub model_dir: PathBuf,
    pub model_path: PathBuf,
    pub labels: Option<Arc<Vec<String>>>,
}

impl ModelVersionSpec {
    pub fn error(&self, problem: impl Into<String>) -> RuntimeError {
        RuntimeError::Model {
            model: self.config.name.clone(),
            version: self.version,
            problem: problem.into(),
        }
    }

    pub fn engine_cache_dir(&self) -> PathBuf {
        match &self.config.runtime.tensorrt_engine_cache {
            Some(dir) if dir.is_absolute() => dir.clone(),
            Some(dir) => self.model_dir.join(dir),
            None => self
                .model_dir
                .join(self.version.to_string())
                .join("tensorrt-cache"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModelRepository {
    pub versions: Vec<ModelVersionSpec>,
}

/// The model name the Open Inference Protocol's routes take for themselves.
const RESERVED_NAME: &str = "stats";

impl ModelRepository {
    /// Reads every model's config and lists the versions its policy selects.
    pub fn scan(root: &Path) -> Result<ModelRepository, RuntimeError> {
        let not_found = |problem: String| RuntimeError::Config {
            path: root.to_path_buf(),
            problem,
        };
        let entries = std::fs::read_dir(root).map_err(|e| {
            // A relative default read from the wrong folder is the usual cause: say where.
            let absolute = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
            not_found(format!(
                "cannot read the model repository {}: {e}; pass --model-repository DIR or set \
                 LINESCAN_MODEL_REPOSITORY",
                absolute.display()
            ))
        })?;
        let mut model_dirs = Vec::new();
        let mut problems = Vec::new();
        for entry in entries {
            let dir = entry
                .map_err(|e| not_found(format!("cannot list the model repository: {e}")))?
                .path();
            match is_model_dir(&dir) {
                Ok(true) => model_dirs.push(dir),
                Ok(false) => {}
                Err(problem) => problems.push(problem),
            }
        }
        model_dirs.sort();
        if model_dirs.is_empty() && problems.is_empty() {
            return Err(not_found(
                "no models: expected <model>/config.toml and <model>/<version>/model.onnx".into(),
            ));
        }
        let mut versions = Vec::new();
        for dir in model_dirs {
            match Self::scan_model(&dir) {
                Ok(found) => versions.extend(found),
                Err(problem) => problems.push(problem),
            }
        }
        match problems.len() {
            0 => Ok(ModelRepository { versions }),
            1 => Err(problems.remove(0)),
            _ => Err(RuntimeError::Several(problems)),
        }
    }

    fn scan_model(dir: &Path) -> Result<Vec<ModelVersionSpec>, RuntimeError> {
        let config_path = dir.join("config.toml");
        let config = ModelConfig::load(&config_path)?;
        let problem = |problem: String| RuntimeError::Config {
            path: config_path.clone(),
            problem,
        };
        let dir_name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if config.name != dir_name {
            return Err(problem(format!(
                "name \"{}\" differs from its folder \"{dir_name}\"",
                config.name
            )));
        }
        if config.name == RESERVED_NAME {
            return Err(problem(format!(
                "a model cannot be named \"{RESERVED_NAME}\": /v2/models/{RESERVED_NAME} is the \
                 statistics of every model (Triton's statistics extension)"
            )));
        }
        let labels = match &config.labels {
            Some(file) => Some(Arc::new(read_labels(&dir.join(file))?)),
            None => None,
        };
        // Labels name the classes of the first output, along its last dimension.
        if let Some(labels) = &labels {
            let count = labels.len() as i64;
            let first = &config.outputs[0];
            if first.shape.last() != Some(&count) {
                return Err(problem(format!(
                    "the labels file holds {count} labels, but they name the classes of the \
                     first output, {} {:?}, whose last dimension is not {count}",
                    first.name, first.shape
                )));
            }
        }
        // Every folder named by a number is a version; one without its model is an error, not
        // a version quietly left out (which would move "latest" to an older one).
        let mut available: Vec<u64> = Vec::new();
        let mut others: Vec<String> = Vec::new();
        for entry in
            std::fs::read_dir(dir).map_err(|e| problem(format!("cannot list versions: {e}")))?
        {
            let entry = entry.map_err(|e| problem(format!("cannot list versions: {e}")))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let Some(version) = version_number(&name).map_err(problem)? else {
                if path.is_dir() {
                    others.push(name);
                }
                continue;
            };
            let model = path.join("model.onnx");
            match std::fs::metadata(&model) {
                // Opened now, so an unreadable model is reported with the configs' problems.
                Ok(meta) if meta.is_file() => {
                    std::fs::File::open(&model)
                        .map_err(|e| problem(format!("cannot read {}: {e}", model.display())))?;
                    available.push(version);
                }
                Ok(_) => return Err(problem(format!("{} is not a file", model.display()))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !path.is_dir() => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(problem(format!(
                        "version folder {} has no model.onnx",
                        path.display()
                    )));
                }
                Err(e) => return Err(problem(format!("cannot read {}: {e}", model.display()))),
            }
        }
        available.sort_unstable();
        if available.is_empty() {
            others.sort();
            let ignored = if others.is_empty() {
                String::new()
            } else {
                format!(
                    " (folders not named by a version number: {})",
                    others.join(", ")
                )
            };
            return Err(problem(format!(
                "no versions: expected {}/<version>/model.onnx, <version> a whole number from 1\
                 {ignored}",
                dir.display()
            )));
        }
        let selected: Vec<u64> = match &config.version_policy {
            VersionPolicy::Named(NamedPolicy::Latest) => vec![*available.last().unwrap()],
            VersionPolicy::Named(NamedPolicy::All) => available.clone(),
            VersionPolicy::Specific(wanted) => {
                if let Some(missing) = wanted.iter().find(|v| !available.contains(v)) {
                    return Err(problem(format!(
                        "version_policy names version {missing}, which has no model.onnx (found {available:?})"
                    )));
                }
                wanted.clone()
            }
        };
        let config = Arc::new(config);
        Ok(selected
            .into_iter()
            .map(|version| ModelVersionSpec {
                config: config.clone(),
                version,
                model_dir: dir.to_path_buf(),
                model_path: dir.join(version.to_string()).join("model.onnx"),
                labels: labels.clone(),
            })
            .collect())
    }
}

/// Whether `dir` is a model folder (it holds config.toml). Other folders are skipped, with a
/// warning when they look like a Triton model or are a link to nothing; a filesystem's
/// `lost+found` is skipped unread. A folder that cannot be looked into is an error, not a model
/// that may be left out.
fn is_model_dir(dir: &Path) -> Result<bool, RuntimeError> {
    let unreadable = |path: &Path, e: std::io::Error| RuntimeError::Config {
        path: path.to_path_buf(),
        problem: format!("cannot read: {e}"),
    };
    if dir.file_name().is_some_and(|name| name == "lost+found") {
        return Ok(false);
    }
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(entry = %dir.display(), "not a model: a link to nothing");
            return Ok(false);
        }
        Err(e) => return Err(unreadable(dir, e)),
    }
    let config = dir.join("config.toml");
    match std::fs::metadata(&config) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::fs::symlink_metadata(&config).is_ok() {
                return Err(RuntimeError::Config {
                    path: config,
                    problem: format!("cannot read: {e} (a link to nothing)"),
                });
            }
            if dir.join("config.pbtxt").exists() {
                tracing::warn!(
                    folder = %dir.display(),
                    "not a model: it has Triton's config.pbtxt, and linescan reads config.toml"
                );
            }
            Ok(false)
        }
        Err(e) => Err(unreadable(&config, e)),
    }
}

/// The version a folder name gives: `Ok(None)` for a name that is not a number (another kind of
/// folder), an error for one that is a number but not a version (0, a leading zero or sign, too
/// large), which would otherwise be read as another folder's version or dropped.
fn version_number(name: &str) -> Result<Option<u64>, String> {
    let digits = name.strip_prefix('+').unwrap_or(name);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    let refuse = |why: &str| {
        Err(format!(
            "version folder \"{name}\" {why}: name versions 1, 2, 3, ... (no sign, no leading \
             zero)"
        ))
    };
    if digits != name || (digits.starts_with('0') && digits != "0") {
        return refuse("is not written as a version number");
    }
    match digits.parse::<u64>() {
        Ok(0) => refuse("is 0"),
        Ok(version) => Ok(Some(version)),
        Err(_) => refuse("is too large"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_model(root: &Path, name: &str, versions: &[u64], extra: &str) {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.toml"),
            format!(
                "{extra}\nname = \"{name}\"\nmax_batch_size = 4\n[[input]]\nname = \"x\"\ndatatype = \"FP32\"\nshape = [2]\n[[output]]\nname = \"y\"\ndatatype = \"FP32\"\nshape = [2]\n"
            ),
        )
        .unwrap();
        for v in versions {
            std::fs::create_dir_all(dir.join(v.to_string())).unwrap();
            std::fs::write(dir.join(v.to_string()).join("model.onnx"), b"onnx").unwrap();
        }
    }

    #[test]
    fn latest_version_by_default_and_policies() {
        let root = tempfile::tempdir().unwrap();
        write_model(root.path(), "a", &[1, 3, 2], "");
        write_model(root.path(), "b", &[1, 2], "version_policy = \"all\"");
        std::fs::create_dir_all(root.path().join("train")).unwrap();
        let repo = ModelRepository::scan(root.path()).unwrap();
        let found: Vec<(String, u64)> = repo
            .versions
            .iter()
            .map(|v| (v.config.name.clone(), v.version))
            .collect();
        assert_eq!(
            found,
            vec![("a".into(), 3), ("b".into(), 1), ("b".into(), 2)]
        );
    }

    #[test]
    fn errors_name_the_file_and_problem() {
        let root = tempfile::tempdir().unwrap();
        write_model(root.path(), "a", &[1], "version_policy = [1, 5]");
        let error = ModelRepository::scan(root.path()).unwrap_err().to_string();
        assert!(error.contains("config.toml"), "{error}");
        assert!(error.contains("version 5"), "{error}");

        let root = tempfile::tempdir().unwrap();
        write_model(root.path(), "a", &[], "");
        let error = ModelRepository::scan(root.path()).unwrap_err().to_string();
        assert!(error.contains("no versions"), "{error}");

        let root = tempfile::tempdir().unwrap();
        write_model(root.path(), "a", &[1, 2], "");
        std::fs::remove_file(root.path().join("a/2/model.onnx")).unwrap();
        let error = ModelRepository::scan(root.path()).unwrap_err().to_string();
        assert!(
            error.contains("version folder") && error.contains("has no model.onnx"),
            "{error}"
        );

        let root = tempfile::tempdir().unwrap();
        write_model(root.path(), "a", &[1], "labels = \"labels.txt\"");
        std::fs::write(root.path().join("a/labels.txt"), "x\ny\nz\n").unwrap();
        let error = ModelRepository::scan(root.path()).unwrap_err().to_string();
        assert!(error.contains("holds 3 labels"), "{error}");
        std::fs::write(root.path().join("a/labels.txt"), "x\ny\n").unwrap();
        assert!(ModelRepository::scan(root.path()).is_ok());

        let root = tempfile::tempdir().unwrap();
        write_model(root.path(), "a", &[1], "labels = \"missing.txt\"");
        let error = ModelRepository::scan(root.path()).unwrap_err().to_string();
        assert!(error.contains("missing.txt"), "{error}");

        let root = tempfile::tempdir().unwrap();
        write_model(root.path(), "a", &[], "");
        std::fs::create_dir(root.path().join("a/v1")).unwrap();
        let error = ModelRepository::scan(root.path()).unwrap_err().to_string();
        assert!(
            error.contains("not named by a version number: v1"),
            "{error}"
        );
        // Names that read as a number but are no version would alias another or be dropped.
        for name in ["02", "+2", "0", "99999999999999999999"] {
            let root = tempfile::tempdir().unwrap();
            write_model(root.path(), "a", &[1], "");
            std::fs::create_dir(root.path().join("a").join(name)).unwrap();
            let error = ModelRepository::scan(root.path()).unwrap_err().to_string();
            assert!(error.contains(&format!("\"{name}\"")), "{name}: {error}");
        }

        // Every model's problem at once.
        let root = tempfile::tempdir().unwrap();
        write_model(root.path(), "a", &[], "");
        write_model(root.path(), "b", &[1], "version_policy = [3]");
        let error = ModelRepository::scan(root.path()).unwrap_err().to_string();
        assert!(
            error.starts_with("2 models have problems")
                && error.contains("no versions")
                && error.contains("version 3"),
            "{error}"
        );

        let root = tempfile::tempdir().unwrap();
        write_model(root.path(), "stats", &[1], "");
        let error = ModelRepository::scan(root.path()).unwrap_err().to_string();
        assert!(error.contains("cannot be named \"stats\""), "{error}");

        let empty = tempfile::tempdir().unwrap();
        assert!(ModelRepository::scan(empty.path()).is_err());
    }
}
