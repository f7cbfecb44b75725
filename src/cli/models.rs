//! `linescan models list|check`.

use std::sync::Arc;

use crate::aoi::Inspector;
use crate::aoi::pipeline::DEFECT_MODEL;
use crate::config::ModelArgs;
use crate::engine::ModelRegistry;
use crate::metrics::Metrics;
use crate::preprocess::Preprocess;
use crate::preprocess::cpu::CpuPreprocessor;
use crate::runtime::ModelRepository;
use crate::sensors::{AssessSettings, SensorService};

pub fn list(args: &ModelArgs) -> anyhow::Result<()> {
    let repository = ModelRepository::scan(&args.model_repository)?;
    // What `serve` would use: the flags replace the configs' values.
    let options = args.load_options()?;
    for spec in &repository.versions {
        let config = &spec.config;
        let providers = match &options.providers {
            Some(kinds) => kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(","),
            None => config.runtime.execution_providers.join(","),
        };
        println!(
            "{} v{}  max_batch_size={}  providers={}  instances={}  threads={}  {}",
            config.name,
            spec.version,
            config.max_batch_size,
            providers,
            options.instances.unwrap_or(config.instance_group.count),
            options.threads.unwrap_or(config.instance_group.threads),
            spec.model_path.display()
        );
        for (kind, tensors) in [("in ", &config.inputs), ("out", &config.outputs)] {
            for t in tensors.iter() {
                println!(
                    "    {kind} {:<14} {:<5} {:?}",
                    t.name,
                    t.datatype.name(),
                    t.full_shape(config.batching())
                );
            }
        }
    }
    Ok(())
}

pub fn check(args: &ModelArgs) -> anyhow::Result<()> {
    let repository = ModelRepository::scan(&args.model_repository)?;
    let metrics = Arc::new(Metrics::new());
    let registry = ModelRegistry::load(&repository, &args.load_options()?, &metrics)?;
    let checked = check_domains(&registry, metrics);
    if let Err(error) = checked {
        registry.shutdown();
        return Err(error);
    }
    for model in registry.models() {
        println!(
            "ok  {} v{}  provider={}",
            model.name(),
            model.spec.version,
            model.provider_names()
        );
    }
    registry.shutdown();
    Ok(())
}

/// What `serve` checks once the models are in, beyond ONNX: the AOI classifier's tensors and
/// `[preprocessing]`, the sensor models' channels, scaling and outputs. A repository that
/// passes here is one `serve` accepts.
fn check_domains(registry: &ModelRegistry, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let cpu: Arc<dyn Preprocess> = Arc::new(CpuPreprocessor);
    if registry.get(DEFECT_MODEL, None).is_some() {
        Inspector::new(registry, metrics, u64::MAX, cpu.clone())?;
    }
    SensorService::open(registry, AssessSettings::default(), cpu)?;
    Ok(())
}
