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
        let mut model_dirs: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("config.toml").is_file())
            .collect();
        model_dirs.sort();
        if model_dirs.is_empty() {
            return Err(not_found(
                "no models: expected <model>/config.toml and <model>/<version>/model.onnx".into(),
            ));
        }
        let mut versions = Vec::new();
        for dir in model_dirs {
            versions.extend(Self::scan_model(&dir)?);
        }
        Ok(ModelRepository { versions })
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
        // Labels name the classes of an output: one of them must have that many.
        if let Some(labels) = &labels {
            let count = labels.len() as i64;
            if !config
                .outputs
                .iter()
                .any(|o| o.shape.last() == Some(&count))
            {
                let widths: Vec<String> = config
                    .outputs
                    .iter()
                    .map(|o| format!("{} {:?}", o.name, o.shape))
                    .collect();
                return Err(problem(format!(
                    "the labels file holds {count} labels but no output has {count} classes in \
                     its last dimension (outputs: {})",
                    widths.join(", ")
                )));
            }
        }
        // Every numbered folder is a version; one without its model is an error, not a
        // version quietly left out (which would move "latest" to an older one).
        let mut available: Vec<u64> = Vec::new();
        for entry in std::fs::read_dir(dir)
            .map_err(|e| problem(format!("cannot list versions: {e}")))?
            .flatten()
        {
            let Some(version) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if !entry.path().is_dir() {
                continue;
            }
            if !entry.path().join("model.onnx").is_file() {
                return Err(problem(format!(
                    "version folder {} has no model.onnx",
                    entry.path().display()
                )));
            }
            available.push(version);
        }
        available.sort_unstable();
        if available.is_empty() {
            return Err(problem(format!(
                "no versions: expected {}/<version>/model.onnx",
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
        assert!(
            error.contains("holds 3 labels but no output has 3"),
            "{error}"
        );
        std::fs::write(root.path().join("a/labels.txt"), "x\ny\n").unwrap();
        assert!(ModelRepository::scan(root.path()).is_ok());

        let root = tempfile::tempdir().unwrap();
        write_model(root.path(), "a", &[1], "labels = \"missing.txt\"");
        let error = ModelRepository::scan(root.path()).unwrap_err().to_string();
        assert!(error.contains("missing.txt"), "{error}");

        let root = tempfile::tempdir().unwrap();
        write_model(root.path(), "stats", &[1], "");
        let error = ModelRepository::scan(root.path()).unwrap_err().to_string();
        assert!(error.contains("cannot be named \"stats\""), "{error}");

        let empty = tempfile::tempdir().unwrap();
        assert!(ModelRepository::scan(empty.path()).is_err());
    }
}
