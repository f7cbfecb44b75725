//! `<model>/config.toml`: what a model takes and returns, how it is batched and where it runs.
//! Parsed strictly (unknown keys are errors) so a typo fails at start instead of being ignored.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::runtime::RuntimeError;
use crate::tensor::DataType;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    #[serde(default = "default_platform")]
    pub platform: String,
    /// Largest batch the batcher forms; 0 disables batching (shapes are then taken whole).
    #[serde(default)]
    pub max_batch_size: usize,
    /// File beside config.toml with one label per line, indexed by class.
    #[serde(default)]
    pub labels: Option<String>,
    #[serde(default)]
    pub version_policy: VersionPolicy,
    #[serde(rename = "input")]
    pub inputs: Vec<TensorSpec>,
    #[serde(rename = "output")]
    pub outputs: Vec<TensorSpec>,
    #[serde(default)]
    pub dynamic_batching: DynamicBatching,
    #[serde(default)]
    pub instance_group: InstanceGroup,
    #[serde(default)]
    pub runtime: RuntimeOptions,
    /// Free-form parameters of the pipeline that feeds this model (read by the domain modules).
    #[serde(default)]
    pub preprocessing: Option<toml::Table>,
    /// Figures the model reached on held-out data (documentation; served in the metadata).
    #[serde(default)]
    pub metrics: Option<toml::Table>,
    #[serde(default)]
    pub calibration: Option<toml::Table>,
}

fn default_platform() -> String {
    "onnxruntime".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    /// Dimensions without the batch dimension when `max_batch_size > 0`; -1 = any size.
    pub shape: Vec<i64>,
}

impl TensorSpec {
    /// A concrete shape for `rows` batch rows (ignored without batching); variable dimensions
    /// become 1.
    pub fn concrete_shape(&self, batching: bool, rows: usize) -> Vec<usize> {
        let mut dims = Vec::with_capacity(self.shape.len() + 1);
        if batching {
            dims.push(rows);
        }
        dims.extend(self.shape.iter().map(|d| (*d).max(1) as usize));
        dims
    }

