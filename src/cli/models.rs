//! `linescan models list|check`.

use std::sync::Arc;

use crate::config::ModelArgs;
use crate::engine::ModelRegistry;
use crate::metrics::Metrics;
use crate::runtime::ModelRepository;

pub fn list(args: &ModelArgs) -> anyhow::Result<()> {
    let repository = ModelRepository::scan(&args.model_repository)?;
    for spec in &repository.versions {
        let config = &spec.config;
        println!(
            "{} v{}  max_batch_size={}  providers={}  {}",
            config.name,
            spec.version,
            config.max_batch_size,
            config.runtime.execution_providers.join(","),
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
    let registry =
        ModelRegistry::load(&repository, &args.load_options(), &Arc::new(Metrics::new()))?;
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
