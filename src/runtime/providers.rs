//! Execution providers: which ones a model asks for, which the loaded ONNX Runtime has, and
//! registration that fails loudly instead of quietly running on the CPU.

use std::fmt;

use ort::ep::{self, ExecutionProvider, ExecutionProviderDispatch};

use crate::runtime::RuntimeError;
use crate::runtime::model_config::{ConvAlgoSearch, ModelConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    Auto,
    TensorRt,
    Cuda,
    Cpu,
}

impl ProviderKind {
    /// Providers in order of preference as one label, e.g. `tensorrt+cuda+cpu`.
    pub fn label(providers: &[ProviderKind]) -> String {
        providers
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join("+")
    }

    pub fn parse(name: &str) -> Result<ProviderKind, String> {
        match name {
            "auto" => Ok(ProviderKind::Auto),
            "tensorrt" => Ok(ProviderKind::TensorRt),
            "cuda" => Ok(ProviderKind::Cuda),
            "cpu" => Ok(ProviderKind::Cpu),
            other => Err(format!(
                "execution provider \"{other}\" is unknown (allowed: auto, tensorrt, cuda, cpu)"
            )),
        }
    }

    /// A config's provider list: known names, and a list `check_list` accepts.
    pub fn parse_list(names: &[String]) -> Result<Vec<ProviderKind>, String> {
        let kinds = names
            .iter()
            .map(|name| ProviderKind::parse(name))
            .collect::<Result<Vec<_>, _>>()?;
        ProviderKind::check_list(&kinds)?;
        Ok(kinds)
    }

    /// A config's or flag's provider list: none twice, and "auto" alone (it already tries
    /// every provider in turn).
    pub fn check_list(kinds: &[ProviderKind]) -> Result<(), String> {
        if kinds.len() > 1 && kinds.contains(&ProviderKind::Auto) {
            let names: Vec<&str> = kinds.iter().map(|kind| kind.name()).collect();
            return Err(format!(
                "\"auto\" cannot be combined with other providers (got {}): it tries tensorrt, \
                 cuda, then cpu by itself",
                names.join(",")
            ));
        }
        if let Some(twice) = kinds
            .iter()
            .enumerate()
            .find_map(|(i, kind)| kinds[..i].contains(kind).then_some(kind))
        {
            return Err(format!("provider {twice} is listed twice"));
        }
        Ok(())
    }

    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::Auto => "auto",
            ProviderKind::TensorRt => "tensorrt",
            ProviderKind::Cuda => "cuda",
            ProviderKind::Cpu => "cpu",
        }
    }

    /// Whether the loaded ONNX Runtime library was built with this provider.
    pub fn compiled_in(self) -> bool {
        let available = match self {
            ProviderKind::TensorRt => ep::TensorRT::is_available(),
            ProviderKind::Cuda => ep::CUDA::is_available(),
            ProviderKind::Cpu | ProviderKind::Auto => Ok(true),
        };
        available.unwrap_or(false)
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a session picks its providers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderPlan {
    /// Best available first (TensorRT, CUDA, CPU), each tried alone; the one that loads is logged.
    Auto,
    /// Exactly these, registered together; one that cannot load is an error, not a CPU fallback.
    Strict(Vec<ProviderKind>),
}

impl ProviderPlan {
    /// From the model's preference, unless the command line overrides it.
    pub fn new(preference: &[String], overridden: Option<&[ProviderKind]>) -> ProviderPlan {
        let kinds: Vec<ProviderKind> = match overridden {
            Some(kinds) => kinds.to_vec(),
            None => preference
                .iter()
                .filter_map(|p| ProviderKind::parse(p).ok())
                .collect(),
        };
        if kinds.contains(&ProviderKind::Auto) {
            ProviderPlan::Auto
        } else {
            ProviderPlan::Strict(kinds)
        }
    }

    /// The provider chains to try, in order.
    pub fn attempts(&self) -> Vec<Vec<ProviderKind>> {
        match self {
            ProviderPlan::Auto => [ProviderKind::TensorRt, ProviderKind::Cuda]
                .into_iter()
                .filter(|k| {
                    let present = k.compiled_in();
                    if !present {
                        tracing::debug!(provider = %k, reason = NOT_COMPILED_IN, "auto skips a provider");
                    }
                    present
                })
                .map(|k| vec![k])
                .chain([vec![ProviderKind::Cpu]])
                .collect(),
            ProviderPlan::Strict(kinds) => vec![kinds.clone()],
        }
    }
}

/// Why a GPU provider cannot be used with the library that was loaded.
const NOT_COMPILED_IN: &str = "the loaded ONNX Runtime library was built without it (the CPU \
                               package `onnxruntime` has only cpu; use `onnxruntime-gpu` for \
                               cuda/tensorrt)";

/// Settings a provider needs from the model (engine cache, profiles, device).
pub struct ProviderSettings<'a> {
    pub config: &'a ModelConfig,
    pub engine_cache: std::path::PathBuf,
    pub max_batch: usize,
}