    /// The dimensions the model sees, batch dimension included (as -1) when batching.
    pub fn full_shape(&self, batching: bool) -> Vec<i64> {
        let mut dims = Vec::with_capacity(self.shape.len() + 1);
        if batching {
            dims.push(-1);
        }
        dims.extend_from_slice(&self.shape);
        dims
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(
    untagged,
    expecting = "\"latest\", \"all\" or a list of version numbers such as [1, 3]"
)]
pub enum VersionPolicy {
    /// "latest" (the default) or "all".
    Named(NamedPolicy),
    /// Only these versions.
    Specific(Vec<u64>),
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Named(NamedPolicy::Latest)
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum NamedPolicy {
    Latest,
    All,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DynamicBatching {
    /// How long the first request of a batch waits for company (default 0, as in Triton: a
    /// batch takes what is already waiting and runs).
    pub max_queue_delay_us: u64,
    /// A forming batch also closes once no request has arrived for this long, so a batch that
    /// has gathered everything in flight does not sit out the rest of `max_queue_delay_us`
    /// (0: off; with one session the whole delay is then waited, as in Triton).
    pub max_arrival_gap_us: u64,
    /// Requests waiting per model version; beyond it requests get 503 + Retry-After.
    pub max_queue_size: usize,
    /// Deadline of a request that does not set its own `timeout` parameter.
    pub default_timeout_ms: u64,
}

impl Default for DynamicBatching {
    fn default() -> Self {
        DynamicBatching {
            max_queue_delay_us: 0,
            max_arrival_gap_us: 0,
            max_queue_size: 1024,
            default_timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InstanceGroup {
    /// Sessions (each owned by one worker thread) per model version.
    pub count: usize,
    /// Intra-op threads per session.
    pub threads: usize,
}

impl Default for InstanceGroup {
    fn default() -> Self {
        InstanceGroup {
            count: 1,
            threads: 1,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeOptions {
    /// In order of preference: "tensorrt", "cuda", "cpu", or ["auto"].
    pub execution_providers: Vec<String>,
    pub tensorrt_fp16: bool,
    /// Where TensorRT keeps built engines (relative to the model directory when not absolute).
    pub tensorrt_engine_cache: Option<PathBuf>,
    pub cuda_device: i32,
    /// How the CUDA provider picks each convolution's cuDNN algorithm.
    pub cudnn_conv_algo_search: ConvAlgoSearch,
    /// On the CUDA or TensorRT provider, pad every batch with zero rows to `max_batch_size`,
    /// so the graph only ever sees one shape: ONNX Runtime's CUDA convolutions plan again
    /// whenever the input shape changes, which costs far more than the padded rows.
    pub gpu_pad_to_max_batch: bool,
}

/// ONNX Runtime's `cudnn_conv_algo_search`, by its own names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvAlgoSearch {
    /// cuDNN's heuristics: no timing runs. The default, because the batcher forms batches of
    /// every size and an exhaustive search times every algorithm again for each new shape.
    #[default]
    Heuristic,
    /// Time every algorithm for each input shape (ONNX Runtime's own default): best for a
    /// model that always runs one batch size.
    Exhaustive,
    /// cuDNN's fallback choice, with no search at all.
    Default,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            execution_providers: vec!["auto".into()],
            tensorrt_fp16: true,
            tensorrt_engine_cache: None,
            cuda_device: 0,
            cudnn_conv_algo_search: ConvAlgoSearch::default(),
            gpu_pad_to_max_batch: false,
        }
    }
}

/// Upper bound on the batch the server accepts so a config cannot make warm-up or buffers unbounded.
pub const MAX_BATCH_LIMIT: usize = 65_536;

/// Upper bound on `max_queue_size`: the queue's slots are allocated at load (about 200 bytes
/// each, so this is some 200 MB).
pub const MAX_QUEUE_LIMIT: usize = 1 << 20;

/// Upper bound on the values of one tensor in a full batch (variable dimensions counted as 1),
/// which warm-up allocates: 2^28 values are 1 GiB of FP32.
pub const MAX_BATCH_VALUES: u64 = 1 << 28;

/// Upper bound on `default_timeout_ms`: a day.
pub const MAX_TIMEOUT_MS: u64 = 86_400_000;

impl ModelConfig {
    pub fn load(path: &Path) -> Result<ModelConfig, RuntimeError> {
        let text = std::fs::read_to_string(path).map_err(|e| RuntimeError::Config {
            path: path.to_path_buf(),
            problem: format!("cannot read: {e}"),
        })?;
        let config: ModelConfig = toml::from_str(&text).map_err(|e| RuntimeError::Config {
            path: path.to_path_buf(),
            problem: e.to_string(),
        })?;
        config.validate().map_err(|problem| RuntimeError::Config {
            path: path.to_path_buf(),
            problem,
        })?;
        Ok(config)
    }

    pub fn batching(&self) -> bool {
        self.max_batch_size > 0
    }

    fn validate(&self) -> Result<(), String> {
        if self.platform != "onnxruntime" {
            return Err(format!(
                "platform \"{}\" is not supported (allowed: \"onnxruntime\")",
                self.platform
            ));
        }
        if self.max_batch_size > MAX_BATCH_LIMIT {
            return Err(format!(
                "max_batch_size {} is above the limit of {MAX_BATCH_LIMIT}",
                self.max_batch_size
            ));
        }
        if self.runtime.gpu_pad_to_max_batch && !self.batching() {
            return Err("gpu_pad_to_max_batch needs max_batch_size > 0 (batches to pad)".into());
        }
        if self.inputs.is_empty() || self.outputs.is_empty() {
            return Err("a model needs at least one [[input]] and one [[output]]".into());
        }
        for spec in self.inputs.iter().chain(&self.outputs) {
            if spec.name.is_empty() {
                return Err("tensor names must not be empty".into());
            }
            if let Some(bad) = spec.shape.iter().find(|d| **d < -1 || **d == 0) {
                return Err(format!(
                    "tensor \"{}\": dimension {bad} is invalid (use a positive size or -1 for any)",
                    spec.name
                ));
            }
            if !self.batching() && spec.shape.is_empty() {
                return Err(format!(
                    "tensor \"{}\": an empty shape needs max_batch_size > 0",
                    spec.name
                ));
            }
            let values = spec
                .shape
                .iter()
                .try_fold(self.max_batch_size.max(1) as u64, |n, d| {
                    n.checked_mul((*d).max(1) as u64)
                })
                .filter(|n| *n <= MAX_BATCH_VALUES);
            if values.is_none() {
                return Err(format!(
                    "tensor \"{}\": shape {:?} at max_batch_size {} holds more than \
                     {MAX_BATCH_VALUES} values per batch (the limit; variable dimensions count \
                     as 1): lower the shape or max_batch_size",
                    spec.name, spec.shape, self.max_batch_size
                ));
            }
        }
        let mut names: Vec<&str> = self
            .inputs
            .iter()
            .chain(&self.outputs)
            .map(|s| s.name.as_str())
            .collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("tensor name \"{}\" is used twice", pair[0]));
        }
        let batching = &self.dynamic_batching;
        if !(1..=MAX_QUEUE_LIMIT).contains(&batching.max_queue_size) {
            return Err(format!(
                "dynamic_batching.max_queue_size {} is outside 1..={MAX_QUEUE_LIMIT} (its slots \
                 are allocated at load)",
                batching.max_queue_size
            ));
        }
        if !(1..=MAX_TIMEOUT_MS).contains(&batching.default_timeout_ms) {
            return Err(format!(
                "dynamic_batching.default_timeout_ms {} is outside 1..={MAX_TIMEOUT_MS} (a \
                 request's deadline; 0 would fail every request)",
                batching.default_timeout_ms
            ));
        }
        if self.instance_group.count == 0 || self.instance_group.threads == 0 {
            return Err(
                "instance_group.count and instance_group.threads must be at least 1".into(),
            );
        }
        if self.runtime.execution_providers.is_empty() {
            return Err("runtime.execution_providers must name at least one provider".into());
        }
        crate::runtime::providers::ProviderKind::parse_list(&self.runtime.execution_providers)
            .map_err(|problem| format!("runtime.execution_providers: {problem}"))?;
        if let VersionPolicy::Specific(versions) = &self.version_policy {
            if versions.is_empty() {
                return Err("version_policy lists no versions".into());
            }
            let mut sorted = versions.clone();
            sorted.sort_unstable();
            if let Some(pair) = sorted.windows(2).find(|w| w[0] == w[1]) {
                return Err(format!("version_policy lists version {} twice", pair[0]));
            }
            if sorted[0] == 0 {
                return Err("version_policy lists version 0 (versions start at 1)".into());
            }
        }
        Ok(())
    }
}

/// Reads a free-form table of config.toml (`[preprocessing]`, `[calibration]`) into `T`, a struct
/// with `deny_unknown_fields` whose fields are the keys the server uses. `notes` are keys kept
/// for people (a recipe's name, figures) and may hold anything; any other key is an error, so a
/// typo does not silently leave a default in place.
pub fn read_table<T: serde::de::DeserializeOwned>(
    table: &toml::Table,
    notes: &[&str],
) -> Result<T, String> {
    let mut used = table.clone();
    for note in notes {
        used.remove(*note);
    }
    used.try_into().map_err(|e: toml::de::Error| {
        if notes.is_empty() {
            e.message().to_string()
        } else {
            format!("{} (besides the notes {})", e.message(), notes.join(", "))
        }
    })
}

/// Reads a labels file: one label per line, blank lines kept out.
pub fn read_labels(path: &Path) -> Result<Vec<String>, RuntimeError> {
    let text = std::fs::read_to_string(path).map_err(|e| RuntimeError::Config {
        path: path.to_path_buf(),
        problem: format!("cannot read labels: {e}"),
    })?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        name = "m"
        max_batch_size = 8
        [[input]]
        name = "x"
        datatype = "FP32"
        shape = [3, -1]
        [[output]]
        name = "y"
        datatype = "FP32"
        shape = [2]
    "#;

    fn parse(text: &str) -> Result<ModelConfig, String> {
        let config: ModelConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(
            config.version_policy,
            VersionPolicy::Named(NamedPolicy::Latest)
        );
        assert_eq!(config.dynamic_batching.max_queue_size, 1024);
        assert_eq!(
            config.dynamic_batching.max_arrival_gap_us, 0,
            "off unless set"
        );
        assert_eq!(config.runtime.execution_providers, vec!["auto"]);
        assert_eq!(config.inputs[0].full_shape(true), vec![-1, 3, -1]);
    }

    #[test]
    fn gpu_options_default_to_heuristic_search_without_padding() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(
            config.runtime.cudnn_conv_algo_search,
            ConvAlgoSearch::Heuristic
        );
        assert!(!config.runtime.gpu_pad_to_max_batch);
        let set = parse(&format!(
            "{MINIMAL}\n[runtime]\ncudnn_conv_algo_search = \"exhaustive\"\ngpu_pad_to_max_batch = true"
        ))
        .unwrap();
        assert_eq!(
            set.runtime.cudnn_conv_algo_search,
            ConvAlgoSearch::Exhaustive
        );
        assert!(set.runtime.gpu_pad_to_max_batch);
        let error = parse(&format!(
            "{MINIMAL}\n[runtime]\ncudnn_conv_algo_search = \"fastest\""
        ))
        .unwrap_err();
        assert!(
            error.contains("`heuristic`, `exhaustive`, `default`"),
            "{error}"
        );
        let unbatched = MINIMAL.replace("max_batch_size = 8", "max_batch_size = 0");
        let error = parse(&format!(
            "{unbatched}\n[runtime]\ngpu_pad_to_max_batch = true"
        ))
        .unwrap_err();
        assert!(error.contains("needs max_batch_size > 0"), "{error}");
    }

    #[test]
    fn version_policies_parse() {
        let all = parse(&format!("version_policy = \"all\"\n{MINIMAL}")).unwrap();
        assert_eq!(all.version_policy, VersionPolicy::Named(NamedPolicy::All));
        let some = parse(&format!("version_policy = [1, 3]\n{MINIMAL}")).unwrap();
        assert_eq!(some.version_policy, VersionPolicy::Specific(vec![1, 3]));
        let error = parse(&format!("version_policy = \"newest\"\n{MINIMAL}")).unwrap_err();
        assert!(error.contains("\"latest\", \"all\" or a list"), "{error}");
    }

    #[test]
    fn invalid_configs_say_what_is_wrong() {
        let bad_dim = MINIMAL.replace("[3, -1]", "[3, 0]");
        assert!(parse(&bad_dim).unwrap_err().contains("dimension 0"));
        let typo = MINIMAL.replace("max_batch_size", "max_batch");
        assert!(parse(&typo).unwrap_err().contains("max_batch"));
        let dtype = MINIMAL.replace("\"FP32\"\nshape = [3", "\"FLOAT\"\nshape = [3");
        let dtype = dtype.replacen("FP32", "FLOAT", 1);
        assert!(parse(&dtype).is_err());
        let dup = MINIMAL.replace("name = \"y\"", "name = \"x\"");
        assert!(parse(&dup).unwrap_err().contains("used twice"));
        let provider = format!("{MINIMAL}\n[runtime]\nexecution_providers = [\"tpu\"]");
        assert!(parse(&provider).unwrap_err().contains("tpu"));
    }

    #[test]
    fn limits_that_would_break_the_server_at_load_or_later_are_refused() {
        let with_batching = |line: &str| format!("{MINIMAL}\n[dynamic_batching]\n{line}");
        for (line, expected) in [
            ("default_timeout_ms = 0", "default_timeout_ms 0"),
            ("max_queue_size = 0", "max_queue_size 0"),
            ("max_queue_size = 100000000", "max_queue_size 100000000"),
        ] {
            let error = parse(&with_batching(line)).unwrap_err();
            assert!(error.contains(expected), "{line}: {error}");
        }
        assert!(parse(&with_batching("max_queue_size = 1048576")).is_ok());
        let huge = MINIMAL.replace("[3, -1]", "[1000000000000]");
        assert!(parse(&huge).unwrap_err().contains("values per batch"));
        let overflowing = MINIMAL.replace("[3, -1]", "[9223372036854775807, 9223372036854775807]");
        assert!(
            parse(&overflowing)
                .unwrap_err()
                .contains("values per batch")
        );
        for (policy, expected) in [("[1, 3, 1]", "twice"), ("[0]", "version 0")] {
            let error = parse(&format!("version_policy = {policy}\n{MINIMAL}")).unwrap_err();
            assert!(error.contains(expected), "{policy}: {error}");
        }
    }
}
