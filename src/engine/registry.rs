//! Loaded models: sessions created, warmed up and handed to their batchers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use crate::engine::Batcher;
use crate::metrics::Metrics;
use crate::runtime::providers::{ProviderKind, ProviderPlan};
use crate::runtime::{ModelRepository, ModelSession, ModelVersionSpec, RuntimeError};

/// One model version ready to serve.
pub struct ServedModel {
    pub spec: ModelVersionSpec,
    pub batcher: Batcher,
    pub providers: Vec<ProviderKind>,
}

impl ServedModel {
    pub fn name(&self) -> &str {
        &self.spec.config.name
    }

    pub fn provider_names(&self) -> String {
        ProviderKind::label(&self.providers)
    }
}

/// Loading options that come from the command line rather than config.toml.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Replaces every model's execution provider preference.
    pub providers: Option<Vec<ProviderKind>>,
    /// Replaces every model's instance count.
    pub instances: Option<usize>,
    /// Replaces every model's intra-op threads per session.
    pub threads: Option<usize>,
}

#[derive(Default)]
pub struct ModelRegistry {
    models: BTreeMap<String, BTreeMap<u64, Arc<ServedModel>>>,
}

impl ModelRegistry {
    /// Creates every session of every selected version, warms it up and starts its batcher.
    pub fn load(
        repository: &ModelRepository,
        options: &LoadOptions,
        metrics: &Arc<Metrics>,
    ) -> Result<ModelRegistry, RuntimeError> {
        Self::load_until(repository, options, metrics, &|| false)
    }

    /// `load`, asking `stopped` before each session: once it answers true, what is left is not
    /// loaded (a version with only some of its sessions is dropped) and the registry holds the
    /// versions completed. A server stopped while it loads then waits for one session's
    /// warm-up, not for every model's.
    pub fn load_until(
        repository: &ModelRepository,
        options: &LoadOptions,
        metrics: &Arc<Metrics>,
        stopped: &dyn Fn() -> bool,
    ) -> Result<ModelRegistry, RuntimeError> {
        let mut models: BTreeMap<String, BTreeMap<u64, Arc<ServedModel>>> = BTreeMap::new();
        for (done, spec) in repository.versions.iter().enumerate() {
            let Some(served) = Self::load_version(spec, options, metrics, stopped)? else {
                tracing::info!(
                    loaded = done,
                    left = repository.versions.len() - done,
                    "stop requested: the model versions left are not loaded"
                );
                break;
            };
            models
                .entry(spec.config.name.clone())
                .or_default()
                .insert(spec.version, Arc::new(served));
        }
        Ok(ModelRegistry { models })
    }

    /// One version's sessions, warmed up, and its batcher; None when `stopped` says so first.
    fn load_version(
        spec: &ModelVersionSpec,
        options: &LoadOptions,
        metrics: &Arc<Metrics>,
        stopped: &dyn Fn() -> bool,
    ) -> Result<Option<ServedModel>, RuntimeError> {
        let started = Instant::now();
        let plan = ProviderPlan::new(
            &spec.config.runtime.execution_providers,
            options.providers.as_deref(),
        );
        let instances = options
            .instances
            .unwrap_or(spec.config.instance_group.count);
        let threads = options
            .threads
            .unwrap_or(spec.config.instance_group.threads);
        // The configuration as it runs, flags applied, is what the API shows.
        let mut running = (*spec.config).clone();
        running.instance_group.count = instances;
        running.instance_group.threads = threads;
        if let Some(kinds) = &options.providers {
            running.runtime.execution_providers =
                kinds.iter().map(|k| k.name().to_string()).collect();
        }
        let spec = &ModelVersionSpec {
            config: Arc::new(running),
            ..spec.clone()
        };
        let config = &spec.config;
        let mut sessions = Vec::with_capacity(instances);
        for _ in 0..instances {
            if stopped() {
                return Ok(None);
            }
            let mut session = ModelSession::load(spec, &plan, threads)?;
            session.warm_up()?;
            sessions.push(session);
        }
        let providers = sessions[0].providers().to_vec();
        let provider_label = ProviderKind::label(&providers);
        tracing::info!(
            model = %config.name,
            version = spec.version,
            providers = %provider_label,
            instances,
            threads,
            max_batch_size = config.max_batch_size,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "model loaded and warmed up"
        );
        metrics
            .model_info
            .with_label_values(&[&config.name, &spec.version.to_string(), &provider_label])
            .set(1);
        Ok(Some(ServedModel {
            spec: spec.clone(),
            batcher: Batcher::start(config.clone(), spec.version, sessions, metrics.clone()),
            providers,
        }))
    }

    /// A specific version, or the latest loaded one.
    pub fn get(&self, name: &str, version: Option<u64>) -> Option<Arc<ServedModel>> {
        let versions = self.models.get(name)?;
        match version {
            Some(v) => versions.get(&v).cloned(),
            None => versions.values().next_back().cloned(),
        }
    }

    pub fn models(&self) -> impl Iterator<Item = &Arc<ServedModel>> {
        self.models.values().flat_map(|v| v.values())
    }

    /// Every batcher runs its batches without waiting for company from now on (the server is
    /// stopping).
    pub fn begin_drain(&self) {
        for model in self.models() {
            model.batcher.begin_drain();
        }
    }

    /// Drains every queue and stops the workers.
    pub fn shutdown(&self) {
        for model in self.models() {
            model.batcher.shutdown();
        }
    }
}
