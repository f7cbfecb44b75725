//! Sensors: remaining useful life with an uncertainty, an anomaly score and a health index from
//! windows of sensor readings.
//!
//! One concern per module: `params` (what the models' config.toml say), `channels` (matching
//! columns by name), `window` (scaling, windowing, the padding policy), `assess` (risk, anomaly
//! score, health), `scorer` (the two models through their batchers), `live` (JSON windows of the
//! HTTP API). Archives and jobs live in `crate::jobs`.
//!
//! A RUL model `rul_<name>` is paired with the anomaly model `anomaly_<name>` when the repository
//! has it (same window, channels and scaling); without one, anomaly is absent and health comes
//! from RUL alone.

pub mod assess;
pub mod channels;
pub mod live;
pub mod params;
pub mod scorer;
pub mod window;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use assess::{AssessSettings, Risk};
pub use scorer::{Assessment, Scores, SensorModel};

use crate::engine::{InferError, ModelRegistry};

/// Prefix of the models the sensor API serves.
pub const RUL_PREFIX: &str = "rul_";
/// Prefix of the anomaly model paired with `rul_<name>`.
pub const ANOMALY_PREFIX: &str = "anomaly_";

#[derive(Debug, thiserror::Error)]
pub enum SensorError {
    /// The model repository cannot serve sensors as configured.
    #[error("{0}")]
    Setup(String),
    /// The body is not JSON at all.
    #[error("{0}")]
    Syntax(String),
    /// Well-formed input that cannot be scored (names what is wrong).
    #[error("{0}")]
    Invalid(String),
    /// More windows than one request may hold.
    #[error("{0}")]
    TooMany(String),
    #[error(transparent)]
    Infer(#[from] InferError),
}

/// Every RUL model of the repository, ready to score.
pub struct SensorService {
    models: BTreeMap<String, Arc<SensorModel>>,
    pub settings: AssessSettings,
    /// Backend of the archive jobs' scaling stage.
    pub preprocess: Arc<dyn crate::preprocess::Preprocess>,
}

impl SensorService {
    /// Opens every `rul_*` model of the registry; None when there is none.
    pub fn open(
        registry: &ModelRegistry,
        settings: AssessSettings,
        preprocess: Arc<dyn crate::preprocess::Preprocess>,
    ) -> Result<Option<SensorService>, SensorError> {
        settings.validate().map_err(SensorError::Setup)?;
        let mut models = BTreeMap::new();
        for served in registry.models() {
            let name = served.name();
            if name.starts_with(RUL_PREFIX) && !models.contains_key(name) {
                let model = SensorModel::open(registry, name)?;
                models.insert(name.to_string(), Arc::new(model));
            }
        }
        Ok((!models.is_empty()).then_some(SensorService {
            models,
            settings,
            preprocess,
        }))
    }

    pub fn model(&self, name: &str) -> Option<&Arc<SensorModel>> {
        self.models.get(name)
    }

    pub fn names(&self) -> Vec<String> {
        self.models.keys().cloned().collect()
    }
}
