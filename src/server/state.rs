//! What every handler shares: the models (once loaded), metrics and limits.

use std::sync::{Arc, OnceLock};

use crate::aoi::AoiService;
use crate::engine::{ModelRegistry, ServedModel};
use crate::jobs::Fleet;
use crate::metrics::Metrics;
use crate::server::body_memory::BodyMemory;
use crate::server::error::ApiError;

pub struct AppState {
    registry: OnceLock<Arc<ModelRegistry>>,
    aoi: OnceLock<Arc<AoiService>>,
    fleet: OnceLock<Arc<Fleet>>,
    pub metrics: Arc<Metrics>,
    pub max_body_bytes: usize,
    /// What the bodies of requests not yet answered hold together (`--max-body-memory`).
    pub body_memory: Arc<BodyMemory>,
    /// How long a request body may go without a byte (`--body-timeout`).
    pub body_stall_limit: std::time::Duration,
}

impl AppState {
    pub fn new(
        metrics: Arc<Metrics>,
        max_body_bytes: usize,
        max_body_memory: usize,
        body_stall_limit: std::time::Duration,
    ) -> AppState {
        AppState {
            registry: OnceLock::new(),
            aoi: OnceLock::new(),
            fleet: OnceLock::new(),
            metrics,
            max_body_bytes,
            body_memory: BodyMemory::new(max_body_memory),
            body_stall_limit,
        }
    }

    /// Marks the server ready; called once every model is loaded and warmed up.
    pub fn set_registry(&self, registry: Arc<ModelRegistry>) {
        let _ = self.registry.set(registry);
    }

    /// Set before the registry, so a ready server has its AOI service (when the model exists).
    pub fn set_aoi(&self, service: Arc<AoiService>) {
        let _ = self.aoi.set(service);
    }

    pub fn aoi(&self) -> Option<&Arc<AoiService>> {
        self.aoi.get()
    }

    /// Set before the registry, so a ready server has its sensor models and job queue (when the
    /// repository has a `rul_*` model).
    pub fn set_fleet(&self, fleet: Arc<Fleet>) {
        let _ = self.fleet.set(fleet);
    }

    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet.get()
    }

    pub fn ready(&self) -> bool {
        self.registry.get().is_some()
    }

    pub fn registry(&self) -> Result<&Arc<ModelRegistry>, ApiError> {
        self.registry.get().ok_or_else(ApiError::not_ready)
    }

    /// A model by name and optional version string, as found in a URL.
    pub fn model(&self, name: &str, version: Option<&str>) -> Result<Arc<ServedModel>, ApiError> {
        let registry = self.registry()?;
        let version = match version {
            None => None,
            Some(text) => Some(text.parse::<u64>().map_err(|_| {
                ApiError::NotFound(format!(
                    "version \"{text}\" of model {name} is not a version number"
                ))
            })?),
        };
        registry.get(name, version).ok_or_else(|| {
            let known: Vec<String> = registry
                .models()
                .map(|m| format!("{}/{}", m.name(), m.spec.version))
                .collect();
            ApiError::NotFound(match version {
                Some(v) => format!(
                    "model {name} version {v} is not loaded (loaded: {})",
                    known.join(", ")
                ),
                None => format!("model {name} is not loaded (loaded: {})", known.join(", ")),
            })
        })
    }
}