/// Builds the strict registration for one provider; CPU needs none.
pub fn dispatch(
    kind: ProviderKind,
    settings: &ProviderSettings<'_>,
) -> Result<Option<ExecutionProviderDispatch>, RuntimeError> {
    if !kind.compiled_in() {
        return Err(RuntimeError::Provider {
            provider: kind.name().into(),
            problem: NOT_COMPILED_IN.into(),
        });
    }
    let runtime = &settings.config.runtime;
    let dispatch = match kind {
        ProviderKind::TensorRt => {
            let mut tensorrt = ep::TensorRT::default()
                .with_device_id(runtime.cuda_device)
                .with_fp16(runtime.tensorrt_fp16)
                .with_engine_cache(true)
                .with_engine_cache_path(settings.engine_cache.display())
                .with_timing_cache(true);
            match tensorrt_profiles(settings.config, settings.max_batch) {
                Some((min, opt, max)) => {
                    tensorrt = tensorrt
                        .with_profile_min_shapes(min)
                        .with_profile_opt_shapes(opt)
                        .with_profile_max_shapes(max);
                }
                None => tracing::warn!(
                    model = %settings.config.name,
                    "an input has a variable dimension besides the batch: TensorRT builds its \
                     engine for the shapes it has seen and rebuilds it when a request falls \
                     outside them"
                ),
            }
            Some(tensorrt.build().error_on_failure())
        }
        ProviderKind::Cuda => Some(
            ep::CUDA::default()
                .with_device_id(runtime.cuda_device)
                .with_conv_algorithm_search(match runtime.cudnn_conv_algo_search {
                    ConvAlgoSearch::Heuristic => ep::cuda::ConvAlgorithmSearch::Heuristic,
                    ConvAlgoSearch::Exhaustive => ep::cuda::ConvAlgorithmSearch::Exhaustive,
                    ConvAlgoSearch::Default => ep::cuda::ConvAlgorithmSearch::Default,
                })
                .build()
                .error_on_failure(),
        ),
        ProviderKind::Cpu | ProviderKind::Auto => None,
    };
    Ok(dispatch)
}

/// TensorRT optimisation profiles covering every batch the batcher forms: `name:1xAxB` …
/// None when an input has a variable dimension besides the batch: its range is unknown, and a
/// profile pinning it would refuse every other size.
fn tensorrt_profiles(config: &ModelConfig, max_batch: usize) -> Option<(String, String, String)> {
    if config
        .inputs
        .iter()
        .any(|input| input.shape.iter().any(|d| *d < 0))
    {
        return None;
    }
    let profile = |batch: usize| {
        config
            .inputs
            .iter()
            .map(|input| {
                let mut dims = Vec::new();
                if config.batching() {
                    dims.push(batch.to_string());
                }
                dims.extend(input.shape.iter().map(|d| d.to_string()));
                format!("{}:{}", input.name, dims.join("x"))
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    Some((profile(1), profile(max_batch), profile(max_batch)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_follow_preference_and_override() {
        assert_eq!(
            ProviderPlan::new(&["auto".into()], None),
            ProviderPlan::Auto
        );
        assert_eq!(
            ProviderPlan::new(&["auto".into()], Some(&[ProviderKind::Cpu])),
            ProviderPlan::Strict(vec![ProviderKind::Cpu])
        );
        assert_eq!(
            ProviderPlan::new(&["cuda".into(), "cpu".into()], None),
            ProviderPlan::Strict(vec![ProviderKind::Cuda, ProviderKind::Cpu])
        );
    }

    #[test]
    fn tensorrt_profiles_span_batch_sizes() {
        let mut config: ModelConfig = toml::from_str(
            r#"
            name = "m"
            max_batch_size = 16
            [[input]]
            name = "crops"
            datatype = "FP32"
            shape = [2, 64, 64]
            [[output]]
            name = "p"
            datatype = "FP32"
            shape = [7]
            "#,
        )
        .unwrap();
        let (min, opt, max) = tensorrt_profiles(&config, 16).unwrap();
        assert_eq!(min, "crops:1x2x64x64");
        assert_eq!(opt, "crops:16x2x64x64");
        assert_eq!(max, opt);
        config.inputs[0].shape = vec![2, -1, 64];
        assert_eq!(tensorrt_profiles(&config, 16), None);
    }
}
