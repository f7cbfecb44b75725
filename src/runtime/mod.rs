//! ONNX Runtime through `ort`: finding the library, execution providers, the model repository
//! and the sessions that run batches.

pub mod device;
pub mod library;
pub mod model_config;
pub mod providers;
pub mod repository;
pub mod session;

use std::path::PathBuf;

pub use model_config::ModelConfig;
pub use repository::{ModelRepository, ModelVersionSpec};
pub use session::ModelSession;

/// Everything that can go wrong before a model serves: its files, its config, the library.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{path}: {problem}")]
    Config { path: PathBuf, problem: String },
    #[error("ONNX Runtime library: {0}")]
    Library(String),
    #[error("model {model} version {version}: {problem}")]
    Model {
        model: String,
        version: u64,
        problem: String,
    },
    #[error("execution provider {provider}: {problem}")]
    Provider { provider: String, problem: String },
    #[error("inference failed: {0}")]
    Inference(String),
    /// Several models' problems, found in one pass so a repository is fixed in one round.
    #[error("{} models have problems:\n{}", .0.len(), list(.0))]
    Several(Vec<RuntimeError>),
}

fn list(errors: &[RuntimeError]) -> String {
    errors
        .iter()
        .map(|e| format!("  - {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}
